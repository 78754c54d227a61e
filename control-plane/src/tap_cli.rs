//! `crankctl tap` and `crankctl top`: live traffic from sidecars' admin
//! ports. `tap` streams matching requests as they finish (the sidecar's
//! `GET /tap`, JSON lines); `top` scrapes `/metrics` every interval and
//! shows request rate, success rate and latency per route, computed from
//! the differences between two scrapes, summed across the sidecars named.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What `crankctl tap` asks each sidecar for.
#[derive(Debug, Clone, Default)]
pub struct TapArgs {
    pub proxies: Vec<String>,
    pub query: Vec<(String, String)>,
    pub output: String,
    /// Stop after this many events in all (0: until interrupted).
    pub limit: u64,
}

/// Streams matching requests from every sidecar until `limit` events or
/// Ctrl-C.
pub fn tap(args: &TapArgs) -> Result<()> {
    if args.proxies.is_empty() {
        bail!("name at least one sidecar admin address with --proxy HOST:PORT (its admin.listen)");
    }
    if !matches!(args.output.as_str(), "human" | "wide" | "json") {
        bail!("--output {}: use human, wide or json", args.output);
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(args.query.iter())
        .finish();
    let (tx, rx) = std::sync::mpsc::channel::<Result<(String, serde_json::Value), String>>();
    for proxy in &args.proxies {
        let addr = resolve(proxy)?;
        let (tx, proxy, query) = (tx.clone(), proxy.clone(), query.clone());
        std::thread::spawn(move || {
            let r = stream_tap(addr, &query, |v| tx.send(Ok((proxy.clone(), v))).is_ok());
            if let Err(e) = r {
                let _ = tx.send(Err(format!("{proxy}: {e:#}")));
            }
        });
    }
    drop(tx);
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    for msg in rx {
        let (proxy, ev) = match msg {
            Ok(m) => m,
            Err(e) => bail!("tap {e}"),
        };
        let line = match args.output.as_str() {
            "json" => {
                let mut ev = ev;
                if let Some(o) = ev.as_object_mut() {
                    o.insert("proxy".into(), proxy.into());
                }
                ev.to_string()
            }
            "wide" => wide_line(&ev, &proxy),
            _ => human_line(&ev),
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(()); // a closed pipe (`| head`)
        }
        seen += 1;
        if args.limit > 0 && seen >= args.limit {
            break;
        }
    }
    Ok(())
}

pub(crate) fn resolve(proxy: &str) -> Result<SocketAddr> {
    proxy
        .to_socket_addrs()
        .with_context(|| format!("--proxy {proxy}: not a HOST:PORT"))?
        .next()
        .with_context(|| format!("--proxy {proxy}: resolves to no address"))
}

/// One sidecar's `GET /tap` (chunked JSON lines), each event to `each`
/// until it returns false or the sidecar ends the stream.
fn stream_tap(
    addr: SocketAddr,
    query: &str,
    mut each: impl FnMut(serde_json::Value) -> bool,
) -> Result<()> {
    let (status, headers, mut r) = admin_get(addr, &format!("/tap?{query}"), None)?;
    if status != 200 {
        let mut body = String::new();
        let _ = r.take(4096).read_to_string(&mut body);
        bail!("the sidecar refused the tap ({status}): {}", body.trim());
    }
    if !headers.contains("transfer-encoding: chunked") {
        bail!("the sidecar's /tap did not stream (no chunked body); is it a crank-proxy with tap support?");
    }
    let mut pending = Vec::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            return Ok(());
        }
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
            .with_context(|| format!("bad chunk size {size:?} from the sidecar"))?;
        if n == 0 {
            return Ok(());
        }
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk)?;
        pending.extend_from_slice(&chunk[..n]);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if let Ok(v) = serde_json::from_slice(&line) {
                if !each(v) {
                    return Ok(());
                }
            }
        }
    }
}

