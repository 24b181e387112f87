//! The command line: `usher serve` and the helpdesk commands that work on
//! the same store as the running servers.
//!
//! Passwords never come from argv (they would show in `ps` and shell
//! history): they are read from a prompt, or from stdin with
//! `--password-stdin`.

use std::io::{BufRead, IsTerminal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::admin::{KickReply, KickRequest};
use crate::auth::hash_password;
use crate::config::Config;
use crate::sessions::SessionView;
use crate::store::{BackendFields, BackendState, Change, Store};

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
    /// address (admin endpoint).
    Kick {
        #[arg(long, group = "which")]
        user: Option<String>,
        #[arg(long, group = "which")]
        backend: Option<String>,
        /// Client IP address.
        #[arg(long, group = "which")]
        client: Option<String>,
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
    #[arg(long)]
    pub imap_port: Option<u16>,
    #[arg(long)]
    pub submission_port: Option<u16>,
    /// none, starttls or implicit.
    #[arg(long)]
    pub tls: Option<String>,
    /// CA bundle for this backend's certificate.
    #[arg(long)]
    pub ca: Option<String>,
    /// master or passthrough.
    #[arg(long)]
    pub login: Option<String>,
    /// How the client address is forwarded: id, xclient, proxy or none.
    #[arg(long)]
    pub forward: Option<String>,
    #[arg(long)]
    pub pool: Option<String>,
    #[arg(long)]
    pub site: Option<String>,
    #[arg(long)]
    pub weight: Option<u32>,
    /// active, draining or disabled.
    #[arg(long)]
    pub state: Option<String>,
}

impl From<BackendArgs> for BackendFields {
    fn from(a: BackendArgs) -> BackendFields {
        BackendFields {
            host: a.host,
            imap_port: a.imap_port,
            submission_port: a.submission_port,
            tls: a.tls,
            ca_file: a.ca,
            login: a.login,
            forward: a.forward,
            pool: a.pool,
            site: a.site,
            weight: a.weight,
            state: a.state,
        }
    }
}

/// Reads a password from stdin (one line) or from a confirmed prompt.
fn read_password(input: &PasswordInput) -> anyhow::Result<Vec<u8>> {
    let password = if input.password_stdin || !std::io::stdin().is_terminal() {
        let mut line = Vec::new();
        std::io::stdin().lock().read_until(b'\n', &mut line)?;
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
                client,
            };
            return kick(config, &admin, &request);
        }
        _ => {}
    }
    let store = Store::open(config.store.url.expose())
        .await
        .context("opening the store")?;
    match command {
        Command::User(cmd) => user(config, &store, cmd).await,
        Command::Backend(cmd) => backend(&store, cmd).await,
        _ => Ok(()),
    }
}

/// The admin endpoint's base URL and token.
fn admin_endpoint(config: &Config, args: &AdminArgs) -> anyhow::Result<(String, String)> {
    let admin = config
        .admin
        .as_ref()
        .context("the config has no [admin] section: no running server to ask")?;
    let addr = args.admin.unwrap_or(admin.address);
    Ok((format!("http://{addr}"), admin.token.expose().clone()))
}

fn admin_error(base: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::StatusCode(401) => {
            anyhow::anyhow!("{base}: the admin token was refused (check admin.token)")
        }
        ureq::Error::StatusCode(code) => anyhow::anyhow!("{base}: the server answered {code}"),
        other => anyhow::anyhow!("{base}: cannot reach the running server: {other}"),
    }
}

