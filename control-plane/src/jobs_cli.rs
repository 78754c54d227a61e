//! `crankctl jobs usage`: CPU-seconds, GPU-seconds, energy and job counts
//! per tenant and capability from a worker shim's `GET /v1/usage` (every
//! shim's jobs when they share a queue), for cost allocation.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Deserialize;

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Usage per tenant and capability: CPU-seconds, GPU-seconds, energy
    /// (joules, where the host measures it) and jobs.
    Usage {
        /// A shim's job API (`listen`), like `127.0.0.1:8700` or
        /// `http://worker-1:8700`.
        #[arg(long, env = "CRANK_SHIM")]
        shim: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// How far back (`30d`, `12h`).
        #[arg(long, default_value = "30d")]
        since: String,
        /// `human` or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
}

/// One row of the shim's answer.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Row {
    tenant: String,
    capability: String,
    jobs: u64,
    attempts: u64,
    cpu_seconds: f64,
    gpu_seconds: f64,
    energy_joules: f64,
    energy_unmeasured_attempts: u64,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Report {
    since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    source: String,
    usage: Vec<Row>,
}

pub fn run(cmd: JobsCommand) -> Result<()> {
    match cmd {
        JobsCommand::Usage {
            shim,
            tenant,
            since,
            output,
        } => usage(&shim, tenant.as_deref(), &since, &output),
    }
}

fn usage(shim: &str, tenant: Option<&str>, since: &str, output: &str) -> Result<()> {
    if !matches!(output, "human" | "json") {
        bail!("-o {output}: use human or json");
    }
    humantime::parse_duration(since)
        .with_context(|| format!("--since {since:?} is not a duration like 30d or 12h"))?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("since", since);
    if let Some(t) = tenant {
        q.append_pair("tenant", t);
    }
    let (status, body) = get(shim, &format!("/v1/usage?{}", q.finish()))?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("{shim} answered {status}: {message}");
    }
    let report: Report = serde_json::from_str(&body).with_context(|| {
        format!("{shim}/v1/usage did not answer a usage report; is it a crank-shim in exec mode?")
    })?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&report)?),
        _ => print_table(&report),
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "{:<24} {:<24} {:>6} {:>8} {:>12} {:>12} {:>14}",
        "TENANT", "CAPABILITY", "JOBS", "ATTEMPTS", "CPU-S", "GPU-S", "ENERGY-J"
    );
    for row in &r.usage {
        let energy = match row.energy_unmeasured_attempts {
            0 => format!("{:.1}", row.energy_joules),
            n => format!("{:.1} ({n} unmeasured)", row.energy_joules),
        };
        println!(
            "{:<24} {:<24} {:>6} {:>8} {:>12.2} {:>12.2} {:>14}",
            row.tenant,
            row.capability,
            row.jobs,
            row.attempts,
            row.cpu_seconds,
            row.gpu_seconds,
            energy
        );
    }
    if r.usage.is_empty() {
        println!("(no finished attempts in the window; source: {})", r.source);
    }
}

/// A plain HTTP/1.1 GET (the shim's job API is reached on loopback or
/// through a sidecar's plain port).
fn get(shim: &str, path: &str) -> Result<(u16, String)> {
    let hostport = shim
        .strip_prefix("http://")
        .unwrap_or(shim)
        .trim_end_matches('/');
    if shim.starts_with("https://") {
        bail!(
            "--shim {shim}: give the shim's plain http:// job API address (its listen), not https"
        );
    }
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("--shim {shim}: not a host:port"))?
        .next()
        .with_context(|| format!("--shim {shim} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the shim at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .context("reading the shim's answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{shim} answered something other than HTTP"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{shim} answered no HTTP status"))?;
    Ok((status, body.to_string()))
}
