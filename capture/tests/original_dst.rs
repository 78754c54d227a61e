//! `original_dst` on connections that a real REDIRECT rule rewrote: IPv4,
//! IPv6, and IPv4 on a dual-stack listener. Each case runs on a thread moved
//! into a fresh network namespace (root only; elsewhere it says why it
//! skips, or fails under `CRANK_NETNS_REQUIRED=1`, which tests/run.sh sets
//! as root), so the host's rules are never touched.

use crank_capture::original_dst;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};

/// Runs `f` on a thread in a new, empty network namespace with `lo` up and
/// `rules` loaded into nft; `None` (with the reason printed) where that
/// cannot be done.
fn in_fresh_netns<T: Send>(rules: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root to make a network namespace");
        return None;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: only this thread moves; its sockets and children
            // live in the new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                skip(&format!("cannot make a network namespace: {e}"));
                return None;
            }
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(
                matches!(up, Ok(s) if s.success()),
                "ip link set lo up: {up:?} (install iproute2)"
            );
            let mut nft = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("nft runs (apt-get install nftables)");
            nft.stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(nft.wait().unwrap().success(), "nft refused:\n{rules}");
            Some(f())
        })
        .join()
        .unwrap()
    })
}

fn skip(why: &str) {
    let required = std::env::var("CRANK_NETNS_REQUIRED").is_ok_and(|v| v == "1");
    assert!(!required, "CRANK_NETNS_REQUIRED=1 but this test {why}");
    eprintln!("skipping: {why}");
}

/// Connects to `asked`, which the rules send to `listener`; what the
/// accepted side learns.
fn redirected(listener: &TcpListener, asked: SocketAddr) -> SocketAddr {
    let _client = TcpStream::connect(asked).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    assert_ne!(accepted.local_addr().unwrap().port(), asked.port());
    original_dst(&accepted).unwrap()
}

#[test]
fn ipv4_and_ipv6_redirects_report_where_the_client_was_going() {
    let rules = "table inet t {
        chain o {
            type nat hook output priority -100;
            ip daddr 127.0.0.2 tcp dport 5432 redirect to :15001
            ip6 daddr ::1 tcp dport 5432 redirect to :15001
        }
    }";
    let seen = in_fresh_netns(rules, || {
        let v4 = TcpListener::bind("127.0.0.1:15001").unwrap();
        let v6 = TcpListener::bind("[::1]:15001").unwrap();
        (
            redirected(&v4, "127.0.0.2:5432".parse().unwrap()),
            redirected(&v6, "[::1]:5432".parse().unwrap()),
        )
    });
    if let Some((v4, v6)) = seen {
        assert_eq!(v4, "127.0.0.2:5432".parse().unwrap());
        assert_eq!(v6, "[::1]:5432".parse().unwrap());
    }
}

#[test]
fn ipv4_on_a_dual_stack_listener_is_asked_at_the_ipv4_level() {
    let rules = "table ip t {
        chain o {
            type nat hook output priority -100;
            ip daddr 127.0.0.3 tcp dport 6379 redirect to :15001
        }
    }";
    let seen = in_fresh_netns(rules, || {
        let dual = TcpListener::bind("[::]:15001").unwrap();
        redirected(&dual, "127.0.0.3:6379".parse().unwrap())
    });
    if let Some(dst) = seen {
        assert_eq!(dst, "127.0.0.3:6379".parse().unwrap());
    }
}
