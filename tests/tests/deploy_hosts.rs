//! The deploy files for hosts and Kubernetes (deploy/systemd,
//! deploy/kubernetes): every unit passes `systemd-analyze verify` with the
//! built binaries in place of /usr/local/bin and keeps its hardening; the
//! capture commands the unit and the pod's init container run take the
//! shipped proxy configs and produce the rules (printed with --dry-run,
//! and really installed and removed inside a network-namespace host); and
//! every manifest validates against the Kubernetes 1.33 schemas.

use std::path::{Path, PathBuf};
use std::process::Command;

use crank_tests::netns::Hosts;
use crank_tests::{bin, output_text, Pki};

const K8S_VERSION: &str = "1.33.0";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The unit with /usr/local/bin/ pointing at the built binaries.
fn local_unit(text: &str) -> String {
    let dir = bin("crank-proxy").parent().unwrap().display().to_string();
    text.replace("/usr/local/bin/", &format!("{dir}/"))
}

const UNITS: [&str; 3] = ["crank-control", "crank-proxy", "crank-shim"];

#[test]
fn every_unit_verifies_and_keeps_its_hardening() {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let text = read(&format!("deploy/systemd/{name}.service"));
        for want in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "AmbientCapabilities=\n",
            "Restart=",
            &format!("User={name}\n"),
            &format!("ReadWritePaths=/var/lib/{name}"),
        ] {
            assert!(text.contains(want), "{name}.service lacks {want:?}");
        }
        let caps = if name == "crank-proxy" {
            "CAP_NET_ADMIN"
        } else {
            ""
        };
        assert!(
            text.contains(&format!("CapabilityBoundingSet={caps}\n")),
            "{name}.service: capabilities limited to {caps:?}"
        );
        let path = dir.path().join(format!("{name}.service"));
        std::fs::write(&path, local_unit(&text)).unwrap();
        let out = match Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                panic!("systemd-analyze cannot run ({e}): install systemd (tests/run.sh does)")
            }
        };
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stderr).trim().is_empty(),
            "systemd-analyze verify {name}.service: {}",
            output_text(&out)
        );
    }
    let users = read("deploy/systemd/crank.sysusers.conf");
    for name in UNITS {
        assert!(users.contains(&format!("\nu {name} ")), "{users}");
    }
}

/// The shipped proxy config with its /etc and /var paths moved into `dir`,
/// a real bundle and a token in place, so the proxy's config loader takes it.
fn local_proxy_config(dir: &Path, yaml: &str) -> PathBuf {
    let pki = Pki::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("trust")).unwrap();
    std::fs::create_dir_all(etc.join("token")).unwrap();
    for bundle in [etc.join("bundle.pem"), etc.join("trust/bundle.pem")] {
        std::fs::copy(pki.bundle(), bundle).unwrap();
    }
    for token in [etc.join("join.token"), etc.join("token/token")] {
        std::fs::write(token, "crank-jt-example").unwrap();
    }
    let text = yaml
        .replace("/etc/crank/", &format!("{}/", etc.display()))
        .replace(
            "/var/lib/crank-proxy",
            &dir.join("state").display().to_string(),
        )
        .replace("POD_IP", "10.1.2.3");
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `crank-proxy capture ARGS` as a unit line names it (without its `!`).
fn capture_args(line: &str) -> Vec<String> {
    let cmd = line.split_once('=').unwrap().1.trim_start_matches('!');
    let words: Vec<&str> = cmd.split_whitespace().collect();
    assert_eq!(
        words[..2],
        ["/usr/local/bin/crank-proxy", "capture"],
        "{line}"
    );
    words[2..].iter().map(|w| w.to_string()).collect()
}

fn run_capture(host: Option<&crank_tests::netns::Host>, args: &[String]) -> String {
    let mut cmd = match host {
        Some(h) => h.command(bin("crank-proxy")),
        None => Command::new(bin("crank-proxy")),
    };
    let out = cmd.arg("capture").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "crank-proxy capture {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rules (nftables or iptables, whichever `auto` took) leave `uid` alone.
fn exempts_uid(rules: &str, uid: u64) -> bool {
    rules.contains(&format!("meta skuid {uid} return"))
        || rules.contains(&format!("--uid-owner {uid} -j RETURN"))
}

/// The args with `--config` pointing at `config`.
fn with_config(args: &[String], config: &Path) -> Vec<String> {
    let mut a = args.to_vec();
    let at = a.iter().position(|w| w == "--config").expect("--config") + 1;
    a[at] = config.display().to_string();
    a
}

#[test]
fn the_proxy_units_capture_steps_install_and_remove_the_rules_of_its_config() {
    let unit = read("deploy/systemd/crank-proxy.service");
    let line = |key: &str| {
        unit.lines()
            .find(|l| l.starts_with(key) && l.contains(" capture "))
            .unwrap_or_else(|| panic!("crank-proxy.service has no {key} capture line"))
            .to_string()
    };
    let install = capture_args(&line("ExecStartPre=!"));
    let remove = capture_args(&line("ExecStopPost=!"));
    assert_eq!(install[..2], ["install", "--config"]);
    assert_eq!(remove[..2], ["remove", "--config"]);
    let dir = tempfile::tempdir().unwrap();
    let config = local_proxy_config(dir.path(), &read("deploy/systemd/proxy.yaml"));
    let (install, remove) = (
        with_config(&install, &config),
        with_config(&remove, &config),
    );

    let mut dry = install.clone();
    dry.push("--dry-run".to_string());
    let rules = run_capture(None, &dry);
    assert!(
        exempts_uid(&rules, 1337),
        "the proxy's uid is exempt:\n{rules}"
    );
    for want in ["15001", "15006", "8080"] {
        assert!(rules.contains(want), "the dry run lacks {want:?}:\n{rules}");
    }

    // As systemd would run them, on a host of their own.
    let Some(hosts) = Hosts::new(1) else { return };
    run_capture(Some(&hosts[0]), &install);
    let shown = run_capture(Some(&hosts[0]), &["show".to_string()]);
    assert!(shown.contains("15001") && shown.contains("1337"), "{shown}");
    run_capture(Some(&hosts[0]), &remove);
    let shown = run_capture(Some(&hosts[0]), &["show".to_string()]);
    assert!(!shown.contains("15001"), "removed: {shown}");
}

/// Runs `program ARGS` to success.
fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(bin(program)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        output_text(&out)
    );
}

