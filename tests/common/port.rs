//! Ports for test servers that come back on the same address after a restart.
//!
//! Port 0 gives a port from the kernel's ephemeral range (`ip_local_port_range`, 32768–60999
//! here), the same range outgoing connections draw their local ports from. Once a server
//! is killed, any connection of any test running in parallel may take its port, and the
//! restart on that address then fails to bind ("the server exited on restart"). These
//! ports come from below the ephemeral range, where no outgoing connection lands.
//!
//! Included by `server.rs` and `cluster.rs`; not every test uses every item.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lowest port handed out: above the well-known and common service ports.
const PORT_LOW: u16 = 20_000;

/// The next candidate port, as an offset from [`PORT_LOW`]: random once per process, then
/// counted up, so one process never hands out the same port twice (two random picks of a
/// cluster's eight ports could collide before any node had bound its own).
static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);

/// A port below the ephemeral range that was free a moment ago (bound and released), and
/// not handed out before by this process.
pub fn free_port() -> u16 {
    let high = ephemeral_low().min(32_768);
    if high <= PORT_LOW + 1_000 {
        // No room below the ephemeral range: fall back to the kernel's choice.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        return l.local_addr().expect("addr").port();
    }
    let span = u64::from(high - PORT_LOW);
    let start = RandomState::new().hash_one(std::process::id()) % span;
    let _ = NEXT.compare_exchange(u64::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = PORT_LOW + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORT_LOW}..{high}");
}

/// `127.0.0.1:PORT` with a [`free_port`].
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The low end of the kernel's ephemeral port range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
