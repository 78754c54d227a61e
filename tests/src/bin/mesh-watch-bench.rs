//! Config distribution benchmark (issue #4): N simulated proxies long-poll
//! one real `crank-control`; the config directory is edited K times and we
//! measure, per edit, the time from the file save to every watcher holding
//! the new version, plus crank-control's RSS per watcher and CPU per edit.
//!
//! ```sh
//! CRANK_BIN_DIR=target/release mesh-watch-bench --watchers 100,1000 --updates 20
//! ```
//!
//! Setup per N, as in `tests/src/control.rs`: a fresh CA (`crankctl ca
//! init` + `ca intermediate`), crank-control with `config_dir: mesh`, one
//! join token for `bench.demo` enrolled through `POST /v1/identity/enroll`.
//! Every watcher is a tokio task with its own TLS 1.3 connection (all share
//! that one certificate, each has its own `instance`) that loops on
//! `GET /v1/mesh/watch?...&wait=30`. "Applied" is the instant a watcher has
//! read and parsed the answer with the new `version.seq`. The watchers are
//! simulated in one process: they are not real proxies, and on a small
//! machine they share the CPUs with crank-control.
//!
//! `--replicas 3` (issue #15): three etcd members and three crank-control
//! replicas with `store: etcd` (`tests/src/control_ha.rs`); watcher `i`
//! starts on replica `i % 3` and moves to the next on any error. K edits,
//! then SIGKILL of the leading replica and one edit saved at once (its
//! save-to-applied includes the election and the reconnection of the
//! killed replica's watchers), then K edits more on the two survivors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use crank_tests::control::{ControlOptions, ControlPlane};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::{mpsc, Semaphore};

const SERVER_NAME: &str = "control.crank-system.crank.local";

/// (watcher, seq it now holds, when it had parsed it).
type Event = (usize, u64, Instant);

