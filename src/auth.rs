//! Password checks against the store.
//!
//! Invariants:
//! - an unknown user, a disabled user and a wrong password give the same
//!   answer after the same work: the unknown user's password is verified
//!   against a dummy hash of the same cost, and every failure waits the same
//!   configured delay before it is reported;
//! - credentials are checked for size and control characters before any
//!   store query (cases C07, C35);
//! - hashing runs on the blocking pool, never on the reactor threads;
//! - repeated failures from one client address (an IPv6 /64) or against one
//!   user make every further failure slower, up to a cap, whichever side
//!   the attacker varies; a success clears the user's count.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Semaphore;

use argon2::{Algorithm, Argon2, Params, Version};
use password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::config::AuthConfig;
use crate::secret::Secret;
use crate::store::{Store, StoreError, User};

/// What a login attempt comes to.
#[derive(Debug)]
pub enum Verdict {
    Accepted(Box<User>),
    /// Unknown user, disabled user or wrong password: deliberately one case.
    Rejected,
}

/// Checks credentials; shared by every session.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    config: Arc<AuthConfig>,
    dummy_hash: Arc<String>,
    identity_limit: usize,
    penalties: Arc<Penalties>,
    /// One permit per core for hashing: a verification holds its argon2
    /// memory (19 MiB by default) for its whole run, so a burst of logins
    /// waits its turn instead of holding that much each at once, and the
    /// cores are not oversubscribed.
    hashing: Arc<Semaphore>,
}

/// Hashing jobs that run at once: the machine's cores.
fn hashing_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// How long failures are remembered.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept before old ones are swept, bounding memory under attack.
const MAX_TRACKED: usize = 100_000;

/// Recent failures per client network and per login name.
#[derive(Default)]
struct Penalties {
    failures: DashMap<String, (u32, Instant)>,
}

impl Penalties {
    /// Counts one failure under each key; returns the highest count.
    fn fail(&self, keys: &[String]) -> u32 {
        if self.failures.len() > MAX_TRACKED {
            self.failures
                .retain(|_, (_, at)| at.elapsed() < FAILURE_WINDOW);
        }
        let now = Instant::now();
        keys.iter()
            .map(|k| {
                let mut e = self.failures.entry(k.clone()).or_insert((0, now));
                if e.1.elapsed() >= FAILURE_WINDOW {
                    *e = (0, now);
                }
                e.0 = e.0.saturating_add(1);
                e.1 = now;
                e.0
            })
            .max()
            .unwrap_or(0)
    }

    fn clear(&self, key: &str) {
        self.failures.remove(key);
    }
}

/// The key a client address is counted under: IPv6 hosts by their /64,
/// which one subscriber usually holds whole.
fn network_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The delay for the `n`th recent failure.
pub fn failure_delay(config: &AuthConfig, n: u32) -> Duration {
    let extra = n.saturating_sub(config.free_failures).min(16);
    config
        .failure_delay
        .saturating_mul(1 << extra)
        .min(config.failure_delay_max)
}

/// Builds the argon2id hasher from the configured costs.
pub fn hasher(config: &AuthConfig) -> Argon2<'static> {
    let params = Params::new(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.argon2_parallelism,
        None,
    )
    .expect("argon2 parameters are validated with the configuration");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes `password` as an argon2id PHC string.
pub fn hash_password(config: &AuthConfig, password: &[u8]) -> String {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    hasher(config)
        .hash_password(password, &salt)
        .expect("argon2id hashing with validated parameters cannot fail")
        .to_string()
}

