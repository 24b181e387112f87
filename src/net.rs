//! Byte streams that may or may not be wrapped in TLS, and TLS set-up.
//!
//! A session's stream changes type at STARTTLS; [`Stream`] lets the rest of
//! the code hold one type while the variant tells which layer is in use.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Longest a refused client is read from after usher's farewell line.
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes a refused client may still send before usher stops reading.
const LINGER_BYTES: usize = 256 * 1024;

/// A TCP connection, cleartext or inside TLS (either side of it).
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Ends a session that usher refused: shuts the sending side (after the
    /// farewell line was written), then reads and drops what the client is
    /// still sending, for at most [`LINGER`] and [`LINGER_BYTES`]. Closing
    /// with unread input would make the kernel answer with a reset, and a
    /// reset can destroy the farewell line before the client reads it.
    pub async fn linger_close(&mut self) {
        let _ = self.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        let drain = async {
            while left > 0 {
                match self.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::ServerTls($s) => $e,
            Stream::ClientTls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Accepts a client's TLS handshake on `tcp` by `deadline` (the pre-login
/// deadline: the handshake counts against it). A failed or late handshake
/// is logged, with its reason, and gives `None`.
pub async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(Stream::ServerTls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            None
        }
    }
}

/// Errors while loading certificates and keys, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
    #[error("{path}: no certificate found")]
    NoCert { path: String },
    #[error("{path}: no private key found")]
    NoKey { path: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|error| TlsSetupError::Io {
        path: path.display().to_string(),
        error,
    })
}

fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsSetupError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|error| TlsSetupError::Io {
            path: path.display().to_string(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCert {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// TLS acceptor for client-facing listeners.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let certs = load_certs(cert)?;
    let pem = read_pem(key)?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|error| TlsSetupError::Io {
            path: key.display().to_string(),
            error,
        })?
        .ok_or_else(|| TlsSetupError::NoKey {
            path: key.display().to_string(),
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Arc::new(config))
}

/// TLS connector that verifies backends against the CA bundle at `ca`.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
