//! Loopback ports for tests: never a fixed port, always one the kernel chose.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// How long one connection attempt may take on loopback.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// How long to wait between connection attempts.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The loopback address with `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The kernel picks it by binding port 0; the listener is closed again
/// before returning, so another process could take the port in between.
/// Callers that start a server on it should be ready to retry.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(loopback(0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `n` distinct free ports: all are held open until every one is chosen,
/// so the kernel cannot hand out the same port twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind(loopback(0)).expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn is_listening(port: u16) -> bool {
    TcpStream::connect_timeout(&loopback(port), CONNECT_TIMEOUT).is_ok()
}

/// Waits until 127.0.0.1:`port` accepts a connection; false after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    poll_until(timeout, || is_listening(port))
}

/// Waits until 127.0.0.1:`port` refuses connections; false after `timeout`.
pub fn wait_for_port_closed(port: u16, timeout: Duration) -> bool {
    poll_until(timeout, || !is_listening(port))
}

/// Calls `check` every few milliseconds until it returns true or `timeout`
/// has passed; returns the last result.
pub fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}
