//! Health probes: every backend that is not disabled is probed on an
//! interval — connect, TLS when the backend uses implicit TLS, and a
//! greeting (`* OK` for IMAP, `220` for submission). With
//! `health.test_user` set, an IMAP probe is a whole login instead, as a
//! client's would be (STARTTLS, master user or passthrough), then LOGOUT.
//! Each outcome goes to the [`HealthMap`](crate::route::HealthMap), which
//! also hears of failed connections during real logins and logs each state
//! change once.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::{timeout, MissedTickBehavior};

use crate::backend::{connect_backend, BackendError, ClientAddrs, LineReader};
use crate::config::TlsMode;
use crate::imap::backend::{self as imap_backend, Credentials};
use crate::net::Stream;
use crate::secret::Secret;
use crate::server::Shared;
use crate::store::{Backend, BackendState};

/// Starts the probe loop.
pub fn start(shared: &Arc<Shared>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(shared.config.health.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            round(&shared).await;
        }
    });
}

/// Probes every backend once, concurrently, and records the outcomes.
async fn round(shared: &Arc<Shared>) {
    let backends = match shared.store.list_backends().await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "store unavailable; backends not probed");
            return;
        }
    };
    // A backend removed from the store is forgotten: no stale "down".
    shared
        .health
        .retain(|name| backends.iter().any(|b| b.name == name));
    let limit = shared.config.health.timeout;
    let mut probes = JoinSet::new();
    for b in backends {
        if b.state == BackendState::Disabled {
            continue;
        }
        let shared = shared.clone();
        probes.spawn(async move {
            let result = timeout(limit, probe(&shared, &b))
                .await
                .unwrap_or(Err(BackendError::Timeout));
            (b.name, result)
        });
    }
    while let Some(done) = probes.join_next().await {
        let Ok((name, result)) = done else { continue };
        if let Err(e) = &result {
            tracing::debug!(backend = %name, error = %e, "probe failed");
        }
        shared.health.report(&name, result.is_ok());
    }
}

/// One probe: a test login or the IMAP greeting if the backend serves
/// IMAP, else the submission greeting.
async fn probe(shared: &Shared, b: &Backend) -> Result<(), BackendError> {
    if let (Some(user), Some(_)) = (&shared.config.health.test_user, b.imap_port) {
        return test_login(shared, b, user).await;
    }
    let (port, ready): (u16, &[u8]) = match (b.imap_port, b.submission_port) {
        (Some(p), _) => (p, b"* OK"),
        (None, Some(p)) => (p, b"220"),
        (None, None) => return Ok(()),
    };
    let tcp = connect_backend(b, port, None).await?;
    let stream = match b.tls {
        TlsMode::Implicit => {
            shared
                .backend_tls
                .wrap(tcp, &b.host, b.ca_file.as_deref())
                .await?
        }
        TlsMode::None | TlsMode::Starttls => Stream::Plain(tcp),
    };
    let mut reader = LineReader::new(stream);
    // A greeting is one line; a slow Dovecot may send "* OK Waiting for
    // authentication process to respond.." first, which is just as good.
    let line = reader.line().await?;
    if line.starts_with(ready) {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        Err(BackendError::Refused(text))
    }
}

/// Logs in at `b` as the configured test user, then logs out.
async fn test_login(shared: &Shared, b: &Backend, user: &str) -> Result<(), BackendError> {
    let password = match &shared.config.health.test_password {
        Some(p) => Secret::new(p.expose().as_bytes().to_vec()),
        None => Secret::default(),
    };
    let creds = Credentials {
        user,
        password: &password,
        master: shared.master.as_ref().map(|(u, p)| (u.as_str(), p)),
    };
    // The probe is usher's own: it forwards usher's loopback as the
    // client address, and session id 0, which no client session has.
    let own = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let addrs = ClientAddrs {
        peer: own,
        local: own,
    };
    let mut logged_in = imap_backend::login(b, &shared.backend_tls, &creds, addrs, 0).await?;
    let _ = logged_in.stream.write_all(b"U9 LOGOUT\r\n").await;
    let _ = logged_in.stream.shutdown().await;
    Ok(())
}
