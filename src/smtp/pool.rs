//! Which submission backend takes a session, and which extensions usher's
//! EHLO may list.
//!
//! Submission is stateless (DESIGN "Routing"): a user pinned to a backend
//! that serves submission goes there, through [`route::backend_for`] with
//! its fallback rules; anyone else goes to the active, healthy backend of
//! their pool with the fewest live submission sessions here, ties taking
//! turns.
//!
//! What the pool's backends support is learned by probing: each backend
//! with a submission port is greeted and sent EHLO when usher first needs
//! it and every [`REFRESH`] after that.
//!
//! Invariants:
//! - an extension is advertised only if every healthy submission backend
//!   lists it, and only from [`PASSED_ON`]: extensions that change what a
//!   client may send (CHUNKING, SMTPUTF8, 8BITMIME, BINARYMIME, DSN,
//!   PIPELINING, SIZE) must hold on whichever backend the session lands
//!   (RFC 6409 §4, RFC 3030 §2, RFC 6531 §3.1, case C34);
//! - SIZE is the smallest declared limit (RFC 1870 §4);
//! - with no healthy backend known, nothing optional is advertised;
//! - unassigned users are never written to the store by submission: a
//!   placement is an IMAP decision (see [`route`]).
//!
//! A backend's extensions can change between a client's EHLO and its AUTH
//! (a backend fails and the session lands on another). That costs an
//! error reply from the backend, never a lost message, since the backend
//! answers every command after AUTH itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::backend;
use super::parse::{find, Extension};
use crate::backend::BackendError;
use crate::config::{Protocol, TlsMode};
use crate::route::{self, RouteError, Service};
use crate::server::Shared;
use crate::store::{Backend, BackendState, StoreError, User};

/// How often every submission backend is probed again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Probe failures in a row after which a backend takes no new sessions
/// and no longer counts for the advertised extensions.
const DOWN_AFTER: u32 = 2;

/// Extensions usher passes on when every healthy backend lists them
/// (SIZE is handled apart, for its value). BINARYMIME needs CHUNKING too.
pub const PASSED_ON: &[&str] = &[
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "CHUNKING",
    "BINARYMIME",
    "DSN",
    "ENHANCEDSTATUSCODES",
];

/// What one backend said when last probed.
#[derive(Debug, Clone)]
struct Probe {
    /// Where it was probed; a changed backend is probed afresh.
    key: Key,
    failures: u32,
    extensions: Option<Vec<Extension>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    host: String,
    port: Option<u16>,
    tls: TlsMode,
    ca: Option<String>,
}

impl Key {
    fn of(b: &Backend) -> Key {
        Key {
            host: b.host.clone(),
            port: b.submission_port,
            tls: b.tls,
            ca: b.ca_file.clone(),
        }
    }
}

/// Live submission sessions per backend, and what each backend offers.
#[derive(Default)]
pub struct Pool {
    live: Arc<DashMap<String, usize>>,
    probes: DashMap<String, Probe>,
    /// One probe round at a time; EHLOs wait for a round in progress
    /// rather than starting their own.
    probing: tokio::sync::Mutex<()>,
    turn: AtomicUsize,
}

/// Counts one session (or login in progress) on a backend while held.
pub struct Lease {
    live: Arc<DashMap<String, usize>>,
    backend: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut n) = self.live.get_mut(&self.backend) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The backends a login may try, best first.
#[derive(Debug)]
pub struct Candidates {
    pub backends: Vec<Backend>,
    /// The user's own backend: no other may be tried.
    pub pinned: bool,
}

impl Pool {
    /// Live sessions on `backend`.
    pub fn live(&self, backend: &str) -> usize {
        self.live.get(backend).map_or(0, |n| *n)
    }

    /// Counts a session on `backend` until the lease drops.
    pub fn lease(&self, backend: &str) -> Lease {
        *self.live.entry(backend.to_string()).or_insert(0) += 1;
        Lease {
            live: self.live.clone(),
            backend: backend.to_string(),
        }
    }

