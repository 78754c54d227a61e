//! The capability check: changing the firewall needs `CAP_NET_ADMIN` in the
//! effective set. Read from `/proc/self/status` (`CapEff`, a hex mask), so
//! the refusal comes before any tool runs and says how to fix it.

/// `CAP_NET_ADMIN`'s bit in the capability masks.
pub const CAP_NET_ADMIN: u32 = 12;

/// Whether the `CapEff` line of a `/proc/<pid>/status` text has `cap`;
/// `None` when there is no readable `CapEff` line.
pub fn effective_has(status: &str, cap: u32) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let mask = u64::from_str_radix(hex, 16).ok()?;
    Some(mask & (1u64 << cap) != 0)
}

/// Whether this process may change the firewall rules. Where
/// `/proc/self/status` cannot be read (not Linux), the tools will say.
pub fn have_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_has(&s, CAP_NET_ADMIN))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_decides() {
        let cases = [
            (
                "CapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n",
                Some(true),
            ),
            ("CapEff:\t0000000000001000\n", Some(true)),
            ("CapEff:\t0000000000000000\n", Some(false)),
            // CAP_NET_RAW (bit 13) alone is not enough.
            ("CapEff:\t0000000000002000\n", Some(false)),
            ("CapPrm:\t000001fffeffffff\n", None),
            ("CapEff:\tzz\n", None),
        ];
        for (status, want) in cases {
            assert_eq!(effective_has(status, CAP_NET_ADMIN), want, "{status:?}");
        }
    }
}