#[test]
fn the_units_config_checks_pass_on_the_shipped_configs() {
    // crank-control's ExecStartPre --check, once the CA is made as the
    // config's comment says.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let text = read("deploy/systemd/control.yaml")
        .replace("/var/lib/crank-control", &state.display().to_string())
        .replace(
            "/run/crank-control",
            &dir.path().join("run").display().to_string(),
        )
        .replace(
            "/etc/crank/mesh",
            &repo("deploy/mesh-config").display().to_string(),
        );
    let config = dir.path().join("control.yaml");
    std::fs::write(&config, text).unwrap();
    let (root, int) = (state.join("ca/root"), state.join("ca/int1"));
    run_ok("crankctl", &["ca", "init", "--dir", root.to_str().unwrap()]);
    run_ok(
        "crankctl",
        &[
            "ca",
            "intermediate",
            "--root",
            root.to_str().unwrap(),
            "--out",
            int.to_str().unwrap(),
        ],
    );
    check("crank-control", &config);
    // The StatefulSet's control.yaml, on the same CA.
    let docs = documents("deploy/kubernetes/crank-control.yaml");
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let text = cm["data"]["control.yaml"]
        .as_str()
        .unwrap()
        .replace("/var/lib/crank-control", &state.display().to_string())
        .replace(
            "/etc/crank/mesh",
            &repo("deploy/mesh-config").display().to_string(),
        );
    std::fs::write(&config, text).unwrap();
    check("crank-control", &config);
    // crank-proxy's, before its first enrollment (a bundle and a token),
    // and the pod's.
    let config = local_proxy_config(dir.path(), &read("deploy/systemd/proxy.yaml"));
    check("crank-proxy", &config);
    let docs = documents("deploy/kubernetes/example-app.yaml");
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let pod = tempfile::tempdir().unwrap();
    let config = local_proxy_config(pod.path(), cm["data"]["proxy.yaml"].as_str().unwrap());
    check("crank-proxy", &config);
}

/// `program --config CONFIG --check` passes.
fn check(program: &str, config: &Path) {
    run_ok(program, &["--config", config.to_str().unwrap(), "--check"]);
}

/// Every document of a manifest file.
fn documents(rel: &str) -> Vec<serde_yaml::Value> {
    read(rel)
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn kind<'a>(docs: &'a [serde_yaml::Value], k: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k}"))
}

#[test]
fn the_kubernetes_manifests_validate_and_the_pod_captures_with_net_admin_only() {
    let manifests = ["namespace.yaml", "crank-control.yaml", "example-app.yaml"];
    let validate = repo("target/py/bin/kubernetes-validate");
    for m in manifests {
        let path = repo(&format!("deploy/kubernetes/{m}"));
        let out = Command::new(&validate)
            .args(["--strict", "-k", K8S_VERSION])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} cannot run ({e}): tests/run.sh installs it into target/py",
                    validate.display()
                )
            });
        assert!(out.status.success(), "{m}: {}", output_text(&out));
    }
    let control = documents("deploy/kubernetes/crank-control.yaml");
    let sts = kind(&control, "StatefulSet");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "state"
    );

    let app = documents("deploy/kubernetes/example-app.yaml");
    let pod = &kind(&app, "Deployment")["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_sequence().unwrap();
    let (capture, sidecar) = (&init[0], &init[1]);
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        capture["securityContext"]["capabilities"]["add"][0],
        "NET_ADMIN"
    );
    assert_eq!(
        capture["securityContext"]["capabilities"]["add"]
            .as_sequence()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(sidecar["securityContext"]["capabilities"]["drop"][0], "ALL");
    let script = capture["command"][2].as_str().unwrap();
    assert!(
        script.contains("crank-proxy capture install --config /etc/crank/run/proxy.yaml"),
        "{script}"
    );

    // The pod's proxy config, with an address for POD_IP, gives the rules.
    let cm = app.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = local_proxy_config(dir.path(), cm["data"]["proxy.yaml"].as_str().unwrap());
    let uid = sidecar["securityContext"]["runAsUser"].as_u64().unwrap();
    let args: Vec<String> = ["install", "--config", config.to_str().unwrap(), "--dry-run"]
        .map(String::from)
        .to_vec();
    let rules = run_capture(None, &args);
    assert!(
        exempts_uid(&rules, uid),
        "the proxy's uid is exempt:\n{rules}"
    );
}
