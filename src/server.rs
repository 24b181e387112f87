//! `usher serve`: binds the listeners, accepts connections and hands each
//! to its protocol's session, inside one tracing span per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::auth::Authenticator;
use crate::backend::{BackendTls, ClientAddrs};
use crate::config::{Config, ListenerConfig, Protocol, TlsMode};
use crate::net::{accept_tls, client_config, server_config, Stream};
use crate::relay::{Counters, End};
use crate::route::HealthMap;
use crate::secret::Secret;
use crate::sessions::Registry;
use crate::store::Store;

/// State every session shares.
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub auth: Authenticator,
    pub acceptor: Option<TlsAcceptor>,
    pub backend_tls: BackendTls,
    pub master: Option<(String, Secret<String>)>,
    pub sessions: Registry,
    pub health: HealthMap,
    /// Live submission sessions and what the submission backends offer.
    pub submission: crate::smtp::pool::Pool,
    next_id: AtomicU64,
}

/// One accepted client connection.
pub struct Conn {
    pub id: u64,
    pub stream: Stream,
    pub addrs: ClientAddrs,
    pub listener: Arc<ListenerConfig>,
}

/// How the connection's own task ends: the session is over, or it goes on
/// in the relay, handed over as a future of its own.
pub enum Served {
    Done(Summary),
    /// The post-login part of the session. It runs in a task of its own,
    /// so that the pre-login state machine — kilobytes sized for its
    /// largest state — is freed, and an idle relayed session costs only
    /// what the relay holds.
    Relay(Pin<Box<dyn Future<Output = Summary> + Send>>),
}

/// What a finished session reports.
#[derive(Debug, Default)]
pub struct Summary {
    pub up: u64,
    pub down: u64,
    pub end: Option<End>,
}

impl Summary {
    pub fn from_counters(c: &Counters, end: End) -> Summary {
        Summary {
            up: c.up.load(Ordering::Relaxed),
            down: c.down.load(Ordering::Relaxed),
            end: Some(end),
        }
    }
}

/// The secrets and certificates a configuration names, loaded.
pub struct Keys {
    pub acceptor: Option<TlsAcceptor>,
    pub master: Option<(String, Secret<String>)>,
}

impl Keys {
    /// Loads every file the configuration names (certificate, key, master
    /// password, backend CA); an error names the key and the file. `usher
    /// check-config` runs this too, so it passes only what `serve` starts.
    pub fn load(config: &Config) -> anyhow::Result<Keys> {
        let acceptor = match &config.tls {
            Some(tls) => Some(TlsAcceptor::from(
                server_config(&tls.cert, &tls.key).context("tls.cert / tls.key")?,
            )),
            None => None,
        };
        let password = config.master_password().with_context(|| {
            match &config.backends.master_password_file {
                Some(file) => format!("backends.master_password_file: {}", file.display()),
                None => "backends.master_password".to_string(),
            }
        })?;
        let master = match (&config.backends.master_user, password) {
            (Some(user), Some(pw)) => Some((user.clone(), pw)),
            _ => None,
        };
        if let Some(ca) = &config.backends.ca {
            client_config(ca).context("backends.ca")?;
        }
        check_store_dir(config.store.url.expose())?;
        Ok(Keys { acceptor, master })
    }
}

/// The directory an SQLite store file goes in must exist: usher creates
/// the file, not the directories above it.
fn check_store_dir(url: &str) -> anyhow::Result<()> {
    let path = url
        .trim_start_matches("sqlite:")
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    match Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            anyhow::bail!("store.url: directory {} does not exist", dir.display())
        }
        _ => Ok(()),
    }
}

impl Shared {
    /// Opens the store and loads keys; everything `serve` needs before
    /// binding.
    pub async fn new(config: Config) -> anyhow::Result<Shared> {
        let Keys { acceptor, master } = Keys::load(&config)?;
        let store = Store::open(config.store.url.expose())
            .await
            .context("opening the store")?;
        let auth = Authenticator::new(
            store.clone(),
            config.auth.clone(),
            config.limits.identity_bytes,
        );
        Ok(Shared {
            backend_tls: BackendTls::new(config.backends.ca.clone()),
            health: HealthMap::new(config.health.down_after),
            config,
            store,
            auth,
            acceptor,
            master,
            sessions: Registry::default(),
            submission: Default::default(),
            next_id: AtomicU64::new(1),
        })
    }
}

