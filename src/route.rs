//! Which backend serves a user right now.
//!
//! - An assigned user goes to their backend while it is up; if it is down,
//!   to their fallback; otherwise the login fails temporarily. Never to a
//!   backend the store does not name.
//! - An unassigned user is placed by weighted rendezvous hashing over the
//!   active, healthy backends of their pool, and the placement is written
//!   back, so that adding a backend later moves nobody.
//! - While a move holds a user (`usher user move`), their logins wait for
//!   the hold to end and then read the new assignment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::server::Shared;
use crate::store::{Backend, BackendState, StoreError, User};

/// The protocol a backend is wanted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Imap,
    Submission,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("backend {0} is down and the user has no usable fallback")]
    Down(String),
    #[error("backend {0} is disabled")]
    Disabled(String),
    #[error("backend {0} does not serve this protocol")]
    NoService(String),
    #[error("no active backend in pool {0}")]
    EmptyPool(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The longest one login waits for a hold, whatever the store says: a
/// `usher user move` that died half-way must not lock a user out.
pub const MAX_HOLD: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    failures: u32,
    down: bool,
}

/// One backend's state, for the admin endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HealthView {
    pub backend: String,
    pub up: bool,
    pub failures: u32,
}

/// Up/down state of every backend, fed by probes and real logins.
pub struct HealthMap {
    backends: DashMap<String, Health>,
    down_after: u32,
}

impl Default for HealthMap {
    fn default() -> Self {
        HealthMap::new(2)
    }
}

impl HealthMap {
    /// A map that marks a backend down after `down_after` consecutive
    /// failures; one success brings it back.
    pub fn new(down_after: u32) -> HealthMap {
        HealthMap {
            backends: DashMap::new(),
            down_after: down_after.max(1),
        }
    }

    /// Records one success or failure; logs a state change once.
    pub fn report(&self, backend: &str, ok: bool) {
        let mut h = self.backends.entry(backend.to_string()).or_default();
        if ok {
            if h.down {
                tracing::info!(backend, "backend is up again");
            }
            *h = Health::default();
        } else {
            h.failures = h.failures.saturating_add(1);
            if !h.down && h.failures >= self.down_after {
                h.down = true;
                tracing::warn!(backend, failures = h.failures, "backend is down");
            }
        }
    }

    /// Keeps only the backends for which `keep` is true.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.backends.retain(|name, _| keep(name));
    }

    pub fn is_up(&self, backend: &str) -> bool {
        self.backends.get(backend).is_none_or(|h| !h.down)
    }

    /// Every backend heard of so far, by name.
    pub fn list(&self) -> Vec<HealthView> {
        let mut all: Vec<HealthView> = self
            .backends
            .iter()
            .map(|h| HealthView {
                backend: h.key().clone(),
                up: !h.down,
                failures: h.failures,
            })
            .collect();
        all.sort_by(|a, b| a.backend.cmp(&b.backend));
        all
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Waits while a move holds `user`, then returns their current record
/// (the move has changed it). `None` when the user is gone meanwhile.
pub async fn after_hold(shared: &Shared, user: User) -> Result<Option<User>, RouteError> {
    let Some(until) = user.hold_until else {
        return Ok(Some(user));
    };
    let wait = until.saturating_sub(now_ms());
    if wait <= 0 {
        return Ok(Some(user));
    }
    let started = tokio::time::Instant::now();
    let step = Duration::from_millis(50);
    let limit = Duration::from_millis(wait as u64).min(MAX_HOLD);
    tracing::debug!(
        user = user.login.as_str(),
        wait_ms = wait,
        "login held while the user moves"
    );
    // Poll: the mover releases the hold early once the change is done.
    loop {
        tokio::time::sleep(step).await;
        let Some(now) = shared.store.find_user(&user.login).await? else {
            return Ok(None);
        };
        let held = now.hold_until.is_some_and(|t| t > now_ms());
        if !held || started.elapsed() >= limit {
            return Ok(Some(now));
        }
    }
}

fn serves(b: &Backend, service: Service) -> bool {
    match service {
        Service::Imap => b.imap_port.is_some(),
        Service::Submission => b.submission_port.is_some(),
    }
}

/// The backend for `user`'s next session.
pub async fn backend_for(
    shared: &Shared,
    user: &User,
    service: Service,
) -> Result<Backend, RouteError> {
    let Some(name) = &user.backend else {
        return place(shared, user, service).await;
    };
    let primary = shared.store.backend(name).await?;
    if !serves(&primary, service) {
        return Err(RouteError::NoService(primary.name));
    }
    if primary.state == BackendState::Disabled {
        return Err(RouteError::Disabled(primary.name));
    }
    if shared.health.is_up(&primary.name) {
        return Ok(primary);
    }
    if let Some(fallback) = &user.fallback {
        let fb = shared.store.backend(fallback).await?;
        if serves(&fb, service)
            && fb.state != BackendState::Disabled
            && shared.health.is_up(&fb.name)
        {
            return Ok(fb);
        }
    }
    Err(RouteError::Down(primary.name))
}

/// Places an unassigned user and records the placement.
async fn place(shared: &Shared, user: &User, service: Service) -> Result<Backend, RouteError> {
    let candidates: Vec<Backend> = shared
        .store
        .list_backends()
        .await?
        .into_iter()
        .filter(|b| b.pool == user.pool && b.state == BackendState::Active && serves(b, service))
        .filter(|b| shared.health.is_up(&b.name))
        .collect();
    let chosen = rendezvous(&user.login, &candidates)
        .ok_or_else(|| RouteError::EmptyPool(user.pool.clone()))?;
    // Another node may have placed the user at the same moment: the store
    // keeps the first placement and both nodes use it.
    let placed = shared.store.place(&user.login, &chosen.name).await?;
    if placed == chosen.name {
        tracing::info!(user = user.login.as_str(), backend = %chosen.name, "placed user");
        return Ok(chosen.clone());
    }
    Ok(shared.store.backend(&placed).await?)
}

/// The user's fallback, when a login at `failed` could not connect and the
/// fallback is usable; never any other backend.
pub async fn fallback_after(
    shared: &Shared,
    user: &User,
    service: Service,
    failed: &str,
) -> Option<Backend> {
    let name = user.fallback.as_deref().filter(|f| *f != failed)?;
    let fb = shared.store.backend(name).await.ok()?;
    (serves(&fb, service) && fb.state != BackendState::Disabled && shared.health.is_up(&fb.name))
        .then_some(fb)
}

/// Weighted rendezvous (highest random weight) choice: each backend scores
/// `-weight / ln(u)` with `u` a uniform hash of (user, backend) in (0, 1);
/// the highest score wins. A new backend takes only the users it wins.
pub fn rendezvous<'a>(key: &str, backends: &'a [Backend]) -> Option<&'a Backend> {
    backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| (score(key, &b.name, b.weight), b))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, b)| b)
}

