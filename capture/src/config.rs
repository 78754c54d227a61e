//! The capture config: which uid is the proxy, where captured connections go,
//! and what is left alone. Parsed and validated here, once; the rule
//! renderers ([`crate::nft`], [`crate::iptables`]) take a valid
//! [`CaptureConfig`] and cannot fail.

use serde::Serialize;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// What `crank-capture install` sets up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// The proxy's uid: its own connections are never captured.
    pub proxy_uid: u32,
    /// The proxy's outbound capture listener; the app's TCP connects go here.
    pub outbound_port: u16,
    /// Inbound capture, when the app's listening ports are redirected too.
    pub inbound: Option<Inbound>,
    /// Destination ports that outbound capture leaves alone.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Destination ranges that outbound capture leaves alone (loopback
    /// always is).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Capture IPv6 too (otherwise IPv6 traffic is left alone).
    pub ipv6: bool,
}

#[cfg(test)]
impl CaptureConfig {
    /// Outbound capture only: proxy uid 1337, outbound port 15001, no
    /// exclusions, IPv4 only (the renderers' tests start from it).
    pub(crate) fn outbound_only_for_tests() -> CaptureConfig {
        CaptureConfig {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound: None,
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            ipv6: false,
        }
    }
}

/// Inbound capture: the app's listening ports go to the inbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inbound {
    /// The proxy's inbound capture listener.
    pub port: u16,
    /// Which destination ports are redirected.
    pub ports: InboundPorts,
}

/// The inbound ports to redirect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundPorts {
    /// Only these (the app's listening ports).
    Only(Vec<PortRange>),
    /// Every port but these.
    AllExcept(Vec<PortRange>),
}

