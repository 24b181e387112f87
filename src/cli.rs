//! The command line: `usher serve` and the helpdesk commands that work on
//! the same store as the running servers.
//!
//! Passwords never come from argv (they would show in `ps` and shell
//! history): they are read from a prompt, or from stdin with
//! `--password-stdin`.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use crate::admin::{KickReply, KickRequest};
use crate::auth::hash_password;
use crate::config::Config;
use crate::sessions::SessionView;
use crate::store::{
    canonical_login, validate_login, BackendFields, BackendState, Change, Store, StoreError, User,
};

#[derive(Debug, Parser)]
#[command(
    name = "usher",
    version,
    about = "IMAP and submission front-end proxy: one front door for many mail backends"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        env = "USHER_CONFIG",
        default_value = "usher.toml",
        global = true
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Write the bound listener addresses here as JSON once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Check the configuration file and exit.
    CheckConfig,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Print an argon2id hash of a password (for scripts and SQL).
    Hash(PasswordInput),
    /// List the live sessions of a running server (admin endpoint).
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End live sessions of a running server by user, backend or client
    /// address (admin endpoint). Ending none is no error, unless the user
    /// or backend is not in the store either.
    Kick {
        /// Login or alias.
        #[arg(long, group = "which")]
        user: Option<String>,
        /// Backend name.
        #[arg(long, group = "which")]
        backend: Option<String>,
        /// Client IP address (without a port).
        #[arg(long, group = "which", value_parser = client_ip)]
        client: Option<IpAddr>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the running server's admin endpoint is.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin endpoint address; defaults to the config's `admin.address`.
    #[arg(long, env = "USHER_ADMIN")]
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct PasswordInput {
    /// Read the password from the first line of stdin instead of a prompt.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (login with domain, e.g. alice@example.com).
    Add {
        login: String,
        /// Backend that holds the user's mailbox.
        #[arg(long)]
        backend: Option<String>,
        #[command(flatten)]
        password: PasswordInput,
    },
    /// Add many users from stdin, one per line: the login, a space, then
    /// the password (the rest of the line). All or none are added.
    Import {
        /// Backend for every imported user (else placed at first login).
        #[arg(long)]
        backend: Option<String>,
        /// Lines carry existing hashes instead of passwords (Dovecot's
        /// `{SHA512-CRYPT}`, `{BLF-CRYPT}`, `{SSHA512}`, `{ARGON2ID}`, …);
        /// each is rewritten as argon2id at the user's first login.
        #[arg(long)]
        hashed: bool,
    },
    /// Set a user's password.
    Passwd {
        login: String,
        #[command(flatten)]
        password: PasswordInput,
    },
    /// Refuse the user's logins from now on.
    Disable { login: String },
    /// Allow the user's logins again.
    Enable { login: String },
    /// Delete a user (their mail stays on the backend).
    Remove { login: String },
    /// Show one user.
    Show { login: String },
    /// List all users.
    List,
    /// Assign a user to a backend (`--none` clears it: placed at next login).
    Assign {
        login: String,
        backend: Option<String>,
        #[arg(long, conflicts_with = "backend")]
        none: bool,
    },
    /// Set (or with `--none` clear) the backend used when the user's is down.
    Fallback {
        login: String,
        backend: Option<String>,
        #[arg(long, conflicts_with = "backend")]
        none: bool,
    },
    /// Add another login name for a user.
    AliasAdd { alias: String, login: String },
    /// Remove a login name.
    AliasRemove { alias: String },
    /// Set the helpdesk note.
    Note { login: String, note: Option<String> },
    /// Move a user to another backend: hold their new logins, change the
    /// assignment, end their live sessions on every server, release the
    /// hold. Their next login goes to the new backend. (Copying the mail
    /// itself, e.g. with doveadm sync, is done before this.)
    Move {
        login: String,
        backend: String,
        /// How long logins are held while every server applies the move.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend.
    Add {
        name: String,
        #[command(flatten)]
        fields: BackendArgs,
    },
    /// Change a backend's settings.
    Set {
        name: String,
        #[command(flatten)]
        fields: BackendArgs,
    },
    /// List backends.
    List,
    /// Remove a backend that serves nobody.
    Remove { name: String },
    /// Stop placing new users on a backend (state draining); with
    /// `--kick-over`, also end its live sessions spread over that time.
    Drain {
        name: String,
        #[arg(long, value_parser = humantime::parse_duration)]
        kick_over: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Host name or IP address.
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub imap_port: Option<u16>,
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub submission_port: Option<u16>,
    /// How usher reaches the backend.
    #[arg(long)]
    pub tls: Option<TlsArg>,
    /// CA bundle for this backend's certificate.
    #[arg(long)]
    pub ca: Option<String>,
    /// How usher logs in to the backend.
    #[arg(long)]
    pub login: Option<LoginArg>,
    /// How the client address is forwarded.
    #[arg(long)]
    pub forward: Option<ForwardArg>,
    #[arg(long)]
    pub pool: Option<String>,
    #[arg(long)]
    pub site: Option<String>,
    #[arg(long)]
    pub weight: Option<u32>,
    /// Whether the backend takes new work.
    #[arg(long)]
    pub state: Option<StateArg>,
}

// The values below are spelt as the store's schema spells them (its CHECK
// constraints); clap lists them when a value is wrong.

/// `--tls`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TlsArg {
    /// Cleartext only.
    None,
    /// Cleartext, upgraded with STARTTLS.
    Starttls,
    /// TLS from the first byte (993, 465).
    Implicit,
}

/// `--login`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LoginArg {
    /// SASL PLAIN as the configured master user.
    Master,
    /// The client's own password.
    Passthrough,
}

/// `--forward`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ForwardArg {
    /// Not forwarded.
    None,
    /// IMAP ID (and XCLIENT on submission).
    Id,
    /// XCLIENT (and IMAP ID on IMAP).
    Xclient,
    /// A PROXY protocol v2 header.
    Proxy,
}