fn score(key: &str, backend: &str, weight: u32) -> f64 {
    let h = stable_hash(key.as_bytes(), backend.as_bytes());
    // 53 random bits into (0, 1), never 0 so ln stays finite.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

/// FNV-1a over both parts with a separator, then a splitmix64 finaliser:
/// stable across processes and Rust versions, unlike `DefaultHasher`.
fn stable_hash(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in a.iter().chain(&[0xff]).chain(b) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use crate::store::{Forward, LoginMode};

    fn backend(name: &str, weight: u32) -> Backend {
        Backend {
            id: 0,
            name: name.into(),
            host: "127.0.0.1".into(),
            imap_port: Some(143),
            submission_port: None,
            tls: TlsMode::None,
            ca_file: None,
            login: LoginMode::Master,
            forward: Forward::Id,
            pool: "default".into(),
            site: None,
            weight,
            state: BackendState::Active,
        }
    }

    #[test]
    fn rendezvous_follows_weights_and_adding_moves_only_to_the_new_one() {
        let three = vec![backend("a", 100), backend("b", 200), backend("c", 100)];
        let users: Vec<String> = (0..1000).map(|i| format!("user{i}@example.com")).collect();
        let before: Vec<String> = users
            .iter()
            .map(|u| rendezvous(u, &three).unwrap().name.clone())
            .collect();
        let share = |n: &str| before.iter().filter(|b| *b == n).count();
        // Expected 250 / 500 / 250.
        assert!((200..=300).contains(&share("a")), "a {}", share("a"));
        assert!((440..=560).contains(&share("b")), "b {}", share("b"));
        assert!((200..=300).contains(&share("c")), "c {}", share("c"));
        let mut four = three.clone();
        four.push(backend("d", 100));
        for (u, old) in users.iter().zip(&before) {
            let new = &rendezvous(u, &four).unwrap().name;
            assert!(new == old || new == "d", "{u} moved from {old} to {new}");
        }
    }

    #[test]
    fn zero_weight_and_empty_pools_place_nobody() {
        assert!(rendezvous("x", &[]).is_none());
        assert!(rendezvous("x", &[backend("a", 0)]).is_none());
    }

    #[test]
    fn health_needs_consecutive_failures() {
        let h = HealthMap::default();
        h.report("a", false);
        assert!(h.is_up("a"));
        h.report("a", false);
        assert!(!h.is_up("a"));
        h.report("a", true);
        assert!(h.is_up("a"));
    }
}
