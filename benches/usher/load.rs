//! The load generator: real IMAP and SMTP clients over TCP (or TLS), one
//! scenario per run, bounded by a deadline and a count.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::procfs;

/// The password every benchmark user has.
pub const PASSWORD: &str = "bench-password";

/// Longest any single protocol step may take before the run counts an error.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// No scenario loops more often than this, whatever the deadline.
const MAX_OPS: u64 = 10_000_000;

/// The name of benchmark user `i`.
pub fn user(i: usize) -> String {
    format!("bench{i}@example.com")
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// connect, LOGIN, SELECT INBOX, LOGOUT in a loop.
    Login,
    /// FETCH one large message in a loop.
    Fetch,
    /// Hold many sessions in IDLE; memory per session.
    Idle,
    /// AUTH once, then send messages in a loop.
    Submit,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Login => "login",
            Scenario::Fetch => "fetch",
            Scenario::Idle => "idle",
            Scenario::Submit => "submit",
        }
    }
}

/// Where the clients connect: user `i` goes to `addrs[i % addrs.len()]`
/// (the user's own backend when connecting directly).
#[derive(Clone)]
pub struct Target {
    pub addrs: Vec<SocketAddr>,
    pub tls: Option<TlsConnector>,
}

impl Target {
    fn addr(&self, user: usize) -> SocketAddr {
        self.addrs[user % self.addrs.len()]
    }
}

/// What one run does.
#[derive(Clone)]
pub struct Params {
    pub scenario: Scenario,
    pub target: Target,
    /// Users bench0 … bench{users-1}.
    pub users: usize,
    pub duration: Duration,
    /// Concurrent clients (login, submit).
    pub concurrency: usize,
    /// Sessions to hold (idle).
    pub sessions: usize,
    /// Message size for submit.
    pub message_bytes: usize,
    /// Processes (with their trees) whose CPU and memory are measured.
    pub watch: Vec<u32>,
    /// The backends' processes, whose CPU is measured apart.
    pub backends: Vec<u32>,
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub scenario: &'static str,
    /// Completed operations: logins, fetches, sessions held, messages.
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Payload bytes received (fetch).
    pub bytes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds of the watched trees during the run.
    pub cpu_s: f64,
    /// CPU seconds of the backends' trees during the run.
    pub backend_cpu_s: f64,
    /// Resident memory of the watched trees per held session (idle).
    pub kib_per_session: f64,
}

impl Figures {
    /// Operations per second (MB/s for fetch).
    pub fn rate(&self) -> f64 {
        if self.seconds <= 0.0 {
            return 0.0;
        }
        match self.scenario {
            "fetch" => self.bytes as f64 / 1e6 / self.seconds,
            _ => self.ops as f64 / self.seconds,
        }
    }

    /// The unit of [`Figures::rate`].
    pub fn unit(&self) -> &'static str {
        match self.scenario {
            "login" => "logins/s",
            "fetch" => "MB/s",
            "idle" => "sessions",
            _ => "msgs/s",
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scenario={} rate={:.1} unit={} ops={} errors={} seconds={:.2} bytes={} \
             p50_ms={:.2} p99_ms={:.2} cpu_s={:.2} backend_cpu_s={:.2} kib_per_session={:.2}",
            self.scenario,
            self.rate(),
            self.unit(),
            self.ops,
            self.errors,
            self.seconds,
            self.bytes,
            self.p50_ms,
            self.p99_ms,
            self.cpu_s,
            self.backend_cpu_s,
            self.kib_per_session,
        )
    }
}

/// Runs one scenario and returns its figures.
pub async fn run(p: &Params) -> anyhow::Result<Figures> {
    let cpu_before = procfs::cpu_seconds(&p.watch);
    let backend_before = procfs::cpu_seconds(&p.backends);
    let mut figures = match p.scenario {
        Scenario::Login => login(p).await,
        Scenario::Fetch => fetch(p).await?,
        Scenario::Idle => idle(p).await?,
        Scenario::Submit => submit(p).await,
    };
    figures.scenario = p.scenario.name();
    figures.cpu_s = procfs::cpu_seconds(&p.watch) - cpu_before;
    figures.backend_cpu_s = procfs::cpu_seconds(&p.backends) - backend_before;
    Ok(figures)
}

// ---------------------------------------------------------------- clients

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One client connection with a line reader.
struct Conn {
    io: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
}