/// True if `password` matches `hash`: usher's argon2id PHC strings, and the
/// schemes existing installations carry, with or without Dovecot's scheme
/// prefix — `{ARGON2ID}`, `{SHA512-CRYPT}` (`$6$`), `{SHA256-CRYPT}`
/// (`$5$`), `{BLF-CRYPT}` (bcrypt `$2y$`, `$2b$`, `$2a$`) and `{SSHA512}`.
/// An unknown or unparsable hash never matches.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let (scheme, rest) = match hash.strip_prefix('{').and_then(|h| h.split_once('}')) {
        Some((scheme, rest)) => (scheme.to_ascii_uppercase(), rest),
        None => (String::new(), hash),
    };
    let text = std::str::from_utf8(password).ok();
    match scheme.as_str() {
        "SSHA512" => return ssha512_matches(rest, password),
        "" | "ARGON2ID" | "ARGON2I" | "SHA512-CRYPT" | "SHA256-CRYPT" | "BLF-CRYPT" | "CRYPT" => {}
        _ => return false,
    }
    if rest.starts_with("$argon2") {
        return match PasswordHash::new(rest) {
            // The parameters come from the hash itself, not from our config.
            Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
            Err(_) => false,
        };
    }
    if rest.starts_with("$6$") {
        return text.is_some_and(|t| sha_crypt::sha512_check(t, rest).is_ok());
    }
    if rest.starts_with("$5$") {
        return text.is_some_and(|t| sha_crypt::sha256_check(t, rest).is_ok());
    }
    if ["$2y$", "$2b$", "$2a$"].iter().any(|p| rest.starts_with(p)) {
        return bcrypt::verify(password, rest).unwrap_or(false);
    }
    false
}

/// Whether `hash` is in a scheme [`verify_password`] understands (for
/// imports of existing hashes).
pub fn is_supported(hash: &str) -> bool {
    let rest = match hash.strip_prefix('{').and_then(|h| h.split_once('}')) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("SSHA512") => return !rest.is_empty(),
        Some((_, rest)) => rest,
        None => hash,
    };
    (rest.starts_with("$argon2") && PasswordHash::new(rest).is_ok())
        || ["$6$", "$5$", "$2y$", "$2b$", "$2a$"]
            .iter()
            .any(|p| rest.starts_with(p))
}

/// Whether `hash` is what usher writes now; others are rewritten as
/// argon2id after a successful login.
pub fn is_current(hash: &str) -> bool {
    hash.starts_with("$argon2id$")
}

