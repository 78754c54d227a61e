//! A platform engineer's config mistakes, through the real binary:
//! `crank-proxy --config bad.yaml` (and `--check`) exits 2 without serving,
//! and stderr names the file, the field and the fix; a good config passes
//! `--check` with 0.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crank_tests::proxy::free_addr;
use crank_tests::sidecar::leaf_without_identity;
use crank_tests::Pki;

/// How one run of the binary ended.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `crank-proxy --config <config> [extra]`; a process still running
/// after 10 s (it started serving) is killed and reported.
fn crank_proxy(config: &Path, extra: &[&str]) -> Outcome {
    let mut child = Command::new(crank_tests::bin("crank-proxy"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crank-proxy");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let outcome = Outcome {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    };
    assert!(
        status.is_some(),
        "crank-proxy {extra:?} was still running after 10s: {outcome:?}"
    );
    outcome
}

/// A fresh PKI with a valid leaf, and a valid config's YAML for it with
/// `{extra}` appended (routes, ports, inbound, ...).
struct Setup {
    pki: Pki,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new();
        pki.leaf("frontend", "demo");
        Setup { pki }
    }

    fn identity(&self) -> String {
        "identity: {cert: frontend.demo.crt, key: frontend.demo.key, trust_bundle: bundle.pem}\n"
            .into()
    }

    fn admin(&self) -> String {
        format!("admin: {{listen: {}}}\n", free_addr())
    }

    /// Writes `yaml` as `<name>.yaml` next to the certificates.
    fn write(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.pki.path().join(format!("{name}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        p
    }
}

/// Asserts a refused config: exit 2, and stderr names the file, the field
/// and says what to do (`needles`).
fn assert_refused(case: &str, o: &Outcome, file: &Path, field: &str, needles: &[&str]) {
    assert_eq!(o.code, Some(2), "{case}: want exit 2: {o:?}");
    let err = &o.stderr;
    assert!(
        err.contains(&file.display().to_string()),
        "{case}: stderr names the file {}: {err}",
        file.display()
    );
    assert!(
        err.contains(field),
        "{case}: stderr names the field {field}: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{case}: stderr says {n:?}: {err}");
    }
}

#[test]
fn config_mistakes_exit_2_naming_file_field_and_fix() {
    let s = Setup::new();
    let (id, admin) = (s.identity(), s.admin());
    let cases: Vec<(&str, String, &str, Vec<&str>)> = vec![
        (
            "unknown-top-level-key",
            format!("{id}{admin}routse: []\n"),
            "routse",
            vec!["unknown field `routse`", "expected one of", "`routes`", "remove it or fix its spelling"],
        ),
        (
            "unknown-nested-key",
            format!("{id}{admin}inbound: {{listen: {}, app: {}, colour: red}}\n", free_addr(), free_addr()),
            "inbound.colour",
            vec!["unknown field `colour`", "remove it or fix its spelling"],
        ),
        (
            "undefined-route",
            format!(
                "{id}{admin}outbound: {{ports: [{{listen: {}, route: payments}}]}}\n\
                 routes: [{{name: backend, endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]}}]\n",
                free_addr()
            ),
            "outbound.ports[0].route",
            vec!["\"payments\" is not defined", "define it under `routes`", "backend"],
        ),
        (
            "bad-identity",
            format!("{id}{admin}routes: [{{name: backend, endpoints: [{{address: 127.0.0.1:1, identity: backend}}]}}]\n"),
            "routes[0].endpoints[0].identity",
            vec!["\"backend\"", "<service>.<tenant>.<trust-domain>"],
        ),
        (
            "missing-cert-file",
            format!("identity: {{cert: nope.crt, key: frontend.demo.key, trust_bundle: bundle.pem}}\n{admin}"),
            "identity.cert",
            vec!["nope.crt", "crankctl cert issue"],
        ),
    ];
    for (name, yaml, field, needles) in &cases {
        let file = s.write(name, yaml);
        let run = crank_proxy(&file, &[]);
        assert_refused(&format!("{name} (run)"), &run, &file, field, needles);
        let check = crank_proxy(&file, &["--check"]);
        assert_refused(&format!("{name} (--check)"), &check, &file, field, needles);
    }
}

#[test]
fn a_bad_value_is_shown_with_its_field_once_and_the_fix() {
    let s = Setup::new();
    let (id, admin) = (s.identity(), s.admin());
    let file = s.write(
        "bad-listen",
        &format!("{id}{admin}inbound:\n  listen: localhost:4143\n  app: 127.0.0.1:8080\n"),
    );
    for extra in [&[][..], &["--check"][..]] {
        let o = crank_proxy(&file, extra);
        let needles = [
            "found `localhost:4143` (line 4)",
            "ip:port",
            "127.0.0.1:4143",
        ];
        assert_refused(&format!("{extra:?}"), &o, &file, "inbound.listen", &needles);
        assert_eq!(
            o.stderr.matches("inbound.listen").count(),
            1,
            "the field is named once: {}",
            o.stderr
        );
        assert!(!o.stderr.contains(" at line "), "{}", o.stderr);
    }
}

#[test]
fn every_problem_of_a_refused_config_is_listed() {
    let s = Setup::new();
    let (id, admin) = (s.identity(), s.admin());
    let file = s.write(
        "many",
        &format!(
            "{id}{admin}threads: 0\n\
             routes: [{{name: backend, endpoints: [{{address: 127.0.0.1:1, identity: backend, weight: 0}}]}}]\n\
             tracing: {{sampling: 1.5}}\n"
        ),
    );
    let o = crank_proxy(&file, &["--check"]);
    assert_eq!(o.code, Some(2), "{o:?}");
    let want = [
        ("threads", "use 1 to 64"),
        ("routes[0].endpoints[0].identity", "\"backend\""),
        ("routes[0].endpoints[0].weight", "weight 0"),
        ("tracing.sampling", "1.5 is out of range"),
    ];
    for (field, needle) in want {
        let line = format!("{}: {field}: ", file.display());
        let hit = o.stderr.lines().find(|l| l.contains(&line));
        assert!(
            hit.is_some_and(|l| l.contains(needle)),
            "{field}: {needle}: {}",
            o.stderr
        );
    }
}

#[test]
fn a_policy_compile_error_points_at_the_line_of_the_mistake() {
    let s = Setup::new();
    let pol = s.pki.path().join("pol");
    std::fs::create_dir(&pol).unwrap();
    // The dangling `==` is on line 3; the parser only notices at line 4.
    std::fs::write(
        pol.join("authz.rego"),
        "package crank.authz\nallow if {\n  input.x ==\n}\n",
    )
    .unwrap();
    let (id, admin) = (s.identity(), s.admin());
    let file = s.write(
        "bad-policy",
        &format!(
            "{id}{admin}inbound: {{listen: {}, app: 127.0.0.1:8080}}\npolicy: {{inbound: {{dir: pol}}}}\n",
            free_addr()
        ),
    );
    let o = crank_proxy(&file, &["--check"]);
    assert_eq!(o.code, Some(2), "{o:?}");
    assert!(o.stderr.contains("authz.rego:3:13"), "{}", o.stderr);
    assert!(o.stderr.contains("3 |   input.x =="), "{}", o.stderr);
    assert!(!o.stderr.contains("authz.rego:4:"), "{}", o.stderr);
}

/// Configs whose YAML is fine but whose identity material is unusable:
/// (name, yaml, field, needles), written next to the certificates.
fn unusable_identity_cases(
    s: &Setup,
) -> Vec<(&'static str, PathBuf, &'static str, Vec<&'static str>)> {
    s.pki.leaf("backend", "demo");
    leaf_without_identity(&s.pki, "legacy");
    // A chain whose second certificate does not decode (Pingora would panic on it).
    let leaf = std::fs::read_to_string(s.pki.path().join("frontend.demo.crt")).unwrap();
    std::fs::write(
        s.pki.path().join("bad-chain.crt"),
        format!("{leaf}-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"),
    )
    .unwrap();
    let admin = s.admin();
    let cases = [
        (
            "key-of-another-cert",
            "identity: {cert: frontend.demo.crt, key: backend.demo.key, trust_bundle: bundle.pem}\n",
            "identity.key",
            vec!["does not match", "use the key issued with that certificate"],
        ),
        (
            "cert-without-identity",
            "identity: {cert: legacy.crt, key: legacy.key, trust_bundle: bundle.pem}\n",
            "identity.cert",
            vec!["no Crank identity", "crankctl cert issue"],
        ),
        (
            "chain-with-garbage",
            "identity: {cert: bad-chain.crt, key: frontend.demo.key, trust_bundle: bundle.pem}\n",
            "identity.cert",
            vec!["certificate 1 of the chain", "reissue the chain"],
        ),
        (
            "bundle-not-pem",
            "identity: {cert: frontend.demo.crt, key: frontend.demo.key, trust_bundle: legacy.ext}\n",
            "identity.trust_bundle",
            vec!["legacy.ext", "bundle.pem from `crankctl ca init`"],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, id, field, needles)| {
            (name, s.write(name, &format!("{id}{admin}")), field, needles)
        })
        .collect()
}

#[test]
fn identity_material_that_cannot_be_used_exits_2_naming_the_field() {
    let s = Setup::new();
    for (name, file, field, needles) in unusable_identity_cases(&s) {
        let run = crank_proxy(&file, &[]);
        assert_refused(name, &run, &file, field, &needles);
    }
}

#[test]
fn check_refuses_what_a_start_would_refuse() {
    // `--check` is what CI runs before a rollout: docs/reference/cli.md says
    // it exits 2 when the config or identity cannot be loaded.
    let s = Setup::new();
    for (name, file, field, needles) in unusable_identity_cases(&s) {
        let check = crank_proxy(&file, &["--check"]);
        assert_refused(&format!("{name} (--check)"), &check, &file, field, &needles);
    }
}

#[test]
fn a_good_config_passes_check_with_0_and_does_not_serve() {
    let s = Setup::new();
    let admin_addr = free_addr();
    let yaml = format!(
        "{}admin: {{listen: {admin_addr}}}\n\
         outbound: {{ports: [{{listen: {}, route: backend}}]}}\n\
         routes: [{{name: backend, endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]}}]\n",
        s.identity(),
        free_addr()
    );
    let file = s.write("good", &yaml);
    let o = crank_proxy(&file, &["--check"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(
        o.stdout.contains(&format!("{}: ok", file.display())),
        "{o:?}"
    );
    assert!(
        std::net::TcpStream::connect(admin_addr).is_err(),
        "--check must not start listeners"
    );
}

#[test]
fn the_shipped_resilience_example_passes_check() {
    // deploy/examples/resilience.yaml documents every resilience knob; it
    // must stay a valid config (only the identity files are swapped in).
    let s = Setup::new();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/resilience.yaml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let text = text
        .replace("certs/api.acme.crt", "frontend.demo.crt")
        .replace("certs/api.acme.key", "frontend.demo.key")
        .replace("certs/bundle.pem", "bundle.pem");
    let file = s.write("resilience-example", &text);
    let o = crank_proxy(&file, &["--check"]);
    assert_eq!(o.code, Some(0), "{o:?}");
}
