//! The W3C Trace Context parsers never panic; an accepted `traceparent`
//! re-serialises (as version 00) to a value that parses to the same trace;
//! an accepted `tracestate` is itself accepted again unchanged.
#![no_main]
use crank_proxy::tracecontext::{combine_tracestate, parse_traceparent, truncate_tracestate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = parse_traceparent([data]) {
        let child = t.child(t.parent_id);
        let again = parse_traceparent([child.as_bytes()]).expect("our own traceparent parses");
        assert_eq!(again.trace_id, t.trace_id);
        assert_eq!(again.version, 0);
    }
    let halves = data.split_at(data.len() / 2);
    if let Some(ts) = combine_tracestate([halves.0, halves.1]) {
        assert_eq!(combine_tracestate([ts.as_bytes()]).as_deref(), Some(ts.as_str()));
        let cut = truncate_tracestate(&ts, 512);
        assert!(cut.len() <= ts.len());
    }
});
