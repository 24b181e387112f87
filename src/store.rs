//! The shared user store: users, aliases, backends and the change feed.
//!
//! SQLite through sqlx; the file is created and migrated from `schema/` on
//! first open. Every write that changes what a running server must honour
//! also appends to `events`, so that servers following the feed react to a
//! helpdesk change made by another process.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use crate::config::TlsMode;

/// Errors from the store, worded for the helpdesk.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such user: {0}")]
    NoUser(String),
    #[error("no such backend: {0}")]
    NoBackend(String),
    #[error("no such alias: {0}")]
    NoAlias(String),
    #[error("{0} is a user's login, not an alias (`usher user remove {0}` deletes the user)")]
    NotAlias(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("backend {0} still serves users; move them first")]
    InUse(String),
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store file {0}: {1}")]
    File(String, std::io::Error),
}

/// A user as the login path needs it.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub login: String,
    pub password_hash: String,
    pub enabled: bool,
    pub backend: Option<String>,
    pub fallback: Option<String>,
    pub pool: String,
    pub hold_until: Option<i64>,
    pub display_name: Option<String>,
    pub note: Option<String>,
    pub version: i64,
}

/// How usher logs in to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMode {
    /// SASL PLAIN as the configured master user, the user as authzid.
    Master,
    /// The client's own password.
    Passthrough,
}

/// How the client's address is passed to a backend.
///
/// `Id` and `Xclient` both mean each protocol's own way, since one backend
/// row serves both protocols: IMAP `ID ("x-originating-ip" …)` on IMAP
/// and `XCLIENT ADDR= PORT= …` on submission, each only where the backend
/// offers it. `Proxy` is a PROXY protocol v2 header before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    None,
    Id,
    Xclient,
    Proxy,
}

impl Forward {
    /// Whether the address goes inside the protocol (ID, XCLIENT).
    pub fn is_native(self) -> bool {
        matches!(self, Forward::Id | Forward::Xclient)
    }
}

/// Whether a backend takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Active,
    Draining,
    Disabled,
}

/// A backend mail server.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: i64,
    pub name: String,
    pub host: String,
    pub imap_port: Option<u16>,
    pub submission_port: Option<u16>,
    pub tls: TlsMode,
    pub ca_file: Option<String>,
    pub login: LoginMode,
    pub forward: Forward,
    pub pool: String,
    pub site: Option<String>,
    pub weight: u32,
    pub state: BackendState,
}

/// Fields of a backend that `backend add` and `backend set` may change.
#[derive(Debug, Clone, Default)]
pub struct BackendFields {
    pub host: Option<String>,
    pub imap_port: Option<u16>,
    pub submission_port: Option<u16>,
    pub tls: Option<String>,
    pub ca_file: Option<String>,
    pub login: Option<String>,
    pub forward: Option<String>,
    pub pool: Option<String>,
    pub site: Option<String>,
    pub weight: Option<u32>,
    pub state: Option<String>,
}

/// What a change-feed entry says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    UserAdded,
    Password,
    Disabled,
    Enabled,
    Removed,
    /// The user's backend assignment changed.
    Moved,
    /// A server placed an unassigned user (nothing to end).
    Placed,
    Fallback,
    Alias,
    Note,
    Backend,
    /// A backend drains and its sessions are to be ended, spread over the
    /// number of seconds in the event's detail.
    Drain,
}

const CHANGES: [(Change, &str); 12] = [
    (Change::UserAdded, "user.added"),
    (Change::Password, "user.password"),
    (Change::Disabled, "user.disabled"),
    (Change::Enabled, "user.enabled"),
    (Change::Removed, "user.removed"),
    (Change::Moved, "user.moved"),
    (Change::Placed, "user.placed"),
    (Change::Fallback, "user.fallback"),
    (Change::Alias, "user.alias"),
    (Change::Note, "user.note"),
    (Change::Backend, "backend.changed"),
    (Change::Drain, "backend.drain"),
];

impl Change {
    pub fn as_str(self) -> &'static str {
        CHANGES
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("unknown", |(_, s)| s)
    }

    pub fn parse(s: &str) -> Option<Change> {
        CHANGES.iter().find(|(_, name)| *name == s).map(|(c, _)| *c)
    }

    /// Whether the user's live sessions must end: they were opened with
    /// credentials or a routing that no longer holds.
    pub fn ends_sessions(self) -> bool {
        matches!(
            self,
            Change::Password | Change::Disabled | Change::Removed | Change::Moved
        )
    }
}

