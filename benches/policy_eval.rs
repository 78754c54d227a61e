//! Policy decision latency for the shipped policies (`policies/`), as the
//! proxy makes it: build the input document from request facts, evaluate
//! allow and deny, apply the mode. One thread, warm engine, many requests.
//!
//! Run: `cargo bench -p crank-policy --bench policy_eval` (add
//! `-- --iterations N` to change the sample count). Prints a markdown table
//! of p50 / p90 / p99 / p99.9 / max per request kind.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crank_policy::input::{self, RequestFacts, Workload};
use crank_policy::manifest::EngineChoice;
use crank_policy::{Bundle, Outcome, PolicySet};

fn workload(service: &str, tenant: &str) -> Workload {
    let id = crank_certs::Identity::new(service, tenant, "crank.local").expect("valid labels");
    Workload::from(&id)
}

fn facts(
    source: (&str, &str),
    dest: (&str, &str),
    capability: Option<&str>,
    method: &str,
    path: &str,
    body: Option<u64>,
) -> RequestFacts {
    RequestFacts {
        direction: "inbound",
        source: Some(workload(source.0, source.1)),
        source_address: Some("10.0.0.7:41000".parse().unwrap()),
        destination: workload(dest.0, dest.1),
        capability: capability.map(String::from),
        route: None,
        method: method.into(),
        path_and_query: path.into(),
        host: Some(dest.0.into()),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("user-agent".into(), "bench/1".into()),
            ("x-request-id".into(), "abc".into()),
            ("authorization".into(), "Bearer x".into()),
            ("accept".into(), "*/*".into()),
        ],
        body_size: body,
        time: SystemTime::now(),
        id: "0123456789abcdef0123456789abcdef".into(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let mut iterations = 100_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--iterations" {
            iterations = args
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(iterations);
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let bundle = Bundle::read(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let cases = [
        (
            "quickstart GET (allow)",
            facts(
                ("frontend", "demo"),
                ("backend", "demo"),
                None,
                "GET",
                "/hello",
                None,
            ),
        ),
        (
            "transcode POST, role media (allow)",
            facts(
                ("web", "acme"),
                ("transcoder", "media"),
                Some("transcode:v1"),
                "POST",
                "/v1/jobs?preset=fast",
                Some(10 << 20),
            ),
        ),
        (
            "transcode POST, no role (deny)",
            facts(
                ("web", "evil"),
                ("transcoder", "media"),
                Some("transcode:v1"),
                "POST",
                "/v1/jobs",
                Some(1024),
            ),
        ),
        (
            "body over the limit (deny)",
            facts(
                ("web", "acme"),
                ("transcoder", "media"),
                Some("transcode:v1"),
                "POST",
                "/v1/jobs",
                Some(200 << 20),
            ),
        ),
    ];
    for engine in [EngineChoice::Rvm, EngineChoice::Interpreter] {
        let mut b = bundle.clone();
        b.manifest.engine = engine;
        let set = PolicySet::compile(&b).unwrap_or_else(|e| panic!("{e}"));
        run(&set, &cases, iterations);
    }
}

fn run(set: &PolicySet, cases: &[(&str, RequestFacts)], iterations: usize) {
    println!(
        "policy set {} ({} modules, engine {}), {iterations} decisions per case, one thread\n",
        set.revision(),
        set.files().len(),
        set.engine()
    );
    println!("| request | result | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |");
    println!("|---|---|---|---|---|---|---|");
    for (name, f) in cases {
        // Warm up: the first decision on a thread clones the prepared engine.
        let mut outcome = Outcome::Error;
        for _ in 0..1000 {
            outcome = set.decide_owned(input::build(f, set.manifest())).outcome;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let start = Instant::now();
            let d = set.decide_owned(input::build(f, set.manifest()));
            samples.push(start.elapsed());
            std::hint::black_box(d);
        }
        samples.sort();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            outcome.as_str(),
            us(percentile(&samples, 0.5)),
            us(percentile(&samples, 0.9)),
            us(percentile(&samples, 0.99)),
            us(percentile(&samples, 0.999)),
            us(*samples.last().unwrap()),
        );
    }
}
