//! Reaching a backend: TCP connect, TLS verified against a CA, line reads.
//!
//! The protocol-specific logins (IMAP in `imap::backend`, SMTP in
//! `smtp::backend`) build on these pieces.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::net::{client_config, Stream};
use crate::store::{Backend, Forward};

/// Longest line usher reads from a backend before login completes.
pub const MAX_BACKEND_LINE: usize = 64 * 1024;

/// Why a backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("closed the connection")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("refused usher's login: {0}")]
    Refused(String),
    #[error("no answer within the backend timeout")]
    Timeout,
    #[error("not configured: {0}")]
    Config(String),
}

impl BackendError {
    /// Whether the failure says the backend is down, as opposed to a
    /// refusal from a working backend.
    pub fn is_down(&self) -> bool {
        matches!(
            self,
            BackendError::Connect(_)
                | BackendError::Timeout
                | BackendError::Closed
                | BackendError::Io(_)
        )
    }

    /// Whether the backend refused for a limit of its own (RFC 5530
    /// `[LIMIT]`, e.g. Dovecot's connections per user and address): the
    /// client should hear that, not that the account is unavailable.
    pub fn is_limit(&self) -> bool {
        matches!(self, BackendError::Refused(text) if text.starts_with("[LIMIT]"))
    }

    /// Whether a real login's failure counts against the backend's health:
    /// only a connection that could not be made. A slow answer under load
    /// is not a dead backend, and counting it would turn a burst of
    /// reconnects (after a kick or a drain) into refusals for everyone;
    /// the probes judge slowness with their own timeout.
    pub fn counts_against_health(&self) -> bool {
        matches!(self, BackendError::Connect(_))
    }
}

/// TLS connectors for backends, one per CA bundle, built on first use.
#[derive(Default)]
pub struct BackendTls {
    default_ca: Option<PathBuf>,
    connectors: DashMap<PathBuf, TlsConnector>,
}

impl BackendTls {
    pub fn new(default_ca: Option<PathBuf>) -> BackendTls {
        BackendTls {
            default_ca,
            connectors: DashMap::new(),
        }
    }

    fn connector(&self, ca: Option<&str>) -> Result<TlsConnector, BackendError> {
        let path = match ca {
            Some(p) => PathBuf::from(p),
            None => self.default_ca.clone().ok_or_else(|| {
                BackendError::Config(
                    "backend uses TLS but no CA is configured (backends.ca)".into(),
                )
            })?,
        };
        if let Some(c) = self.connectors.get(&path) {
            return Ok(c.clone());
        }
        let config =
            client_config(Path::new(&path)).map_err(|e| BackendError::Config(e.to_string()))?;
        let connector = TlsConnector::from(config);
        self.connectors.insert(path, connector.clone());
        Ok(connector)
    }

    /// Wraps `tcp` in TLS, verifying the certificate for `host`.
    pub async fn wrap(
        &self,
        tcp: TcpStream,
        host: &str,
        ca: Option<&str>,
    ) -> Result<Stream, BackendError> {
        let connector = self.connector(ca)?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| BackendError::Config(format!("host {host:?}: {e}")))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| BackendError::Tls(e.to_string()))?;
        Ok(Stream::ClientTls(Box::new(tls)))
    }
}

/// Opens a TCP connection to `host:port`.
pub async fn connect(host: &str, port: u16) -> Result<TcpStream, BackendError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(BackendError::Connect)?;
    tcp.set_nodelay(true).map_err(BackendError::Connect)?;
    Ok(tcp)
}

/// Opens a TCP connection to `backend` on `port`. A backend that takes
/// PROXY headers (`forward = "proxy"`) gets a version 2 header as the very
/// first bytes, before TLS: the client's addresses for a client's session,
/// or the LOCAL command for usher's own probes (`client` is `None`), which
/// the receiver treats as a health check from the proxy itself.
pub async fn connect_backend(
    backend: &Backend,
    port: u16,
    client: Option<ClientAddrs>,
) -> Result<TcpStream, BackendError> {
    let mut tcp = connect(&backend.host, port).await?;
    if backend.forward == Forward::Proxy {
        tcp.write_all(&proxy_v2_header(client)?).await?;
    }
    Ok(tcp)
}

/// A PROXY protocol version 2 header for `client` (LOCAL when `None`).
fn proxy_v2_header(client: Option<ClientAddrs>) -> Result<Vec<u8>, BackendError> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let built = match client {
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build(),
        Some(c) => {
            // Both addresses of one family: a v4 client on a v6 listener
            // arrives mapped, and goes on as plain v4 when both are.
            let (peer, local) = (unmap(c.peer), unmap(c.local));
            let pair = if peer.is_ipv4() == local.is_ipv4() {
                (peer, local)
            } else {
                (as_v6(peer), as_v6(local))
            };
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, pair).build()
        }
    };
    built.map_err(BackendError::Io)
}

/// `addr` with an IPv4-mapped IPv6 address turned into plain IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// `addr` as IPv6 (IPv4 mapped), for a header whose other address is v6.
fn as_v6(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    }
}

/// A stream read line by line, keeping what follows the last line.
pub struct LineReader {
    pub stream: Stream,
    pub buf: Vec<u8>,
}

impl LineReader {
    pub fn new(stream: Stream) -> LineReader {
        LineReader {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads one line, CRLF included.
    pub async fn line(&mut self) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            if self.buf.len() > MAX_BACKEND_LINE {
                return Err(BackendError::Protocol("line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(BackendError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Gives the stream back with the bytes read past the last line.
    pub fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// The addresses that identify a client to a backend.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddrs {
    /// The client's address (from a trusted PROXY header if there was one).
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
}
