//! Identity parsing never panics, and what parses round-trips through both forms.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = s.parse::<crank_certs::Identity>() {
        assert_eq!(id.dns_name().parse::<crank_certs::Identity>().unwrap(), id);
        assert_eq!(id.spiffe_id().parse::<crank_certs::Identity>().unwrap(), id);
    }
});
