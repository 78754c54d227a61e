//! `crank-proxy capture install|remove|show [FLAGS]`: crank-capture's
//! command line (the same flags, the same output), plus `--config FILE`,
//! which takes the install flags from the proxy config's `capture` section,
//! so a unit's `ExecStartPre=crank-proxy capture install --config FILE`
//! writes exactly the rules the proxy's capture listeners expect.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Runs `crank-proxy capture ARGS` (ARGS after `capture`).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let argv = match with_config_flags(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("crank-proxy capture: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match crank_capture::cli::Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match crank_capture::cli::run(&cli) {
        Ok(report) => {
            crank_capture::cli::print(&report, cli.output);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crank-proxy capture: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The argv for crank-capture's parser: `--config FILE` (or `-c`,
/// `--config=FILE`) taken out and, for `install`, replaced by the flags of
/// the file's capture section. `remove` and `show` accept it and need none.
pub fn with_config_flags(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let mut out: Vec<OsString> = vec!["crank-proxy capture".into()];
    let mut config: Option<PathBuf> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" || s == "-c" {
            let path = it.next().ok_or("--config needs the proxy config file")?;
            config = Some(path.into());
        } else if let Some(p) = s.strip_prefix("--config=") {
            config = Some(p.into());
        } else {
            out.push(a);
        }
    }
    let Some(path) = config else { return Ok(out) };
    let Some(at) = out.iter().position(|a| a == "install") else {
        return Ok(out);
    };
    let cfg = crate::config::load(&path).map_err(|e| e.to_string())?;
    let section = cfg.capture.ok_or_else(|| {
        format!(
            "{}: has no capture section; add one (capture: {{proxy_uid: UID}}, docs/reference/proxy-config.md) or give the flags",
            path.display()
        )
    })?;
    let flags = super::config::install_flags(&section);
    out.splice(at + 1..at + 1, flags.into_iter().map(OsString::from));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Result<Vec<String>, String> {
        let a = args.iter().map(OsString::from).collect();
        with_config_flags(a).map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn config_flags_are_spliced_after_install() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            "identity: {cert: a.pem, key: a.key, trust_bundle: b.pem}\nadmin: {listen: 127.0.0.1:1}\ncapture: {proxy_uid: 7, exclude_outbound_ports: 22}\n",
        )
        .unwrap();
        for f in ["a.pem", "a.key", "b.pem"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let p = path.to_str().unwrap();
        let got = argv(&["-o", "json", "install", "--config", p, "--dry-run"]).unwrap();
        assert_eq!(
            got.join(" "),
            "crank-proxy capture -o json install --proxy-uid 7 --outbound-port 15001 --exclude-outbound-ports 22 --backend auto --dry-run"
        );
        assert_eq!(
            argv(&["remove", &format!("--config={p}")]).unwrap(),
            ["crank-proxy capture", "remove"]
        );
        assert_eq!(argv(&["show"]).unwrap(), ["crank-proxy capture", "show"]);
        assert!(argv(&["install", "--config"])
            .unwrap_err()
            .contains("needs"));
    }
}