    /// The extension lines usher's EHLO lists now (without STARTTLS and
    /// AUTH, which the session adds).
    pub async fn offer(&self, shared: &Arc<Shared>) -> Vec<String> {
        let backends = match serving(shared).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable");
                return Vec::new();
            }
        };
        self.probe_unknown(shared, &backends).await;
        let sets: Vec<Vec<Extension>> = backends
            .iter()
            .filter_map(|b| self.known_extensions(shared, b))
            .collect();
        intersect(&sets)
    }

    /// The backends `user`'s login may try, best first.
    pub async fn candidates(&self, shared: &Shared, user: &User) -> Result<Candidates, RouteError> {
        if let Some(name) = &user.backend {
            let own = shared.store.backend(name).await?;
            if own.submission_port.is_some() {
                let chosen = route::backend_for(shared, user, Service::Submission).await?;
                return Ok(Candidates {
                    backends: vec![chosen],
                    pinned: true,
                });
            }
        }
        let mut backends: Vec<Backend> = shared
            .store
            .list_backends()
            .await?
            .into_iter()
            .filter(|b| {
                b.pool == user.pool
                    && b.state == BackendState::Active
                    && b.submission_port.is_some()
                    && b.weight > 0
                    && self.healthy(shared, b)
            })
            .collect();
        if backends.is_empty() {
            return Err(RouteError::EmptyPool(user.pool.clone()));
        }
        // Fewest live sessions first; among equals, take turns.
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % backends.len();
        backends.rotate_left(turn);
        backends.sort_by_key(|b| self.live(&b.name));
        Ok(Candidates {
            backends,
            pinned: false,
        })
    }

    /// Up by the shared health map and not failing its probes.
    fn healthy(&self, shared: &Shared, b: &Backend) -> bool {
        let probe_ok = self
            .probes
            .get(&b.name)
            .is_none_or(|p| p.key != Key::of(b) || p.failures < DOWN_AFTER);
        probe_ok && shared.health.is_up(&b.name)
    }

    /// The extensions of a healthy, successfully probed backend.
    fn known_extensions(&self, shared: &Shared, b: &Backend) -> Option<Vec<Extension>> {
        let probe = self.probes.get(&b.name)?;
        if probe.key != Key::of(b) || probe.failures >= DOWN_AFTER {
            return None;
        }
        let exts = probe.extensions.clone()?;
        drop(probe);
        shared.health.is_up(&b.name).then_some(exts)
    }

    fn is_unknown(&self, b: &Backend) -> bool {
        self.probes.get(&b.name).is_none_or(|p| p.key != Key::of(b))
    }

    /// Probes the backends never probed (or changed since).
    async fn probe_unknown(&self, shared: &Arc<Shared>, backends: &[Backend]) {
        if !backends.iter().any(|b| self.is_unknown(b)) {
            return;
        }
        let _round = self.probing.lock().await;
        let todo: Vec<Backend> = backends
            .iter()
            .filter(|b| self.is_unknown(b))
            .cloned()
            .collect();
        self.probe_all(shared, todo).await;
    }

    /// Probes `backends` concurrently and records the outcomes.
    async fn probe_all(&self, shared: &Arc<Shared>, backends: Vec<Backend>) {
        let mut round = JoinSet::new();
        for b in backends {
            let shared = shared.clone();
            round.spawn(async move {
                let limit = shared.config.limits.backend_timeout;
                let probe = backend::probe(&b, &shared.backend_tls, &shared.config.hostname);
                let result = tokio::time::timeout(limit, probe)
                    .await
                    .unwrap_or(Err(BackendError::Timeout));
                (b, result)
            });
        }
        while let Some(done) = round.join_next().await {
            if let Ok((b, result)) = done {
                self.record(&b, result);
            }
        }
    }

    fn record(&self, b: &Backend, result: Result<Vec<Extension>, BackendError>) {
        let key = Key::of(b);
        let mut probe = self.probes.entry(b.name.clone()).or_insert(Probe {
            key: key.clone(),
            failures: 0,
            extensions: None,
        });
        if probe.key != key {
            *probe = Probe {
                key,
                failures: 0,
                extensions: None,
            };
        }
        match result {
            Ok(exts) => {
                if probe.failures >= DOWN_AFTER {
                    info!(backend = %b.name, "submission backend answers again");
                }
                debug!(backend = %b.name, extensions = exts.len(), "probed");
                probe.failures = 0;
                probe.extensions = Some(exts);
            }
            Err(e) => {
                probe.failures += 1;
                if probe.failures == DOWN_AFTER {
                    warn!(backend = %b.name, error = %e, "submission backend is down");
                } else {
                    debug!(backend = %b.name, error = %e, "probe failed");
                }
            }
        }
    }
}

