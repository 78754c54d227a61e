//! A small client for Prometheus' HTTP API (`GET /api/v1/query`), enough
//! for `crankctl slo status --prometheus` and `crankctl slo check
//! --prometheus`: plain `http://` only, one HTTP/1.0 request per query (the
//! server closes the connection, so no chunked bodies), and every failure
//! said with the URL and what to do about it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

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
}

/// The Prometheus server at a `http://HOST:PORT[/PREFIX]` URL.
#[derive(Debug, Clone)]
pub struct Prometheus {
    url: String,
    host: String,
    addr: SocketAddr,
    prefix: String,
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
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| bad(&format!("{host} does not resolve ({e})")))?
            .next()
            .ok_or_else(|| bad(&format!("{host} resolves to no address")))?;
        Ok(Prometheus {
            url: url.trim_end_matches('/').to_string(),
            host: host.to_string(),
            addr,
            prefix,
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

    fn get(&self, path: &str) -> Result<(u16, String), PromError> {
        let unreachable =
            |e: std::io::Error| PromError::Unreachable(self.url.clone(), e.to_string());
        let mut s =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).map_err(unreachable)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(unreachable)?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: crankctl\r\n\r\n",
            self.host
        )
        .map_err(unreachable)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(unreachable)?;
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
        assert_eq!(p.addr.port(), 9090);
        let p = Prometheus::new("127.0.0.1:9091/prom").unwrap();
        assert_eq!((p.addr.port(), p.prefix.as_str()), (9091, "/prom"));
        assert_eq!(Prometheus::new("http://127.0.0.1").unwrap().addr.port(), 80);
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
