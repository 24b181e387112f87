//! A transcript-style protocol client for tests: send bytes, expect lines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;
use usher::net::Stream;

use super::dovecot::example_ca_cert;

/// How long any one expected line may take.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    /// Everything received, for failure messages.
    seen: String,
}

fn connector() -> TlsConnector {
    let config = usher::net::client_config(&example_ca_cert()).unwrap();
    TlsConnector::from(config)
}

async fn tls(tcp: TcpStream) -> Stream {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake with usher");
    Stream::ClientTls(Box::new(tls))
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Client::new(Stream::Plain(tcp))
    }

    pub async fn connect_tls(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Client::new(tls(tcp).await)
    }

    /// A client on a connection the test opened itself (e.g. from a
    /// chosen source address).
    pub fn from_tcp(tcp: TcpStream) -> Client {
        Client::new(Stream::Plain(tcp))
    }

    fn new(stream: Stream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
            seen: String::new(),
        }
    }

    /// Starts TLS on a cleartext connection (after the server's OK/220).
    /// Bytes buffered but unread are dropped, as a careful client would.
    pub async fn upgrade(self) -> Client {
        let Stream::Plain(tcp) = self.stream else {
            panic!("already TLS")
        };
        Client::new(tls(tcp).await)
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.expect("send");
        self.stream.flush().await.unwrap();
    }

    /// Reads one line (CRLF stripped); panics on timeout or close.
    pub async fn line(&mut self) -> String {
        self.try_line(LINE_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no line; received so far:\n{}", self.seen))
    }

    /// Reads one line, or `None` on close or after `wait`.
    pub async fn try_line(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                self.seen.push_str(&line);
                self.seen.push('\n');
                return Some(line);
            }
            let mut chunk = vec![0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads exactly `n` bytes (after any buffered ones).
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = vec![0u8; 16384];
            let got = tokio::time::timeout(LINE_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("timeout reading bytes")
                .expect("read");
            assert!(got > 0, "closed while reading bytes");
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// Reads a line and checks that it starts with `prefix`.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().await;
        assert!(
            line.starts_with(prefix),
            "expected a line starting with {prefix:?}, got {line:?}; received:\n{}",
            self.seen
        );
        line
    }

    /// Reads lines up to and including the one tagged `tag`.
    pub async fn tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// True if the server closes the connection within `wait` (any
    /// remaining lines are read and recorded first).
    pub async fn closes_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.seen.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) => return false,
            }
        }
    }

    /// Everything received so far.
    pub fn transcript(&self) -> &str {
        &self.seen
    }
}

/// The shared TLS config, for tests that build their own connectors.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    usher::net::client_config(&example_ca_cert()).unwrap()
}
