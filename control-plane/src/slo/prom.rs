//! A small client for Prometheus' HTTP API (`GET /api/v1/query`), enough
//! for `crankctl slo status --prometheus` and `crankctl slo check
//! --prometheus`: plain `http://` only, one HTTP/1.0 request per query (the
//! server closes the connection, so no chunked bodies), every address the
//! host resolves to tried in turn, [`QUERY_DEADLINE`] for a whole query and
//! at most [`MAX_ANSWER`] read, and every failure said with the URL and
//! what to do about it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The longest a query may take, connecting and reading included.
pub const QUERY_DEADLINE: Duration = Duration::from_secs(60);
/// The largest answer read (16 MiB); the queries are sums, far smaller.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("--prometheus {0}: {1}")]
    BadUrl(String, String),
    #[error("cannot reach Prometheus at {0} ({1}); check --prometheus (its web.listen-address, e.g. http://prometheus:9090), or leave --prometheus out and name the sidecars with --proxy")]
    Unreachable(String, String),
    #[error("Prometheus at {url} refused the query ({status}): {error}\nquery: {query}")]
    Refused {
        url: String,
        status: u16,
        error: String,
        query: String,
    },
    #[error("{0} did not answer like Prometheus' /api/v1/query ({1}); is --prometheus the Prometheus server's address?")]
    NotPrometheus(String, String),
    #[error("Prometheus at {0} did not answer a query within {1}s (a busy server, or a long window); try again, or check the server's load")]
    Slow(String, u64),
}

/// The Prometheus server at a `http://HOST:PORT[/PREFIX]` URL.
#[derive(Debug, Clone)]
pub struct Prometheus {
    url: String,
    host: String,
    /// Every address the host resolves to, tried in turn.
    addrs: Vec<SocketAddr>,
    prefix: String,
    /// For a whole query ([`QUERY_DEADLINE`]).
    deadline: Duration,
}

impl Prometheus {
    pub fn new(url: &str) -> Result<Prometheus, PromError> {
        let bad = |why: &str| PromError::BadUrl(url.to_string(), why.to_string());
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "{scheme}:// is not supported; give a plain http:// address (a port-forward to Prometheus works)"
                )))
            }
            None => url,
        };
        let (host, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        let prefix = if prefix == "/" { String::new() } else { prefix };
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| bad(&format!("{host} does not resolve ({e})")))?
            .collect();
        if addrs.is_empty() {
            return Err(bad(&format!("{host} resolves to no address")));
        }
        Ok(Prometheus {
            url: url.trim_end_matches('/').to_string(),
            host: host.to_string(),
            addrs,
            prefix,
            deadline: QUERY_DEADLINE,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// An instant query: each series' labels (as JSON) and value. NaN
    /// (0/0: no requests) is left out.
    pub fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, PromError> {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let (status, body) = self.get(&format!("{}/api/v1/query?{q}", self.prefix))?;
        let not_prom = |why: String| PromError::NotPrometheus(self.url.clone(), why);
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| {
            not_prom(format!(
                "status {status}, body {:?}",
                body.chars().take(200).collect::<String>()
            ))
        })?;
        if v["status"] != "success" {
            return Err(PromError::Refused {
                url: self.url.clone(),
                status,
                error: format!(
                    "{}: {}",
                    v["errorType"].as_str().unwrap_or("error"),
                    v["error"].as_str().unwrap_or("(no message)")
                ),
                query: promql.to_string(),
            });
        }
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| not_prom("no data.result".into()))?;
        let mut out = Vec::new();
        for r in result {
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| not_prom(format!("a sample without a value: {r}")))?;
            if !value.is_nan() {
                out.push((r["metric"].clone(), value));
            }
        }
        Ok(out)
    }

    /// The value of a query that yields one series (a `sum`), or `None`
    /// when it yields nothing (no data, or 0/0).
    pub fn scalar(&self, promql: &str) -> Result<Option<f64>, PromError> {
        Ok(self.query(promql)?.first().map(|(_, v)| *v))
    }

    /// A connection to the first address that takes one (`localhost` may
    /// resolve to ::1 first while Prometheus listens on 127.0.0.1 only).
    fn connect(&self, deadline: Instant) -> Result<TcpStream, PromError> {
        let mut tried = Vec::new();
        for a in &self.addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                Ok(s) => return Ok(s),
                Err(e) => tried.push(format!("{a}: {e}")),
            }
        }
        Err(PromError::Unreachable(self.url.clone(), tried.join("; ")))
    }

    /// The whole answer, read by the deadline and at most [`MAX_ANSWER`].
    fn read_answer(&self, s: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, PromError> {
        let slow = || PromError::Slow(self.url.clone(), self.deadline.as_secs());
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(slow());
            }
            s.set_read_timeout(Some(left))
                .map_err(|e| PromError::Unreachable(self.url.clone(), e.to_string()))?;
            match s.read(&mut buf) {
                Ok(0) => return Ok(raw),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(slow())
                }
                Err(e) => return Err(PromError::Unreachable(self.url.clone(), e.to_string())),
            }
            if raw.len() > MAX_ANSWER {
                return Err(PromError::NotPrometheus(
                    self.url.clone(),
                    format!("an answer larger than {} MiB", MAX_ANSWER >> 20),
                ));
            }
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String), PromError> {
        let deadline = Instant::now() + self.deadline;
        let mut s = self.connect(deadline)?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: crankctl\r\n\r\n",
            self.host
        );
        s.write_all(request.as_bytes())
            .map_err(|e| PromError::Unreachable(self.url.clone(), e.to_string()))?;
        let raw = self.read_answer(&mut s, deadline)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                PromError::NotPrometheus(self.url.clone(), "not an HTTP response".into())
            })?;
        Ok((status, body.to_string()))
    }
}

