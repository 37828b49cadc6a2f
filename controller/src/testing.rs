//! Support for tests and benchmarks that start controllers on loopback.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports handed out: below the kernel's ephemeral range (32768-60999 by default), so an
/// outgoing connection cannot take the port between this call and the server's bind, as it
/// could with a port the kernel picked for `bind(0)`.
const FIRST: u32 = 20000;
const COUNT: u32 = 12000;

/// A loopback address whose TCP port is free now and not handed out before by this process.
/// Processes start at different places in the range (by pid), so two test binaries running
/// at once rarely meet; a port in use is skipped.
pub fn free_loopback_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % COUNT).unwrap_or(u16::MAX);
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            && let Ok(addr) = l.local_addr()
        {
            return addr;
        }
        if n > COUNT {
            // Every port tried: let the kernel pick one.
            if let Ok(addr) =
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr())
            {
                return addr;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_loopback_ports_below_the_ephemeral_range() {
        let a: Vec<SocketAddr> = (0..50).map(|_| free_loopback_addr()).collect();
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert!(
            a.iter()
                .all(|s| s.ip().is_loopback() && (20000..32000).contains(&s.port()))
        );
    }
}
