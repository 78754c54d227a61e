//! The nftables rules: one table, `inet crank`, with a nat `output` chain
//! (outbound capture) and a nat `prerouting` chain (inbound capture).
//! Rendering is pure; [`crate::apply`] feeds the text to `nft -f -`.
//!
//! Install is one transaction that adds the table, deletes it and defines it
//! again, so installing twice leaves the same rules and no window without
//! them. Remove deletes exactly that table (the add-then-delete pattern makes
//! removing an absent table a no-op).

use crate::config::{CaptureConfig, Cidr, InboundPorts, PortRange};
use std::fmt::Write;

/// The one table crank-capture owns.
pub const TABLE: &str = "inet crank";

/// The `nft -f` script that installs (or atomically replaces) the table.
pub fn install_script(cfg: &CaptureConfig) -> String {
    let mut s = format!("table {TABLE}\ndelete table {TABLE}\n");
    s.push_str(&table(cfg));
    s
}

/// The `nft -f` script that removes the table, present or not.
pub fn remove_script() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// The table definition alone (what `--dry-run` shows under the header).
pub fn table(cfg: &CaptureConfig) -> String {
    let mut s = format!("table {TABLE} {{\n");
    s.push_str(&output_chain(cfg));
    if cfg.inbound.is_some() {
        s.push_str(&prerouting_chain(cfg));
    }
    s.push_str("}\n");
    s
}

fn output_chain(cfg: &CaptureConfig) -> String {
    let mut rules = vec![];
    if !cfg.ipv6 {
        rules.push("meta nfproto ipv6 return".to_string());
    }
    rules.push(format!("meta skuid {} return", cfg.proxy_uid));
    rules.push("ip daddr 127.0.0.0/8 return".to_string());
    if cfg.ipv6 {
        rules.push("ip6 daddr ::1 return".to_string());
    }
    if !cfg.exclude_outbound_ports.is_empty() {
        rules.push(format!(
            "tcp dport {} return",
            set(&cfg.exclude_outbound_ports)
        ));
    }
    let (v4, v6): (Vec<Cidr>, Vec<Cidr>) = cfg
        .exclude_outbound_cidrs
        .iter()
        .partition(|c| !c.is_ipv6());
    if !v4.is_empty() {
        rules.push(format!("ip daddr {} return", set(&v4)));
    }
    if !v6.is_empty() {
        rules.push(format!("ip6 daddr {} return", set(&v6)));
    }
    rules.push(format!(
        "meta l4proto tcp redirect to :{}",
        cfg.outbound_port
    ));
    chain("output", "output", &rules)
}

fn prerouting_chain(cfg: &CaptureConfig) -> String {
    let Some(inbound) = &cfg.inbound else {
        return String::new();
    };
    let mut rules = vec![];
    if !cfg.ipv6 {
        rules.push("meta nfproto ipv6 return".to_string());
    }
    // Only connections to this host: forwarded traffic (containers, a
    // router) is not the app's.
    rules.push("fib daddr type != local return".to_string());
    match &inbound.ports {
        InboundPorts::Only(ports) => rules.push(format!(
            "tcp dport {} redirect to :{}",
            set(ports),
            inbound.port
        )),
        InboundPorts::AllExcept(except) => {
            if !except.is_empty() {
                rules.push(format!("tcp dport {} return", set(except)));
            }
            rules.push(format!("meta l4proto tcp redirect to :{}", inbound.port));
        }
    }
    chain("prerouting", "prerouting", &rules)
}

fn chain(name: &str, hook: &str, rules: &[String]) -> String {
    let mut s =
        format!("\tchain {name} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n");
    for r in rules {
        let _ = writeln!(s, "\t\t{r}");
    }
    s.push_str("\t}\n");
    s
}

/// `22` or `{ 22, 8000-8100 }`: nft's anonymous set syntax.
fn set<T: std::fmt::Display>(items: &[T]) -> String {
    match items {
        [one] => one.to_string(),
        many => {
            let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("{{ {} }}", parts.join(", "))
        }
    }
}

/// Used by the iptables renderer and the report too.
pub(crate) fn port_list(ports: &[PortRange]) -> String {
    let parts: Vec<String> = ports.iter().map(ToString::to_string).collect();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidrs, parse_ports, Inbound};

    fn cfg() -> CaptureConfig {
        CaptureConfig::outbound_only_for_tests()
    }

    #[test]
    fn outbound_only_skips_ipv6_the_proxy_and_loopback() {
        assert_eq!(
            table(&cfg()),
            "table inet crank {
	chain output {
		type nat hook output priority -100; policy accept;
		meta nfproto ipv6 return
		meta skuid 1337 return
		ip daddr 127.0.0.0/8 return
		meta l4proto tcp redirect to :15001
	}
}
"
        );
    }

    #[test]
    fn exclusions_and_inbound_list_with_ipv6() {
        let c = CaptureConfig {
            inbound: Some(Inbound {
                port: 15006,
                ports: InboundPorts::Only(parse_ports("p", "8080,9000").unwrap()),
            }),
            exclude_outbound_ports: parse_ports("p", "22,8000-8100").unwrap(),
            exclude_outbound_cidrs: parse_cidrs("c", "10.0.0.0/8,fd00::/8").unwrap(),
            ipv6: true,
            ..cfg()
        };
        assert_eq!(
            table(&c),
            "table inet crank {
	chain output {
		type nat hook output priority -100; policy accept;
		meta skuid 1337 return
		ip daddr 127.0.0.0/8 return
		ip6 daddr ::1 return
		tcp dport { 22, 8000-8100 } return
		ip daddr 10.0.0.0/8 return
		ip6 daddr fd00::/8 return
		meta l4proto tcp redirect to :15001
	}
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		fib daddr type != local return
		tcp dport { 8080, 9000 } redirect to :15006
	}
}
"
        );
    }

    #[test]
    fn inbound_all_but_excluded() {
        let c = CaptureConfig {
            inbound: Some(Inbound {
                port: 15006,
                ports: InboundPorts::AllExcept(parse_ports("p", "22,4191").unwrap()),
            }),
            ..cfg()
        };
        let t = table(&c);
        let pre = &t[t.find("chain prerouting").unwrap()..];
        assert_eq!(
            pre,
            "chain prerouting {
		type nat hook prerouting priority -100; policy accept;
		meta nfproto ipv6 return
		fib daddr type != local return
		tcp dport { 22, 4191 } return
		meta l4proto tcp redirect to :15006
	}
}
"
        );
    }

    #[test]
    fn install_replaces_the_table_in_one_transaction_and_remove_tolerates_absence() {
        let s = install_script(&cfg());
        assert!(s.starts_with("table inet crank\ndelete table inet crank\ntable inet crank {\n"));
        assert_eq!(
            remove_script(),
            "table inet crank\ndelete table inet crank\n"
        );
    }
}