/// One entry of the change feed.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    /// `None` for kinds this version does not know (written by a newer one).
    pub change: Option<Change>,
    pub subject: String,
    pub detail: Option<String>,
}

/// Lower-cases a login name so that `Alice@Example.COM` and
/// `alice@example.com` are one user. Unicode-aware (`José` → `josé`).
pub fn canonical_login(login: &str) -> String {
    login.trim().to_lowercase()
}

/// Creates the store's file, readable by its owner only, if it does not
/// exist: it holds every password hash. SQLite gives its `-wal` and `-shm`
/// files the same permissions. An existing file keeps its own.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str().is_empty() || path == Path::new(":memory:") {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::File(path.display().to_string(), e)),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A handle on the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

const USER_COLUMNS: &str = "u.id, u.login, u.password_hash, u.enabled, b.name AS backend, \
     f.name AS fallback, u.pool, u.hold_until, u.display_name, u.note, u.version";
const USER_FROM: &str = "users u LEFT JOIN backends b ON b.id = u.backend_id \
     LEFT JOIN backends f ON f.id = u.fallback_id";

impl Store {
    /// Opens (creating and migrating if needed) the store at `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        create_private(options.get_filename())?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("schema/sqlite").run(&pool).await?;
        Ok(Store { pool })
    }

    // ---- users -------------------------------------------------------

    /// Finds a user by login name or alias.
    pub async fn find_user(&self, login: &str) -> Result<Option<User>, StoreError> {
        let login = canonical_login(login);
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.login = ?1 \
             OR u.id = (SELECT user_id FROM aliases WHERE alias = ?1) LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(&login)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| user_from_row(&r)))
    }

    async fn user(&self, login: &str) -> Result<User, StoreError> {
        self.find_user(login)
            .await?
            .ok_or_else(|| StoreError::NoUser(login.to_string()))
    }

    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM {USER_FROM} ORDER BY u.login");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(user_from_row).collect())
    }

    pub async fn aliases_of(&self, user_id: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT alias FROM aliases WHERE user_id = ? ORDER BY alias")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Adds a user; `login` must contain a domain.
    pub async fn add_user(
        &self,
        login: &str,
        password_hash: &str,
        backend: Option<&str>,
    ) -> Result<(), StoreError> {
        let login = canonical_login(login);
        validate_login(&login)?;
        if self.find_user(&login).await?.is_some() {
            return Err(StoreError::Exists(login));
        }
        let backend_id = match backend {
            Some(name) => Some(self.backend(name).await?.id),
            None => None,
        };
        let t = now();
        sqlx::query(
            "INSERT INTO users (login, password_hash, backend_id, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&login)
        .bind(password_hash)
        .bind(backend_id)
        .bind(t)
        .bind(t)
        .execute(&self.pool)
        .await?;
        self.event(Change::UserAdded, &login, None).await
    }

    /// Adds many users in one transaction: all or none.
    pub async fn add_users(
        &self,
        users: &[(String, String)],
        backend: Option<&str>,
    ) -> Result<(), StoreError> {
        let backend_id = match backend {
            Some(name) => Some(self.backend(name).await?.id),
            None => None,
        };
        let mut logins = Vec::with_capacity(users.len());
        for (login, _) in users {
            let login = canonical_login(login);
            validate_login(&login)?;
            if self.find_user(&login).await?.is_some() || logins.contains(&login) {
                return Err(StoreError::Exists(login));
            }
            logins.push(login);
        }
        let t = now();
        let mut tx = self.pool.begin().await?;
        for (login, (_, hash)) in logins.iter().zip(users) {
            sqlx::query(
                "INSERT INTO users (login, password_hash, backend_id, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(login)
            .bind(hash)
            .bind(backend_id)
            .bind(t)
            .bind(t)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO events (kind, subject, at) VALUES (?, ?, ?)")
                .bind(Change::UserAdded.as_str())
                .bind(login)
                .bind(t)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Runs `set` (an SQL assignment list) on one user, bumps its version
    /// and records the change in the feed.
    async fn update_user(
        &self,
        login: &str,
        set: &str,
        value: Value<'_>,
        change: Change,
    ) -> Result<(), StoreError> {
        let user = self.user(login).await?;
        let sql =
            format!("UPDATE users SET {set}, version = version + 1, updated_at = ? WHERE id = ?");
        let q = sqlx::query(&sql);
        let q = match value {
            Value::Text(s) => q.bind(s),
            Value::Int(i) => q.bind(i),
        };
        q.bind(now()).bind(user.id).execute(&self.pool).await?;
        self.event(change, &user.login, None).await
    }

    /// Replaces `old` by `new` as the user's hash, unless the hash changed
    /// meanwhile (a password reset wins). Not a password change: no event,
    /// no session ends. Returns whether it was replaced.
    pub async fn upgrade_hash(
        &self,
        user_id: i64,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?")
                .bind(new)
                .bind(user_id)
                .bind(old)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_password(&self, login: &str, password_hash: &str) -> Result<(), StoreError> {
        self.update_user(
            login,
            "password_hash = ?",
            Value::Text(Some(password_hash)),
            Change::Password,
        )
        .await
    }

    pub async fn set_enabled(&self, login: &str, enabled: bool) -> Result<(), StoreError> {
        let change = if enabled {
            Change::Enabled
        } else {
            Change::Disabled
        };
        self.update_user(
            login,
            "enabled = ?",
            Value::Int(Some(enabled as i64)),
            change,
        )
        .await
    }

    /// Assigns `login` to `backend` (or clears the assignment with `None`).
    pub async fn assign(&self, login: &str, backend: Option<&str>) -> Result<(), StoreError> {
        let id = match backend {
            Some(name) => Some(self.backend(name).await?.id),
            None => None,
        };
        self.update_user(login, "backend_id = ?", Value::Int(id), Change::Moved)
            .await
    }

    /// Records a placement unless the user was assigned meanwhile; returns
    /// the backend the user is assigned to now.
    pub async fn place(&self, login: &str, backend: &str) -> Result<String, StoreError> {
        let user = self.user(login).await?;
        let id = self.backend(backend).await?.id;
        let done = sqlx::query(
            "UPDATE users SET backend_id = ?, updated_at = ? WHERE id = ? AND backend_id IS NULL",
        )
        .bind(id)
        .bind(now())
        .bind(user.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            self.event(Change::Placed, &user.login, Some(backend))
                .await?;
        }
        let now = self.user(login).await?;
        now.backend
            .ok_or_else(|| StoreError::Invalid(format!("{login} lost its placement")))
    }

    pub async fn set_fallback(&self, login: &str, backend: Option<&str>) -> Result<(), StoreError> {
        let id = match backend {
            Some(name) => Some(self.backend(name).await?.id),
            None => None,
        };
        self.update_user(login, "fallback_id = ?", Value::Int(id), Change::Fallback)
            .await
    }

    /// Holds (or with `None` releases) the user's new logins until the
    /// given Unix time in milliseconds, while a move runs.
    pub async fn set_hold(&self, login: &str, until_ms: Option<i64>) -> Result<(), StoreError> {
        let user = self.user(login).await?;
        sqlx::query("UPDATE users SET hold_until = ? WHERE id = ?")
            .bind(until_ms)
            .bind(user.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_note(&self, login: &str, note: Option<&str>) -> Result<(), StoreError> {
        self.update_user(login, "note = ?", Value::Text(note), Change::Note)
            .await
    }

    pub async fn remove_user(&self, login: &str) -> Result<(), StoreError> {
        let user = self.user(login).await?;
        sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(user.id)
            .execute(&self.pool)
            .await?;
        self.event(Change::Removed, &user.login, None).await
    }

    pub async fn add_alias(&self, alias: &str, login: &str) -> Result<(), StoreError> {
        let alias = canonical_login(alias);
        if alias.is_empty() || alias.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(StoreError::Invalid(format!("alias {alias:?}")));
        }
        if self.find_user(&alias).await?.is_some() {
            return Err(StoreError::Exists(alias));
        }
        let user = self.user(login).await?;
        sqlx::query("INSERT INTO aliases (alias, user_id) VALUES (?, ?)")
            .bind(&alias)
            .bind(user.id)
            .execute(&self.pool)
            .await?;
        self.event(Change::Alias, &user.login, None).await
    }

    pub async fn remove_alias(&self, alias: &str) -> Result<(), StoreError> {
        let alias = canonical_login(alias);
        let done = sqlx::query("DELETE FROM aliases WHERE alias = ?")
            .bind(&alias)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            let login = self.find_user(&alias).await?.map(|u| u.login);
            return Err(if login.as_ref() == Some(&alias) {
                StoreError::NotAlias(alias)
            } else {
                StoreError::NoAlias(alias)
            });
        }
        self.event(Change::Alias, &alias, None).await
    }

    // ---- backends ----------------------------------------------------

    pub async fn backend(&self, name: &str) -> Result<Backend, StoreError> {
        let row = sqlx::query("SELECT * FROM backends WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => backend_from_row(&r),
            None => Err(StoreError::NoBackend(name.to_string())),
        }
    }

    pub async fn list_backends(&self) -> Result<Vec<Backend>, StoreError> {
        let rows = sqlx::query("SELECT * FROM backends ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(backend_from_row).collect()
    }

    pub async fn add_backend(&self, name: &str, fields: &BackendFields) -> Result<(), StoreError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(StoreError::Invalid(format!(
                "backend name {name:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        if self.backend(name).await.is_ok() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let host = fields
            .host
            .as_deref()
            .ok_or_else(|| StoreError::Invalid("a backend needs a host".into()))?;
        let t = now();
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO backends (name, host, created_at, updated_at) VALUES (?, ?, ?, ?) \
             RETURNING id",
        )
        .bind(name)
        .bind(host)
        .bind(t)
        .bind(t)
        .fetch_one(&mut *tx)
        .await?;
        apply_backend_fields(&mut tx, id, fields).await?;
        tx.commit().await?;
        self.event(Change::Backend, name, None).await
    }

    /// Changes the given fields of a backend; values are checked by the
    /// schema's constraints and reported by name.
    pub async fn set_backend(&self, name: &str, f: &BackendFields) -> Result<(), StoreError> {
        let b = self.backend(name).await?;
        let mut tx = self.pool.begin().await?;
        apply_backend_fields(&mut tx, b.id, f).await?;
        tx.commit().await?;
        self.event(Change::Backend, name, None).await
    }

    pub async fn remove_backend(&self, name: &str) -> Result<(), StoreError> {
        let b = self.backend(name).await?;
        let users: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM users WHERE backend_id = ?1 OR fallback_id = ?1",
        )
        .bind(b.id)
        .fetch_one(&self.pool)
        .await?;
        if users > 0 {
            return Err(StoreError::InUse(name.to_string()));
        }
        sqlx::query("DELETE FROM backends WHERE id = ?")
            .bind(b.id)
            .execute(&self.pool)
            .await?;
        self.event(Change::Backend, name, None).await
    }

    // ---- change feed -------------------------------------------------

    /// Appends to the change feed.
    pub async fn event(
        &self,
        change: Change,
        subject: &str,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO events (kind, subject, detail, at) VALUES (?, ?, ?, ?)")
            .bind(change.as_str())
            .bind(subject)
            .bind(detail)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Events after `after`, oldest first.
    pub async fn events_since(&self, after: i64) -> Result<Vec<Event>, StoreError> {
        let rows =
            sqlx::query("SELECT id, kind, subject, detail FROM events WHERE id > ? ORDER BY id")
                .bind(after)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| Event {
                id: r.get(0),
                change: Change::parse(r.get(1)),
                subject: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }

    /// Deletes events older than `age`; returns how many. Followers only
    /// read forward from where they are, so old entries serve nobody.
    pub async fn prune_events(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        let cutoff = now() - age.as_secs() as i64;
        let done = sqlx::query("DELETE FROM events WHERE at < ?")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The newest event id, where a follower starts.
    pub async fn last_event(&self) -> Result<i64, StoreError> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(id.unwrap_or(0))
    }
}

async fn apply_backend_fields(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: i64,
    f: &BackendFields,
) -> Result<(), StoreError> {
    let texts = [
        ("host", &f.host),
        ("tls", &f.tls),
        ("ca_file", &f.ca_file),
        ("login", &f.login),
        ("forward", &f.forward),
        ("pool", &f.pool),
        ("site", &f.site),
        ("state", &f.state),
    ];
    for (column, value) in texts {
        if let Some(v) = value {
            let sql = format!("UPDATE backends SET {column} = ? WHERE id = ?");
            sqlx::query(&sql)
                .bind(v)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| constraint(column, v, e))?;
        }
    }
    let ints = [
        ("imap_port", f.imap_port.map(i64::from)),
        ("submission_port", f.submission_port.map(i64::from)),
        ("weight", f.weight.map(i64::from)),
    ];
    for (column, value) in ints {
        if let Some(v) = value {
            let sql = format!("UPDATE backends SET {column} = ? WHERE id = ?");
            sqlx::query(&sql)
                .bind(v)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| constraint(column, &v.to_string(), e))?;
        }
    }
    sqlx::query("UPDATE backends SET updated_at = ? WHERE id = ?")
        .bind(now())
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A value bound into a one-column user update.
enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
}

/// Checks that a (canonical) login is a full address usher can store.
pub fn validate_login(login: &str) -> Result<(), StoreError> {
    let ok = match login.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') || domain == "localhost",
        None => false,
    };
    if !ok || login.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(StoreError::Invalid(format!(
            "login {login:?}: use a full address such as alice@example.com"
        )));
    }
    // `*` separates a user from a master user in Dovecot's `user*master`
    // logins, and cannot stand in an IMAP atom: refuse it in names.
    if login.contains('*') {
        return Err(StoreError::Invalid(format!(
            "login {login:?}: `*` is not allowed in a login name"
        )));
    }
    Ok(())
}

fn constraint(column: &str, value: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.message().contains("CHECK") => {
            StoreError::Invalid(format!("{column} = {value:?} is not allowed"))
        }
        _ => StoreError::Db(e),
    }
}

fn user_from_row(r: &sqlx::sqlite::SqliteRow) -> User {
    User {
        id: r.get("id"),
        login: r.get("login"),
        password_hash: r.get("password_hash"),
        enabled: r.get::<i64, _>("enabled") != 0,
        backend: r.get("backend"),
        fallback: r.get("fallback"),
        pool: r.get("pool"),
        hold_until: r.get("hold_until"),
        display_name: r.get("display_name"),
        note: r.get("note"),
        version: r.get("version"),
    }
}

fn backend_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Backend, StoreError> {
    let text = |c: &str| -> String { r.get(c) };
    let port = |c: &str| {
        r.get::<Option<i64>, _>(c)
            .and_then(|p| u16::try_from(p).ok())
    };
    let tls = match text("tls").as_str() {
        "starttls" => TlsMode::Starttls,
        "implicit" => TlsMode::Implicit,
        _ => TlsMode::None,
    };
    let login = match text("login").as_str() {
        "passthrough" => LoginMode::Passthrough,
        _ => LoginMode::Master,
    };
    let forward = match text("forward").as_str() {
        "none" => Forward::None,
        "xclient" => Forward::Xclient,
        "proxy" => Forward::Proxy,
        _ => Forward::Id,
    };
    let state = match text("state").as_str() {
        "draining" => BackendState::Draining,
        "disabled" => BackendState::Disabled,
        _ => BackendState::Active,
    };
    Ok(Backend {
        id: r.get("id"),
        name: text("name"),
        host: text("host"),
        imap_port: port("imap_port"),
        submission_port: port("submission_port"),
        tls,
        ca_file: r.get("ca_file"),
        login,
        forward,
        pool: text("pool"),
        site: r.get("site"),
        weight: r.get::<i64, _>("weight").max(0) as u32,
        state,
    })
}

impl Backend {
    pub fn tls_name(&self) -> &'static str {
        match self.tls {
            TlsMode::None => "none",
            TlsMode::Starttls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/s.db", dir.path().display());
        (Store::open(&url).await.unwrap(), dir)
    }

    /// The store holds every password hash: its files are the owner's
    /// alone, whatever the umask.
    #[tokio::test]
    async fn a_new_store_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (s, dir) = store().await;
        s.add_user("alice@example.com", "h", None).await.unwrap();
        for name in ["s.db", "s.db-wal", "s.db-shm"] {
            let path = dir.path().join(name);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
        }
    }

    #[test]
    fn login_names_are_full_addresses_without_master_separator() {
        assert!(validate_login("alice@example.com").is_ok());
        for bad in [
            "alice",
            "alice@",
            "al ice@example.com",
            "a*master@example.com",
        ] {
            assert!(validate_login(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn users_resolve_by_any_case_and_alias() {
        let (s, _d) = store().await;
        s.add_backend(
            "imap1",
            &BackendFields {
                host: Some("127.0.0.1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        s.add_user("Alice@Example.COM", "h", Some("imap1"))
            .await
            .unwrap();
        s.add_alias("EXAMPLE\\alice", "alice@example.com")
            .await
            .unwrap();
        let u = s.find_user("ALICE@example.com").await.unwrap().unwrap();
        assert_eq!(u.login, "alice@example.com");
        assert_eq!(u.backend.as_deref(), Some("imap1"));
        let via_alias = s.find_user("example\\Alice").await.unwrap().unwrap();
        assert_eq!(via_alias.id, u.id);
        assert!(matches!(
            s.add_user("alice@example.com", "h", None).await,
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            s.remove_backend("imap1").await,
            Err(StoreError::InUse(_))
        ));
        assert!(matches!(
            s.add_user("nodomain", "h", None).await,
            Err(StoreError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn changes_bump_version_and_feed() {
        let (s, _d) = store().await;
        s.add_user("bob@example.com", "h1", None).await.unwrap();
        let before = s.last_event().await.unwrap();
        let v1 = s
            .find_user("bob@example.com")
            .await
            .unwrap()
            .unwrap()
            .version;
        s.set_password("bob@example.com", "h2").await.unwrap();
        let u = s.find_user("bob@example.com").await.unwrap().unwrap();
        assert_eq!(u.version, v1 + 1);
        assert_eq!(u.password_hash, "h2");
        let ev = s.events_since(before).await.unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].subject, "bob@example.com");
        assert_eq!(ev[0].change, Some(Change::Password));
        assert!(Change::Password.ends_sessions() && !Change::Note.ends_sessions());
        for (c, name) in CHANGES {
            assert_eq!(Change::parse(name), Some(c));
        }
    }

    #[tokio::test]
    async fn backend_values_are_checked_by_name() {
        let (s, _d) = store().await;
        let f = BackendFields {
            host: Some("h".into()),
            tls: Some("bogus".into()),
            ..Default::default()
        };
        let err = s.add_backend("b1", &f).await.unwrap_err().to_string();
        assert!(err.contains("tls"), "{err}");
    }

    #[tokio::test]
    async fn placement_keeps_the_first_and_the_feed_prunes_old_entries() {
        let (s, _d) = store().await;
        for b in ["b1", "b2"] {
            let f = BackendFields {
                host: Some("h".into()),
                imap_port: Some(143),
                ..Default::default()
            };
            s.add_backend(b, &f).await.unwrap();
        }
        s.add_user("u@example.com", "x", None).await.unwrap();
        assert_eq!(s.place("u@example.com", "b1").await.unwrap(), "b1");
        // A second node placing at the same time gets the first placement.
        assert_eq!(s.place("u@example.com", "b2").await.unwrap(), "b1");
        let events = s.events_since(0).await.unwrap();
        let placed: Vec<_> = events
            .iter()
            .filter(|e| e.change == Some(Change::Placed))
            .collect();
        assert_eq!(placed.len(), 1);
        assert!(!Change::Placed.ends_sessions());

        let before = events.len() as u64;
        assert_eq!(
            s.prune_events(std::time::Duration::from_secs(60))
                .await
                .unwrap(),
            0
        );
        sqlx::query("UPDATE events SET at = at - 120")
            .execute(&s.pool)
            .await
            .unwrap();
        assert_eq!(
            s.prune_events(std::time::Duration::from_secs(60))
                .await
                .unwrap(),
            before
        );
        // The feed goes on from where it was.
        s.set_note("u@example.com", Some("n")).await.unwrap();
        let last = events.last().unwrap().id;
        assert_eq!(s.events_since(last).await.unwrap().len(), 1);
    }
}