/// `{SSHA512}`: base64 of SHA-512(password ‖ salt) followed by the salt.
fn ssha512_matches(encoded: &str, password: &[u8]) -> bool {
    use base64::Engine;
    use sha2::{Digest, Sha512};
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    if raw.len() <= 64 {
        return false;
    }
    let (digest, salt) = raw.split_at(64);
    let mut h = Sha512::new();
    h.update(password);
    h.update(salt);
    let computed = h.finalize();
    computed
        .iter()
        .zip(digest)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Why credentials are refused before any lookup.
fn malformed(login: &[u8], password: &[u8], limit: usize) -> bool {
    let bad = |b: &[u8]| b.is_empty() || b.len() > limit || b.iter().any(|c| c.is_ascii_control());
    bad(login) || password.len() > limit || password.iter().any(|c| c.is_ascii_control())
}

impl Authenticator {
    pub fn new(store: Store, config: AuthConfig, identity_limit: usize) -> Authenticator {
        let dummy_hash = hash_password(&config, b"usher dummy password, never valid");
        Authenticator {
            store,
            config: Arc::new(config),
            dummy_hash: Arc::new(dummy_hash),
            identity_limit,
            penalties: Arc::default(),
            hashing: Arc::new(Semaphore::new(hashing_threads())),
        }
    }

    /// Runs `work` (a hash or a verification) on the blocking pool once a
    /// hashing permit is free; `None` if it could not run.
    async fn hash_job<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _permit = self.hashing.acquire().await.ok()?;
        tokio::task::spawn_blocking(work).await.ok()
    }

    /// Checks a login from `client`; failures come back only after the
    /// failure delay, which grows with recent failures from the client's
    /// network and against the login name.
    pub async fn check(
        &self,
        login: &[u8],
        password: &Secret<Vec<u8>>,
        client: IpAddr,
    ) -> Result<Verdict, StoreError> {
        let verdict = self.check_now(login, password).await?;
        let name = format!(
            "user:{}",
            crate::store::canonical_login(&String::from_utf8_lossy(login))
        );
        match &verdict {
            Verdict::Rejected => {
                let n = self.penalties.fail(&[network_key(client), name]);
                let delay = failure_delay(&self.config, n);
                if n > self.config.free_failures {
                    tracing::info!(
                        failures = n,
                        delay_ms = delay.as_millis() as u64,
                        "repeated login failures"
                    );
                }
                tokio::time::sleep(delay).await;
            }
            Verdict::Accepted(u) => self.penalties.clear(&format!("user:{}", u.login)),
        }
        Ok(verdict)
    }

    /// Rewrites a legacy hash as argon2id, now that the password is known
    /// to be right. A failure only means the next login tries again.
    async fn upgrade(&self, user: &User, password: &[u8]) {
        let config = self.config.clone();
        let pw = password.to_vec();
        let Some(new) = self.hash_job(move || hash_password(&config, &pw)).await else {
            return;
        };
        match self
            .store
            .upgrade_hash(user.id, &user.password_hash, &new)
            .await
        {
            Ok(true) => tracing::info!(
                user = user.login.as_str(),
                "password hash rewritten as argon2id"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(user = user.login.as_str(), error = %e, "could not rewrite the hash")
            }
        }
    }

    async fn check_now(
        &self,
        login: &[u8],
        password: &Secret<Vec<u8>>,
    ) -> Result<Verdict, StoreError> {
        let password_bytes = password.expose();
        if malformed(login, password_bytes, self.identity_limit) {
            return Ok(Verdict::Rejected);
        }
        // Login names are UTF-8 (RFC 9051 §6.2.3 allows 8-bit only by
        // extension); other octets can name no user.
        let user = match std::str::from_utf8(login) {
            Ok(name) => self.store.find_user(name).await?,
            Err(_) => None,
        };
        let hash = match &user {
            Some(u) => u.password_hash.clone(),
            None => self.dummy_hash.as_str().to_owned(),
        };
        let pw = password_bytes.clone();
        let matches = self
            .hash_job(move || verify_password(&hash, &pw))
            .await
            .unwrap_or(false);
        match user {
            Some(u) if matches && u.enabled => {
                if self.config.rewrite_legacy_hashes && !is_current(&u.password_hash) {
                    self.upgrade(&u, password_bytes).await;
                }
                Ok(Verdict::Accepted(Box::new(u)))
            }
            _ => Ok(Verdict::Rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> AuthConfig {
        AuthConfig {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            argon2_parallelism: 1,
            failure_delay: std::time::Duration::ZERO,
            ..AuthConfig::default()
        }
    }

    /// However many logins arrive at once, no more hashing jobs run at a
    /// time than there are cores.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hashing_jobs_run_at_most_one_per_core() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let store = Store::open(&url).await.unwrap();
        let auth = Arc::new(Authenticator::new(store, cheap(), 1024));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..4 * hashing_threads())
            .map(|_| {
                let (auth, running, most) = (auth.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    auth.hash_job(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for job in jobs {
            assert!(job.await.unwrap().is_some());
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most >= 1 && most <= hashing_threads(), "{most} at once");
    }

    #[test]
    fn delays_grow_after_the_free_failures_and_stop_at_the_cap() {
        let c = AuthConfig {
            failure_delay: Duration::from_millis(100),
            free_failures: 3,
            failure_delay_max: Duration::from_millis(1000),
            ..AuthConfig::default()
        };
        let ms = |n| failure_delay(&c, n).as_millis();
        assert_eq!(
            [ms(1), ms(3), ms(4), ms(5), ms(7), ms(40)],
            [100, 100, 200, 400, 1000, 1000]
        );
    }

    #[test]
    fn failures_count_per_network_and_per_user() {
        let p = Penalties::default();
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(network_key(a), network_key(b));
        assert_eq!(
            network_key("::ffff:192.0.2.7".parse().unwrap()),
            "ip:192.0.2.7"
        );
        assert_eq!(p.fail(&[network_key(a), "user:x".into()]), 1);
        assert_eq!(p.fail(&[network_key(b), "user:y".into()]), 2);
        // Another network, same user: the user's count rules.
        assert_eq!(p.fail(&["ip:192.0.2.1".into(), "user:y".into()]), 2);
        p.clear("user:y");
        assert_eq!(p.fail(&["ip:192.0.2.1".into(), "user:y".into()]), 2);
    }

    #[test]
    fn argon2id_round_trip_keeps_exact_octets() {
        let c = cheap();
        let h = hash_password(&c, "accentué1!".as_bytes());
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, "accentué1!".as_bytes()));
        // The Latin-1 form of the same password is other octets (case C03).
        assert!(!verify_password(&h, b"accentu\xe91!"));
        assert!(verify_password(
            &format!("{{ARGON2ID}}{h}"),
            "accentué1!".as_bytes()
        ));
        assert!(!verify_password("garbage", b"x"));
    }

    const LEGACY: [&str; 4] = [
        "{SHA512-CRYPT}$6$CSLJFrCKUmVyJ/r8$9drZFSjO4j902NS2rc97YumEzZyLT4i3Ei4eUI4NGFQ9LUTS1ECACQELCu13uiCM7TqEDdOxFpBbI8oWM64a5.",
        "{SHA256-CRYPT}$5$ATNiLtA8VFhvclJ6$xbeJ6tcdrUutmPTf2tgd8JBTxBThJK6bq/24v4PoeN3",
        "{BLF-CRYPT}$2y$05$./BRoK/N1MIM6Bjg/AMLwuy8tIoRbU0Fsg8jQb/UW28YNoLfYOdhm",
        "{SSHA512}08WzZU9QlIL70qYZr1uITz8xQFe7PjjR8FmpVFeQ4kbTmcbK9S/r/xuyazPi9BGglsNyGpPlud/GLEqLn3XuZuRAAiQ=",
    ];

    #[test]
    fn legacy_schemes_verify() {
        // Made with `doveadm pw -s SHA512-CRYPT|SHA256-CRYPT|BLF-CRYPT|SSHA512
        // -p 'pa ss"wörd'`.
        let pw = "pa ss\"wörd".as_bytes();
        for hash in LEGACY {
            assert!(verify_password(hash, pw), "{hash}");
            assert!(!verify_password(hash, b"pa ss\"word"), "{hash}");
            assert!(!is_current(hash));
        }
        assert!(!verify_password("{PLAIN}pa ss\"wörd", pw));
        assert!(!verify_password("{SSHA512}!!!", pw));
        assert!(!verify_password("{SSHA512}c2hvcnQ=", pw));
    }

    #[test]
    fn control_characters_and_oversize_are_malformed() {
        assert!(malformed(
            b"alice@example.com",
            b"secret\r\na2 DELETE INBOX",
            1024
        ));
        assert!(malformed(b"alice@example.com", b"sec\0ret", 1024));
        assert!(malformed(&[b'a'; 2000], b"secret", 1024));
        assert!(malformed(b"", b"secret", 1024));
        assert!(!malformed(
            "josé@example.com".as_bytes(),
            "accentué1!".as_bytes(),
            1024
        ));
    }
    /// With `rewrite_legacy_hashes = false` an imported hash stays as it
    /// is after a successful login (the cheap-hash benchmark relies on it).
    #[tokio::test]
    async fn legacy_hash_is_kept_when_rewriting_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        let store = Store::open(&url).await.unwrap();
        let ssha = LEGACY[3];
        assert!(ssha.starts_with("{SSHA512}"));
        let user = ("alice@example.com".to_string(), ssha.to_string());
        store.add_users(&[user], None).await.unwrap();
        let config = AuthConfig {
            rewrite_legacy_hashes: false,
            ..cheap()
        };
        let auth = Authenticator::new(store.clone(), config, 1024);
        let password = Secret::new("pa ss\"wörd".as_bytes().to_vec());
        let verdict = auth.check(b"alice@example.com", &password, [127, 0, 0, 1].into());
        assert!(matches!(verdict.await.unwrap(), Verdict::Accepted(_)));
        let kept = store.find_user("alice@example.com").await.unwrap().unwrap();
        assert_eq!(kept.password_hash, ssha);
    }
}