fn sessions(config: &Config, args: &AdminArgs) -> anyhow::Result<()> {
    let (base, token) = admin_endpoint(config, args)?;
    let list: Vec<SessionView> = ureq::get(format!("{base}/sessions"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .map_err(|e| admin_error(&base, e))?
        .body_mut()
        .read_json()?;
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

fn kick(config: &Config, args: &AdminArgs, request: &KickRequest) -> anyhow::Result<()> {
    let given = [&request.user, &request.backend, &request.client]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if given != 1 {
        bail!("name exactly one of --user, --backend, --client");
    }
    let (base, token) = admin_endpoint(config, args)?;
    let reply: KickReply = ureq::post(format!("{base}/kick"))
        .header("Authorization", format!("Bearer {token}"))
        .send_json(request)
        .map_err(|e| admin_error(&base, e))?
        .body_mut()
        .read_json()?;
    println!("ended {} session(s)", reply.kicked);
    Ok(())
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `usher user import`: see [`UserCommand::Import`].
async fn import_users(
    config: &Config,
    store: &Store,
    backend: Option<&str>,
    hashed: bool,
) -> anyhow::Result<usize> {
    let mut users = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}", i + 1))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((login, password)) = line.split_once(' ') else {
            bail!(
                "stdin line {}: expected a login, a space and a password",
                i + 1
            );
        };
        if password.is_empty() || password.chars().any(|c| c.is_control()) {
            bail!(
                "stdin line {}: the password is empty or has control characters",
                i + 1
            );
        }
        let hash = if hashed {
            if !crate::auth::is_supported(password) {
                bail!("stdin line {}: not a hash scheme usher can verify", i + 1);
            }
            password.to_string()
        } else {
            hash_password(&config.auth, password.as_bytes())
        };
        users.push((login.to_string(), hash));
    }
    store.add_users(&users, backend).await?;
    Ok(users.len())
}

/// `usher user move`: see [`UserCommand::Move`].
async fn move_user(
    config: &Config,
    store: &Store,
    login: &str,
    backend: &str,
    hold: Duration,
) -> anyhow::Result<()> {
    let user = store
        .find_user(login)
        .await?
        .with_context(|| format!("no such user: {login}"))?;
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
    match cmd {
        UserCommand::Add {
            login,
            backend,
            password,
        } => {
            let hash = hash_password(&config.auth, &read_password(&password)?);
            store.add_user(&login, &hash, backend.as_deref()).await?;
            println!("added {login}");
        }
        UserCommand::Import { backend, hashed } => {
            let n = import_users(config, store, backend.as_deref(), hashed).await?;
            println!("added {n} user(s)");
        }
        UserCommand::Passwd { login, password } => {
            let hash = hash_password(&config.auth, &read_password(&password)?);
            store.set_password(&login, &hash).await?;
            println!("password changed for {login}");
        }
        UserCommand::Disable { login } => store.set_enabled(&login, false).await?,
        UserCommand::Enable { login } => store.set_enabled(&login, true).await?,
        UserCommand::Remove { login } => store.remove_user(&login).await?,
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
            store.assign(&login, backend.as_deref()).await?;
        }
        UserCommand::Fallback {
            login,
            backend,
            none,
        } => {
            if backend.is_none() && !none {
                bail!("name a backend, or --none to clear the fallback");
            }
            store.set_fallback(&login, backend.as_deref()).await?;
        }
        UserCommand::AliasAdd { alias, login } => store.add_alias(&alias, &login).await?,
        UserCommand::AliasRemove { alias } => store.remove_alias(&alias).await?,
        UserCommand::Note { login, note } => store.set_note(&login, note.as_deref()).await?,
        UserCommand::Move {
            login,
            backend,
            hold,
        } => move_user(config, store, &login, &backend, hold).await?,
    }
    Ok(())
}

async fn show_user(store: &Store, login: &str) -> anyhow::Result<()> {
    let u = store
        .find_user(login)
        .await?
        .with_context(|| format!("no such user: {login}"))?;
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
        BackendCommand::Add { name, fields } => store.add_backend(&name, &fields.into()).await?,
        BackendCommand::Set { name, fields } => store.set_backend(&name, &fields.into()).await?,
        BackendCommand::Remove { name } => store.remove_backend(&name).await?,
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
