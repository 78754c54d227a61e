//! The cross-host fixture itself (tests/src/netns.rs): hosts reach each
//! other by their own addresses, not loopback; fixtures side by side do not
//! clash; and everything is gone after the fixture drops, a panicking test
//! included.

use crank_tests::netns::Hosts;
use crank_tests::{output_text, wait_until};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

#[test]
fn hosts_talk_over_their_own_addresses_and_not_over_loopback() {
    let Some(hosts) = Hosts::new(3) else { return };
    let (a, c) = (&hosts[0], &hosts[2]);
    assert_eq!(a.addr().octets()[..2], [10, 77]);
    assert_eq!(a.addr().octets()[3], 1);
    assert_eq!(c.addr().octets()[3], 3);
    let listener = c.enter(|| TcpListener::bind((c.addr(), 7000))).unwrap();
    let client = a.enter(|| TcpStream::connect((c.addr(), 7000))).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        a.addr(),
        "the server sees the client host's address"
    );
    drop((client, accepted));
    let v6 = c.enter(|| TcpListener::bind((c.addr6(), 7001))).unwrap();
    let _client = a.enter(|| TcpStream::connect((c.addr6(), 7001))).unwrap();
    assert_eq!(v6.accept().unwrap().1.ip(), a.addr6());
    // A host's own loopback is its own: nothing of c's listens on a's.
    assert!(a.enter(|| TcpStream::connect(("127.0.0.1", 7000))).is_err());
    // Programs run inside the host see its address.
    let out = a.run("ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/24", a.addr())),
        "{}",
        output_text(&out)
    );
}

#[test]
fn fixtures_side_by_side_get_their_own_names_and_subnets() {
    let (Some(one), Some(two)) = (Hosts::new(1), Hosts::new(1)) else {
        return;
    };
    assert_ne!(one[0].name(), two[0].name());
    assert_ne!(one[0].addr(), two[0].addr());
    assert!(one[0].name().contains(&std::process::id().to_string()));
}

#[test]
fn drop_tears_down_namespaces_and_processes_even_after_a_panic() {
    if Hosts::new(1).is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let hosts = Hosts::new(2).unwrap();
        let mut sleeper = hosts[1].command("sleep");
        sleeper.arg("600");
        // Left to the fixture: not kept as a handle.
        std::mem::forget(hosts[1].spawn(sleeper));
        let names: Vec<String> = hosts.iter().map(|h| h.name().to_string()).collect();
        let pids_in = |ns: &str| {
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", ns])
                .output();
            String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
        };
        // `ip netns exec` enters the namespace, then execs the program.
        wait_until("the sleeper in the host", Duration::from_secs(10), || {
            !pids_in(&names[1]).trim().is_empty()
        });
        let pids = pids_in(&names[1]);
        tx.send((names, pids)).unwrap();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let (names, pids) = rx.recv().unwrap();
    for name in &names {
        assert!(
            !Path::new(&format!("/run/netns/{name}")).exists(),
            "{name} is left"
        );
    }
    for pid in pids.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its (forgotten) parent handle.
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "process {pid} still runs: {stat}"
        );
    }
}
