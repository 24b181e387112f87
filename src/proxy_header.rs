//! Inbound PROXY protocol: the header a load balancer puts in front of a
//! connection to say whose connection it is (HAProxy's
//! `proxy-protocol.txt`, version 1 text and version 2 binary).
//!
//! Invariants:
//! - a header is read only on listeners with `proxy_protocol = true`, and
//!   only from peers inside the listener's `trusted_proxies`; from those
//!   peers it is required, so that a misconfigured balancer is noticed at
//!   once instead of every client looking like the balancer (case C31);
//! - it is read only as the very first bytes of the connection, before
//!   usher writes anything and before TLS on implicit-TLS listeners
//!   (case C32); a `PROXY` line later in a session is an ordinary
//!   unknown command of that protocol;
//! - exactly the header is taken from the socket: the bytes are looked at
//!   with `peek` and consumed only as far as the header goes, so what
//!   follows it (a TLS ClientHello, an early command) is left for the next
//!   layer, whatever the TCP segmentation;
//! - at most [`MAX_HEADER`] bytes, within the pre-login timeout;
//! - a header from an untrusted peer is never honoured. On implicit-TLS
//!   listeners, where the client speaks first, usher looks at the first
//!   bytes and refuses one that starts like a header; on cleartext
//!   listeners the greeting cannot wait for the client, so the header
//!   reaches the protocol session as a line it does not accept.
//!
//! Parsing is split in two pure steps that tests feed byte by byte:
//! [`scan`] says how long the header is (or that more bytes are needed),
//! [`parse`] turns exactly those bytes into addresses with the `ppp` crate.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::ClientAddrs;
use crate::config::{ListenerConfig, Protocol, TlsMode};

/// The v2 signature (proxy-protocol.txt §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The v1 prefix (§2.1).
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Longest v1 header, CRLF included (§2.1).
const V1_MAX: usize = 107;

/// Fixed part of a v2 header: signature, version/command, family,
/// length.
const V2_FIXED: usize = 16;

/// Longest header usher reads. Addresses need at most 232 bytes (v2 with
/// UNIX addresses); the rest is room for TLVs (TLS details, cloud
/// balancers' connection ids) while keeping a hostile length cheap.
pub const MAX_HEADER: usize = 4096;

/// How far the bytes seen so far go towards a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Every byte so far belongs to a header that is not complete yet.
    Incomplete,
    /// The header is the first `n` bytes.
    Complete(usize),
    /// The bytes do not start a PROXY header.
    NotProxy,
    /// A header longer than [`MAX_HEADER`] (or than v1 allows).
    TooLong,
}

/// Finds the end of a header at the start of `bytes`, without judging its
/// content.
pub fn scan(bytes: &[u8]) -> Scan {
    if bytes.is_empty() {
        return Scan::Incomplete;
    }
    if starts_like(bytes, V2_SIGNATURE) {
        return scan_v2(bytes);
    }
    if starts_like(bytes, V1_PREFIX) {
        return scan_v1(bytes);
    }
    Scan::NotProxy
}

/// Whether `bytes` and `prefix` agree as far as both go.
fn starts_like(bytes: &[u8], prefix: &[u8]) -> bool {
    let n = bytes.len().min(prefix.len());
    bytes[..n] == prefix[..n]
}

/// v1 ends at the first LF; `parse` checks that a CR is before it.
fn scan_v1(bytes: &[u8]) -> Scan {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) if i < V1_MAX => Scan::Complete(i + 1),
        Some(_) => Scan::TooLong,
        None if bytes.len() >= V1_MAX => Scan::TooLong,
        None => Scan::Incomplete,
    }
}

/// v2 carries its length after the fixed part.
fn scan_v2(bytes: &[u8]) -> Scan {
    if bytes.len() < V2_FIXED {
        return Scan::Incomplete;
    }
    let len = V2_FIXED + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if len > MAX_HEADER {
        Scan::TooLong
    } else if bytes.len() >= len {
        Scan::Complete(len)
    } else {
        Scan::Incomplete
    }
}