/// One port or an inclusive range (`8000-8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A flag value or a combination of flags that cannot work; the message
/// names the flag and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "{flag}: {value:?} is not a port or a range of ports (1-65535, e.g. 5432 or 8000-8100)"
    )]
    BadPort { flag: &'static str, value: String },
    #[error("{flag}: {value:?} is not an address range (e.g. 10.0.0.0/8, fd00::/8 or 192.0.2.7)")]
    BadCidr { flag: &'static str, value: String },
    #[error("{flag}: {value} has bits set past the /{prefix} prefix: write {suggest}")]
    HostBits {
        flag: &'static str,
        value: String,
        prefix: u8,
        suggest: String,
    },
    #[error("{flag} must not be 0: give the proxy's listening port")]
    ZeroPort { flag: &'static str },
    #[error("--outbound-port and --inbound-port are both {0}: the proxy needs a separate listener for each direction")]
    SamePort(u16),
    #[error(
        "--inbound-ports is empty: name the app's ports (--inbound-ports 8080,9000) or write `all`"
    )]
    NoInboundPorts,
    #[error("--exclude-inbound-ports only applies with --inbound-ports all: with a list, leave the port out of the list")]
    ExcludeWithList,
    #[error("--exclude-outbound-cidrs has the IPv6 range {0}, but IPv6 is not captured: add --ipv6 or drop the range")]
    Ipv6CidrWithoutIpv6(Cidr),
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

/// Parses a comma-separated list of ports and ranges for `flag`; sorted,
/// without duplicates. An empty string is an empty list.
pub fn parse_ports(flag: &'static str, text: &str) -> Result<Vec<PortRange>, ConfigError> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || ConfigError::BadPort {
            flag,
            value: item.to_string(),
        };
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let first = u16::from_str(a.trim()).map_err(|_| bad())?;
        let last = u16::from_str(b.trim()).map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        out.push(PortRange { first, last });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses a comma-separated list of address ranges for `flag`.
pub fn parse_cidrs(flag: &'static str, text: &str) -> Result<Vec<Cidr>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| parse_cidr(flag, item))
        .collect()
}

fn parse_cidr(flag: &'static str, item: &str) -> Result<Cidr, ConfigError> {
    let bad = || ConfigError::BadCidr {
        flag,
        value: item.to_string(),
    };
    let (addr, prefix) = match item.split_once('/') {
        Some((a, p)) => (
            IpAddr::from_str(a).map_err(|_| bad())?,
            Some(u8::from_str(p).map_err(|_| bad())?),
        ),
        None => (IpAddr::from_str(item).map_err(|_| bad())?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    if prefix > max {
        return Err(bad());
    }
    let masked = mask(addr, prefix);
    if masked != addr {
        return Err(ConfigError::HostBits {
            flag,
            value: item.to_string(),
            prefix,
            suggest: format!("{masked}/{prefix}"),
        });
    }
    Ok(Cidr { addr, prefix })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl CaptureConfig {
    /// Checks the combination of flags; the renderers assume it passed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.outbound_port == 0 {
            return Err(ConfigError::ZeroPort {
                flag: "--outbound-port",
            });
        }
        if let Some(inbound) = &self.inbound {
            if inbound.port == 0 {
                return Err(ConfigError::ZeroPort {
                    flag: "--inbound-port",
                });
            }
            if inbound.port == self.outbound_port {
                return Err(ConfigError::SamePort(inbound.port));
            }
            if inbound.ports == InboundPorts::Only(Vec::new()) {
                return Err(ConfigError::NoInboundPorts);
            }
        }
        match self.exclude_outbound_cidrs.iter().find(|c| c.is_ipv6()) {
            Some(c) if !self.ipv6 => Err(ConfigError::Ipv6CidrWithoutIpv6(*c)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn ports_parse_sorted_without_duplicates() {
        let cases: &[(&str, Result<Vec<PortRange>, ()>)] = &[
            ("", Ok(vec![])),
            ("22", Ok(vec![r(22, 22)])),
            (
                "9000, 8080,22,8080",
                Ok(vec![r(22, 22), r(8080, 8080), r(9000, 9000)]),
            ),
            ("8000-8100", Ok(vec![r(8000, 8100)])),
            ("0", Err(())),
            ("65536", Err(())),
            ("http", Err(())),
            ("90-80", Err(())),
        ];
        for (text, want) in cases {
            let got = parse_ports("--x", text).map_err(|_| ());
            assert_eq!(&got, want, "{text:?}");
        }
    }

    #[test]
    fn a_bad_port_names_the_flag_and_the_value() {
        let e = parse_ports("--exclude-outbound-ports", "22,ssh").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("--exclude-outbound-ports: \"ssh\""),
            "{msg}"
        );
    }

    #[test]
    fn cidrs_parse_and_host_bits_are_refused_with_the_fix() {
        let ok = parse_cidrs("--c", "10.0.0.0/8, 192.0.2.7,fd00::/8").unwrap();
        let shown: Vec<String> = ok.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]);
        let e = parse_cidrs("--c", "10.1.2.3/8").unwrap_err();
        assert!(e.to_string().contains("write 10.0.0.0/8"), "{e}");
        for bad in ["10.0.0.0/33", "fd00::/129", "example.com", "10.0.0/8"] {
            assert!(matches!(
                parse_cidrs("--c", bad),
                Err(ConfigError::BadCidr { .. })
            ));
        }
        assert_eq!(parse_cidrs("--c", "0.0.0.0/0").unwrap()[0].prefix, 0);
    }

    fn base() -> CaptureConfig {
        CaptureConfig::outbound_only_for_tests()
    }

    #[test]
    fn validation_refuses_combinations_that_cannot_work() {
        let inbound = |port, ports| Some(Inbound { port, ports });
        let cases: Vec<(CaptureConfig, Option<ConfigError>)> = vec![
            (base(), None),
            (
                CaptureConfig {
                    outbound_port: 0,
                    ..base()
                },
                Some(ConfigError::ZeroPort {
                    flag: "--outbound-port",
                }),
            ),
            (
                CaptureConfig {
                    inbound: inbound(15001, InboundPorts::AllExcept(vec![])),
                    ..base()
                },
                Some(ConfigError::SamePort(15001)),
            ),
            (
                CaptureConfig {
                    inbound: inbound(15006, InboundPorts::Only(vec![])),
                    ..base()
                },
                Some(ConfigError::NoInboundPorts),
            ),
            (
                CaptureConfig {
                    exclude_outbound_cidrs: parse_cidrs("--c", "fd00::/8").unwrap(),
                    ..base()
                },
                Some(ConfigError::Ipv6CidrWithoutIpv6(
                    parse_cidrs("--c", "fd00::/8").unwrap()[0],
                )),
            ),
            (
                CaptureConfig {
                    exclude_outbound_cidrs: parse_cidrs("--c", "fd00::/8").unwrap(),
                    ipv6: true,
                    ..base()
                },
                None,
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(cfg.validate().err(), want, "{cfg:?}");
        }
    }
}
