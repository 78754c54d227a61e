//! The policy scan that decides whether a set may use the decision cache
//! (which input paths it reads, which built-ins it calls) never panics on
//! any module text, and a plan it accepts keys any document.
#![no_main]
use crank_policy::cache::plan;
use crank_policy::InputShape;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = plan([text], InputShape::Crank) {
            let doc = crank_policy::RegoValue::from(
                serde_json::json!({"source": null, "request": {"method": "GET"}}),
            );
            let _ = p.key(&doc);
        }
    }
});
