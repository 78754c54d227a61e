//! The `capture` section of the proxy config: the `crank-capture install`
//! flags it stands for (so `crank-proxy capture install --config FILE`
//! writes the rules the listeners expect), its validation, and the
//! addresses the capture listeners bind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crank_api::proxy::CaptureConfig;

/// The `crank-capture install` flags of a capture section.
pub fn install_flags(c: &CaptureConfig) -> Vec<String> {
    let mut f = vec![
        "--proxy-uid".to_string(),
        c.proxy_uid.to_string(),
        "--outbound-port".into(),
        c.outbound_port.to_string(),
    ];
    if let Some(ports) = &c.inbound_ports {
        f.extend([
            "--inbound-port".into(),
            c.inbound_port.to_string(),
            "--inbound-ports".into(),
            ports.0.clone(),
        ]);
    }
    let mut pair = |flag: &str, value: String| {
        if !value.trim().is_empty() {
            f.extend([flag.to_string(), value]);
        }
    };
    pair("--exclude-inbound-ports", c.exclude_inbound_ports.0.clone());
    pair(
        "--exclude-outbound-ports",
        c.exclude_outbound_ports.0.clone(),
    );
    pair(
        "--exclude-outbound-cidrs",
        c.exclude_outbound_cidrs.join(","),
    );
    pair("--backend", c.backend.clone());
    if c.ipv6 {
        f.push("--ipv6".into());
    }
    f
}

/// The flag names as the config names them, for error messages.
const FIELDS: [(&str, &str); 9] = [
    ("--exclude-inbound-ports", "capture.exclude_inbound_ports"),
    ("--exclude-outbound-ports", "capture.exclude_outbound_ports"),
    ("--exclude-outbound-cidrs", "capture.exclude_outbound_cidrs"),
    ("--inbound-ports", "capture.inbound_ports"),
    ("--inbound-port", "capture.inbound_port"),
    ("--outbound-port", "capture.outbound_port"),
    ("--proxy-uid", "capture.proxy_uid"),
    ("--backend", "capture.backend"),
    ("--ipv6", "capture.ipv6"),
];

/// The capture rules this section stands for, or why it cannot.
pub fn rules(c: &CaptureConfig) -> Result<crank_capture::CaptureConfig, String> {
    use clap::Parser;
    let argv = ["crank-proxy capture", "install"]
        .into_iter()
        .map(String::from)
        .chain(install_flags(c));
    let cli = crank_capture::cli::Cli::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        text.lines().next().unwrap_or_default().to_string()
    });
    let cli = cli.map_err(|e| in_fields(&e))?;
    match cli.command {
        crank_capture::cli::Cmd::Install(args) => {
            args.config().map_err(|e| in_fields(&e.to_string()))
        }
        _ => Err("not an install".into()),
    }
}

fn in_fields(message: &str) -> String {
    FIELDS.iter().fold(message.to_string(), |m, (flag, field)| {
        m.replace(flag, field)
    })
}

/// Every problem of a capture section, `(field, message)`.
pub fn problems(c: &CaptureConfig) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if let Err(e) = rules(c) {
        p.push((
            "capture".to_string(),
            format!("{e}; see docs/reference/capture.md"),
        ));
    }
    let t = c.detect_timeout;
    if t < Duration::from_millis(10) || t > Duration::from_secs(60) {
        p.push((
            "capture.detect_timeout".into(),
            format!("{t:?} is out of range; use 10ms to 60s (default 1s)"),
        ));
    }
    if c.server_speaks_first.contains(&0) {
        p.push((
            "capture.server_speaks_first".into(),
            "port 0 is not a port; list the destination ports whose server talks first (25, 3306, ...)".into(),
        ));
    }
    p
}

/// Why the proxy must not start with capture listeners as `euid`: the
/// rules exempt only `capture.proxy_uid` from redirection, so under any
/// other uid the proxy's own upstream connects would be captured again,
/// a redirect loop.
pub fn uid_problem(c: &CaptureConfig, euid: u32) -> Option<String> {
    (c.proxy_uid != euid).then(|| {
        format!(
            "capture.proxy_uid is {} but crank-proxy runs as uid {euid}: the capture rules exempt only uid {} from redirection, so this proxy's own connections would be captured again (a redirect loop); run crank-proxy as uid {} (User= in the unit, runAsUser in the pod) or set capture.proxy_uid: {euid} and reinstall the rules (crank-proxy capture install --config FILE)",
            c.proxy_uid, c.proxy_uid, c.proxy_uid
        )
    })
}

/// The outbound capture listener's addresses: loopback, where the rules
/// send the app's connects.
pub fn outbound_addrs(c: &CaptureConfig) -> Vec<SocketAddr> {
    let mut a = vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), c.outbound_port)];
    if c.ipv6 {
        a.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), c.outbound_port));
    }
    a
}