/// How long a stopping server waits for its sessions' farewells.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the server until the process is stopped.
pub async fn run(config: Config, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(config).await?);
    crate::smtp::pool::start(&shared);
    crate::health::start(&shared);
    crate::follow::start(&shared)
        .await
        .context("reading the store's change feed")?;
    let limit = Arc::new(Semaphore::new(shared.config.limits.max_connections));
    let mut bound = serde_json::Map::new();
    let mut tasks = tokio::task::JoinSet::new();
    for l in &shared.config.listeners {
        let socket = TcpListener::bind(l.address)
            .await
            .with_context(|| format!("listener {}: binding {}", l.name, l.address))?;
        let addr = socket.local_addr()?;
        info!(listener = %l.name, %addr, protocol = ?l.protocol, "listening");
        bound.insert(l.name.clone(), addr.to_string().into());
        tasks.spawn(accept_loop(
            shared.clone(),
            socket,
            Arc::new(l.clone()),
            limit.clone(),
        ));
    }
    if let Some(admin) = &shared.config.admin {
        let socket = TcpListener::bind(admin.address)
            .await
            .with_context(|| format!("admin endpoint: binding {}", admin.address))?;
        let addr = socket.local_addr()?;
        info!(%addr, "admin endpoint listening");
        bound.insert("admin".into(), addr.to_string().into());
        let shared = shared.clone();
        tasks.spawn(async move {
            if let Err(e) = crate::admin::serve(shared, socket).await {
                tracing::error!(error = %e, "admin endpoint failed");
            }
        });
    }
    if let Some(path) = ready_file {
        std::fs::write(path, serde_json::Value::Object(bound).to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tokio::select! {
        _ = tasks.join_next() => anyhow::bail!("a listener stopped"),
        _ = shutdown_signal() => {}
    }
    // Stop accepting, then say goodbye to every session (`* BYE`, `421`),
    // logged in or not, and give the farewells a moment to go out before
    // the process ends.
    tasks.abort_all();
    let n = shared.sessions.stop_all();
    info!(sessions = n, "stopping");
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    // Every connection, logged in or not, holds a permit until it ends.
    let all_closed = || limit.available_permits() == shared.config.limits.max_connections;
    while !(shared.sessions.is_empty() && all_closed()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    socket: TcpListener,
    listener: Arc<ListenerConfig>,
    limit: Arc<Semaphore>,
) {
    loop {
        let (tcp, peer) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                warn!(listener = %listener.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tokio::spawn(refuse(tcp, listener.protocol, peer));
            continue;
        };
        let span = info_span!(
            "conn",
            id,
            // Recorded in `connection`: a PROXY header may name another.
            client.addr = tracing::field::Empty,
            proxy.addr = tracing::field::Empty,
            listener = %listener.name,
            user = tracing::field::Empty,
            backend = tracing::field::Empty,
        );
        let shared = shared.clone();
        let listener = listener.clone();
        tokio::spawn(
            async move {
                let started = Instant::now();
                match connection(shared, tcp, peer, listener, id).await {
                    Served::Done(summary) => closed(started, summary),
                    Served::Relay(relay) => {
                        let session = async move {
                            let _permit = permit;
                            closed(started, relay.await);
                        };
                        tokio::spawn(session.instrument(tracing::Span::current()));
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Turns a connection away when the connection cap is reached.
async fn refuse(mut tcp: TcpStream, protocol: Protocol, peer: SocketAddr) {
    warn!(client.addr = %peer, "connection limit reached");
    let line: &[u8] = match protocol {
        Protocol::Imap => b"* BYE Too many connections, try again later\r\n",
        Protocol::Submission => b"421 4.3.2 Too many connections, try again later\r\n",
    };
    let _ = tcp.write_all(line).await;
    let _ = tcp.shutdown().await;
}

/// The closing event of every connection.
fn closed(started: Instant, summary: Summary) {
    info!(
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = summary.up,
        bytes_down = summary.down,
        end = summary.end.map_or("before login", End::as_str),
        "connection closed"
    );
}

async fn connection(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerConfig>,
    id: u64,
) -> Served {
    debug!("accepted");
    let _ = tcp.set_nodelay(true);
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return Served::Done(Summary::default()),
    };
    let socket = ClientAddrs { peer, local };
    let limit = shared.config.limits.prelogin_timeout;
    let addrs = match crate::proxy_header::receive(&mut tcp, socket, &listener, limit).await {
        Ok(addrs) => addrs,
        Err(e) => {
            crate::proxy_header::refuse(tcp, listener.protocol, e).await;
            return Served::Done(Summary::default());
        }
    };
    crate::proxy_header::record(&tracing::Span::current(), socket, addrs);
    let stream = match listener.tls {
        TlsMode::Implicit => {
            let Some(acceptor) = shared.acceptor.clone() else {
                return Served::Done(Summary::default());
            };
            let deadline = tokio::time::Instant::now() + shared.config.limits.prelogin_timeout;
            match accept_tls(&acceptor, tcp, deadline).await {
                Some(tls) => tls,
                None => return Served::Done(Summary::default()),
            }
        }
        _ => Stream::Plain(tcp),
    };
    let conn = Conn {
        id,
        stream,
        addrs,
        listener: listener.clone(),
    };
    match listener.protocol {
        Protocol::Imap => crate::imap::session::serve(shared, conn).await,
        Protocol::Submission => crate::smtp::session::serve(shared, conn).await,
    }
}
