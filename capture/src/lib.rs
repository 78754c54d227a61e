//! Transparent capture for Crank Mesh: the equivalent of linkerd-init and
//! istio-iptables. `crank-capture install` writes nftables (or iptables)
//! rules that send an unmodified app's outbound TCP connects to the proxy's
//! outbound capture listener and its listening ports to the inbound one;
//! `remove` undoes exactly that; `show` lists it. The proxy recovers where a
//! captured connection was going with [`original_dst`].
//!
//! | module           | what it holds |
//! |------------------|---------------|
//! | [`config`]       | the typed, validated [`CaptureConfig`] and the flag parsers |
//! | [`nft`]          | the `inet crank` table, rendered as text (pure) |
//! | [`iptables`]     | the `CRANK_*` chains as `iptables-restore` scripts, and the parser of `iptables -S` (pure) |
//! | [`apply`]        | finds the tools, reads what is installed, applies the scripts |
//! | [`caps`]         | the `CAP_NET_ADMIN` check |
//! | [`report`]       | what was done, as text or JSON |
//! | [`original_dst`](mod@original_dst) | `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on an accepted socket |
//! | [`cli`]          | the command line |

pub mod apply;
pub mod caps;
pub mod cli;
pub mod config;
pub mod error;
pub mod iptables;
pub mod nft;
pub mod original_dst;
pub mod report;

pub use apply::BackendChoice;
pub use config::{CaptureConfig, Cidr, Inbound, InboundPorts, PortRange};
pub use error::CaptureError;
pub use original_dst::original_dst;
pub use report::Report;
