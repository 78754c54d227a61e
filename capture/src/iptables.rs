//! The iptables rules, for hosts without `nft` (or `--backend iptables`):
//! two chains in the nat table, `CRANK_OUTPUT` (jumped to from `OUTPUT`) and
//! `CRANK_PREROUTING` (from `PREROUTING`), for IPv4 and, with `--ipv6`, the
//! same in ip6tables. Works with either iptables backend (legacy or nft).
//!
//! Rendering is pure: an `iptables-restore --noflush` script per family.
//! Declaring a chain in the script (`:CRANK_OUTPUT - [0:0]`) creates or
//! empties it, so install replaces the chains in one commit; the jumps are
//! added only when [`NatState`] (parsed from `iptables -t nat -S`) lacks
//! them, so installing twice leaves the same rules. Remove deletes the jumps
//! and the chains that exist, and nothing else.

use crate::config::{CaptureConfig, Cidr, InboundPorts, PortRange};
use std::fmt::Write;

pub const OUTPUT_CHAIN: &str = "CRANK_OUTPUT";
pub const PREROUTING_CHAIN: &str = "CRANK_PREROUTING";

/// IPv4 (iptables) or IPv6 (ip6tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What crank-capture owns in a nat table now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// `CRANK_*` chains that exist.
    pub chains: Vec<String>,
    /// Rules jumping to them, as `-S` prints them (`-A OUTPUT -j CRANK_OUTPUT`).
    pub jumps: Vec<String>,
    /// Every `-S` line that mentions a `CRANK_*` chain (what `show` prints).
    pub lines: Vec<String>,
}

