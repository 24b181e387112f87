//! The registry of live sessions: who is connected where, and kicks.
//!
//! A session registers when its relay starts and is removed when the
//! [`Entry`] guard drops, whatever way the session ends.

use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::watch;

use crate::relay::Counters;

struct Live {
    user: String,
    backend: String,
    client: SocketAddr,
    listener: String,
    started: SystemTime,
    counters: Arc<Counters>,
    kick: watch::Sender<bool>,
}

/// A snapshot of one session for listings.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SessionView {
    pub id: u64,
    pub user: String,
    pub backend: String,
    pub client: String,
    pub listener: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Which sessions a kick ends.
#[derive(Debug, Clone)]
pub enum Selector {
    User(String),
    Backend(String),
    Client(IpAddr),
}

/// All live sessions of this process.
pub struct Registry {
    live: DashMap<u64, Live>,
    /// Turns `true` when the server stops; pre-login connections, which
    /// are not registered, watch it too.
    stop: watch::Sender<bool>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            live: DashMap::new(),
            stop: watch::Sender::new(false),
        }
    }
}

/// Removes its session from the registry when dropped.
pub struct Entry<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.registry.live.remove(&self.id);
    }
}

impl Registry {
    /// Registers a session; the receiver turns `true` on a kick.
    pub fn register(
        &self,
        id: u64,
        user: &str,
        backend: &str,
        client: SocketAddr,
        listener: &str,
        counters: Arc<Counters>,
    ) -> (Entry<'_>, watch::Receiver<bool>) {
        let (kick, rx) = watch::channel(false);
        let live = Live {
            user: user.to_string(),
            backend: backend.to_string(),
            client,
            listener: listener.to_string(),
            started: SystemTime::now(),
            counters,
            kick,
        };
        self.live.insert(id, live);
        (Entry { registry: self, id }, rx)
    }

    /// Ends every session that matches; returns how many.
    pub fn kick(&self, which: &Selector) -> usize {
        let mut n = 0;
        for s in self.live.iter() {
            let hit = match which {
                Selector::User(u) => s.user == *u,
                Selector::Backend(b) => s.backend == *b,
                Selector::Client(ip) => s.client.ip() == *ip,
            };
            if hit {
                s.kick.send_replace(true);
                n += 1;
            }
        }
        n
    }

    /// Ids of the sessions that match, for kicks spread over time.
    pub fn matching(&self, which: &Selector) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .live
            .iter()
            .filter(|s| match which {
                Selector::User(u) => s.user == *u,
                Selector::Backend(b) => s.backend == *b,
                Selector::Client(ip) => s.client.ip() == *ip,
            })
            .map(|s| *s.key())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Ends one session by id.
    pub fn kick_id(&self, id: u64) -> bool {
        match self.live.get(&id) {
            Some(s) => {
                s.kick.send_replace(true);
                true
            }
            None => false,
        }
    }

    /// Ends every session because the server stops; their farewell says so.
    pub fn stop_all(&self) -> usize {
        self.stop.send_replace(true);
        for s in self.live.iter() {
            s.kick.send_replace(true);
        }
        self.live.len()
    }

    /// Whether [`Registry::stop_all`] was called.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// A receiver that turns `true` when the server stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn list(&self) -> Vec<SessionView> {
        let mut all: Vec<SessionView> = self
            .live
            .iter()
            .map(|s| SessionView {
                id: *s.key(),
                user: s.user.clone(),
                backend: s.backend.clone(),
                client: s.client.to_string(),
                listener: s.listener.clone(),
                started: s
                    .started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                bytes_up: s.counters.up.load(std::sync::atomic::Ordering::Relaxed),
                bytes_down: s.counters.down.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }
}

/// Resolves once `signal` (a kick or the server's stop) turns `true`;
/// never if its sender is gone, since then nobody can send it.
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    if signal.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}