fn main() -> Result<()> {
    let mut watchers = vec![100, 1000];
    let mut updates = 20;
    let mut replicas = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().context("a flag needs a value");
        match a.as_str() {
            "--watchers" => {
                watchers = val()?
                    .split(',')
                    .map(|n| n.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--updates" => updates = val()?.parse()?,
            "--replicas" => replicas = val()?.parse()?,
            "--bin-dir" => std::env::set_var("CRANK_BIN_DIR", val()?),
            _ => bail!(
                "usage: mesh-watch-bench [--watchers 100,1000] [--updates 20] [--replicas 1|3] [--bin-dir DIR]"
            ),
        }
    }
    raise_nofile();
    let rt = tokio::runtime::Runtime::new()?;
    if replicas > 1 {
        return ha::main(&rt, &watchers, updates, replicas);
    }
    let mut summary = Vec::new();
    for n in watchers {
        summary.push(rt.block_on(run(n, updates))?);
    }
    println!("| watchers | updates | p50 ms | p99 ms | max ms | fan-out p50 ms | fan-out max ms | RSS idle MiB | RSS watching MiB | KiB per watcher | CPU ms per update |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &summary {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r["watchers"],
            r["updates"],
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["max_ms"].as_f64().unwrap_or(0.0),
            r["fanout_p50_ms"].as_f64().unwrap_or(0.0),
            r["fanout_max_ms"].as_f64().unwrap_or(0.0),
            r["rss_idle_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            r["rss_watching_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            r["kib_per_watcher"].as_f64().unwrap_or(0.0),
            r["cpu_ms_per_update"].as_f64().unwrap_or(0.0),
        );
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn run(n: usize, updates: usize) -> Result<serde_json::Value> {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\nregistry: {lease: 10s}\n".into(),
        ..Default::default()
    });
    let pid = pid_of(&cp)?;
    save(
        &cp,
        "capabilities.yaml",
        "capabilities:\n  - name: hello:v1\n",
    )?;
    save(&cp, "routes/bench.yaml", &route(100))?;
    let tls = Arc::new(enroll(&cp).await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kib(pid)?;

    // Open the watchers, at most 64 handshakes at a time, and wait for seq 1.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let gate = Arc::new(Semaphore::new(64));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let addrs = Arc::new(vec![cp.listen]);
            tokio::spawn(watch(i, addrs, tls.clone(), gate.clone(), tx.clone()))
        })
        .collect();
    let mut seqs = vec![0u64; n];
    collect(&mut rx, &mut seqs, 1, Duration::from_secs(120), |_| {}).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_watching = rss_kib(pid)?;

    // The idle CPU (config-dir polling, 30 s re-polls) over a few seconds.
    let idle_span = Duration::from_secs(5);
    let (c0, t0) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(idle_span).await;
    let idle_rate = (cpu_ticks(pid)? - c0) as f64 / t0.elapsed().as_secs_f64();

    let (mut all, mut fanouts) = (Vec::new(), Vec::new());
    let (c1, t1) = (cpu_ticks(pid)?, Instant::now());
    for k in 0..updates {
        // Spread the saves over the 0.5 s poll of the config directory.
        tokio::time::sleep(Duration::from_millis(150 + (k as u64 * 137) % 500)).await;
        let target = k as u64 + 2;
        save(&cp, "routes/bench.yaml", &route(101 + k as u32))?;
        let saved = Instant::now();
        let mut lat = Vec::with_capacity(n);
        collect(&mut rx, &mut seqs, target, Duration::from_secs(30), |at| {
            lat.push(at.saturating_duration_since(saved).as_secs_f64() * 1e3)
        })
        .await?;
        lat.sort_by(f64::total_cmp);
        println!(
            "N={n} update {k:>2}: p50 {:>4.0} ms  p99 {:>4.0} ms  max {:>4.0} ms  first {:>4.0} ms",
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            lat[lat.len() - 1],
            lat[0]
        );
        fanouts.push(lat[lat.len() - 1] - lat[0]);
        all.extend(lat);
    }
    let span = t1.elapsed().as_secs_f64();
    let busy = (cpu_ticks(pid)? - c1) as f64 - idle_rate * span;
    let tick_ms = 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for t in tasks {
        t.abort();
    }
    all.sort_by(f64::total_cmp);
    fanouts.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "watchers": n,
        "updates": updates,
        "p50_ms": pct(&all, 50.0),
        "p99_ms": pct(&all, 99.0),
        "max_ms": all[all.len() - 1],
        "fanout_p50_ms": pct(&fanouts, 50.0),
        "fanout_max_ms": fanouts[fanouts.len() - 1],
        "rss_idle_kib": rss_idle,
        "rss_watching_kib": rss_watching,
        "kib_per_watcher": (rss_watching as f64 - rss_idle as f64) / n as f64,
        "cpu_ms_per_update": (busy * tick_ms / updates as f64).max(0.0),
        "idle_cpu_ms_per_s": idle_rate * tick_ms,
    }))
}

/// Reads events until every watcher holds `target`; `on` gets each arrival.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    seqs: &mut [u64],
    target: u64,
    limit: Duration,
    mut on: impl FnMut(Instant),
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut missing = seqs.iter().filter(|s| **s < target).count();
    while missing > 0 {
        let Ok(Some((i, seq, at))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            bail!("{missing} watchers lack seq {target} after {limit:?}");
        };
        if seqs[i] < target && seq >= target {
            missing -= 1;
            on(at);
        }
        seqs[i] = seqs[i].max(seq);
    }
    Ok(())
}