impl NatState {
    /// Parses `iptables -t nat -S` output.
    pub fn parse(listing: &str) -> NatState {
        let mut st = NatState::default();
        for line in listing.lines().map(str::trim) {
            if !line.contains("CRANK_") {
                continue;
            }
            st.lines.push(line.to_string());
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["-N", chain] => st.chains.push(chain.to_string()),
                ["-A", parent, ..] if !parent.starts_with("CRANK_") => {
                    st.jumps.push(line.to_string())
                }
                _ => {}
            }
        }
        st
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The `iptables-restore --noflush` script that installs the rules for
/// `family`, given what the nat table holds now.
pub fn install_script(cfg: &CaptureConfig, family: Family, now: &NatState) -> String {
    let mut s = String::from("*nat\n");
    let _ = writeln!(s, ":{OUTPUT_CHAIN} - [0:0]");
    // A reinstall without inbound capture empties the old inbound chain here
    // and deletes it below.
    let drop_inbound = cfg.inbound.is_none() && now.chains.iter().any(|c| c == PREROUTING_CHAIN);
    if cfg.inbound.is_some() || drop_inbound {
        let _ = writeln!(s, ":{PREROUTING_CHAIN} - [0:0]");
    }
    for rule in output_rules(cfg, family) {
        let _ = writeln!(s, "-A {OUTPUT_CHAIN} {rule}");
    }
    for rule in prerouting_rules(cfg) {
        let _ = writeln!(s, "-A {PREROUTING_CHAIN} {rule}");
    }
    let mut jumps = vec![("OUTPUT", OUTPUT_CHAIN)];
    if cfg.inbound.is_some() {
        jumps.push(("PREROUTING", PREROUTING_CHAIN));
    }
    for (parent, chain) in jumps {
        let jump = format!("-A {parent} -j {chain}");
        if !now.jumps.contains(&jump) {
            let _ = writeln!(s, "{jump}");
        }
    }
    if drop_inbound {
        s.push_str(&drop_chain(PREROUTING_CHAIN, now));
    }
    s.push_str("COMMIT\n");
    s
}

/// The script that removes what `now` shows, or `None` when nothing is there.
pub fn remove_script(now: &NatState) -> Option<String> {
    if now.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for chain in &now.chains {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for jump in &now.jumps {
        let _ = writeln!(s, "-D {}", &jump[3..]);
    }
    for chain in &now.chains {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

fn drop_chain(chain: &str, now: &NatState) -> String {
    let mut s = String::new();
    for jump in now
        .jumps
        .iter()
        .filter(|j| j.ends_with(&format!("-j {chain}")))
    {
        let _ = writeln!(s, "-D {}", &jump[3..]);
    }
    let _ = writeln!(s, "-X {chain}");
    s
}

fn output_rules(cfg: &CaptureConfig, family: Family) -> Vec<String> {
    let mut rules = vec![format!("-m owner --uid-owner {} -j RETURN", cfg.proxy_uid)];
    rules.push(match family {
        Family::V4 => "-d 127.0.0.0/8 -j RETURN".to_string(),
        Family::V6 => "-d ::1/128 -j RETURN".to_string(),
    });
    for p in &cfg.exclude_outbound_ports {
        rules.push(format!("-p tcp --dport {} -j RETURN", range(p)));
    }
    let mine = |c: &&Cidr| c.is_ipv6() == (family == Family::V6);
    for c in cfg.exclude_outbound_cidrs.iter().filter(mine) {
        rules.push(format!("-d {c} -j RETURN"));
    }
    rules.push(format!(
        "-p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    rules
}

fn prerouting_rules(cfg: &CaptureConfig) -> Vec<String> {
    let Some(inbound) = &cfg.inbound else {
        return vec![];
    };
    let mut rules = vec!["-m addrtype ! --dst-type LOCAL -j RETURN".to_string()];
    let to = format!("-j REDIRECT --to-ports {}", inbound.port);
    match &inbound.ports {
        InboundPorts::Only(ports) => {
            for p in ports {
                rules.push(format!("-p tcp --dport {} {to}", range(p)));
            }
        }
        InboundPorts::AllExcept(except) => {
            for p in except {
                rules.push(format!("-p tcp --dport {} -j RETURN", range(p)));
            }
            rules.push(format!("-p tcp {to}"));
        }
    }
    rules
}

/// iptables writes a range as `8000:8100`.
fn range(p: &PortRange) -> String {
    if p.first == p.last {
        p.first.to_string()
    } else {
        format!("{}:{}", p.first, p.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidrs, parse_ports, Inbound};

    fn cfg() -> CaptureConfig {
        CaptureConfig {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound: Some(Inbound {
                port: 15006,
                ports: InboundPorts::Only(parse_ports("p", "8080").unwrap()),
            }),
            exclude_outbound_ports: parse_ports("p", "22,8000-8100").unwrap(),
            exclude_outbound_cidrs: parse_cidrs("c", "10.0.0.0/8,fd00::/8").unwrap(),
            ipv6: true,
        }
    }

    #[test]
    fn install_on_a_clean_table_adds_chains_rules_and_jumps() {
        assert_eq!(
            install_script(&cfg(), Family::V4, &NatState::default()),
            "*nat
:CRANK_OUTPUT - [0:0]
:CRANK_PREROUTING - [0:0]
-A CRANK_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A CRANK_OUTPUT -d 127.0.0.0/8 -j RETURN
-A CRANK_OUTPUT -p tcp --dport 22 -j RETURN
-A CRANK_OUTPUT -p tcp --dport 8000:8100 -j RETURN
-A CRANK_OUTPUT -d 10.0.0.0/8 -j RETURN
-A CRANK_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A CRANK_PREROUTING -m addrtype ! --dst-type LOCAL -j RETURN
-A CRANK_PREROUTING -p tcp --dport 8080 -j REDIRECT --to-ports 15006
-A OUTPUT -j CRANK_OUTPUT
-A PREROUTING -j CRANK_PREROUTING
COMMIT
"
        );
    }

    #[test]
    fn ipv6_gets_its_own_loopback_and_ranges() {
        let s = install_script(&cfg(), Family::V6, &NatState::default());
        assert!(s.contains("-A CRANK_OUTPUT -d ::1/128 -j RETURN\n"), "{s}");
        assert!(s.contains("-A CRANK_OUTPUT -d fd00::/8 -j RETURN\n"), "{s}");
        assert!(
            !s.contains("10.0.0.0/8") && !s.contains("127.0.0.0/8"),
            "{s}"
        );
    }

    const INSTALLED: &str = "-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N CRANK_OUTPUT
-N CRANK_PREROUTING
-N DOCKER
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -j CRANK_PREROUTING
-A OUTPUT -j CRANK_OUTPUT
-A CRANK_OUTPUT -p tcp -j REDIRECT --to-ports 15001
";

    #[test]
    fn state_is_parsed_from_the_listing_and_leaves_others_alone() {
        let st = NatState::parse(INSTALLED);
        assert_eq!(st.chains, ["CRANK_OUTPUT", "CRANK_PREROUTING"]);
        assert_eq!(
            st.jumps,
            [
                "-A PREROUTING -j CRANK_PREROUTING",
                "-A OUTPUT -j CRANK_OUTPUT"
            ]
        );
        assert_eq!(st.lines.len(), 5);
        assert!(NatState::parse("-P OUTPUT ACCEPT\n").is_empty());
    }

    #[test]
    fn reinstall_keeps_the_jumps_it_finds() {
        let s = install_script(&cfg(), Family::V4, &NatState::parse(INSTALLED));
        assert!(!s.contains("-A OUTPUT -j CRANK_OUTPUT"), "{s}");
        assert!(!s.contains("-A PREROUTING -j"), "{s}");
        assert!(s.contains(":CRANK_OUTPUT - [0:0]\n"), "{s}");
    }

    #[test]
    fn reinstall_without_inbound_drops_the_inbound_chain() {
        let c = CaptureConfig {
            inbound: None,
            ..cfg()
        };
        let s = install_script(&c, Family::V4, &NatState::parse(INSTALLED));
        assert!(
            s.starts_with("*nat\n:CRANK_OUTPUT - [0:0]\n:CRANK_PREROUTING - [0:0]\n"),
            "{s}"
        );
        assert!(
            s.ends_with("-D PREROUTING -j CRANK_PREROUTING\n-X CRANK_PREROUTING\nCOMMIT\n"),
            "{s}"
        );
    }

    #[test]
    fn remove_deletes_exactly_the_jumps_and_chains_found() {
        assert_eq!(
            remove_script(&NatState::parse(INSTALLED)).unwrap(),
            "*nat
:CRANK_OUTPUT - [0:0]
:CRANK_PREROUTING - [0:0]
-D PREROUTING -j CRANK_PREROUTING
-D OUTPUT -j CRANK_OUTPUT
-X CRANK_OUTPUT
-X CRANK_PREROUTING
COMMIT
"
        );
        assert_eq!(remove_script(&NatState::default()), None);
    }
}
