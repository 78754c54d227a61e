//! `HTTP_PROXY` and `NO_PROXY`, read the way curl and most HTTP libraries do.
//!
//! - `http_proxy` wins over `HTTP_PROXY`; an empty value counts as unset.
//! - The value is `http://HOST[:PORT]` (port 80 by default) or bare `HOST:PORT`.
//! - `no_proxy` / `NO_PROXY` is a comma-separated list of hosts that are
//!   called directly: `*` for all, `example.com` or `.example.com` for that
//!   domain and its subdomains.
//!
//! Parsing is pure: [`ProxyEnv::from_lookup`] takes the variables from a
//! closure, so tests never touch the process environment.

use http::Uri;

/// A parsed `HTTP_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// The value as the user wrote it, for messages and the frontend's JSON.
    pub url: String,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

/// The proxy settings of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    pub http_proxy: Option<HttpProxy>,
    /// Lowercase `NO_PROXY` entries with any leading `*.` or `.` removed.
    pub no_proxy: Vec<String>,
}

/// `HTTP_PROXY` holds something this client cannot use.
#[derive(Debug, thiserror::Error)]
#[error("HTTP_PROXY={value:?}: {reason}; expected http://HOST:PORT, e.g. http://127.0.0.1:4140")]
pub struct ProxyEnvError {
    pub value: String,
    pub reason: &'static str,
}

impl ProxyEnv {
    /// Reads the settings from this process's environment.
    pub fn from_env() -> Result<Self, ProxyEnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get`, which returns a variable's value.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ProxyEnvError> {
        let first_set = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|name| get(name).filter(|v| !v.trim().is_empty()))
        };
        let http_proxy = first_set(["http_proxy", "HTTP_PROXY"])
            .map(|v| parse_proxy_url(&v))
            .transpose()?;
        let no_proxy = first_set(["no_proxy", "NO_PROXY"])
            .map(|v| parse_no_proxy(&v))
            .unwrap_or_default();
        Ok(Self {
            http_proxy,
            no_proxy,
        })
    }

    /// The proxy to use for a request to `host`, or `None` to connect directly.
    pub fn proxy_for(&self, host: &str) -> Option<&HttpProxy> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let bypass = self
            .no_proxy
            .iter()
            .any(|entry| entry == "*" || host == *entry || host.ends_with(&format!(".{entry}")));
        if bypass {
            None
        } else {
            self.http_proxy.as_ref()
        }
    }
}

fn parse_proxy_url(value: &str) -> Result<HttpProxy, ProxyEnvError> {
    let fail = |reason| ProxyEnvError {
        value: value.to_string(),
        reason,
    };
    let uri: Uri = value.trim().parse().map_err(|_| fail("not a URL"))?;
    match uri.scheme_str() {
        None | Some("http") => {}
        Some(_) => return Err(fail("only http:// proxies are supported")),
    }
    let authority = uri.authority().ok_or_else(|| fail("no host in it"))?;
    if authority.as_str().contains('@') {
        return Err(fail("proxy credentials are not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    Ok(HttpProxy {
        url: value.trim().to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
    })
}

fn parse_no_proxy(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|entry| {
            entry
                .trim()
                .trim_start_matches("*.")
                .trim_start_matches('.')
        })
        .filter(|entry| !entry.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<ProxyEnv, ProxyEnvError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyEnv::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn proxy(host: &str, port: u16, url: &str) -> Option<HttpProxy> {
        Some(HttpProxy {
            url: url.into(),
            host: host.into(),
            port,
        })
    }

    #[test]
    fn http_proxy_values() {
        type Vars = &'static [(&'static str, &'static str)];
        let cases: &[(Vars, Option<HttpProxy>)] = &[
            (&[], None),
            (&[("HTTP_PROXY", "")], None),
            (
                &[("HTTP_PROXY", "http://127.0.0.1:4140")],
                proxy("127.0.0.1", 4140, "http://127.0.0.1:4140"),
            ),
            (
                &[("HTTP_PROXY", "http://127.0.0.1:4140/")],
                proxy("127.0.0.1", 4140, "http://127.0.0.1:4140/"),
            ),
            (
                &[("http_proxy", "127.0.0.1:4140")],
                proxy("127.0.0.1", 4140, "127.0.0.1:4140"),
            ),
            (
                &[("http_proxy", "localhost:4140")],
                proxy("localhost", 4140, "localhost:4140"),
            ),
            (
                &[("http_proxy", "http://sidecar")],
                proxy("sidecar", 80, "http://sidecar"),
            ),
            (
                &[("http_proxy", "http://[::1]:4140")],
                proxy("::1", 4140, "http://[::1]:4140"),
            ),
            // lowercase wins, an empty lowercase value does not
            (
                &[("http_proxy", "http://a:1"), ("HTTP_PROXY", "http://b:2")],
                proxy("a", 1, "http://a:1"),
            ),
            (
                &[("http_proxy", " "), ("HTTP_PROXY", "http://b:2")],
                proxy("b", 2, "http://b:2"),
            ),
        ];
        for (vars, want) in cases {
            assert_eq!(env(vars).unwrap().http_proxy, *want, "{vars:?}");
        }
    }

    #[test]
    fn unusable_http_proxy_values_are_errors() {
        let cases = [
            ("https://127.0.0.1:4140", "only http://"),
            ("socks5://127.0.0.1:1080", "only http://"),
            ("http://user:pw@127.0.0.1:4140", "credentials"),
            ("not a url", "not a URL"),
        ];
        for (value, reason) in cases {
            let err = env(&[("HTTP_PROXY", value)]).unwrap_err();
            assert!(err.to_string().contains(reason), "{value}: {err}");
            assert!(
                err.to_string().contains("expected http://HOST:PORT"),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn no_proxy_decides_per_host() {
        let vars = [
            ("HTTP_PROXY", "http://127.0.0.1:4140"),
            ("NO_PROXY", "localhost, .internal,*.corp,::1"),
        ];
        let env = env(&vars).unwrap();
        let cases = [
            ("backend", true),
            ("localhost", false),
            ("LOCALHOST", false),
            ("db.internal", false),
            ("internal", false),
            ("notinternal", true),
            ("a.b.corp", false),
            ("[::1]", false),
        ];
        for (host, proxied) in cases {
            assert_eq!(env.proxy_for(host).is_some(), proxied, "{host}");
        }
        let all = super::ProxyEnv::from_lookup(|n| match n {
            "HTTP_PROXY" => Some("http://p:1".into()),
            "no_proxy" => Some("*".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(all.proxy_for("backend"), None);
    }
}
