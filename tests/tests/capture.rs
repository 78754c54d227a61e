//! Transparent capture across hosts: `crank-capture` installs its rules in
//! one network-namespace "host", and real connections between hosts (curl,
//! run as the app's uid or the proxy's) show what is redirected, to where,
//! and what the capture listener learns with `original_dst`. The capture
//! listeners here are small test servers; the proxy's come next (issue #16).
//!
//! Needs root and iproute2, nftables and iptables (tests/run.sh installs
//! them); without root the tests print why and return.

use crank_tests::netns::{Host, Hosts};
use crank_tests::{bin, output_text};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PROXY_UID: &str = "1337";
const APP_UID: &str = "1000";

/// A test server in a host: answers each connection with one HTTP response
/// whose body `answer` makes from the accepted socket. Stops on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    host: &Host,
    bind: &str,
    answer: impl Fn(&TcpStream) -> String + Send + 'static,
) -> Server {
    let bind: SocketAddr = bind.parse().unwrap();
    let listener = host.enter(|| TcpListener::bind(bind)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => respond(s, &answer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("accept on {bind}: {e}"),
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

fn respond(mut s: TcpStream, answer: &impl Fn(&TcpStream) -> String) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = answer(&s);
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A capture listener: says what `original_dst` reports.
fn capture_listener(host: &Host, bind: &str, name: &'static str) -> Server {
    serve(host, bind, move |s| match crank_capture::original_dst(s) {
        Ok(dst) => format!("{name} {dst}"),
        Err(e) => format!("{name} without original destination: {e}"),
    })
}

/// A plain server: says its name.
fn plain(host: &Host, bind: &str, name: &'static str) -> Server {
    serve(host, bind, move |_| name.to_string())
}

/// The body curl gets from `url`, run in `host` as `uid` (root when None).
fn fetch(host: &Host, uid: Option<&str>, url: &str) -> String {
    let mut cmd = host.command("setpriv");
    if let Some(uid) = uid {
        cmd.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    let out = cmd
        .args(["curl", "-sS", "--noproxy", "*", "--max-time", "5", url])
        .output()
        .expect("setpriv (util-linux) and curl run");
    assert!(
        out.status.success(),
        "curl {url} as uid {uid:?} in {}: {}",
        host.name(),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs crank-capture in `host` with `args`; its output, which must succeed.
fn capture(host: &Host, args: &[&str]) -> String {
    let out = host
        .command(bin("crank-capture"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crank-capture {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn install_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "install",
        "--proxy-uid",
        PROXY_UID,
        "--outbound-port",
        "15001",
    ];
    a.extend_from_slice(extra);
    a
}

fn nft_ruleset(host: &Host) -> String {
    let out = host.run("nft", &["list", "ruleset"]);
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn url(addr: impl std::fmt::Display, port: u16) -> String {
    format!(
        "http://{}/",
        SocketAddr::new(addr.to_string().parse().unwrap(), port)
    )
}

#[test]
fn outbound_connects_go_to_the_capture_listener_except_the_proxy_loopback_and_exclusions() {
    let Some(hosts) = Hosts::new(3) else { return };
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    let _listener = capture_listener(a, "0.0.0.0:15001", "captured");
    let _local = plain(a, "127.0.0.1:7000", "local admin");
    let _b = [
        plain(b, "[::]:5432", "b:5432"),
        plain(b, "0.0.0.0:5433", "b:5433"),
    ];
    let _c = plain(c, "0.0.0.0:5432", "c:5432");
    let excluded_cidr = format!("{}/32", c.addr());
    capture(
        a,
        &install_args(&[
            "--exclude-outbound-ports",
            "5433",
            "--exclude-outbound-cidrs",
            &excluded_cidr,
        ]),
    );

    // The app's connect to another host lands on the listener, which sees
    // where it was going.
    let b_db = url(b.addr(), 5432);
    assert_eq!(
        fetch(a, Some(APP_UID), &b_db),
        format!("captured {}:5432", b.addr())
    );
    // Root is an app like any other.
    assert_eq!(fetch(a, None, &b_db), format!("captured {}:5432", b.addr()));
    // The proxy's own connects reach the real destination.
    assert_eq!(fetch(a, Some(PROXY_UID), &b_db), "b:5432");
    // Excluded port, excluded range, loopback: untouched.
    assert_eq!(fetch(a, Some(APP_UID), &url(b.addr(), 5433)), "b:5433");
    assert_eq!(fetch(a, Some(APP_UID), &url(c.addr(), 5432)), "c:5432");
    assert_eq!(
        fetch(a, Some(APP_UID), "http://127.0.0.1:7000/"),
        "local admin"
    );
    // Without --ipv6, IPv6 is left alone.
    assert_eq!(fetch(a, Some(APP_UID), &url(b.addr6(), 5432)), "b:5432");
    // Other hosts are not affected by A's rules.
    assert_eq!(fetch(c, Some(APP_UID), &b_db), "b:5432");
}

#[test]
fn inbound_connections_to_the_apps_ports_land_on_the_inbound_listener() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (a, b) = (&hosts[0], &hosts[1]);
    let _inbound = capture_listener(a, "0.0.0.0:15006", "inbound");
    let _outbound = capture_listener(a, "0.0.0.0:15001", "outbound");
    let _apps = [
        plain(a, "0.0.0.0:8080", "app:8080"),
        plain(a, "0.0.0.0:9090", "app:9090"),
    ];
    capture(
        a,
        &install_args(&["--inbound-port", "15006", "--inbound-ports", "8080"]),
    );

    let app = url(a.addr(), 8080);
    assert_eq!(
        fetch(b, Some(APP_UID), &app),
        format!("inbound {}:8080", a.addr())
    );
    // A port that is not the app's is left alone.
    assert_eq!(fetch(b, None, &url(a.addr(), 9090)), "app:9090");
    // The proxy reaches the app on its own host through loopback, uncaptured.
    assert_eq!(
        fetch(a, Some(PROXY_UID), "http://127.0.0.1:8080/"),
        "app:8080"
    );
}

#[test]
fn install_is_idempotent_and_remove_restores_plain_behaviour_exactly() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (a, b) = (&hosts[0], &hosts[1]);
    let _listener = capture_listener(a, "0.0.0.0:15001", "captured");
    let _b = plain(b, "0.0.0.0:5432", "b:5432");
    let plain_ruleset = nft_ruleset(a);
    let args = install_args(&[
        "--inbound-port",
        "15006",
        "--inbound-ports",
        "all",
        "--exclude-inbound-ports",
        "22",
    ]);

    let first = capture(a, &args);
    assert!(
        first.contains("nftables: table inet crank: installed\n"),
        "{first}"
    );
    let installed = nft_ruleset(a);
    assert!(installed.contains("table inet crank"), "{installed}");
    let mut json_args = vec!["-o", "json"];
    json_args.extend_from_slice(&args);
    let again: serde_json::Value = serde_json::from_str(&capture(a, &json_args)).unwrap();
    assert_eq!(again["changed"], false, "{again:#}");
    assert_eq!(
        nft_ruleset(a),
        installed,
        "a second install changed the rules"
    );
    let shown = capture(a, &["show"]);
    assert!(
        shown.contains("redirect to :15001") && shown.contains("redirect to :15006"),
        "{shown}"
    );
    assert_eq!(
        fetch(a, Some(APP_UID), &url(b.addr(), 5432)),
        format!("captured {}:5432", b.addr())
    );

    let removed = capture(a, &["remove"]);
    assert!(
        removed.contains("nftables: table inet crank: removed"),
        "{removed}"
    );
    assert_eq!(
        nft_ruleset(a),
        plain_ruleset,
        "remove left something behind"
    );
    assert_eq!(fetch(a, Some(APP_UID), &url(b.addr(), 5432)), "b:5432");
    let again = capture(a, &["remove"]);
    assert!(
        again.contains("not installed (nothing to remove)"),
        "{again}"
    );
}

#[test]
fn the_iptables_backend_captures_the_same_way_and_removes_its_chains() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (a, b) = (&hosts[0], &hosts[1]);
    let _out = capture_listener(a, "0.0.0.0:15001", "captured");
    let _in = capture_listener(a, "0.0.0.0:15006", "inbound");
    let _apps = [
        plain(a, "0.0.0.0:8080", "app:8080"),
        plain(a, "0.0.0.0:9090", "app:9090"),
    ];
    let _b = plain(b, "0.0.0.0:5432", "b:5432");
    let nat = |h: &Host| {
        String::from_utf8_lossy(&h.run("iptables", &["-t", "nat", "-S"]).stdout).into_owned()
    };
    let plain_nat = nat(a);
    let args = install_args(&[
        "--backend",
        "iptables",
        "--inbound-port",
        "15006",
        "--inbound-ports",
        "all",
        "--exclude-inbound-ports",
        "9090",
    ]);
    capture(a, &args);
    let installed = nat(a);
    assert!(
        installed.contains("-A OUTPUT -j CRANK_OUTPUT"),
        "{installed}"
    );
    let again = capture(a, &args);
    assert!(again.contains("unchanged"), "{again}");
    assert_eq!(nat(a), installed, "a second install changed the rules");
    assert!(!nft_ruleset(a).contains("inet crank"));

    assert_eq!(
        fetch(a, Some(APP_UID), &url(b.addr(), 5432)),
        format!("captured {}:5432", b.addr())
    );
    assert_eq!(fetch(a, Some(PROXY_UID), &url(b.addr(), 5432)), "b:5432");
    assert_eq!(
        fetch(b, None, &url(a.addr(), 8080)),
        format!("inbound {}:8080", a.addr())
    );
    assert_eq!(fetch(b, None, &url(a.addr(), 9090)), "app:9090");

    capture(a, &["remove"]);
    assert_eq!(nat(a), plain_nat, "remove left CRANK_ rules behind");
    assert_eq!(fetch(a, Some(APP_UID), &url(b.addr(), 5432)), "b:5432");
    assert_eq!(fetch(b, None, &url(a.addr(), 8080)), "app:8080");
}

#[test]
fn ipv6_connects_are_captured_with_their_original_destination() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (a, b) = (&hosts[0], &hosts[1]);
    let _listener = capture_listener(a, "[::]:15001", "captured");
    let _b = plain(b, "[::]:5432", "b:5432");
    capture(a, &install_args(&["--ipv6"]));
    let b_db = url(b.addr6(), 5432);
    assert_eq!(
        fetch(a, Some(APP_UID), &b_db),
        format!("captured [{}]:5432", b.addr6())
    );
    assert_eq!(fetch(a, Some(PROXY_UID), &b_db), "b:5432");
    // IPv4 still works on the same dual-stack listener.
    assert_eq!(
        fetch(a, Some(APP_UID), &url(b.addr(), 5432)),
        format!("captured {}:5432", b.addr())
    );
}

#[test]
fn without_cap_net_admin_it_refuses_and_says_how_to_fix_it() {
    let Some(hosts) = Hosts::new(1) else { return };
    let a = &hosts[0];
    let before = nft_ruleset(a);
    let no_caps: [&[&str]; 2] = [
        // An ordinary user with no capabilities at all.
        &[
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ],
        // Root in a container that dropped NET_ADMIN.
        &["--inh-caps=-net_admin", "--bounding-set=-net_admin"],
    ];
    for caps in no_caps {
        for args in [install_args(&[]), vec!["remove"], vec!["show"]] {
            let out = a
                .command("setpriv")
                .args(caps)
                .arg(bin("crank-capture"))
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{caps:?} {args:?}: {}",
                output_text(&out)
            );
            assert!(
                err.contains("lacks CAP_NET_ADMIN") && err.contains("run it as root"),
                "{caps:?} {args:?}: {err}"
            );
        }
        // The rules can still be looked at without privileges.
        let mut dry = install_args(&["--dry-run", "--backend", "nft"]);
        dry.insert(0, "-o");
        dry.insert(1, "text");
        let out = a
            .command("setpriv")
            .args(caps)
            .arg(bin("crank-capture"))
            .args(&dry)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("redirect to :15001"));
    }
    assert_eq!(nft_ruleset(a), before);
}