/// `GET path` on a sidecar's admin port (one request, then the connection
/// closes): the status, the lower-cased header block, and the body to read.
fn admin_get(
    addr: SocketAddr,
    path: &str,
    read_timeout: Option<Duration>,
) -> Result<(u16, String, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
        format!("cannot connect to the sidecar admin port {addr}; is admin.listen right?")
    })?;
    s.set_read_timeout(read_timeout)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    Ok((status, headers, r))
}

/// Status and lower-cased header block of an HTTP/1.1 response.
fn read_head(r: &mut impl BufRead) -> Result<(u16, String)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {line:?}"))?;
    let mut headers = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        headers.push_str(&h.to_ascii_lowercase());
    }
    Ok((status, headers))
}

fn human_line(ev: &serde_json::Value) -> String {
    let s = |k: &str| {
        ev.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_string()
    };
    let ts = ev.get("ts_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    let (secs, ms) = (ts / 1000, ts % 1000);
    let clock = format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    );
    format!(
        "{clock} {:<8} {} {} {} {} {:.1}ms {} -> {} trace={} {}",
        s("direction"),
        s("route"),
        s("method"),
        s("path"),
        ev.get("status").and_then(|v| v.as_u64()).unwrap_or(0),
        ev.get("latency_ms").and_then(|v| v.as_f64()).unwrap_or(0.0),
        s("source"),
        s("destination"),
        s("trace_id"),
        ev.get("crank_error")
            .and_then(|v| v.as_str())
            .map(|e| format!("x-crank-error={e}"))
            .unwrap_or_default(),
    )
    .trim_end()
    .to_string()
}

/// `-o wide`: the human line, then the capability and the sidecar that
/// reported it (`--proxy` as given).
fn wide_line(ev: &serde_json::Value, proxy: &str) -> String {
    let capability = ev.get("capability").and_then(|v| v.as_str()).unwrap_or("-");
    format!("{} capability={capability} proxy={proxy}", human_line(ev))
}

/// What `crankctl top` shows.
#[derive(Debug, Clone)]
pub struct TopArgs {
    pub proxies: Vec<String>,
    pub interval: Duration,
    /// Tables to show (0: until interrupted).
    pub iterations: u64,
    pub output: String,
}

/// One route's counters at one scrape, summed across sidecars.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteCounters {
    pub requests: f64,
    /// 5xx and requests that got no response.
    pub failures: f64,
    /// Cumulative histogram buckets: (upper bound in seconds, count).
    pub buckets: Vec<(f64, f64)>,
}

/// (direction, route) → counters.
pub type Scrape = BTreeMap<(String, String), RouteCounters>;

/// One row of `crankctl top`.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct TopRow {
    pub direction: String,
    pub route: String,
    pub rps: f64,
    /// Share of requests that were not 5xx (1.0 when there were none).
    pub success: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub requests: f64,
    pub failures: f64,
}

/// Shows live rates per route across the sidecars, refreshed in place.
pub fn top(args: &TopArgs) -> Result<()> {
    if args.proxies.is_empty() {
        bail!("name at least one sidecar admin address with --proxy HOST:PORT (its admin.listen)");
    }
    if !matches!(args.output.as_str(), "human" | "wide" | "json") {
        bail!("--output {}: use human, wide or json", args.output);
    }
    let addrs: Vec<SocketAddr> = args
        .proxies
        .iter()
        .map(|p| resolve(p))
        .collect::<Result<_>>()?;
    let scrape_all = || -> Result<Scrape> {
        let mut total = Scrape::new();
        for a in &addrs {
            merge(&mut total, parse_metrics(&get_metrics(*a)?));
        }
        Ok(total)
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut before = scrape_all()?;
    let mut at = Instant::now();
    let mut shown = 0u64;
    loop {
        std::thread::sleep(args.interval);
        let now = scrape_all()?;
        let dt = at.elapsed().as_secs_f64();
        at = Instant::now();
        let rows = rows(&before, &now, dt);
        before = now;
        let text = match args.output.as_str() {
            "json" => serde_json::to_string(&rows)?,
            o => table(&rows, o == "wide"),
        };
        let mut out = std::io::stdout().lock();
        let clear = if tty && args.output != "json" {
            "\x1b[2J\x1b[H"
        } else {
            ""
        };
        if writeln!(out, "{clear}{text}")
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(());
        }
        shown += 1;
        if args.iterations > 0 && shown >= args.iterations {
            return Ok(());
        }
    }
}