/// Backends that may take submission sessions: a port, not disabled.
async fn serving(shared: &Shared) -> Result<Vec<Backend>, StoreError> {
    Ok(shared
        .store
        .list_backends()
        .await?
        .into_iter()
        .filter(|b| b.submission_port.is_some() && b.state != BackendState::Disabled)
        .collect())
}

/// Starts probing every [`REFRESH`], if any listener serves submission.
pub fn start(shared: &Arc<Shared>) {
    let submission = shared
        .config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Submission);
    if !submission {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            match serving(&shared).await {
                Ok(backends) => {
                    let pool = &shared.submission;
                    let _round = pool.probing.lock().await;
                    pool.probe_all(&shared, backends).await;
                }
                Err(e) => tracing::error!(error = %e, "store unavailable"),
            }
            tokio::time::sleep(REFRESH).await;
        }
    });
}

/// The extension lines every set offers, from [`PASSED_ON`] and SIZE.
pub fn intersect(sets: &[Vec<Extension>]) -> Vec<String> {
    if sets.is_empty() {
        return Vec::new();
    }
    let everywhere = |k: &str| sets.iter().all(|s| find(s, k).is_some());
    let mut lines = Vec::new();
    if everywhere("SIZE") {
        // No value (or 0) declares no fixed limit (RFC 1870 §4).
        let limit = sets
            .iter()
            .filter_map(|s| find(s, "SIZE")?.params.first()?.parse::<u64>().ok())
            .filter(|n| *n > 0)
            .min();
        lines.push(match limit {
            Some(n) => format!("SIZE {n}"),
            None => "SIZE".to_string(),
        });
    }
    for keyword in PASSED_ON {
        if everywhere(keyword) && (*keyword != "BINARYMIME" || everywhere("CHUNKING")) {
            lines.push(keyword.to_string());
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exts(list: &[&str]) -> Vec<Extension> {
        list.iter()
            .map(|l| {
                let mut w = l.split(' ');
                Extension {
                    keyword: w.next().unwrap().to_string(),
                    params: w.map(str::to_string).collect(),
                }
            })
            .collect()
    }

    #[test]
    fn only_what_every_backend_offers() {
        let dovecot = exts(&[
            "8BITMIME",
            "AUTH PLAIN LOGIN",
            "BURL imap",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "SIZE",
            "STARTTLS",
            "PIPELINING",
            "XCLIENT ADDR PORT",
        ]);
        let other = exts(&[
            "PIPELINING",
            "SIZE 10240000",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]);
        assert_eq!(
            intersect(std::slice::from_ref(&dovecot)),
            [
                "SIZE",
                "PIPELINING",
                "8BITMIME",
                "CHUNKING",
                "ENHANCEDSTATUSCODES"
            ]
        );
        assert_eq!(
            intersect(&[dovecot, other.clone()]),
            [
                "SIZE 10240000",
                "PIPELINING",
                "8BITMIME",
                "ENHANCEDSTATUSCODES"
            ]
        );
        let smaller = exts(&["SIZE 5000", "SMTPUTF8", "8BITMIME"]);
        assert_eq!(
            intersect(&[other, smaller]),
            ["SIZE 5000", "8BITMIME", "SMTPUTF8"]
        );
    }

    #[test]
    fn nothing_optional_without_a_known_backend() {
        assert!(intersect(&[]).is_empty());
        assert!(intersect(&[exts(&["BINARYMIME"])]).is_empty());
    }

    #[test]
    fn leases_count_live_sessions() {
        let pool = Pool::default();
        let a = pool.lease("sub1");
        let b = pool.lease("sub1");
        assert_eq!(pool.live("sub1"), 2);
        drop(a);
        assert_eq!(pool.live("sub1"), 1);
        drop(b);
        assert_eq!((pool.live("sub1"), pool.live("sub2")), (0, 0));
    }
}
