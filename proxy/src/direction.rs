//! Which side of the sidecar a listener serves. A leaf: every layer names
//! it (policy sets, metrics labels, the request phases).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Peer sidecar → local app, over mTLS.
    Inbound,
    /// Local app → mesh.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}
