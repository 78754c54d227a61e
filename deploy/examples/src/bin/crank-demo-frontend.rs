//! `crank-demo-frontend`: an HTTP server whose `GET /` calls a backend URL,
//! through `HTTP_PROXY` when set. All logic is in `crank_examples::frontend`.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use crank_examples::frontend::{self, Frontend};
use crank_examples::proxy_env::ProxyEnv;
use crank_examples::server;
use tokio::net::TcpListener;

/// Demo frontend for the Crank Mesh quickstart: `GET /` calls --backend-url.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Set HTTP_PROXY=http://HOST:PORT to call the backend through a sidecar."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Service name shown in every answer.
    #[arg(long, default_value = "frontend")]
    name: String,
    /// What `GET /` calls, e.g. http://backend/hello.
    #[arg(long)]
    backend_url: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let proxy_env = ProxyEnv::from_env()?;
    let frontend = Frontend::new(args.name, &args.backend_url, proxy_env)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "crank-demo-frontend {:?} listening on http://{}; GET / calls {} via {}",
        frontend.name,
        listener.local_addr()?,
        frontend.backend_url,
        frontend.via_proxy().unwrap_or("direct"),
    );
    frontend::serve(listener, frontend, server::stop_signal()).await?;
    eprintln!("crank-demo-frontend stopped");
    Ok(())
}