/// One simulated proxy: long-polls forever, reconnecting when needed
/// (to the next of `addrs` after an error, starting at `i % addrs.len()`).
async fn watch(
    i: usize,
    addrs: Arc<Vec<std::net::SocketAddr>>,
    tls: Arc<rustls::ClientConfig>,
    gate: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let (mut seq, mut registry) = (0u64, 0u64);
    let mut at = i % addrs.len();
    loop {
        let opened = {
            let _permit = gate.acquire().await;
            connect(addrs[at], &tls).await
        };
        let Ok(mut send) = opened else {
            at = (at + 1) % addrs.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let uri = format!("/v1/mesh/watch?instance=w{i}&seq={seq}&registry={registry}&wait=30");
            match request(&mut send, hyper::Method::GET, &uri, Bytes::new()).await {
                Ok(v) => {
                    let got = v["version"]["seq"].as_u64().unwrap_or(0);
                    registry = v["registry"].as_u64().unwrap_or(0);
                    if got != seq {
                        seq = got;
                        let _ = tx.send((i, seq, Instant::now()));
                    }
                }
                // No config published yet (503), or the connection is gone.
                Err(_) => {
                    at = (at + 1) % addrs.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn request(
    send: &mut SendRequest<Full<Bytes>>,
    method: hyper::Method,
    uri: &str,
    body: Bytes,
) -> Result<serde_json::Value> {
    send.ready().await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", SERVER_NAME)
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// Enrolls `bench.demo` with a fresh join token; returns the mTLS config.
async fn enroll(cp: &ControlPlane) -> Result<rustls::ClientConfig> {
    enroll_at(
        cp.listen,
        &cp.token("bench", "demo"),
        &cp.bootstrap_bundle(),
    )
    .await
}

/// Enrolls `bench.demo` at `addr` with `token`, trusting `bundle`.
async fn enroll_at(
    addr: std::net::SocketAddr,
    token: &str,
    bundle: &std::path::Path,
) -> Result<rustls::ClientConfig> {
    let id = crank_certs::Identity::new("bench", "demo", crank_certs::DEFAULT_TRUST_DOMAIN)?;
    let (key, csr) = crank_certs::new_key_and_csr(&id)?;
    let body = serde_json::json!({
        "token": token,
        "csr": csr,
        "instance": "bench-enroll",
    });
    let roots = std::fs::read(bundle)?;
    let mut send = connect(addr, &Arc::new(client_config(&roots, None)?)).await?;
    let issued = request(
        &mut send,
        hyper::Method::POST,
        "/v1/identity/enroll",
        Bytes::from(serde_json::to_vec(&body)?),
    )
    .await?;
    let chain = issued["chain"].as_str().context("no chain in the answer")?;
    client_config(&roots, Some((chain.as_bytes(), key.as_bytes())))
}

fn client_config(roots: &[u8], cert: Option<(&[u8], &[u8])>) -> Result<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots) {
        store.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(store);
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(chain).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn route(weight: u32) -> String {
    format!("routes:\n  - name: bench\n    match: {{hosts: [bench]}}\n    backends:\n      - {{capability: hello:v1, weight: {weight}}}\n")
}

/// Write then rename, as editors and git do.
fn save(cp: &ControlPlane, rel: &str, text: &str) -> Result<()> {
    let p = cp.path().join("mesh").join(rel);
    std::fs::create_dir_all(p.parent().context("no parent")?)?;
    let tmp = p.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// crank-control's pid: the process whose command line names our config.
fn pid_of(cp: &ControlPlane) -> Result<u32> {
    let config = cp.config.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("crank-control") && cmd.split('\0').any(|a| a == config) {
            return Ok(pid);
        }
    }
    bail!("crank-control for {config} not found in /proc")
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// Soft RLIMIT_NOFILE up to the hard limit; crank-control inherits it.
fn raise_nofile() {
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// `--replicas N`: the watchers spread over N crank-control replicas on a
/// three-member etcd; edits before and after SIGKILL of the leader.
mod ha {
    use super::*;
    use crank_tests::control_ha::{HaControl, HaOptions};

    pub fn main(
        rt: &tokio::runtime::Runtime,
        watchers: &[usize],
        updates: usize,
        replicas: usize,
    ) -> Result<()> {
        let mut rows = Vec::new();
        for &n in watchers {
            rows.push(run(rt, n, updates, replicas)?);
        }
        println!("| watchers | replicas | phase | edits | p50 ms | p99 ms | max ms | fan-out p50 ms | fan-out max ms |");
        println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
        for r in rows
            .iter()
            .flat_map(|r| r.as_array().cloned().unwrap_or_default())
        {
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r["watchers"],
                r["replicas"],
                r["phase"].as_str().unwrap_or_default(),
                r["updates"],
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
                r["max_ms"].as_f64().unwrap_or(0.0),
                r["fanout_p50_ms"].as_f64().unwrap_or(0.0),
                r["fanout_max_ms"].as_f64().unwrap_or(0.0),
            );
        }
        println!("{}", serde_json::to_string_pretty(&rows)?);
        Ok(())
    }

    fn run(
        rt: &tokio::runtime::Runtime,
        n: usize,
        updates: usize,
        replicas: usize,
    ) -> Result<serde_json::Value> {
        let mut ha = HaControl::start(HaOptions {
            replicas,
            etcd_members: 3,
            extra: "registry: {lease: 10s}\n".into(),
            ..Default::default()
        });
        ha.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
        ha.write_mesh_file("routes/bench.yaml", &route(100));
        ha.leader(Duration::from_secs(30));
        let token = ha.replicas[0].token("bench", "demo");
        let bundle = ha.path().join("ca/root/bundle.pem");
        let addrs = Arc::new(ha.replicas.iter().map(|r| r.listen).collect::<Vec<_>>());
        let tls = Arc::new(rt.block_on(enroll_at(addrs[0], &token, &bundle))?);
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let gate = Arc::new(Semaphore::new(64));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                rt.spawn(watch(
                    i,
                    addrs.clone(),
                    tls.clone(),
                    gate.clone(),
                    tx.clone(),
                ))
            })
            .collect();
        let mut seqs = vec![0u64; n];
        rt.block_on(collect(
            &mut rx,
            &mut seqs,
            1,
            Duration::from_secs(300),
            |_| {},
        ))?;
        let mut next = seqs.iter().copied().max().unwrap_or(1) + 1;
        let mut weight = 101;
        let mut edit = |rx: &mut mpsc::UnboundedReceiver<Event>,
                        seqs: &mut [u64],
                        ha: &HaControl,
                        pause: bool| {
            if pause {
                std::thread::sleep(Duration::from_millis(150 + (weight as u64 * 137) % 500));
            }
            // Events that arrived meanwhile (reconnections) are old news.
            while let Ok((i, seq, _)) = rx.try_recv() {
                seqs[i] = seqs[i].max(seq);
            }
            ha.write_mesh_file("routes/bench.yaml", &route(weight));
            let saved = Instant::now();
            let mut lat = Vec::with_capacity(n);
            let target = next;
            rt.block_on(collect(rx, seqs, target, Duration::from_secs(120), |at| {
                lat.push(at.saturating_duration_since(saved).as_secs_f64() * 1e3)
            }))?;
            lat.sort_by(f64::total_cmp);
            println!(
                "N={n} seq {target}: p50 {:>5.0} ms  p99 {:>5.0} ms  max {:>5.0} ms",
                pct(&lat, 50.0),
                pct(&lat, 99.0),
                lat[lat.len() - 1]
            );
            weight += 1;
            next += 1;
            anyhow::Ok(lat)
        };
        let before: Vec<Vec<f64>> = (0..updates)
            .map(|_| edit(&mut rx, &mut seqs, &ha, true))
            .collect::<Result<_>>()?;
        let lead = ha.leader(Duration::from_secs(10));
        ha.replicas[lead].kill();
        println!("N={n}: killed the leading replica {lead}");
        let failover = vec![edit(&mut rx, &mut seqs, &ha, false)?];
        let after: Vec<Vec<f64>> = (0..updates)
            .map(|_| edit(&mut rx, &mut seqs, &ha, true))
            .collect::<Result<_>>()?;
        for t in tasks {
            t.abort();
        }
        let row = |phase: &str, edits: &[Vec<f64>]| {
            let mut all: Vec<f64> = edits.iter().flatten().copied().collect();
            all.sort_by(f64::total_cmp);
            let mut fan: Vec<f64> = edits.iter().map(|l| l[l.len() - 1] - l[0]).collect();
            fan.sort_by(f64::total_cmp);
            serde_json::json!({
                "watchers": n, "replicas": replicas, "phase": phase, "updates": edits.len(),
                "p50_ms": pct(&all, 50.0), "p99_ms": pct(&all, 99.0), "max_ms": all[all.len() - 1],
                "fanout_p50_ms": pct(&fan, 50.0), "fanout_max_ms": fan[fan.len() - 1],
            })
        };
        Ok(serde_json::json!([
            row("before the kill", &before),
            row("first edit after SIGKILL of the leader", &failover),
            row("after the kill (2 replicas)", &after),
        ]))
    }
}