pub(crate) fn get_metrics(addr: SocketAddr) -> Result<String> {
    let (status, _, mut r) = admin_get(addr, "/metrics", Some(Duration::from_secs(10)))?;
    if status != 200 {
        bail!("{addr}/metrics answered {status}");
    }
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    Ok(body)
}

/// The request counters and latency buckets of one `/metrics` text.
pub fn parse_metrics(text: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => continue,
        };
        let label = |k: &str| {
            labels.split("\",").find_map(|kv| {
                let (key, v) = kv.split_once("=\"")?;
                (key.trim_start_matches(',') == k).then(|| v.trim_end_matches('"').to_string())
            })
        };
        let (Some(dir), Some(route)) = (label("direction"), label("route")) else {
            continue;
        };
        let entry = out.entry((dir, route)).or_default();
        match name {
            "crank_requests_total" => {
                entry.requests += value;
                if matches!(label("status_class").as_deref(), Some("5xx" | "error")) {
                    entry.failures += value;
                }
            }
            "crank_request_duration_seconds_bucket" => {
                let le = match label("le").as_deref() {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => v.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                match entry.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += value,
                    None => entry.buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    for c in out.values_mut() {
        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

pub(crate) fn merge(total: &mut Scrape, one: Scrape) {
    for (k, c) in one {
        let t = total.entry(k).or_default();
        t.requests += c.requests;
        t.failures += c.failures;
        for (le, n) in c.buckets {
            match t.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(b) => b.1 += n,
                None => t.buckets.push((le, n)),
            }
        }
        t.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// Rates between two scrapes `dt` seconds apart; routes without requests
/// in between are left out.
pub fn rows(before: &Scrape, now: &Scrape, dt: f64) -> Vec<TopRow> {
    let mut out = Vec::new();
    for ((dir, route), c) in now {
        let b = before.get(&(dir.clone(), route.clone()));
        let requests = c.requests - b.map_or(0.0, |b| b.requests);
        if requests <= 0.0 {
            continue;
        }
        let failures = c.failures - b.map_or(0.0, |b| b.failures);
        let buckets: Vec<(f64, f64)> = c
            .buckets
            .iter()
            .map(|(le, n)| {
                let prev = b
                    .and_then(|b| b.buckets.iter().find(|(l, _)| l == le))
                    .map_or(0.0, |x| x.1);
                (*le, n - prev)
            })
            .collect();
        out.push(TopRow {
            direction: dir.clone(),
            route: route.clone(),
            rps: requests / dt.max(1e-9),
            success: 1.0 - failures / requests,
            p50_ms: quantile(&buckets, 0.5).map(|s| s * 1000.0),
            p99_ms: quantile(&buckets, 0.99).map(|s| s * 1000.0),
            requests,
            failures,
        });
    }
    out.sort_by(|a, b| b.rps.total_cmp(&a.rps));
    out
}

/// Prometheus' `histogram_quantile`: linear within the bucket that holds
/// the rank; the highest finite bound when it falls in `+Inf`.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, n) in buckets {
        if *n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = le - prev.0;
            let inside = n - prev.1;
            return Some(if inside > 0.0 {
                prev.0 + width * (rank - prev.1) / inside
            } else {
                *le
            });
        }
        prev = (*le, *n);
    }
    Some(prev.0)
}

fn table(rows: &[TopRow], wide: bool) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut s = format!(
        "{:<9} {:<24} {:>9} {:>8} {:>8} {:>8}",
        "DIRECTION", "ROUTE", "RPS", "SUCCESS", "P50 ms", "P99 ms"
    );
    if wide {
        s.push_str(&format!(" {:>9} {:>9}", "REQUESTS", "FAILURES"));
    }
    if rows.is_empty() {
        s.push_str("\n(no requests in this interval)");
    }
    for r in rows {
        s.push_str(&format!(
            "\n{:<9} {:<24} {:>9.1} {:>7.1}% {:>8} {:>8}",
            r.direction,
            r.route,
            r.rps,
            r.success * 100.0,
            ms(r.p50_ms),
            ms(r.p99_ms)
        ));
        if wide {
            s.push_str(&format!(" {:>9} {:>9}", r.requests, r.failures));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP crank_requests_total x
crank_requests_total{direction="outbound",route="backend",status_class="2xx"} 100
crank_requests_total{direction="outbound",route="backend",status_class="5xx"} 0
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="0.001"} 50
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="0.01"} 100
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="+Inf"} 100
"#;
    const AFTER: &str = r#"crank_requests_total{direction="outbound",route="backend",status_class="2xx"} 280
crank_requests_total{direction="outbound",route="backend",status_class="5xx"} 20
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="0.001"} 50
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="0.01"} 300
crank_request_duration_seconds_bucket{direction="outbound",route="backend",le="+Inf"} 300
crank_requests_total{direction="inbound",route="app",status_class="2xx"} 7
"#;

    #[test]
    fn rates_success_and_latency_between_two_scrapes() {
        let (b, a) = (parse_metrics(BEFORE), parse_metrics(AFTER));
        let rows = rows(&b, &a, 2.0);
        let r = &rows[0];
        assert_eq!(
            (r.direction.as_str(), r.route.as_str()),
            ("outbound", "backend")
        );
        assert_eq!(r.rps, 100.0);
        assert!((r.success - 0.9).abs() < 1e-9);
        // All 200 new requests fell in (1ms, 10ms]: the median is half way.
        assert!((r.p50_ms.unwrap() - 5.5).abs() < 1e-6, "{r:?}");
        assert!((r.p99_ms.unwrap() - 9.91).abs() < 1e-6, "{r:?}");
        // A route that only appeared now counts from zero.
        assert_eq!(rows[1].route, "app");
        assert_eq!(rows[1].rps, 3.5);
        assert_eq!(rows[1].p50_ms, None);
        let t = table(&rows, true);
        assert!(
            t.contains("backend") && t.contains("90.0%") && t.contains("FAILURES"),
            "{t}"
        );
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(
            quantile(&[(1.0, 10.0), (f64::INFINITY, 10.0)], 0.5),
            Some(0.5)
        );
        // Past the last finite bound: that bound.
        assert_eq!(
            quantile(&[(1.0, 0.0), (f64::INFINITY, 4.0)], 0.5),
            Some(1.0)
        );
    }

    #[test]
    fn tap_lines_are_readable() {
        let ev = serde_json::json!({"ts_ms": 3_723_004u64, "direction": "outbound", "route": "backend",
            "method": "GET", "path": "/x", "status": 503, "latency_ms": 2.25,
            "source": "spiffe://a", "destination": "spiffe://b", "trace_id": "ab", "crank_error": "circuit-open"});
        assert_eq!(
            human_line(&ev),
            "01:02:03.004 outbound backend GET /x 503 2.2ms spiffe://a -> spiffe://b trace=ab x-crank-error=circuit-open"
        );
    }

    #[test]
    fn wide_tap_lines_add_the_capability_and_the_sidecar() {
        let ev = serde_json::json!({"ts_ms": 1000u64, "direction": "inbound", "route": "r",
            "capability": "hello:v1", "method": "GET", "path": "/", "status": 200, "latency_ms": 1.0});
        let line = wide_line(&ev, "127.0.0.1:9901");
        assert!(line.starts_with(&human_line(&ev)), "{line}");
        assert!(
            line.ends_with(" capability=hello:v1 proxy=127.0.0.1:9901"),
            "{line}"
        );
        let no_cap = serde_json::json!({"ts_ms": 0u64, "status": 0});
        assert!(wide_line(&no_cap, "p").ends_with(" capability=- proxy=p"));
    }
}
