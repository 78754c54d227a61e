//! What crank-capture did, for people (`-o text`) and programs (`-o json`):
//! per table, whether crank rules were there before and are there now, the
//! rules now in force, and a plain summary of what is captured.

use crate::config::{CaptureConfig, InboundPorts};
use crate::iptables::{Family, NatState};
use crate::nft::{self, port_list};
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Install,
    Remove,
    Show,
}

/// One backend's crank rules, before and after the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableReport {
    /// `nftables`, `iptables` or `ip6tables`.
    pub backend: &'static str,
    /// `table inet crank`, or the `CRANK_*` chains of the nat table.
    pub name: String,
    pub installed_before: bool,
    pub installed: bool,
    /// The rules differ from before.
    pub changed: bool,
    /// The crank rules now in force, as the tool lists them.
    pub rules: String,
}

/// The whole answer of one command.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub action: Action,
    pub dry_run: bool,
    /// Some table's rules differ from before.
    pub changed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<CaptureConfig>,
    /// What is captured, in words (install and dry run).
    pub summary: Vec<String>,
    pub tables: Vec<TableReport>,
}

impl TableReport {
    pub fn nft(before: Option<String>, after: Option<String>) -> TableReport {
        TableReport {
            backend: "nftables",
            name: format!("table {}", nft::TABLE),
            installed_before: before.is_some(),
            installed: after.is_some(),
            changed: before != after,
            rules: after.unwrap_or_default(),
        }
    }

    pub fn iptables(family: Family, before: NatState, after: NatState) -> TableReport {
        TableReport {
            backend: match family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            },
            name: "nat CRANK_OUTPUT, CRANK_PREROUTING".to_string(),
            installed_before: !before.is_empty(),
            installed: !after.is_empty(),
            changed: before.lines != after.lines,
            rules: after.lines.iter().map(|l| format!("{l}\n")).collect(),
        }
    }
}

impl Report {
    pub fn new(action: Action, config: Option<CaptureConfig>, tables: Vec<TableReport>) -> Report {
        Report {
            action,
            dry_run: false,
            changed: tables.iter().any(|t| t.changed),
            summary: config.as_ref().map(summary).unwrap_or_default(),
            config,
            tables,
        }
    }

    /// The human form.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for t in &self.tables {
            let _ = writeln!(
                s,
                "{}: {}: {}",
                t.backend,
                t.name,
                state_words(self.action, t)
            );
            if self.action == Action::Show && t.installed {
                for line in t.rules.lines() {
                    let _ = writeln!(s, "    {line}");
                }
            }
        }
        for line in &self.summary {
            let _ = writeln!(s, "  {line}");
        }
        s
    }
}

fn state_words(action: Action, t: &TableReport) -> &'static str {
    match (action, t.installed_before, t.installed, t.changed) {
        (Action::Show, _, true, _) => "installed",
        (Action::Show, _, false, _) => "not installed",
        (Action::Install, _, true, false) => {
            "installed (unchanged: the same rules were already there)"
        }
        (Action::Install, true, true, true) => "installed (replaced the earlier rules)",
        (Action::Install, false, true, true) => "installed",
        (_, true, false, _) => "removed",
        (_, false, false, _) => "not installed (nothing to remove)",
        (Action::Remove, _, true, _) => "still installed",
    }
}

/// What the config captures, in words.
pub fn summary(cfg: &CaptureConfig) -> Vec<String> {
    let mut skip = vec!["loopback".to_string()];
    if !cfg.exclude_outbound_ports.is_empty() {
        skip.push(format!("ports {}", port_list(&cfg.exclude_outbound_ports)));
    }
    skip.extend(cfg.exclude_outbound_cidrs.iter().map(ToString::to_string));
    let mut out = vec![format!(
        "outbound: TCP connects from every uid but {} go to port {}; left alone: {}",
        cfg.proxy_uid,
        cfg.outbound_port,
        skip.join(", ")
    )];
    out.push(match &cfg.inbound {
        None => "inbound: not captured".to_string(),
        Some(i) => match &i.ports {
            InboundPorts::Only(p) => {
                format!(
                    "inbound: TCP to ports {} goes to port {}",
                    port_list(p),
                    i.port
                )
            }
            InboundPorts::AllExcept(e) if e.is_empty() => {
                format!("inbound: TCP to every port goes to port {}", i.port)
            }
            InboundPorts::AllExcept(e) => format!(
                "inbound: TCP to every port but {} goes to port {}",
                port_list(e),
                i.port
            ),
        },
    });
    out.push(
        if cfg.ipv6 {
            "IPv6: captured the same way"
        } else {
            "IPv6: not captured"
        }
        .to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidrs, parse_ports, Inbound};

    #[test]
    fn the_summary_says_what_is_captured_and_what_is_not() {
        let cfg = CaptureConfig {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound: Some(Inbound {
                port: 15006,
                ports: InboundPorts::AllExcept(parse_ports("p", "22").unwrap()),
            }),
            exclude_outbound_ports: parse_ports("p", "25,5432").unwrap(),
            exclude_outbound_cidrs: parse_cidrs("c", "10.0.0.0/8").unwrap(),
            ipv6: false,
        };
        assert_eq!(
            summary(&cfg),
            [
                "outbound: TCP connects from every uid but 1337 go to port 15001; left alone: loopback, ports 25,5432, 10.0.0.0/8",
                "inbound: TCP to every port but 22 goes to port 15006",
                "IPv6: not captured",
            ]
        );
    }

    #[test]
    fn each_table_says_what_happened_to_it() {
        let listing = Some("table inet crank {}\n".to_string());
        let cases = [
            (Action::Install, None, listing.clone(), "installed"),
            (
                Action::Install,
                listing.clone(),
                listing.clone(),
                "installed (unchanged: the same rules were already there)",
            ),
            (
                Action::Install,
                Some("x".into()),
                listing.clone(),
                "installed (replaced the earlier rules)",
            ),
            (Action::Remove, listing.clone(), None, "removed"),
            (
                Action::Remove,
                None,
                None,
                "not installed (nothing to remove)",
            ),
        ];
        for (action, before, after, want) in cases {
            let r = Report::new(action, None, vec![TableReport::nft(before, after)]);
            assert_eq!(r.text(), format!("nftables: table inet crank: {want}\n"));
        }
        let shown = Report::new(
            Action::Show,
            None,
            vec![TableReport::nft(listing.clone(), listing)],
        );
        assert_eq!(
            shown.text(),
            "nftables: table inet crank: installed\n    table inet crank {}\n"
        );
    }
}