/// The inbound capture listener's addresses (every address: the rules
/// redirect connections to this host's own addresses), when inbound
/// capture is on.
pub fn inbound_addrs(c: &CaptureConfig) -> Vec<SocketAddr> {
    if c.inbound_ports.is_none() {
        return Vec::new();
    }
    let mut a = vec![SocketAddr::new(
        IpAddr::from(Ipv4Addr::UNSPECIFIED),
        c.inbound_port,
    )];
    if c.ipv6 {
        a.push(SocketAddr::new(
            Ipv6Addr::UNSPECIFIED.into(),
            c.inbound_port,
        ));
    }
    a
}

/// The capture listeners with their config field, for the bind check.
pub fn listen_addrs(c: &CaptureConfig) -> Vec<(String, SocketAddr)> {
    let out = outbound_addrs(c)
        .into_iter()
        .map(|a| ("capture.outbound_port".to_string(), a));
    let inb = inbound_addrs(c)
        .into_iter()
        .map(|a| ("capture.inbound_port".to_string(), a));
    out.chain(inb).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> CaptureConfig {
        let text = format!(
            "identity: {{cert: a, key: b, trust_bundle: c}}\nadmin: {{listen: 127.0.0.1:1}}\ncapture:\n{yaml}"
        );
        crate::config::parse("p.yaml", &text)
            .unwrap()
            .capture
            .unwrap()
    }

    #[test]
    fn defaults_and_flags() {
        let c = section("  proxy_uid: 65534\n");
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.detect_timeout, Duration::from_secs(1));
        assert!(c.server_speaks_first.contains(&25) && c.server_speaks_first.contains(&3306));
        assert_eq!(
            install_flags(&c),
            [
                "--proxy-uid",
                "65534",
                "--outbound-port",
                "15001",
                "--backend",
                "auto"
            ]
        );
        assert!(inbound_addrs(&c).is_empty());
        assert!(problems(&c).is_empty());
        let r = rules(&c).unwrap();
        assert_eq!(
            (r.proxy_uid, r.outbound_port, r.inbound),
            (65534, 15001, None)
        );
    }

    #[test]
    fn the_proxy_must_run_as_the_uid_the_rules_exempt() {
        let c = section("  proxy_uid: 1337\n");
        assert_eq!(uid_problem(&c, 1337), None);
        let e = uid_problem(&c, 0).unwrap();
        assert!(
            e.contains("capture.proxy_uid is 1337 but crank-proxy runs as uid 0"),
            "{e}"
        );
        assert!(
            e.contains("redirect loop") && e.contains("run crank-proxy as uid 1337"),
            "{e}"
        );
    }

    #[test]
    fn lists_take_numbers_strings_and_sequences() {
        let c = section(
            "  proxy_uid: 1337\n  inbound_ports: 8080\n  exclude_outbound_ports: [22, '8000-8100']\n  exclude_outbound_cidrs: [169.254.169.254, 10.0.0.0/8]\n  ipv6: true\n",
        );
        assert_eq!(
            install_flags(&c).join(" "),
            "--proxy-uid 1337 --outbound-port 15001 --inbound-port 15006 --inbound-ports 8080 \
             --exclude-outbound-ports 22,8000-8100 --exclude-outbound-cidrs 169.254.169.254,10.0.0.0/8 \
             --backend auto --ipv6"
        );
        let r = rules(&c).unwrap();
        assert_eq!(r.exclude_outbound_ports.len(), 2);
        assert_eq!(inbound_addrs(&c).len(), 2);
        assert_eq!(listen_addrs(&c).len(), 4);
    }

    #[test]
    fn problems_name_the_field_and_the_fix() {
        let bad = section("  proxy_uid: 1\n  exclude_outbound_cidrs: [10.1.2.3/8]\n  detect_timeout: 0s\n  server_speaks_first: [0]\n");
        let p = problems(&bad);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].1.contains("capture.exclude_outbound_cidrs"), "{p:?}");
        assert!(p[0].1.contains("10.0.0.0/8"), "{p:?}");
        assert_eq!(p[1].0, "capture.detect_timeout");
        assert_eq!(p[2].0, "capture.server_speaks_first");
        let same = section("  proxy_uid: 1\n  outbound_port: 15006\n  inbound_ports: all\n");
        assert!(
            problems(&same)[0].1.contains("both 15006"),
            "{:?}",
            problems(&same)
        );
        let backend = section("  proxy_uid: 1\n  backend: pf\n");
        assert!(
            problems(&backend)[0].1.contains("capture.backend"),
            "{:?}",
            problems(&backend)
        );
    }
}
