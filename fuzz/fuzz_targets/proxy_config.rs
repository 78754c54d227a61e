//! Config parsing never panics on any YAML text; errors name a field.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Err(e) = crank_proxy::config::parse("fuzz.yaml", s) {
        assert!(!e.field.is_empty());
    }
});