/// Whether `bytes` look like the start of a PROXY header (complete or
/// not). Used to refuse headers from peers that may not send one.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    !bytes.is_empty() && scan(bytes) != Scan::NotProxy
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The balancer relays a client: its address and the address it
    /// connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v1 `UNKNOWN` or v2 `LOCAL` (the balancer's own health check, or a
    /// family usher cannot use): the socket's addresses stand.
    Local,
}

/// Why a connection was refused before its session started.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("trusted peer sent no PROXY header")]
    Missing,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header from a peer that is not a trusted proxy")]
    Untrusted,
    #[error("no complete PROXY header within the pre-login timeout")]
    Timeout,
    #[error("closed before the PROXY header was complete")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Parses one complete header (exactly the bytes [`scan`] measured).
pub fn parse(header: &[u8]) -> Result<Origin, HeaderError> {
    let malformed = |e: &dyn fmt::Display| HeaderError::Malformed(e.to_string());
    if header.starts_with(V2_SIGNATURE) {
        let h = ppp::v2::Header::try_from(header).map_err(|e| malformed(&e))?;
        if h.header.len() != header.len() {
            return Err(HeaderError::Malformed("length mismatch".into()));
        }
        return Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => Origin::Local,
            (_, ppp::v2::Addresses::IPv4(a)) => Origin::Proxied {
                source: SocketAddr::from((a.source_address, a.source_port)),
                destination: SocketAddr::from((a.destination_address, a.destination_port)),
            },
            (_, ppp::v2::Addresses::IPv6(a)) => Origin::Proxied {
                source: SocketAddr::from((a.source_address, a.source_port)),
                destination: SocketAddr::from((a.destination_address, a.destination_port)),
            },
            // UNIX sockets and unspecified families carry no client
            // address that a backend could use (§2.2: "ignore").
            _ => Origin::Local,
        });
    }
    let h = ppp::v1::Header::try_from(header).map_err(|e| malformed(&e))?;
    if h.header.len() != header.len() {
        return Err(HeaderError::Malformed("trailing bytes".into()));
    }
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Origin::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        ppp::v1::Addresses::Tcp6(a) => Origin::Proxied {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        ppp::v1::Addresses::Unknown => Origin::Local,
    })
}

/// Reads the header at the start of `tcp`, consuming exactly its bytes.
async fn read_header(tcp: &mut TcpStream) -> Result<Origin, HeaderError> {
    let mut header = Vec::new();
    let mut peeked = [0u8; 512];
    loop {
        let want = peeked.len().min(MAX_HEADER + 1 - header.len());
        let n = tcp.peek(&mut peeked[..want]).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let mut view = header.clone();
        view.extend_from_slice(&peeked[..n]);
        // Only bytes known to belong to the header leave the socket.
        let take = match scan(&view) {
            Scan::Complete(len) => len - header.len(),
            Scan::Incomplete => n,
            Scan::NotProxy if header.is_empty() => return Err(HeaderError::Missing),
            Scan::NotProxy => return Err(HeaderError::Malformed("not a PROXY header".into())),
            Scan::TooLong => return Err(HeaderError::TooLong),
        };
        let start = header.len();
        header.resize(start + take, 0);
        tcp.read_exact(&mut header[start..]).await?;
        if let Scan::Complete(_) = scan(&header) {
            return parse(&header);
        }
    }
}

/// Refuses an untrusted peer whose first bytes start like a header. Only
/// used where the client speaks first (implicit TLS), so that waiting for
/// those bytes delays no one.
async fn refuse_header(tcp: &TcpStream) -> Result<(), HeaderError> {
    let mut first = [0u8; V2_SIGNATURE.len()];
    let n = tcp.peek(&mut first).await?;
    if looks_like_header(&first[..n]) {
        return Err(HeaderError::Untrusted);
    }
    Ok(())
}

