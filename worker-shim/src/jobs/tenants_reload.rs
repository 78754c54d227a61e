//! `tenants.yaml` applied without a restart: the shim re-reads
//! `exec.queue.tenants` every [`RELOAD_INTERVAL`] and, when the text
//! changed, checks it whole. A good file replaces the weights and quotas
//! from the next submission and claim on; a bad one (unreadable, not YAML,
//! an entry that fails its checks) is refused whole and logged, and the
//! last good one stays in force.
//!
//! The file reaches every host the way the rest of the mesh config
//! directory does (the checkout the control plane loads, synced to each
//! host), or, with `exec.queue.tenants_from`, from the sidecar: the control
//! plane pushes it with the mesh update and the sidecar serves it on its
//! admin listener (`GET /mesh/tenants`), polled here at the same interval
//! under the same rule; an unreachable sidecar keeps the last good one. See
//! `docs/reference/job-queue.md#tenants`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::tenants::Tenants;

/// How often the file is re-read (a small file: reading it is cheaper and
/// surer than watching it, and sees a symlink swapped under it too).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What one look at the file found.
#[derive(Debug, PartialEq)]
pub enum Reload {
    Unchanged,
    Applied,
    /// Refused whole; the last good file stays. The message names the file
    /// and the problem.
    Rejected(String),
    /// `tenants_from` did not answer with a document (sidecar down, nothing
    /// pushed yet); the last good one stays.
    Unreachable(String),
}

/// Where the tenants come from.
enum Source {
    Defaults,
    File(PathBuf),
    Sidecar(http::Uri),
}

/// The tenants in force and where they come from.
pub struct LiveTenants {
    source: Source,
    current: RwLock<Arc<Tenants>>,
    /// The text last looked at (good or bad), so a bad file is logged once.
    seen: Mutex<Option<String>>,
}

impl LiveTenants {
    /// Loads the file (a bad one is refused: the shim does not start on
    /// it); without a path, every tenant gets the defaults.
    pub fn load(path: Option<&Path>) -> Result<LiveTenants, String> {
        let (tenants, text) = match path {
            Some(p) => {
                let text = read(p)?;
                (parse(&p.display().to_string(), &text)?, Some(text))
            }
            None => (Tenants::default(), None),
        };
        Ok(LiveTenants {
            source: path.map_or(Source::Defaults, |p| Source::File(p.to_path_buf())),
            current: RwLock::new(Arc::new(tenants)),
            seen: Mutex::new(text),
        })
    }

    /// Polls the sidecar's `/mesh/tenants` (`exec.queue.tenants_from`);
    /// every tenant gets the defaults until the first good answer.
    pub fn from_url(url: &str) -> Result<LiveTenants, String> {
        Ok(LiveTenants {
            source: Source::Sidecar(check_url(url)?),
            current: RwLock::new(Arc::new(Tenants::default())),
            seen: Mutex::new(None),
        })
    }

    /// The tenants in force now.
    pub fn snapshot(&self) -> Arc<Tenants> {
        self.current.read().unwrap().clone()
    }

    /// Re-reads the file and applies it when it changed and is good.
    pub fn reload(&self) -> Reload {
        let Source::File(path) = &self.source else {
            return Reload::Unchanged;
        };
        self.apply(&path.display().to_string(), read(path), false)
    }

    /// Fetches the sidecar's document and applies it when it changed and
    /// is good; a file source is re-read.
    pub async fn reload_async(&self) -> Reload {
        let Source::Sidecar(url) = &self.source else {
            return self.reload();
        };
        self.apply(&url.to_string(), fetch(url).await, true)
    }

    /// Applies `text` (or reports its error once): `unreachable` says a
    /// fetch error is a missing document rather than a bad one.
    fn apply(&self, source: &str, text: Result<String, String>, unreachable: bool) -> Reload {
        let mut seen = self.seen.lock().unwrap();
        let key = text
            .as_ref()
            .map_or_else(|e| format!("\0{e}"), Clone::clone);
        if seen.as_deref() == Some(key.as_str()) {
            return Reload::Unchanged;
        }
        *seen = Some(key);
        let text = match text {
            Ok(t) => t,
            Err(e) if unreachable => return Reload::Unreachable(e),
            Err(e) => return Reload::Rejected(e),
        };
        match parse(source, &text) {
            Ok(t) => {
                *self.current.write().unwrap() = Arc::new(t);
                Reload::Applied
            }
            Err(e) => Reload::Rejected(e),
        }
    }

    /// Reloads every [`RELOAD_INTERVAL`] while the shim runs, logging what
    /// changed.
    pub fn spawn_reloader(self: &Arc<Self>) {
        if matches!(self.source, Source::Defaults) {
            return;
        }
        let weak = Arc::downgrade(self);
        // A file was read at start; the sidecar is asked at once.
        let skip_first = matches!(self.source, Source::File(_));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            if skip_first {
                tick.tick().await;
            }
            loop {
                tick.tick().await;
                let Some(live) = weak.upgrade() else { return };
                live.log(live.reload_async().await);
            }
        });
    }

    fn log(&self, r: Reload) {
        let from = match &self.source {
            Source::File(p) => p.display().to_string(),
            Source::Sidecar(u) => u.to_string(),
            Source::Defaults => return,
        };
        match r {
            Reload::Unchanged => {}
            Reload::Applied => {
                tracing::info!(%from, "tenants.yaml changed: new weights and quotas applied")
            }
            Reload::Rejected(e) => tracing::error!(
                error = %e,
                "tenants.yaml refused whole; the last good file stays in force; fix it (crankctl check) and it applies on the next read"
            ),
            Reload::Unreachable(e) => tracing::warn!(
                error = %e,
                "tenants.yaml not fetched from the sidecar; the last good one stays in force; asked again every 2 s"
            ),
        }
    }
}

