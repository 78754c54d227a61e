//! Cross-host fixture: "hosts" that are Linux network namespaces with their
//! own addresses, joined by a bridge, so a test proves what happens between
//! machines instead of on 127.0.0.1.
//!
//! [`Hosts::new`]`(n)` makes n namespaces `crank-<pid>-<k>-h<i>` and a bridge
//! namespace `crank-<pid>-<k>-br` holding `br0`; host i gets a veth `eth0`
//! on the bridge with `10.77.<k>.<i+1>/24` and `fd77:0:0:<k>::<i+1>/64`, `lo`
//! up and default routes on `eth0`. Each fixture has its own subnet `k`, and
//! the names carry the test process id, so tests run in parallel. Run a
//! program inside with [`Host::command`] (`ip netns exec`), keep it running
//! with [`Host::spawn`], or bind sockets in Rust with [`Host::enter`].
//! Dropping the fixture (also when a test panics) kills every process left
//! in its namespaces and deletes them, which deletes their links.
//!
//! It needs root and `ip` (iproute2). Where those are missing,
//! [`Hosts::new`] prints why and returns `None`, so the test returns early;
//! with `CRANK_NETNS_REQUIRED=1` (tests/run.sh sets it when run as root, as
//! CI does) it fails instead, so CI never skips these tests silently.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_FIXTURE: AtomicU32 = AtomicU32::new(0);

/// N hosts on one bridge; dropped, they are gone.
pub struct Hosts {
    bridge: String,
    hosts: Vec<Host>,
}

/// One host: a network namespace with its own addresses.
pub struct Host {
    ns: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// A process started with [`Host::spawn`]; killed (and reaped) on drop.
pub struct HostProcess {
    child: Child,
}

/// Why the fixture cannot run here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root (run the tests as root, as CI does)".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` cannot run ({e}): install iproute2")),
    }
}

impl Hosts {
    /// Makes `n` hosts (1..=250), or prints why it cannot and returns
    /// `None` (a failure instead under `CRANK_NETNS_REQUIRED=1`).
    pub fn new(n: usize) -> Option<Hosts> {
        assert!((1..=250).contains(&n), "Hosts::new({n}): 1 to 250 hosts");
        if let Some(why) = unavailable() {
            let required = std::env::var("CRANK_NETNS_REQUIRED").is_ok_and(|v| v == "1");
            assert!(!required, "CRANK_NETNS_REQUIRED=1 but {why}");
            eprintln!("skipping: {why}");
            return None;
        }
        sweep_dead_fixtures();
        let k = NEXT_FIXTURE.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("crank-{}-{k}", std::process::id());
        // Subnets per fixture: 10.77.1.0/24 .. 10.77.250.0/24, cycling.
        let subnet = (k % 250 + 1) as u8;
        let mut hosts = Hosts {
            bridge: format!("{prefix}-br"),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &hosts.bridge]);
        in_ns(
            &hosts.bridge,
            &["ip", "link", "add", "br0", "type", "bridge"],
        );
        in_ns(&hosts.bridge, &["ip", "link", "set", "br0", "up"]);
        for i in 0..n {
            let host = Host {
                ns: format!("{prefix}-h{i}"),
                v4: Ipv4Addr::new(10, 77, subnet, i as u8 + 1),
                v6: Ipv6Addr::new(0xfd77, 0, 0, subnet.into(), 0, 0, 0, i as u16 + 1),
            };
            // Pushed first, so a failure below still tears it down.
            hosts.hosts.push(host);
            hosts.hosts[i].plug_into(&hosts.bridge, i);
        }
        Some(hosts)
    }

    /// Host `i` (0-based).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter()
    }

    /// Cuts (`up: false`) or mends host `i`'s cable: its port `h<i>` on
    /// the bridge goes down or up, as a pulled cable or a failed switch
    /// port would; the host itself notices nothing but silence.
    pub fn set_link(&self, i: usize, up: bool) {
        let port = format!("h{i}");
        let state = if up { "up" } else { "down" };
        in_ns(&self.bridge, &["ip", "link", "set", &port, state]);
    }
}

impl std::ops::Index<usize> for Hosts {
    type Output = Host;
    fn index(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .chain([self.bridge.as_str()])
        {
            kill_all_in(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Host {
    fn plug_into(&self, bridge: &str, i: usize) {
        let port = format!("h{i}");
        ip(&["netns", "add", &self.ns]);
        // Made inside the bridge namespace, so no name is ever taken in the
        // test's own namespace.
        in_ns(
            bridge,
            &[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &self.ns,
            ],
        );
        in_ns(bridge, &["ip", "link", "set", &port, "master", "br0", "up"]);
        let v4 = format!("{}/24", self.v4);
        let v6 = format!("{}/64", self.v6);
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "addr", "add", &v4, "dev", "eth0"],
            &["ip", "addr", "add", &v6, "dev", "eth0", "nodad"],
            &["ip", "link", "set", "eth0", "up"],
            &["ip", "route", "add", "default", "dev", "eth0"],
            &["ip", "-6", "route", "add", "default", "dev", "eth0"],
        ] {
            in_ns(&self.ns, args);
        }
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.ns
    }

    /// The host's IPv4 address on the bridge (10.77.k.i+1).
    pub fn addr(&self) -> Ipv4Addr {
        self.v4
    }

    /// The host's IPv6 address on the bridge (fd77:0:0:k::i+1).
    pub fn addr6(&self) -> Ipv6Addr {
        self.v6
    }

    /// `program` to run inside this host (`ip netns exec NAME program`);
    /// add arguments, then `output()`, `status()` or [`Host::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `program args` inside this host to the end.
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Output {
        let program = program.as_ref().to_owned();
        self.command(&program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program:?} in {}: {e}", self.ns))
    }

    /// Starts `cmd` (from [`Host::command`]); it is killed when the handle
    /// drops, and anything still running in the namespace when the
    /// fixture drops.
    pub fn spawn(&self, mut cmd: Command) -> HostProcess {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} in {}: {e}", self.ns));
        HostProcess { child }
    }

    /// Runs `f` on a thread inside this host's namespace; sockets it makes
    /// stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.ns);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the fd is a namespace file held open for the call;
                // only this thread changes namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {}: {}",
                    self.ns,
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl HostProcess {
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip args`, which must succeed.
fn ip(args: &[&str]) {
    check(
        Command::new("ip").args(args).output(),
        &format!("ip {}", args.join(" ")),
    );
}

/// `args` inside namespace `ns`, which must succeed.
fn in_ns(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output();
    check(out, &format!("(in {ns}) {}", args.join(" ")));
}

fn check(out: std::io::Result<Output>, what: &str) {
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{what} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("{what}: {e} (install iproute2)"),
    }
}

/// SIGKILLs every process in namespace `ns` (`ip netns pids`): only the
/// fixture's own namespaces are ever passed here.
fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill has no memory preconditions; the pid is in our
            // namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Deletes namespaces left by fixtures of test processes that died without
/// dropping them (SIGKILL, a crash): `crank-<pid>-…` whose pid is gone.
fn sweep_dead_fixtures() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(pid) = name
            .strip_prefix("crank-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(&name);
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}