impl Conn {
    async fn open(target: &Target, user: usize, buffer: usize) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(target.addr(user)).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &target.tls {
            Some(tls) => {
                let name = ServerName::try_from("localhost").expect("static name");
                Box::new(tls.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        Ok(Conn {
            io: BufReader::with_capacity(buffer, io),
            line: Vec::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        self.io.get_mut().flush().await?;
        Ok(())
    }

    /// The next line, CRLF included; an error at end of stream.
    async fn read_line(&mut self) -> anyhow::Result<&[u8]> {
        self.line.clear();
        if self.io.read_until(b'\n', &mut self.line).await? == 0 {
            bail!("connection closed");
        }
        Ok(&self.line)
    }

    /// Reads up to the tagged reply to `tag`; fails unless it is OK.
    /// Literals in untagged replies are skipped; returns their total size.
    async fn tagged(&mut self, tag: &str) -> anyhow::Result<u64> {
        let mut literal_bytes = 0;
        loop {
            let line = self.read_line().await?;
            if let Some(n) = literal_size(line) {
                let copied =
                    tokio::io::copy(&mut (&mut self.io).take(n), &mut tokio::io::sink()).await?;
                if copied != n {
                    bail!("connection closed inside a literal");
                }
                literal_bytes += n;
                continue;
            }
            if let Some(rest) = line.strip_prefix(tag.as_bytes()) {
                if rest.starts_with(b" OK") {
                    return Ok(literal_bytes);
                }
                bail!("{tag}: {}", String::from_utf8_lossy(rest).trim());
            }
        }
    }

    /// Reads an SMTP reply (all its lines); fails unless it starts with `want`.
    async fn reply(&mut self, want: u8) -> anyhow::Result<()> {
        loop {
            let line = self.read_line().await?;
            if line.len() < 4 || line[3] == b' ' {
                if line.first() != Some(&want) {
                    bail!("SMTP: {}", String::from_utf8_lossy(line).trim());
                }
                return Ok(());
            }
        }
    }

    /// Greeting, LOGIN and SELECT INBOX.
    async fn imap_login(&mut self, user: usize) -> anyhow::Result<()> {
        self.read_line().await?;
        let login = format!("a LOGIN {} {PASSWORD}\r\n", self::user(user));
        self.send(login.as_bytes()).await?;
        self.tagged("a").await?;
        self.send(b"b SELECT INBOX\r\n").await?;
        self.tagged("b").await?;
        Ok(())
    }
}

/// `n` if `line` ends with a literal announcement `{n}\r\n`.
fn literal_size(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&body[open + 1..]).ok()?.parse().ok()
}

async fn step<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

// ---------------------------------------------------------------- login

async fn login(p: &Params) -> Figures {
    let deadline = Instant::now() + p.duration;
    let next_user = Arc::new(AtomicUsize::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..p.concurrency {
        let (p, next_user, ops, errors) =
            (p.clone(), next_user.clone(), ops.clone(), errors.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline && ops.load(Ordering::Relaxed) < MAX_OPS {
                let user = next_user.fetch_add(1, Ordering::Relaxed) % p.users;
                let began = Instant::now();
                match step(login_once(&p.target, user)).await {
                    Ok(()) => {
                        latencies.push(began.elapsed().as_secs_f64() * 1e3);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("login: first error: {e:#}");
                        }
                    }
                }
            }
            latencies
        });
    }
    let mut latencies: Vec<f64> = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.unwrap_or_default());
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Figures {
        ops: ops.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        ..Figures::default()
    }
}

async fn login_once(target: &Target, user: usize) -> anyhow::Result<()> {
    let mut c = Conn::open(target, user, 4096).await?;
    c.imap_login(user).await?;
    c.send(b"c LOGOUT\r\n").await?;
    c.tagged("c").await?;
    Ok(())
}

/// The value at fraction `q` of sorted `values` (0 when empty).
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i]
}

// ---------------------------------------------------------------- fetch

/// User whose INBOX holds the large message (see [`append_large`]).
pub const FETCH_USER: usize = 0;

async fn fetch(p: &Params) -> anyhow::Result<Figures> {
    let mut c = Conn::open(&p.target, FETCH_USER, 256 * 1024).await?;
    step(c.imap_login(FETCH_USER))
        .await
        .context("fetch login")?;
    let start = Instant::now();
    let deadline = start + p.duration;
    let mut figures = Figures::default();
    while Instant::now() < deadline && figures.ops < MAX_OPS {
        c.send(b"f FETCH 1 BODY.PEEK[]\r\n").await?;
        let bytes = step(c.tagged("f")).await.context("fetch")?;
        if bytes == 0 {
            bail!("the INBOX of {} holds no message", user(FETCH_USER));
        }
        figures.bytes += bytes;
        figures.ops += 1;
    }
    figures.seconds = start.elapsed().as_secs_f64();
    c.send(b"z LOGOUT\r\n").await?;
    Ok(figures)
}

