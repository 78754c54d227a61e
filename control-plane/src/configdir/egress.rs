//! `egress.yaml` and the `egress/` directory of the mesh config: the
//! destinations outside the mesh that routes may send to, checked and with
//! each `tls.ca` file's PEM text put inline for the proxies.

use std::collections::{BTreeMap, BTreeSet};

use crank_api::mesh::{EgressFile, MeshRoute};

use super::{problem, Problem};

const FILE: &str = "egress.yaml";

/// Checks the destinations and returns them with every CA inline. `files`
/// holds the `egress/` files (path relative to the directory → text).
pub(super) fn check(
    e: &EgressFile,
    files: &BTreeMap<String, String>,
    p: &mut Vec<Problem>,
) -> EgressFile {
    let mut out = e.clone();
    let mut names = BTreeSet::new();
    for (i, d) in e.destinations.iter().enumerate() {
        let at = |f: &str| Some(format!("destinations[{i}].{f}"));
        for (field, msg) in d.problems() {
            p.push(problem(FILE, None, at(field), msg));
        }
        if !names.insert(d.name.as_str()) {
            let msg = format!(
                "destination {:?} is declared twice; give each destination its own name",
                d.name
            );
            p.push(problem(FILE, None, at("name"), msg));
        }
        let Some(tls) = &d.tls else { continue };
        if tls.ca_is_inline() {
            check_pem(&tls.ca, FILE, at("tls.ca"), p);
            continue;
        }
        match files.get(tls.ca.trim_start_matches("./")) {
            Some(pem) => {
                check_pem(pem, &tls.ca, at("tls.ca"), p);
                if let Some(t) = out.destinations[i].tls.as_mut() {
                    t.ca = pem.clone();
                }
            }
            None => p.push(problem(FILE, None, at("tls.ca"), format!(
                "file {:?} is not in the config directory; put the destination's CA certificate (PEM) under egress/ and give its path relative to the directory (`egress/ray-ca.pem`), or the PEM text itself",
                tls.ca
            ))),
        }
    }
    out
}

/// A CA file must hold at least one PEM certificate that parses.
fn check_pem(pem: &str, file: &str, field: Option<String>, p: &mut Vec<Problem>) {
    match crank_certs::pem::certs_from_pem(pem.as_bytes()) {
        Ok(certs) if !certs.is_empty() => {}
        Ok(_) => p.push(problem(file, None, field, "holds no PEM certificate; give the CA certificate (`-----BEGIN CERTIFICATE-----`) that signed the destination's".into())),
        Err(e) => p.push(problem(file, None, field, format!("{e}; give the CA certificate (PEM) that signed the destination's"))),
    }
}

/// A backend naming `egress` must name a declared destination, be its
/// route's only backend and have no selector.
pub(super) fn check_backends(r: &MeshRoute, e: &EgressFile, mut push: impl FnMut(&str, String)) {
    for (j, b) in r.backends.iter().enumerate() {
        let Some(name) = &b.egress else { continue };
        let bf = format!(".backends[{j}]");
        if !e.destinations.iter().any(|d| &d.name == name) {
            let known: Vec<&str> = e.destinations.iter().map(|d| d.name.as_str()).collect();
            push(&format!("{bf}.egress"), format!("destination {name:?} is not declared in egress.yaml (it declares {known:?}); add it to egress.yaml's destinations or fix the name"));
        }
        if !b.selector.is_empty() {
            push(
                &format!("{bf}.selector"),
                "an egress backend has no endpoints to select; remove the selector".into(),
            );
        }
        if r.backends.len() > 1 {
            push(&format!("{bf}.egress"), "an egress backend must be its route's only backend; give the other backends their own route".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::load;

    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    const CAPS: (&str, &str) = ("capabilities.yaml", "capabilities: [{name: 'ray:serve'}]\n");

    fn egress_problems(files: &[(&str, &str)]) -> Vec<String> {
        let mut all = vec![CAPS];
        all.extend_from_slice(files);
        match load(dir(&all).path()) {
            Ok(_) => vec![],
            Err(ps) => ps.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn route(backend: &str) -> (&'static str, String) {
        (
            "routes/ray.yaml",
            format!("routes: [{{name: ray, backends: [{backend}]}}]\n"),
        )
    }

    #[test]
    fn a_declared_destination_with_a_ca_file_loads_with_the_pem_inline() {
        let ca = crank_certs::ca::Ca::generate("ray.example", std::time::Duration::from_secs(3600))
            .unwrap();
        let pem = ca.cert_pem().to_string();
        let (rf, rt) = route("{capability: 'ray:serve', egress: ray}");
        let d = dir(&[
            CAPS,
            ("egress.yaml", "mode: deny\ndestinations:\n  - {name: ray, address: 'ray-head.internal:8000', tls: {ca: egress/ray-ca.pem}}\n  - {name: dask, address: '10.0.0.5:8786'}\n"),
            ("egress/ray-ca.pem", pem.as_str()),
            (rf, rt.as_str()),
        ]);
        let s = load(d.path()).unwrap();
        assert_eq!(s.egress.mode, Some(crank_api::proxy::EgressMode::Deny));
        let tls = s.egress.destinations[0].tls.as_ref().unwrap();
        assert_eq!(tls.ca, pem, "the file's PEM text is pushed");
        assert_eq!(s.routes[0].backends[0].egress.as_deref(), Some("ray"));
    }

    #[test]
    fn every_egress_mistake_names_the_field_and_the_fix() {
        let (rf, rt) = route(
            "{capability: 'ray:serve', egress: nope, selector: {a: b}}, {capability: 'ray:serve'}",
        );
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("egress.yaml", "destinations: [{name: ray, address: 'ray-head'}]\n")], "destinations[0].address: address \"ray-head\" has no port"),
            (&[("egress.yaml", "destinations: [{name: ray, address: 'ray-head:99999'}]\n")], "port \"99999\" is not 1 to 65535"),
            (&[("egress.yaml", "destinations: [{name: ray, address: 'ray head:80'}]\n")], "is not a DNS name or IP address"),
            (&[("egress.yaml", "destinations: [{name: ray, address: '10.0.0.5:8265', tls: {ca: egress/x.pem}}]\n"), ("egress/x.pem", "x")], "tls.server_name: is needed: address 10.0.0.5:8265 is an IP"),
            (&[("egress.yaml", "destinations: [{name: ray, address: 'a.b:1', tls: {ca: egress/missing.pem}}]\n")], "file \"egress/missing.pem\" is not in the config directory"),
            (&[("egress.yaml", "destinations: [{name: ray, address: 'a.b:1', tls: {ca: egress/bad.pem}}]\n"), ("egress/bad.pem", "not a pem")], "destinations[0].tls.ca: no `-----BEGIN CERTIFICATE-----` block found"),
            (&[("egress.yaml", "destinations: [{name: ray, address: 'a:1'}, {name: ray, address: 'b:1'}]\n")], "declared twice"),
            (&[("egress.yaml", "mode: block\n")], "mode: unknown variant `block`"),
            (&[(rf, rt.as_str())], "backends[0].egress: destination \"nope\" is not declared in egress.yaml"),
            (&[(rf, rt.as_str())], "backends[0].selector: an egress backend has no endpoints to select"),
            (&[(rf, rt.as_str())], "must be its route's only backend"),
        ];
        for (files, want) in cases {
            let got = egress_problems(files);
            assert!(
                got.iter().any(|p| p.contains(want)),
                "want {want:?} in {got:#?}"
            );
        }
    }
}