/// `--state`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Takes new users and sessions.
    Active,
    /// Keeps its users; no new ones are placed there.
    Draining,
    /// Takes nothing.
    Disabled,
}

/// The spelling the store keeps for a command-line value.
fn spelling(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

impl BackendArgs {
    /// Whether no setting was given.
    fn is_empty(&self) -> bool {
        self.host.is_none()
            && self.imap_port.is_none()
            && self.submission_port.is_none()
            && self.tls.is_none()
            && self.ca.is_none()
            && self.login.is_none()
            && self.forward.is_none()
            && self.pool.is_none()
            && self.site.is_none()
            && self.weight.is_none()
            && self.state.is_none()
    }
}

impl From<BackendArgs> for BackendFields {
    fn from(a: BackendArgs) -> BackendFields {
        BackendFields {
            host: a.host,
            imap_port: a.imap_port,
            submission_port: a.submission_port,
            tls: a.tls.map(spelling),
            ca_file: a.ca,
            login: a.login.map(spelling),
            forward: a.forward.map(spelling),
            pool: a.pool,
            site: a.site,
            weight: a.weight,
            state: a.state.map(spelling),
        }
    }
}

/// `--client`: an IP address, which is what the session registry matches.
fn client_ip(s: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    match s.parse::<SocketAddr>() {
        Ok(addr) => Err(format!(
            "not an IP address: give it without the port, e.g. {}",
            addr.ip()
        )),
        Err(_) => Err("not an IP address (e.g. 192.0.2.7 or 2001:db8::7)".into()),
    }
}

/// Reads a password from stdin (one line) or from a confirmed prompt.
fn read_password(input: &PasswordInput) -> anyhow::Result<Vec<u8>> {
    let password = if input.password_stdin || !std::io::stdin().is_terminal() {
        let mut line = Vec::new();
        if std::io::stdin().lock().read_until(b'\n', &mut line)? == 0 {
            bail!("no password on stdin");
        }
        if line.ends_with(b"\n") {
            line.pop();
            if line.ends_with(b"\r") {
                line.pop();
            }
        }
        line
    } else {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first.into_bytes()
    };
    if password.is_empty() {
        bail!("empty password");
    }
    if password.iter().any(u8::is_ascii_control) {
        bail!("the password contains control characters");
    }
    Ok(password)
}

/// Runs a helpdesk command.
pub async fn run(config: &Config, command: Command) -> anyhow::Result<()> {
    if let Command::Hash(input) = &command {
        println!("{}", hash_password(&config.auth, &read_password(input)?));
        return Ok(());
    }
    match command {
        Command::Sessions { admin } => return sessions(config, &admin),
        Command::Kick {
            user,
            backend,
            client,
            admin,
        } => {
            let request = KickRequest {
                user,
                backend,
                client: client.map(|ip| ip.to_string()),
            };
            return kick(config, &admin, &request).await;
        }
        _ => {}
    }
    let store = open_store(config).await?;
    match command {
        Command::User(cmd) => user(config, &store, cmd).await,
        Command::Backend(cmd) => backend(&store, cmd).await,
        _ => Ok(()),
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::open(config.store.url.expose())
        .await
        .context("opening the store")
}

/// A running server's admin endpoint.
struct AdminEndpoint {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminEndpoint {
    fn new(config: &Config, args: &AdminArgs) -> anyhow::Result<AdminEndpoint> {
        let admin = config
            .admin
            .as_ref()
            .context("the config has no [admin] section: no running server to ask")?;
        let addr = args.admin.unwrap_or(admin.address);
        // Statuses are read here, so that an error answer's text is shown.
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Ok(AdminEndpoint {
            base: format!("http://{addr}"),
            token: admin.token.expose().clone(),
            agent,
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let sent = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.answer(sent)
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        let sent = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.answer(sent)
    }

    /// The JSON of a 2xx answer; anything else as an error that carries the
    /// server's own text, which says what it did not like.
    fn answer<T: DeserializeOwned>(
        &self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let base = &self.base;
        let mut response =
            sent.map_err(|e| anyhow!("{base}: cannot reach the running server: {e}"))?;
        let status = response.status();
        if status == ureq::http::StatusCode::UNAUTHORIZED {
            bail!("{base}: the admin token was refused (check admin.token)");
        }
        if !status.is_success() {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            match text.trim() {
                "" => bail!("{base}: the server answered {status}"),
                text => bail!("{base}: the server answered {status}: {text}"),
            }
        }
        response
            .body_mut()
            .read_json()
            .with_context(|| format!("{base}: reading the server's answer"))
    }
}

fn sessions(config: &Config, args: &AdminArgs) -> anyhow::Result<()> {
    let list: Vec<SessionView> = AdminEndpoint::new(config, args)?.get("/sessions")?;
    let now = unix_now().as_secs();
    println!(
        "{:<8} {:<32} {:<12} {:<24} {:<14} {:>8} {:>12} {:>12}",
        "ID", "USER", "BACKEND", "CLIENT", "LISTENER", "AGE", "UP", "DOWN"
    );
    for s in &list {
        println!(
            "{:<8} {:<32} {:<12} {:<24} {:<14} {:>7}s {:>12} {:>12}",
            s.id,
            s.user,
            s.backend,
            s.client,
            s.listener,
            now.saturating_sub(s.started),
            s.bytes_up,
            s.bytes_down
        );
    }
    println!("{} session(s)", list.len());
    Ok(())
}

async fn kick(config: &Config, args: &AdminArgs, request: &KickRequest) -> anyhow::Result<()> {
    let given = [&request.user, &request.backend, &request.client]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if given != 1 {
        bail!("name exactly one of --user, --backend, --client");
    }
    let reply: KickReply = AdminEndpoint::new(config, args)?.post("/kick", request)?;
    if reply.kicked > 0 {
        println!("ended {} session(s)", reply.kicked);
        return Ok(());
    }
    // Nothing ended. The server takes any name (a removed user may still
    // be connected), so a name the store does not know either is most
    // likely a typo: say so, and fail.
    if let Some(client) = &request.client {
        println!("no live session from client {client}");
        return Ok(());
    }
    let store = open_store(config).await?;
    if let Some(login) = &request.user {
        let user = existing_user(&store, login).await?;
        println!("no live session of user {}", user.login);
    } else if let Some(name) = &request.backend {
        store.backend(name).await?;
        println!("no live session on backend {name}");
    }
    Ok(())
}

/// The user `login` names (a login or an alias), or "no such user".
async fn existing_user(store: &Store, login: &str) -> anyhow::Result<User> {
    let user = store.find_user(login).await?;
    Ok(user.ok_or_else(|| StoreError::NoUser(canonical_login(login)))?)
}

/// When the running servers end a user's sessions after a change: at
/// their next read of the change feed.
fn sessions_end(config: &Config) -> String {
    let wait = config.store.follow_interval;
    if wait <= Duration::from_secs(1) {
        "live sessions end within a second".into()
    } else {
        format!(
            "live sessions end within {}",
            humantime::format_duration(wait)
        )
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `usher user import`: see [`UserCommand::Import`]. Every line is
/// checked before anything is added, and a bad one is named by its number.
async fn import_users(
    config: &Config,
    store: &Store,
    backend: Option<&str>,
    hashed: bool,
) -> anyhow::Result<usize> {
    if let Some(name) = backend {
        store.backend(name).await?;
    }
    let mut users = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("stdin line {n}"))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (login, password) = import_line(store, line, &seen)
            .await
            .with_context(|| format!("stdin line {n}"))?;
        let hash = if hashed {
            if !crate::auth::is_supported(password) {
                bail!("stdin line {n}: not a hash scheme usher can verify");
            }
            password.to_string()
        } else {
            hash_password(&config.auth, password.as_bytes())
        };
        seen.insert(login.clone(), n);
        users.push((login, hash));
    }
    store.add_users(&users, backend).await?;
    Ok(users.len())
}

/// One line of an import: the canonical login, new to the store and to the
/// lines before (`seen`, by line number), and the password.
async fn import_line<'a>(
    store: &Store,
    line: &'a str,
    seen: &HashMap<String, usize>,
) -> anyhow::Result<(String, &'a str)> {
    let Some((login, password)) = line.split_once(' ') else {
        bail!("expected a login, a space and a password");
    };
    let login = canonical_login(login);
    validate_login(&login)?;
    if let Some(first) = seen.get(&login) {
        bail!("{login} is already on line {first}");
    }
    match store.find_user(&login).await? {
        Some(u) if u.login == login => bail!("{login} already exists"),
        Some(u) => bail!("{login} already exists as an alias of {}", u.login),
        None => {}
    }
    if password.is_empty() || password.chars().any(|c| c.is_control()) {
        bail!("the password is empty or has control characters");
    }
    Ok((login, password))
}

/// `usher user move`: see [`UserCommand::Move`].
async fn move_user(
    config: &Config,
    store: &Store,
    login: &str,
    backend: &str,
    hold: Duration,
) -> anyhow::Result<()> {
    let user = existing_user(store, login).await?;
    let target = store.backend(backend).await?;
    if target.state == BackendState::Disabled {
        bail!("backend {backend} is disabled");
    }
    if user.backend.as_deref() == Some(backend) {
        println!("{} is already on {backend}", user.login);
        return Ok(());
    }
    // Every server must see the move before the hold ends: two reads of
    // the change feed at least.
    let settle = hold.max(config.store.follow_interval * 2);
    let until = unix_now() + settle + Duration::from_secs(2);
    store
        .set_hold(&user.login, Some(until.as_millis() as i64))
        .await?;
    let moved = store.assign(&user.login, Some(backend)).await;
    tokio::time::sleep(settle).await;
    store.set_hold(&user.login, None).await?;
    moved?;
    println!(
        "moved {} from {} to {backend}",
        user.login,
        user.backend.as_deref().unwrap_or("(unplaced)")
    );
    Ok(())
}

async fn user(config: &Config, store: &Store, cmd: UserCommand) -> anyhow::Result<()> {
    let ends = sessions_end(config);
    match cmd {
        UserCommand::Add {
            login,
            backend,
            password,
        } => add_user(config, store, &login, backend.as_deref(), &password).await?,
        UserCommand::Import { backend, hashed } => {
            let n = import_users(config, store, backend.as_deref(), hashed).await?;
            println!("added {n} user(s)");
        }
        UserCommand::Passwd { login, password } => {
            // Asked only once the user is known to exist.
            let user = existing_user(store, &login).await?;
            let hash = hash_password(&config.auth, &read_password(&password)?);
            store.set_password(&user.login, &hash).await?;
            println!("password changed for {}; {ends}", user.login);
        }
        UserCommand::Disable { login } => {
            let user = existing_user(store, &login).await?;
            store.set_enabled(&user.login, false).await?;
            println!("disabled {}; {ends}", user.login);
        }
        UserCommand::Enable { login } => {
            let user = existing_user(store, &login).await?;
            store.set_enabled(&user.login, true).await?;
            println!("enabled {}", user.login);
        }
        UserCommand::Remove { login } => {
            let user = existing_user(store, &login).await?;
            store.remove_user(&user.login).await?;
            match &user.backend {
                Some(b) => println!("removed {} (the mail stays on {b}); {ends}", user.login),
                None => println!("removed {}; {ends}", user.login),
            }
        }
        UserCommand::Show { login } => show_user(store, &login).await?,
        UserCommand::List => {
            println!(
                "{:<40} {:<8} {:<16} FALLBACK",
                "LOGIN", "ENABLED", "BACKEND"
            );
            for u in store.list_users().await? {
                println!(
                    "{:<40} {:<8} {:<16} {}",
                    u.login,
                    if u.enabled { "yes" } else { "no" },
                    u.backend.as_deref().unwrap_or("-"),
                    u.fallback.as_deref().unwrap_or("-"),
                );
            }
        }
        UserCommand::Assign {
            login,
            backend,
            none,
        } => {
            if backend.is_none() && !none {
                bail!("name a backend, or --none to clear the assignment");
            }
            let user = existing_user(store, &login).await?;
            store.assign(&user.login, backend.as_deref()).await?;
            match backend {
                Some(b) => println!("assigned {} to {b}; {ends}", user.login),
                None => println!(
                    "{} is unassigned and placed at the next login; {ends}",
                    user.login
                ),
            }
        }
        UserCommand::Fallback {
            login,
            backend,
            none,
        } => {
            if backend.is_none() && !none {
                bail!("name a backend, or --none to clear the fallback");
            }
            let user = existing_user(store, &login).await?;
            store.set_fallback(&user.login, backend.as_deref()).await?;
            let own = user.backend.as_deref().unwrap_or("its backend");
            match backend {
                Some(b) => println!("{} falls back to {b} while {own} is down", user.login),
                None => println!("cleared the fallback of {}", user.login),
            }
        }
        UserCommand::AliasAdd { alias, login } => {
            store.add_alias(&alias, &login).await?;
            let user = existing_user(store, &login).await?;
            let alias = canonical_login(&alias);
            println!("{alias} is now an alias of {}", user.login);
        }
        UserCommand::AliasRemove { alias } => {
            let user = store.find_user(&alias).await?;
            store.remove_alias(&alias).await?;
            let alias = canonical_login(&alias);
            match user {
                Some(u) => println!("removed alias {alias} of {}", u.login),
                None => println!("removed alias {alias}"),
            }
        }
        UserCommand::Note { login, note } => {
            let user = existing_user(store, &login).await?;
            store.set_note(&user.login, note.as_deref()).await?;
            match note {
                Some(_) => println!("set the note of {}", user.login),
                None => println!("cleared the note of {}", user.login),
            }
        }
        UserCommand::Move {
            login,
            backend,
            hold,
        } => move_user(config, store, &login, &backend, hold).await?,
    }
    Ok(())
}

/// `usher user add`: the login and backend are checked before the password
/// is asked for.
async fn add_user(
    config: &Config,
    store: &Store,
    login: &str,
    backend: Option<&str>,
    password: &PasswordInput,
) -> anyhow::Result<()> {
    let login = canonical_login(login);
    validate_login(&login)?;
    if store.find_user(&login).await?.is_some() {
        return Err(StoreError::Exists(login).into());
    }
    if let Some(name) = backend {
        store.backend(name).await?;
    }
    let hash = hash_password(&config.auth, &read_password(password)?);
    store.add_user(&login, &hash, backend).await?;
    match backend {
        Some(b) => println!("added {login} on {b}"),
        None => println!("added {login}; placed on a backend at the first login"),
    }
    Ok(())
}

async fn show_user(store: &Store, login: &str) -> anyhow::Result<()> {
    let u = existing_user(store, login).await?;
    println!("login:    {}", u.login);
    println!("enabled:  {}", if u.enabled { "yes" } else { "no" });
    println!("backend:  {}", u.backend.as_deref().unwrap_or("-"));
    println!("fallback: {}", u.fallback.as_deref().unwrap_or("-"));
    println!("pool:     {}", u.pool);
    println!("aliases:  {}", store.aliases_of(u.id).await?.join(", "));
    println!("note:     {}", u.note.as_deref().unwrap_or(""));
    println!("version:  {}", u.version);
    Ok(())
}

async fn backend(store: &Store, cmd: BackendCommand) -> anyhow::Result<()> {
    match cmd {
        BackendCommand::Add { name, fields } => {
            store.add_backend(&name, &fields.into()).await?;
            println!("added backend {name}");
        }
        BackendCommand::Set { name, fields } => {
            if fields.is_empty() {
                bail!("name a setting to change, e.g. --weight 200 (see --help)");
            }
            store.set_backend(&name, &fields.into()).await?;
            println!("changed backend {name}");
        }
        BackendCommand::Remove { name } => {
            store.remove_backend(&name).await?;
            println!("removed backend {name}");
        }
        BackendCommand::Drain { name, kick_over } => {
            let draining = BackendFields {
                state: Some("draining".into()),
                ..Default::default()
            };
            store.set_backend(&name, &draining).await?;
            println!("{name} is draining: no new users are placed there");
            if let Some(spread) = kick_over {
                let detail = spread.as_secs_f64().to_string();
                store.event(Change::Drain, &name, Some(&detail)).await?;
                println!(
                    "its sessions end over {}",
                    humantime::format_duration(spread)
                );
            }
        }
        BackendCommand::List => {
            println!(
                "{:<12} {:<22} {:<6} {:<6} {:<9} {:<12} {:<10} {:<6} STATE",
                "NAME", "HOST", "IMAP", "SUBM", "TLS", "LOGIN", "POOL", "WEIGHT"
            );
            for b in store.list_backends().await? {
                let port = |p: Option<u16>| p.map_or("-".to_string(), |p| p.to_string());
                println!(
                    "{:<12} {:<22} {:<6} {:<6} {:<9} {:<12} {:<10} {:<6} {:?}",
                    b.name,
                    b.host,
                    port(b.imap_port),
                    port(b.submission_port),
                    b.tls_name(),
                    format!("{:?}", b.login).to_lowercase(),
                    b.pool,
                    b.weight,
                    b.state,
                );
            }
        }
    }
    Ok(())
}
