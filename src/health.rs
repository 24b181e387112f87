//! Health probes: every backend that is not disabled is probed on an
//! interval — connect, TLS when the backend uses implicit TLS, and a
//! greeting (`* OK` for IMAP, `220` for submission). Each outcome goes to
//! the [`HealthMap`](crate::route::HealthMap), which also hears of failed
//! connections during real logins and logs each state change once.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::{timeout, MissedTickBehavior};

use crate::backend::{connect, BackendError, LineReader};
use crate::config::TlsMode;
use crate::net::Stream;
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

/// One probe: the IMAP greeting if the backend serves IMAP, else the
/// submission greeting.
async fn probe(shared: &Shared, b: &Backend) -> Result<(), BackendError> {
    let (port, ready): (u16, &[u8]) = match (b.imap_port, b.submission_port) {
        (Some(p), _) => (p, b"* OK"),
        (None, Some(p)) => (p, b"220"),
        (None, None) => return Ok(()),
    };
    let tcp = connect(&b.host, port).await?;
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