/// A PromQL range: `30d`, `1h`, `90s`, `1500ms`.
pub fn range(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{}ms", ms.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_prometheus_urls() {
        let p = Prometheus::new("http://127.0.0.1:9090/").unwrap();
        assert_eq!((p.url(), p.prefix.as_str()), ("http://127.0.0.1:9090", ""));
        assert_eq!(p.addrs[0].port(), 9090);
        let p = Prometheus::new("127.0.0.1:9091/prom").unwrap();
        assert_eq!((p.addrs[0].port(), p.prefix.as_str()), (9091, "/prom"));
        assert_eq!(
            Prometheus::new("http://127.0.0.1").unwrap().addrs[0].port(),
            80
        );
        let e = Prometheus::new("https://127.0.0.1:9090").unwrap_err();
        assert!(e.to_string().contains("plain http://"), "{e}");
    }

    #[test]
    fn slo_unreachable_prometheus_names_the_url_and_the_fix() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = Prometheus::new(&url).unwrap().query("up").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&url) && msg.contains("--proxy"), "{msg}");
    }

    /// A server that answers one request with `response`, then closes.
    fn answer_once(response: &'static str) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(response.as_bytes());
        });
        url
    }

    #[test]
    fn slo_prometheus_answers_are_read() {
        let url = answer_once(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"vector\",\"result\":[{\"metric\":{\"route\":\"a\"},\"value\":[1,\"0.25\"]},{\"metric\":{},\"value\":[1,\"NaN\"]}]}}",
        );
        let got = Prometheus::new(&url).unwrap().query("x").unwrap();
        assert_eq!(got.len(), 1, "NaN (no requests) is left out: {got:?}");
        assert_eq!((got[0].0["route"].as_str(), got[0].1), (Some("a"), 0.25));

        let url = answer_once(
            "HTTP/1.0 400 Bad Request\r\n\r\n{\"status\":\"error\",\"errorType\":\"bad_data\",\"error\":\"parse error\"}",
        );
        let e = Prometheus::new(&url).unwrap().scalar("sum(").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&url)
                && msg.contains("(400): bad_data: parse error")
                && msg.contains("query: sum("),
            "{msg}"
        );

        let url = answer_once("HTTP/1.0 404 Not Found\r\n\r\n404 page not found");
        let e = Prometheus::new(&url).unwrap().scalar("up").unwrap_err();
        assert!(
            e.to_string()
                .contains("is --prometheus the Prometheus server's address"),
            "{e}"
        );
    }

    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn slo_prometheus_tries_every_address() {
        // As `localhost` resolving to ::1 (nothing there) before 127.0.0.1.
        let url = answer_once(
            "HTTP/1.0 200 OK\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"vector\",\"result\":[{\"metric\":{},\"value\":[1,\"3\"]}]}}",
        );
        let mut p = Prometheus::new(&url).unwrap();
        p.addrs.insert(0, closed_port());
        assert_eq!(p.scalar("x").unwrap(), Some(3.0));
        // None answers: each address is named.
        let mut p = Prometheus::new(&url).unwrap();
        p.addrs = vec![closed_port(), closed_port()];
        let msg = p.scalar("x").unwrap_err().to_string();
        assert!(msg.contains(&p.addrs[1].to_string()), "{msg}");
    }

    #[test]
    fn slo_prometheus_queries_have_a_deadline_and_a_size_cap() {
        // Accepts, reads the request, then says nothing for longer than
        // the deadline.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = rx.recv();
        });
        let mut p = Prometheus::new(&url).unwrap();
        p.deadline = Duration::from_millis(300);
        let started = Instant::now();
        let e = p.scalar("up").unwrap_err();
        assert!(matches!(e, PromError::Slow(..)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(tx);

        // An endless answer is cut at MAX_ANSWER.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            let chunk = vec![b' '; 1 << 20];
            while s.write_all(&chunk).is_ok() {}
        });
        let e = Prometheus::new(&url).unwrap().scalar("up").unwrap_err();
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
    }

    #[test]
    fn slo_promql_ranges() {
        let s = Duration::from_secs;
        for (d, want) in [
            (s(30 * 86_400), "30d"),
            (s(3600), "1h"),
            (s(300), "5m"),
            (s(90), "90s"),
            (Duration::from_millis(1500), "1500ms"),
        ] {
            assert_eq!(range(d), want);
        }
    }
}