/// Checks `exec.queue.tenants_from`: an `http://host:port/path` URL.
pub fn check_url(url: &str) -> Result<http::Uri, String> {
    let bad = || {
        format!("{url:?} is not an http:// URL with a host; use the sidecar's admin listener, e.g. http://127.0.0.1:18901/mesh/tenants")
    };
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(bad());
    }
    Ok(uri)
}

/// One `GET` of `url` (HTTP/1.1, plain: the sidecar's loopback admin
/// listener), its body when it answers 200 within [`RELOAD_INTERVAL`].
async fn fetch(url: &http::Uri) -> Result<String, String> {
    let get = async {
        let host = url.host().unwrap_or("127.0.0.1");
        let port = url.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let req = http::Request::get(path)
            .header(
                http::header::HOST,
                url.authority().map_or(host, |a| a.as_str()),
            )
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(format!("answered {status}: {}", text.trim()));
        }
        Ok(text)
    };
    match tokio::time::timeout(RELOAD_INTERVAL, get).await {
        Ok(r) => r.map_err(|e| format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no answer within 2 s")),
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))
}

/// A YAML file or the sidecar's JSON (YAML reads JSON too), checked whole.
fn parse(source: &str, text: &str) -> Result<Tenants, String> {
    let file = serde_yaml::from_str(text).map_err(|e| format!("{source}: {e}"))?;
    Tenants::new(file).map_err(|e| format!("{source}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_change_applies_and_a_bad_one_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.yaml");
        std::fs::write(&path, "tenants:\n  - {name: acme, max_queued: 2}\n").unwrap();
        let live = LiveTenants::load(Some(&path)).unwrap();
        assert_eq!(live.reload(), Reload::Unchanged);
        std::fs::write(&path, "tenants:\n  - {name: acme, max_queued: 5}\n").unwrap();
        assert_eq!(live.reload(), Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        // One good entry and one bad: nothing of it applies.
        std::fs::write(
            &path,
            "tenants:\n  - {name: acme, max_queued: 9}\n  - {name: x, weight: 0}\n",
        )
        .unwrap();
        let Reload::Rejected(e) = live.reload() else {
            panic!("a bad file applied")
        };
        assert!(e.contains("tenants.yaml") && e.contains("weight"), "{e}");
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        assert_eq!(
            live.reload(),
            Reload::Unchanged,
            "a bad file is reported once"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(live.reload(), Reload::Rejected(_)));
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        std::fs::write(&path, "tenants: []\n").unwrap();
        assert_eq!(live.reload(), Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, None);
    }

    /// A stand-in for the sidecar's admin listener: answers every request
    /// with the status and body in `doc` at the time.
    async fn sidecar(doc: Arc<Mutex<(u16, String)>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let (status, body) = doc.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}/mesh/tenants")
    }

    #[tokio::test]
    async fn the_sidecars_document_applies_and_a_bad_one_is_refused_whole() {
        let doc = Arc::new(Mutex::new((
            404,
            r#"{"error":"no mesh update applied yet"}"#.to_string(),
        )));
        let url = sidecar(doc.clone()).await;
        let live = LiveTenants::from_url(&url).unwrap();
        // Nothing pushed yet: the defaults, and the 404 is reported once.
        assert!(matches!(live.reload_async().await, Reload::Unreachable(e) if e.contains("404")));
        assert_eq!(live.reload_async().await, Reload::Unchanged);
        assert_eq!(live.snapshot().get("acme").max_queued, None);
        *doc.lock().unwrap() = (
            200,
            r#"{"tenants":[{"name":"acme","max_queued":5}]}"#.into(),
        );
        assert_eq!(live.reload_async().await, Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        // One good entry and one bad: nothing of it applies.
        *doc.lock().unwrap() = (
            200,
            r#"{"tenants":[{"name":"acme","max_queued":9},{"name":"x","weight":0}]}"#.into(),
        );
        let Reload::Rejected(e) = live.reload_async().await else {
            panic!("a bad document applied")
        };
        assert!(e.contains("/mesh/tenants") && e.contains("weight"), "{e}");
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        assert_eq!(
            live.reload_async().await,
            Reload::Unchanged,
            "reported once"
        );
        // The sidecar gone: the last good stays.
        let gone = LiveTenants::from_url("http://127.0.0.1:1/mesh/tenants").unwrap();
        assert!(matches!(gone.reload_async().await, Reload::Unreachable(_)));
        assert_eq!(gone.reload_async().await, Reload::Unchanged);
        *doc.lock().unwrap() = (200, r#"{"tenants":[]}"#.into());
        assert_eq!(live.reload_async().await, Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, None);
    }

    #[test]
    fn tenants_from_must_be_an_http_url() {
        assert!(check_url("http://127.0.0.1:18901/mesh/tenants").is_ok());
        for bad in [
            "127.0.0.1:18901",
            "https://x/mesh/tenants",
            "file:///t.yaml",
            "",
        ] {
            let e = check_url(bad).unwrap_err();
            assert!(e.contains("http://"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bad_file_at_start_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.yaml");
        std::fs::write(&path, "tenants: [{name: a, wieght: 2}]\n").unwrap();
        assert!(LiveTenants::load(Some(&path)).is_err());
        assert!(LiveTenants::load(None)
            .unwrap()
            .snapshot()
            .arrays()
            .0
            .is_empty());
    }
}
