//! A real PostgreSQL server (Debian's `postgresql` package, version 15 or
//! whichever `/usr/lib/postgresql/*/bin` holds) for end-to-end tests: a
//! private data directory in a temporary directory, TCP on one loopback
//! port, its Unix socket in that directory too, no system service. PostgreSQL
//! refuses to run as root, so under root the server runs as the `postgres`
//! user (`setpriv`), with the data directory handed to it. `stop()` and
//! `restart()` keep the data and the port, for fault tests; drop stops it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::proxy::free_port;
use crate::{output_text, wait_child, wait_until};

/// The database `start()` creates; `url()` names it.
pub const DATABASE: &str = "crank";

pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Postgres {
    /// initdb, start on a free loopback port, wait until it accepts
    /// connections, and create the database `crank`.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        open_to_postgres(dir.path());
        let mut pg = Postgres {
            port: free_port(),
            bin,
            dir,
            child: None,
        };
        pg.initdb();
        pg.launch();
        pg.psql("postgres", &format!("CREATE DATABASE {DATABASE}"));
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/crank` (trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` with psql against `db` (`-At`: unaligned, tuples only);
    /// panics with psql's output when it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .as_postgres(&self.bin.join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql:?}: {}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Fast shutdown (SIGINT: running transactions are rolled back, clients
    /// disconnected); waits until the server has exited. The data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the stopped server again on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) {
        let out = self
            .as_postgres(&self.bin.join("initdb"))
            .arg("-D")
            .arg(self.data())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", output_text(&out));
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("postgres cannot run ({e}): {INSTALL}"));
        self.child = Some(child);
        let ready = self.bin.join("pg_isready");
        let port = self.port.to_string();
        wait_until(
            "postgres accepting connections",
            Duration::from_secs(30),
            || {
                if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!("postgres exited with {st}:\n{}", self.log());
                }
                Command::new(&ready)
                    .args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// A command that runs as the `postgres` user when this process is root.
    fn as_postgres(&self, program: &Path) -> Command {
        if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
            c.arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

const INSTALL: &str =
    "Debian's postgresql package has it; run `bash tests/run.sh` (or `apt-get install postgresql`)";

/// `/usr/lib/postgresql/<newest>/bin`, or `CRANK_PG_BIN`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CRANK_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!("no /usr/lib/postgresql/*/bin/postgres: {INSTALL}"),
    }
}

/// Under root, gives the temporary directory to the `postgres` user so the
/// server can create its data directory, socket and log there.
fn open_to_postgres(dir: &Path) {
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chown postgres {}: {} (the postgresql package creates the user)",
        dir.display(),
        output_text(&out)
    );
    std::fs::File::create(dir.join("postgres.log")).unwrap();
    let _ = Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir.join("postgres.log"))
        .status();
}
