//! The command line: `usher serve` and the helpdesk commands that work on
//! the same store as the running servers.
//!
//! Passwords never come from argv (they would show in `ps` and shell
//! history): they are read from a prompt, or from stdin with
//! `--password-stdin`.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::auth::hash_password;
use crate::config::Config;
use crate::store::{BackendFields, Store};

#[derive(Debug, Parser)]
#[command(
    name = "usher",
    version,
    about = "IMAP front-end proxy: one front door for many mail backends"
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
    let store = Store::open(config.store.url.expose())
        .await
        .context("opening the store")?;
    match command {
        Command::User(cmd) => user(config, &store, cmd).await,
        Command::Backend(cmd) => backend(&store, cmd).await,
        Command::Serve { .. } | Command::CheckConfig | Command::Hash(_) => Ok(()),
    }
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
