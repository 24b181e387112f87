//! The TOML configuration file: its shape, its defaults and their reasons.
//!
//! Unknown keys are rejected (`deny_unknown_fields` everywhere) and every
//! value is checked at start, so a typo stops `usher serve` with a message
//! that names the key instead of silently running with a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name usher uses for itself in greetings and towards backends.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    pub store: StoreConfig,
    /// Certificate and key for STARTTLS and implicit-TLS listeners.
    pub tls: Option<TlsConfig>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub backends: BackendLogin,
    #[serde(default)]
    pub health: HealthConfig,
    /// Admin HTTP endpoint (sessions, kicks); loopback only.
    pub admin: Option<AdminConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path/to/usher.db` (created on first start).
    pub url: Secret<String>,
    /// How often the server reads the store's change feed. Changes made by
    /// the CLI or another node take effect within about this long.
    #[serde(default = "default_follow_interval", with = "humantime_serde")]
    pub follow_interval: Duration,
}

fn default_follow_interval() -> Duration {
    Duration::from_millis(250)
}

/// Backend health probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between probes of each backend.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Connect plus greeting, per probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures (probes or real logins) that mark a backend down.
    pub down_after: u32,
    /// A user that each IMAP probe logs in as, after the greeting, so that
    /// a backend that still greets but cannot log anyone in (auth process
    /// or mail storage broken) counts as down. Unset: greeting only.
    pub test_user: Option<String>,
    /// The test user's own password, for backends that take passthrough
    /// logins; master-user backends are logged in to as the master user.
    pub test_password: Option<Secret<String>>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            down_after: 2,
            test_user: None,
            test_password: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Submission,
}

/// How a listener (or a backend) uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Cleartext only.
    None,
    /// Cleartext with the STARTTLS upgrade offered.
    Starttls,
    /// TLS from the first byte (993, 465).
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// Accept passwords before TLS. Off by default: RFC 9051 §11.1 and the
    /// design's security rules; turn on only for trusted local networks.
    #[serde(default)]
    pub plaintext_auth: bool,
    /// Expect a PROXY protocol header (v1 or v2) from the peers listed in
    /// `trusted_proxies`: from them it is required, as the first bytes and
    /// before TLS; other peers are served as direct clients and a header
    /// from them is never honoured.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Networks of the load balancers whose PROXY headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::proxy_header::Network>,
}

/// Limits that bound what a client may cost before and after login.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line before login, literals excluded. 8 KiB holds
    /// any real LOGIN or AUTHENTICATE while keeping hostile lines cheap.
    pub line_bytes: usize,
    /// Largest literal before login: credentials are short.
    pub literal_bytes: usize,
    /// Longest SASL identity (authcid, authzid) or password, in octets.
    pub identity_bytes: usize,
    /// Bad or failed commands before usher hangs up.
    pub bad_commands: u32,
    /// Failed logins on one connection before usher hangs up.
    pub auth_failures: u32,
    /// Deadline for the whole pre-login phase.
    #[serde(with = "humantime_serde")]
    pub prelogin_timeout: Duration,
    /// Silence in both directions after login that ends a session; RFC 9051
    /// §5.4 asks for at least 30 minutes so that IDLE clients survive.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connect, greeting and login at a backend, together.
    #[serde(with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// Open client connections per usher process.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            line_bytes: 8 * 1024,
            literal_bytes: 4 * 1024,
            identity_bytes: 1024,
            bad_commands: 10,
            auth_failures: 3,
            prelogin_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(31 * 60),
            backend_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// Password hashing and failure handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// argon2id memory cost in KiB (OWASP's 19 MiB, t=2, p=1 baseline).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Delay before any failed login is answered; the same for unknown,
    /// disabled and wrong-password logins so that none can be told apart.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Failed logins per client address (IPv6: per /64) and per user
    /// within 15 minutes that cost only `failure_delay`; each one beyond
    /// doubles the delay, up to `failure_delay_max`.
    pub free_failures: u32,
    #[serde(with = "humantime_serde")]
    pub failure_delay_max: Duration,
    /// Rewrite a legacy hash (`{SSHA512}`, `{SHA512-CRYPT}`, Dovecot's
    /// `{ARGON2ID}` form, …) as usher's argon2id after a successful login.
    /// Off only while another system still checks the same hashes, or for
    /// a benchmark that must keep a chosen scheme.
    pub rewrite_legacy_hashes: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            failure_delay: Duration::from_secs(2),
            free_failures: 3,
            failure_delay_max: Duration::from_secs(30),
            rewrite_legacy_hashes: true,
        }
    }
}

/// How usher logs in to backends whose login mode is `master`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendLogin {
    pub master_user: Option<String>,
    pub master_password: Option<Secret<String>>,
    /// Read the master password from this file instead (first line).
    pub master_password_file: Option<PathBuf>,
    /// CA bundle that backend certificates are verified against, unless a
    /// backend names its own.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token: Secret<String>,
}

/// A configuration error that names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

fn default_hostname() -> String {
    "usher.localdomain".to_string()
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the file in errors
    /// and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Relative file names are taken from the config file's directory, so
    /// that a config works from wherever usher is started.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
        if let Some(ca) = &mut self.backends.ca {
            fix(ca);
        }
        if let Some(file) = &mut self.backends.master_password_file {
            fix(file);
        }
        let url = self.store.url.expose();
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !file.is_empty() && !file.starts_with('/') && file != ":memory:" {
                let joined = base.join(file).display().to_string();
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{query}")
                };
                self.store.url = Secret::new(format!("sqlite://{joined}{query}"));
            }
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: &str| Err((key.to_string(), msg.to_string()));
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return bad("hostname", "must be a host name without spaces");
        }
        if !self.store.url.expose().starts_with("sqlite:") {
            return bad("store.url", "only sqlite:// URLs are supported so far");
        }
        let mut names = std::collections::HashSet::new();
        // Port 0 (any free port) may repeat; a fixed address may not.
        let mut addresses: std::collections::HashSet<SocketAddr> =
            self.admin.iter().map(|a| a.address).collect();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if l.name.is_empty() || !names.insert(l.name.as_str()) {
                return bad(&key("name"), "must be present and unique");
            }
            if l.address.port() != 0 && !addresses.insert(l.address) {
                return bad(
                    &key("address"),
                    "is already used by another listener or the admin endpoint",
                );
            }
            if l.tls != TlsMode::None && self.tls.is_none() {
                return bad(&key("tls"), "needs a [tls] section with cert and key");
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return bad(
                    &key("trusted_proxies"),
                    "proxy_protocol needs at least one trusted network",
                );
            }
            if !l.proxy_protocol && !l.trusted_proxies.is_empty() {
                return bad(
                    &key("proxy_protocol"),
                    "trusted_proxies is set but proxy_protocol is off",
                );
            }
        }
        let limits = &self.limits;
        if limits.line_bytes < 512 {
            return bad("limits.line_bytes", "must be at least 512");
        }
        if limits.literal_bytes == 0 || limits.literal_bytes > 1 << 20 {
            return bad("limits.literal_bytes", "must be between 1 and 1048576");
        }
        if limits.identity_bytes == 0 || limits.identity_bytes > limits.literal_bytes {
            return bad(
                "limits.identity_bytes",
                "must be between 1 and literal_bytes",
            );
        }
        if limits.bad_commands == 0 {
            return bad("limits.bad_commands", "must be at least 1");
        }
        if limits.auth_failures == 0 {
            return bad("limits.auth_failures", "must be at least 1");
        }
        if limits.idle_timeout < Duration::from_secs(30 * 60) {
            return bad(
                "limits.idle_timeout",
                "must be at least 30m (RFC 9051 section 5.4, IDLE clients)",
            );
        }
        if limits.prelogin_timeout.is_zero() {
            return bad("limits.prelogin_timeout", "must be more than 0s");
        }
        if limits.backend_timeout.is_zero() {
            return bad("limits.backend_timeout", "must be more than 0s");
        }
        if limits.max_connections == 0 {
            return bad("limits.max_connections", "must be at least 1");
        }
        let a = &self.auth;
        if a.argon2_memory_kib < 8 * a.argon2_parallelism.max(1) {
            return bad("auth.argon2_memory_kib", "must be at least 8 × parallelism");
        }
        if a.failure_delay_max < a.failure_delay {
            return bad("auth.failure_delay_max", "must be at least failure_delay");
        }
        if a.argon2_iterations == 0 {
            return bad("auth.argon2_iterations", "must be at least 1");
        }
        if a.argon2_parallelism == 0 {
            return bad("auth.argon2_parallelism", "must be at least 1");
        }
        let b = &self.backends;
        if b.master_password.is_some() && b.master_password_file.is_some() {
            return bad(
                "backends.master_password_file",
                "give either master_password or master_password_file, not both",
            );
        }
        if b.master_user.is_some()
            != (b.master_password.is_some() || b.master_password_file.is_some())
        {
            return bad(
                "backends.master_user",
                "master_user and a master password go together",
            );
        }
        let h = &self.health;
        if h.interval < Duration::from_millis(100) {
            return bad("health.interval", "must be at least 100ms");
        }
        if h.timeout.is_zero() || h.timeout > h.interval.max(Duration::from_secs(1)) * 10 {
            return bad(
                "health.timeout",
                "must be more than 0s and at most 10 intervals",
            );
        }
        if h.down_after == 0 {
            return bad("health.down_after", "must be at least 1");
        }
        if h.test_password.is_some() && h.test_user.is_none() {
            return bad("health.test_password", "needs health.test_user");
        }
        if h.test_user.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return bad("health.test_user", "must not be empty");
        }
        if self.store.follow_interval < Duration::from_millis(10)
            || self.store.follow_interval > Duration::from_secs(60)
        {
            return bad("store.follow_interval", "must be between 10ms and 60s");
        }
        if let Some(admin) = &self.admin {
            if !admin.address.ip().is_loopback() {
                return bad("admin.address", "must be a loopback address");
            }
            if admin.token.expose().len() < 16 {
                return bad("admin.token", "must be at least 16 characters");
            }
        }
        Ok(())
    }

    /// The master password, read from the file if one is named.
    pub fn master_password(&self) -> std::io::Result<Option<Secret<String>>> {
        if let Some(pw) = &self.backends.master_password {
            return Ok(Some(pw.clone()));
        }
        match &self.backends.master_password_file {
            Some(file) => {
                let text = std::fs::read_to_string(file)?;
                let line = text.lines().next().unwrap_or("").to_string();
                Ok(Some(Secret::new(line)))
            }
            None => Ok(None),
        }
    }
}