/// Appends a message of about `bytes` to the fetch user's INBOX (through
/// `target`, normally the backend directly), unless one is there already.
pub async fn append_large(target: &Target, bytes: usize) -> anyhow::Result<()> {
    let mut c = Conn::open(target, FETCH_USER, 64 * 1024).await?;
    c.imap_login(FETCH_USER).await?;
    c.send(b"s STATUS INBOX (MESSAGES)\r\n").await?;
    let held = loop {
        let line = c.read_line().await?.to_vec();
        if line.starts_with(b"* STATUS") {
            break !String::from_utf8_lossy(&line).contains("MESSAGES 0)");
        }
    };
    c.tagged("s").await?;
    if !held {
        let message = large_message(bytes);
        c.send(format!("p APPEND INBOX {{{}+}}\r\n", message.len()).as_bytes())
            .await?;
        c.send(&message).await?;
        c.send(b"\r\n").await?;
        c.tagged("p").await?;
    }
    c.send(b"z LOGOUT\r\n").await?;
    Ok(())
}

/// A plain-text message of about `bytes`, in 78-octet lines, none of which
/// starts with a dot.
pub fn large_message(bytes: usize) -> Vec<u8> {
    let mut m = b"From: bench@example.com\r\nTo: bench@example.com\r\n\
                  Subject: usher benchmark\r\n\r\n"
        .to_vec();
    let line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n";
    while m.len() + line.len() <= bytes {
        m.extend_from_slice(line);
    }
    m
}

// ---------------------------------------------------------------- idle

/// Sessions being opened at once.
const IDLE_OPENING: usize = 32;

async fn idle(p: &Params) -> anyhow::Result<Figures> {
    let before = procfs::rss_kib(&p.watch);
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(IDLE_OPENING));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..p.sessions {
        let (target, gate) = (p.target.clone(), gate.clone());
        let user = i % p.users;
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await;
            step(open_idle(&target, user)).await
        });
    }
    let mut held = Vec::with_capacity(p.sessions);
    let mut errors = 0;
    while let Some(done) = opening.join_next().await {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(conn) => held.push(conn),
            Err(e) => {
                if errors == 0 {
                    eprintln!("idle: first error: {e:#}");
                }
                errors += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // Let the proxies finish their hand-offs before looking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procfs::rss_kib(&p.watch);
    let ops = held.len() as u64;
    drop(held);
    Ok(Figures {
        ops,
        errors,
        seconds,
        kib_per_session: after.saturating_sub(before) as f64 / ops.max(1) as f64,
        ..Figures::default()
    })
}

async fn open_idle(target: &Target, user: usize) -> anyhow::Result<Conn> {
    let mut c = Conn::open(target, user, 512).await?;
    c.imap_login(user).await?;
    c.send(b"i IDLE\r\n").await?;
    loop {
        if c.read_line().await?.starts_with(b"+") {
            return Ok(c);
        }
    }
}

// ---------------------------------------------------------------- submit

async fn submit(p: &Params) -> Figures {
    let deadline = Instant::now() + p.duration;
    let message = Arc::new(dot_terminated(large_message(p.message_bytes)));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..p.concurrency {
        let (p, message, ops, errors) = (p.clone(), message.clone(), ops.clone(), errors.clone());
        workers.spawn(async move {
            let user = w % p.users;
            let result = async {
                let mut c = step(submit_login(&p.target, user)).await?;
                while Instant::now() < deadline && ops.load(Ordering::Relaxed) < MAX_OPS {
                    step(send_message(&mut c, user, &message)).await?;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                c.send(b"QUIT\r\n").await
            };
            if let Err(e) = result.await {
                if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("submit: first error: {e:#}");
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let ops = ops.load(Ordering::Relaxed);
    Figures {
        ops,
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        bytes: ops * message.len() as u64,
        ..Figures::default()
    }
}

/// Greeting, EHLO and AUTH PLAIN with an initial response.
async fn submit_login(target: &Target, user: usize) -> anyhow::Result<Conn> {
    let mut c = Conn::open(target, user, 4096).await?;
    c.reply(b'2').await?;
    c.send(b"EHLO bench.example.com\r\n").await?;
    c.reply(b'2').await?;
    let creds = format!("\0{}\0{PASSWORD}", self::user(user));
    let auth = base64::engine::general_purpose::STANDARD.encode(creds);
    c.send(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await?;
    c.reply(b'2').await?;
    Ok(c)
}

async fn send_message(c: &mut Conn, user: usize, message: &[u8]) -> anyhow::Result<()> {
    c.send(format!("MAIL FROM:<{}>\r\n", self::user(user)).as_bytes())
        .await?;
    c.reply(b'2').await?;
    c.send(b"RCPT TO:<sink@example.com>\r\n").await?;
    c.reply(b'2').await?;
    c.send(b"DATA\r\n").await?;
    c.reply(b'3').await?;
    c.send(message).await?;
    c.reply(b'2').await
}

fn dot_terminated(mut message: Vec<u8>) -> Vec<u8> {
    message.extend_from_slice(b".\r\n");
    message
}
