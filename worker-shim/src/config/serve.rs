//! The `serve:` section: the worker's argv, where it listens, its health
//! check, restart backoff and stop timing, with the checks the types cannot
//! make.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// The `serve` section of the shim's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The worker's argv (no shell). The worker inherits the shim's
    /// environment plus `env`.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Where the worker listens (`127.0.0.1:8080`).
    pub upstream: SocketAddr,
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default = "secs::<1>", with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(default = "secs::<1>", with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Not healthy this long after it started: the worker is restarted.
    #[serde(default = "secs::<60>", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Failed checks in a row that make a (once healthy) worker unhealthy,
    /// and so not ready.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Unhealthy this long: the worker is restarted.
    #[serde(default = "secs::<10>", with = "humantime_serde")]
    pub unhealthy_restart_after: Duration,
    #[serde(default = "millis::<250>", with = "humantime_serde")]
    pub restart_backoff_initial: Duration,
    #[serde(default = "secs::<30>", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// How long a graceful stop waits for in-flight requests.
    #[serde(default = "secs::<30>", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long the worker gets between `SIGTERM` and `SIGKILL`.
    #[serde(default = "secs::<10>", with = "humantime_serde")]
    pub stop_timeout: Duration,
}

fn default_health_path() -> String {
    "/healthz".to_string()
}
fn default_failure_threshold() -> u32 {
    3
}
fn secs<const N: u64>() -> Duration {
    Duration::from_secs(N)
}
fn millis<const N: u64>() -> Duration {
    Duration::from_millis(N)
}

impl ServeConfig {
    /// A config with every optional field at its default.
    pub fn new(command: Vec<String>, upstream: SocketAddr) -> Self {
        ServeConfig {
            command,
            env: BTreeMap::new(),
            upstream,
            health_path: default_health_path(),
            health_interval: secs::<1>(),
            health_timeout: secs::<1>(),
            startup_timeout: secs::<60>(),
            failure_threshold: default_failure_threshold(),
            unhealthy_restart_after: secs::<10>(),
            restart_backoff_initial: millis::<250>(),
            restart_backoff_max: secs::<30>(),
            drain_timeout: secs::<30>(),
            stop_timeout: secs::<10>(),
        }
    }

