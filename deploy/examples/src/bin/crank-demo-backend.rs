//! `crank-demo-backend`: an HTTP/1.1 + h2c server that answers every request
//! with JSON describing what it received. All logic is in `crank_examples::backend`.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use crank_examples::{backend, server};
use tokio::net::TcpListener;

/// Demo backend for the Crank Mesh quickstart: echoes each request as JSON.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Service name shown in every answer.
    #[arg(long, default_value = "backend")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "crank-demo-backend {:?} listening on http://{}",
        args.name,
        listener.local_addr()?
    );
    backend::serve(listener, args.name, server::stop_signal()).await?;
    eprintln!("crank-demo-backend stopped");
    Ok(())
}
