//! docs/reference/capture.md shows a `--dry-run`; this checks that the
//! binary prints exactly that, so the reference cannot drift from the code.

use std::process::Command;

#[test]
fn the_reference_shows_what_dry_run_prints() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/reference/capture.md"
    ))
    .expect("docs/reference/capture.md is there");
    let block = doc
        .split_once("<!-- dry-run nft -->\n```\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(block, _)| block)
        .expect("the reference has a `<!-- dry-run nft -->` block");
    let out = Command::new(env!("CARGO_BIN_EXE_crank-capture"))
        .args([
            "install",
            "--dry-run",
            "--backend",
            "nft",
            "--proxy-uid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-port",
            "15006",
            "--inbound-ports",
            "8080,9000",
            "--exclude-outbound-ports",
            "22,25",
            "--exclude-outbound-cidrs",
            "169.254.169.254",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), block);
}