/// The connection's client addresses: from the PROXY header when the
/// listener expects one from this peer, else the socket's own. Errors
/// mean the connection must be closed without a session.
pub async fn receive(
    tcp: &mut TcpStream,
    socket: ClientAddrs,
    listener: &ListenerConfig,
    limit: Duration,
) -> Result<ClientAddrs, HeaderError> {
    if !listener.proxy_protocol {
        return Ok(socket);
    }
    let trusted = listener
        .trusted_proxies
        .iter()
        .any(|n| n.contains(socket.peer.ip()));
    let work = async {
        if !trusted {
            if listener.tls == TlsMode::Implicit {
                refuse_header(tcp).await?;
            }
            return Ok(socket);
        }
        Ok(match read_header(tcp).await? {
            Origin::Proxied {
                source,
                destination,
            } => ClientAddrs {
                peer: source,
                local: destination,
            },
            Origin::Local => socket,
        })
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(HeaderError::Timeout))
}

/// An IP network in CIDR form (`192.0.2.0/24`, `2001:db8::/32`); a bare
/// address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is inside. IPv4 peers seen on an IPv6 socket
    /// (`::ffff:192.0.2.5`) count as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(u32::from(net), self.prefix) == mask32(u32::from(ip), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(u128::from(net), self.prefix) == mask128(u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

/// `v` with only its first `prefix` bits kept (`prefix` at most 32).
fn mask32(v: u32, prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => v & (u32::MAX << (32 - u32::from(p))),
    }
}

/// `v` with only its first `prefix` bits kept (`prefix` at most 128).
fn mask128(v: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => v & (u128::MAX << (128 - u32::from(p))),
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| p.parse::<u8>().ok())
                .flatten()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        let net = Network { addr, prefix };
        // Host bits usually mean a typo in the prefix length.
        if !net.is_base() {
            return Err(format!("`{s}` has host bits set after /{prefix}"));
        }
        Ok(net)
    }
}

