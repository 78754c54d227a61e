//! The original destination of a redirected connection: what the app asked
//! for before the capture rules sent it to the proxy's listener. Linux keeps
//! it in conntrack and answers `getsockopt(SO_ORIGINAL_DST)` (IPv4) or
//! `getsockopt(IP6T_SO_ORIGINAL_DST)` (IPv6) on the accepted socket.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

/// `SO_ORIGINAL_DST` from `linux/netfilter_ipv4.h`; the IPv6 one
/// (`IP6T_SO_ORIGINAL_DST`, `linux/netfilter_ipv6/ip6_tables.h`) has the
/// same number at level `SOL_IPV6`.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the peer connected to before REDIRECT (or DNAT) rewrote
/// it, for a socket accepted on a capture listener (a `std` or `tokio`
/// `TcpStream`). An IPv4 connection on a dual-stack listener is asked at the
/// IPv4 level. Fails with `NotFound` when the kernel has no record of a
/// rewrite (the connection was not captured, or conntrack forgot it).
pub fn original_dst(stream: &impl AsFd) -> io::Result<SocketAddr> {
    let fd = stream.as_fd().as_raw_fd();
    let local = local_addr(fd)?;
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let res = if ipv4 {
        original_v4(fd)
    } else {
        original_v6(fd)
    };
    res.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => io::Error::new(
            io::ErrorKind::NotFound,
            "no original destination: this connection was not redirected by the capture rules (install them with `crank-capture install`)",
        ),
        _ => e,
    })
}

fn original_v4(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: a zeroed sockaddr_in is valid; the kernel writes at most `len`
    // bytes into it.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    getsockopt(fd, libc::SOL_IP, &mut sa)?;
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sa.sin_port)).into())
}

fn original_v6(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: as above, for sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    getsockopt(fd, libc::SOL_IPV6, &mut sa)?;
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    Ok(SocketAddrV6::new(
        ip,
        u16::from_be(sa.sin6_port),
        sa.sin6_flowinfo,
        sa.sin6_scope_id,
    )
    .into())
}

fn getsockopt<T>(fd: libc::c_int, level: libc::c_int, out: &mut T) -> io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a valid, writable T of `len` bytes for the call.
    let rc =
        unsafe { libc::getsockopt(fd, level, SO_ORIGINAL_DST, (out as *mut T).cast(), &mut len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn local_addr(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: the fd stays open for the borrow's life; ManuallyDrop keeps
    // the temporary TcpStream from closing it.
    let s = std::mem::ManuallyDrop::new(unsafe {
        <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    s.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Without a redirect the kernel either reports the real destination
    /// (conntrack saw the connection) or nothing; never a wrong address.
    /// The redirect itself is proven in tests/original_dst.rs.
    #[test]
    fn an_uncaptured_connection_reports_itself_or_not_found() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(bind) else {
                continue; // no IPv6 loopback here
            };
            let addr = l.local_addr().unwrap();
            let _c = TcpStream::connect(addr).unwrap();
            let (s, _) = l.accept().unwrap();
            match original_dst(&s) {
                Ok(dst) => assert_eq!(dst, addr),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
                    assert!(e.to_string().contains("crank-capture install"), "{e}");
                }
            }
        }
    }
}
