//! A saved edit of the config directory is published at once, through the
//! directory watch (inotify), not at the next directory check (issue #19).
//!
//! crank-control runs with its ticker slowed to an hour
//! (`CRANK_CONTROL_TICK=1h`): after the start, only the watch reads the
//! directory, so every version published here came through it.
//!
//! - The directory is missing at start: a warning says it cannot be
//!   watched; once it appears the watch is armed and publishes it.
//! - An edit publishes a new version; a broken edit is refused at once
//!   and the last good version keeps serving; the fix publishes.
//! - The directory swapped for a new one (a rename, as a deploy that
//!   swaps checkouts does): the watch follows and publishes it.

use std::path::Path;
use std::time::Duration;

use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::wait_until;

fn route(weight: u32) -> String {
    format!("routes:\n  - name: backend\n    match: {{hosts: [backend]}}\n    backends:\n      - {{capability: hello:v1, weight: {weight}}}\n")
}

fn status(cp: &ControlPlane) -> serde_json::Value {
    serde_json::from_str(&cp.ctl_ok(&["status", "--output", "json"])).unwrap()
}

fn seq(cp: &ControlPlane) -> u64 {
    status(cp)["version"]["seq"].as_u64().unwrap_or(0)
}

/// A complete config directory at `dir` (made elsewhere, then renamed
/// into place, so the watch never sees half of it).
fn config_dir(dir: &Path, weight: u32) {
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::write(
        dir.join("capabilities.yaml"),
        "capabilities:\n  - name: hello:v1\n",
    )
    .unwrap();
    std::fs::write(dir.join("routes/backend.yaml"), route(weight)).unwrap();
}

const WAIT: Duration = Duration::from_secs(15);

#[test]
fn edits_publish_through_the_directory_watch_without_waiting_for_the_tick() {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\n".into(),
        env: vec![("CRANK_CONTROL_TICK", "1h".into())],
        ..Default::default()
    });
    wait_until("the warning that mesh/ cannot be watched", WAIT, || {
        cp.log_text().contains("cannot watch the config directory")
    });
    assert_eq!(seq(&cp), 0, "nothing to publish yet");

    let mesh = cp.path().join("mesh");
    let staged = cp.path().join("mesh.new");
    config_dir(&staged, 100);
    std::fs::rename(&staged, &mesh).unwrap();
    wait_until("version 1, once the watch is armed", WAIT, || seq(&cp) == 1);

    cp.write_mesh_file("routes/backend.yaml", &route(50));
    wait_until("version 2 after an edit", WAIT, || seq(&cp) == 2);

    cp.write_mesh_file("routes/backend.yaml", "routes: [{name: x, backendz: []}]\n");
    wait_until("the broken edit refused", WAIT, || {
        !status(&cp)["last_error"].is_null()
    });
    assert_eq!(seq(&cp), 2, "the last good version keeps serving");

    cp.write_mesh_file("routes/backend.yaml", &route(20));
    wait_until("version 3 after the fix", WAIT, || seq(&cp) == 3);
    assert!(status(&cp)["last_error"].is_null(), "{}", status(&cp));

    // A new directory swapped in: the watch follows it to the new inode.
    config_dir(&staged, 70);
    std::fs::rename(&mesh, cp.path().join("mesh.old")).unwrap();
    std::fs::rename(&staged, &mesh).unwrap();
    wait_until("version 4 from the swapped-in directory", WAIT, || {
        seq(&cp) == 4
    });
    cp.write_mesh_file("routes/backend.yaml", &route(10));
    wait_until("version 5 after an edit of the new directory", WAIT, || {
        seq(&cp) == 5
    });
}
