//! Password checks against the store.
//!
//! Invariants:
//! - an unknown user, a disabled user and a wrong password give the same
//!   answer after the same work: the unknown user's password is verified
//!   against a dummy hash of the same cost, and every failure waits the same
//!   configured delay before it is reported;
//! - credentials are checked for size and control characters before any
//!   store query (cases C07, C35);
//! - hashing runs on the blocking pool, never on the reactor threads.

use std::sync::Arc;

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

/// True if `password` matches the PHC string `hash`. Dovecot's
/// `{ARGON2ID}` prefix is accepted too. An unparsable hash never matches.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let phc = hash
        .strip_prefix("{ARGON2ID}")
        .or_else(|| hash.strip_prefix("{ARGON2I}"))
        .unwrap_or(hash);
    match PasswordHash::new(phc) {
        // The parameters come from the hash itself, not from our config.
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
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
        }
    }

    /// Checks a login; failures come back only after the failure delay.
    pub async fn check(
        &self,
        login: &[u8],
        password: &Secret<Vec<u8>>,
    ) -> Result<Verdict, StoreError> {
        let verdict = self.check_now(login, password).await?;
        if matches!(verdict, Verdict::Rejected) {
            tokio::time::sleep(self.config.failure_delay).await;
        }
        Ok(verdict)
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
        let matches = tokio::task::spawn_blocking(move || verify_password(&hash, &pw))
            .await
            .unwrap_or(false);
        match user {
            Some(u) if matches && u.enabled => Ok(Verdict::Accepted(Box::new(u))),
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
        }
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
}