    /// Every problem found, joined with `; `; each names the field
    /// (`serve.<field>`) and how to fix it.
    pub fn validate(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        self.check_command(&mut errors);
        self.check_health_and_timing(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The worker's argv, its environment and where it listens.
    fn check_command(&self, errors: &mut Vec<String>) {
        match self.command.first() {
            None => errors.push(
                "serve.command is empty: give the worker's program and its arguments as a list, \
                 e.g. [\"/usr/local/bin/my-server\", \"--port\", \"8080\"]"
                    .to_string(),
            ),
            Some(program) if program.trim().is_empty() => errors.push(
                "serve.command[0] is empty: it must name the worker's program (a path or a name \
                 found on PATH)"
                    .to_string(),
            ),
            Some(_) => {}
        }
        if self.command.iter().any(|arg| arg.contains('\0')) {
            errors.push("serve.command: an argument contains a NUL byte; remove it".to_string());
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                errors.push(format!(
                    "serve.env: {name:?} is not a valid variable name; use a non-empty name \
                     without `=` or NUL"
                ));
            }
            if value.contains('\0') {
                errors.push(format!(
                    "serve.env.{name}: the value contains a NUL byte; remove it"
                ));
            }
        }
        if self.upstream.port() == 0 {
            errors.push(
                "serve.upstream: port 0 is not an address to connect to; set the address the \
                 worker listens on, e.g. 127.0.0.1:8080"
                    .to_string(),
            );
        }
    }

    /// The health check, restart and stop timing.
    fn check_health_and_timing(&self, errors: &mut Vec<String>) {
        if !self.health_path.starts_with('/')
            || self.health_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            errors.push(format!(
                "serve.health_path {:?} is not a request path; use one that starts with `/`, \
                 e.g. /healthz",
                self.health_path
            ));
        }
        for (field, value) in [
            ("health_interval", self.health_interval),
            ("health_timeout", self.health_timeout),
            ("startup_timeout", self.startup_timeout),
            ("unhealthy_restart_after", self.unhealthy_restart_after),
            ("restart_backoff_initial", self.restart_backoff_initial),
        ] {
            if value.is_zero() {
                errors.push(format!(
                    "serve.{field} must be longer than 0; set a duration such as 1s or 250ms"
                ));
            }
        }
        if self.failure_threshold == 0 {
            errors.push(
                "serve.failure_threshold must be at least 1 (failed health checks in a row)"
                    .to_string(),
            );
        }
        if self.restart_backoff_max < self.restart_backoff_initial {
            errors.push(format!(
                "serve.restart_backoff_max ({:?}) is shorter than serve.restart_backoff_initial \
                 ({:?}); raise the maximum or lower the initial delay",
                self.restart_backoff_max, self.restart_backoff_initial
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg: ServeConfig =
            serde_yaml::from_str("command: [my-server]\nupstream: 127.0.0.1:8080\n").unwrap();
        assert_eq!(cfg.health_path, "/healthz");
        assert_eq!(cfg.health_interval, Duration::from_secs(1));
        assert_eq!(cfg.health_timeout, Duration::from_secs(1));
        assert_eq!(cfg.startup_timeout, Duration::from_secs(60));
        assert_eq!(cfg.failure_threshold, 3);
        assert_eq!(cfg.unhealthy_restart_after, Duration::from_secs(10));
        assert_eq!(cfg.restart_backoff_initial, Duration::from_millis(250));
        assert_eq!(cfg.restart_backoff_max, Duration::from_secs(30));
        assert_eq!(cfg.drain_timeout, Duration::from_secs(30));
        assert_eq!(cfg.stop_timeout, Duration::from_secs(10));
        cfg.validate().unwrap();

        let cfg: ServeConfig = serde_yaml::from_str(
            "command: [my-server]\nupstream: 127.0.0.1:8080\nhealth_interval: 500ms\n",
        )
        .unwrap();
        assert_eq!(cfg.health_interval, Duration::from_millis(500));
        let unknown = serde_yaml::from_str::<ServeConfig>(
            "command: [x]\nupstream: 127.0.0.1:8080\nhealth_pth: /h\n",
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("health_pth"), "{unknown}");

        let base = ServeConfig::new(vec!["my-server".into()], "127.0.0.1:8080".parse().unwrap());
        let error = |edit: fn(&mut ServeConfig)| {
            let mut cfg = base.clone();
            edit(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert!(error(|c| c.command.clear()).contains("serve.command is empty"));
        assert!(error(|c| c.command[0] = " ".into()).contains("serve.command[0]"));
        assert!(error(|c| c.upstream.set_port(0)).contains("serve.upstream"));
        assert!(error(|c| c.health_path = "healthz".into()).contains("serve.health_path"));
        assert!(error(|c| c.health_interval = Duration::ZERO).contains("serve.health_interval"));
        assert!(error(|c| c.health_timeout = Duration::ZERO).contains("serve.health_timeout"));
        assert!(error(|c| c.failure_threshold = 0).contains("serve.failure_threshold"));
        assert!(error(|c| {
            c.env.insert("A=B".into(), "x".into());
        })
        .contains("serve.env"));
        let backoff = error(|c| c.restart_backoff_max = Duration::from_millis(100));
        assert!(backoff.contains("serve.restart_backoff_max"), "{backoff}");
        let both = error(|c| {
            c.command.clear();
            c.startup_timeout = Duration::ZERO;
        });
        assert!(
            both.contains("serve.command") && both.contains("serve.startup_timeout"),
            "{both}"
        );
    }
}