impl Network {
    /// Whether the address is the network's first (no host bits).
    fn is_base(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => mask32(u32::from(a), self.prefix) == u32::from(a),
            IpAddr::V6(a) => mask128(u128::from(a), self.prefix) == u128::from(a),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Network, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Records the client address into the connection's span, and the
/// balancer's when a header named the client.
pub fn record(span: &tracing::Span, socket: ClientAddrs, addrs: ClientAddrs) {
    span.record("client.addr", tracing::field::display(addrs.peer));
    if addrs.peer != socket.peer {
        span.record("proxy.addr", tracing::field::display(socket.peer));
    }
}

/// Ends a connection whose PROXY header was missing, bad or not allowed,
/// with the protocol's closing line (in the clear: nothing else has been
/// said on the connection yet).
pub async fn refuse(mut tcp: TcpStream, protocol: Protocol, error: HeaderError) {
    if let Ok(peer) = tcp.peer_addr() {
        tracing::Span::current().record("proxy.addr", tracing::field::display(peer));
    }
    match &error {
        HeaderError::Closed | HeaderError::Io(_) => {
            tracing::debug!(%error, "connection ended before a PROXY header");
        }
        _ => tracing::warn!(%error, "PROXY header refused"),
    }
    let line: &[u8] = match (protocol, &error) {
        (Protocol::Imap, HeaderError::Timeout) => b"* BYE Disconnected for inactivity.\r\n",
        (Protocol::Imap, _) => b"* BYE PROXY protocol error\r\n",
        (Protocol::Submission, HeaderError::Timeout) => b"421 4.4.2 Timeout exceeded\r\n",
        (Protocol::Submission, _) => b"421 4.7.0 PROXY protocol error\r\n",
    };
    let _ = tcp.write_all(line).await;
    let _ = tcp.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[u8] = b"PROXY TCP4 192.0.2.10 192.0.2.1 53211 993\r\n";

    fn v2_ipv4() -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([0x21, 0x11, 0x00, 0x0C]);
        h.extend([192, 0, 2, 10, 192, 0, 2, 1]);
        h.extend(53211u16.to_be_bytes());
        h.extend(465u16.to_be_bytes());
        h
    }

    fn proxied(source: &str, destination: &str) -> Origin {
        Origin::Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        for header in [V1.to_vec(), v2_ipv4()] {
            for n in 0..header.len() {
                assert_eq!(scan(&header[..n]), Scan::Incomplete, "{n}");
            }
            assert_eq!(scan(&header), Scan::Complete(header.len()));
        }
    }

    #[test]
    fn bytes_after_the_header_are_not_counted() {
        let mut bytes = V1.to_vec();
        bytes.extend(b"\x16\x03\x01 a ClientHello");
        assert_eq!(scan(&bytes), Scan::Complete(V1.len()));
        let mut bytes = v2_ipv4();
        bytes.extend(b"a1 CAPABILITY\r\n");
        assert_eq!(scan(&bytes), Scan::Complete(28));
    }

    #[test]
    fn v1_and_v2_name_the_client() {
        assert_eq!(
            parse(V1).unwrap(),
            proxied("192.0.2.10:53211", "192.0.2.1:993")
        );
        assert_eq!(
            parse(&v2_ipv4()).unwrap(),
            proxied("192.0.2.10:53211", "192.0.2.1:465")
        );
        let v6 = b"PROXY TCP6 2001:db8::10 2001:db8::1 53211 143\r\n";
        assert_eq!(
            parse(v6).unwrap(),
            proxied("[2001:db8::10]:53211", "[2001:db8::1]:143")
        );
    }

    #[test]
    fn unknown_and_local_keep_the_socket_addresses() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Origin::Local);
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0x00, 0x00]);
        assert_eq!(scan(&local), Scan::Complete(16));
        assert_eq!(parse(&local).unwrap(), Origin::Local);
    }

    #[test]
    fn v2_with_tlvs_is_accepted() {
        let mut h = v2_ipv4();
        h[15] = 12 + 7;
        h.extend([0x04, 0x00, 0x04, b'a', b'b', b'c', b'd']);
        assert_eq!(scan(&h), Scan::Complete(h.len()));
        assert!(matches!(parse(&h).unwrap(), Origin::Proxied { .. }));
    }

    #[test]
    fn hostile_headers() {
        // Over-long: v1 without LF within 107 bytes, v2 announcing 64 KiB.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(scan(&long), Scan::TooLong);
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(scan(&huge), Scan::TooLong);
        // Not a header at all.
        for bytes in [&b"\x16\x03\x01\x02\x00"[..], b"a1 LOGIN x y\r\n", b"PROXZ"] {
            assert_eq!(scan(bytes), Scan::NotProxy, "{bytes:?}");
            assert!(!looks_like_header(bytes));
        }
        // Complete by length but wrong inside: parse refuses, no panic.
        let bad: [&[u8]; 9] = [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
            b"PROXY \xff\xfe\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY \r\n",
        ];
        for bytes in bad {
            assert_eq!(scan(bytes), Scan::Complete(bytes.len()), "{bytes:?}");
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
        let mut v1_not_v2 = V2_SIGNATURE.to_vec();
        v1_not_v2.extend([0x11, 0x11, 0x00, 0x0C]);
        v1_not_v2.extend([0; 12]);
        assert!(parse(&v1_not_v2).is_err(), "version 1 in a v2 frame");
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(parse(&short).is_err(), "IPv4 family with 4 address bytes");
    }

    #[test]
    fn every_byte_value_after_the_prefix_is_safe() {
        for b in 0..=255u8 {
            let mut v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec();
            v1.insert(12, b);
            v1.extend(b"\r\n");
            if let Scan::Complete(n) = scan(&v1) {
                let _ = parse(&v1[..n]);
            }
            let mut v2 = v2_ipv4();
            v2[12] = b;
            let _ = parse(&v2);
            v2[13] = b;
            let _ = parse(&v2);
        }
    }

    #[test]
    fn networks() {
        let n: Network = "192.0.2.0/24".parse().unwrap();
        assert!(n.contains("192.0.2.5".parse().unwrap()));
        assert!(n.contains("::ffff:192.0.2.5".parse().unwrap()));
        assert!(!n.contains("192.0.3.5".parse().unwrap()));
        assert!(!n.contains("2001:db8::5".parse().unwrap()));
        let host: Network = "127.0.0.1".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6: Network = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "lb.example",
            "2001:db8::/129",
            "",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }
}
