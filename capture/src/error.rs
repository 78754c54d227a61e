//! What can stop crank-capture, each with the fix in its message.

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("this process lacks CAP_NET_ADMIN, which changing the firewall rules needs (CapEff in /proc/self/status lacks bit 12): run it as root, or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN; Kubernetes: securityContext.capabilities.add: [NET_ADMIN] on the init container); --dry-run prints the rules without it")]
    NoNetAdmin,
    #[error("neither nft nor iptables is installed (looked in PATH, /usr/sbin and /sbin): install nftables (`apt-get install nftables`) or iptables")]
    NoTools,
    #[error("--backend {backend} needs `{program}`, which is not installed (looked in PATH, /usr/sbin and /sbin): install the {package} package, or pick another --backend")]
    MissingTool {
        backend: &'static str,
        program: &'static str,
        package: &'static str,
    },
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}
