//! Build script of crank-proxy: the release binary is linked with the
//! functions that a running sidecar executes placed side by side, in the
//! order of `link-order.txt` (issue #19, memory).
//!
//! Why: the kernel maps an executable's pages 64 KiB at a time around each
//! page that runs (fault-around). With the functions a sidecar runs spread
//! over 13 MiB of `.text`, a sidecar had 10.6-12.6 MiB of its binary
//! resident after start-up; packed together (about 4 MiB of functions), far
//! fewer pages are touched. Instructions per request do not change.
//!
//! The file lists mangled symbol names, hottest first; `benches/link-order.sh`
//! regenerates it from callgrind runs of the bench pairs. Names that no
//! longer exist are ignored (stale entries only cost the packing, never the
//! build). Applied only where rustc links with LLD by default (release,
//! x86_64-unknown-linux-gnu, no custom linker); `CRANK_LINK_ORDER=0` turns
//! it off.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=CRANK_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let wanted = var("CRANK_LINK_ORDER") != "0";
    let release = var("PROFILE") == "release";
    let lld_target = var("TARGET") == "x86_64-unknown-linux-gnu";
    // A custom linker (or linker flavour) may not be LLD, which alone knows
    // --symbol-ordering-file.
    let custom_linker = !var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if !(wanted && release && lld_target) || custom_linker {
        return;
    }
    let file = Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if !file.is_file() {
        return;
    }
    let arg = |a: String| println!("cargo:rustc-link-arg-bin=crank-proxy=-Wl,{a}");
    arg(format!("--symbol-ordering-file={}", file.display()));
    arg("--no-warn-symbol-ordering".into());
}
