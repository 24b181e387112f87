//! The submission pre-AUTH server: greeting, EHLO/HELO, STARTTLS and AUTH,
//! then the hand-off to the relay.
//!
//! States, as the types carry them: cleartext or TLS ([`Stream`]); before
//! or after EHLO (`Front::hello`); the relay once the backend said `235`.
//!
//! ```text
//! greeting ─► EHLO ─► [STARTTLS ─► TLS ─► EHLO] ─► AUTH ─► backend login ─► 235 ─► relay
//! ```
//!
//! Invariants:
//! - bytes received after STARTTLS, in the same read or before the
//!   handshake, are never processed, and EHLO must be given again inside
//!   TLS (RFC 3207 §4.2, case C14);
//! - no password is taken on a cleartext connection unless the listener
//!   allows it: AUTH is not advertised and answers `538` (RFC 4954 §4);
//! - MAIL, RCPT, DATA and BDAT are refused before AUTH (RFC 6409 §4.3);
//!   a BDAT's chunk octets are skipped, never read as commands
//!   (RFC 3030 §2, case C33);
//! - bytes already buffered are consumed before the socket is read again,
//!   so pipelined commands and SASL responses never stall (RFC 2920 §3.1,
//!   cases C20, C21);
//! - `235` is sent only after the backend's `235`; bytes the client
//!   pipelined behind AUTH are kept, in order, and reach the backend
//!   exactly once, from the relay (case C20);
//! - credentials live only in the handler of one attempt: a cancelled,
//!   undecodable or failed exchange leaves nothing behind (case C11);
//! - the pre-AUTH phase has one absolute deadline (case C25), a line
//!   limit, and limits on errors and failed logins, each ending with one
//!   `421` line.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::backend::{self as smtp_backend, Identity, LoggedIn};
use super::parse::{
    frame_line, parse_command, parse_sasl_response, split_plain, trim_eol, Command, CommandError,
    Framed, Mechanism, SaslResponse,
};
use super::pool::{Candidates, Lease};
use super::reply::{self, Closing};
use crate::auth::Verdict;
use crate::backend::{BackendError, ClientAddrs};
use crate::config::{ListenerConfig, TlsMode};
use crate::metrics::{self, Outcome};
use crate::net::{accept_tls, Stream};
use crate::relay::{self, End, Relay};
use crate::route::RouteError;
use crate::secret::Secret;
use crate::server::{Conn, Served, Shared, Summary};
use crate::sessions::stopped;
use crate::store::{Backend, User};

/// Largest BDAT chunk usher skips before AUTH; no client has a reason to
/// send one at all.
const PRE_AUTH_CHUNK: u64 = 64 * 1024;

/// Client bytes kept while usher logs in at the backend: a pipelined
/// transaction of hundreds of RCPTs fits; past it the client waits.
const PIPELINE_BUFFER: usize = 256 * 1024;

/// What the pre-AUTH loop does after a command.
enum Next {
    Continue,
    Close,
    StartTls,
    Relay(Box<Handoff>),
}

/// Everything the relay takes over.
struct Handoff {
    logged_in: LoggedIn,
    user: User,
    backend: Backend,
    lease: Lease,
}

/// Why the pre-AUTH phase stopped reading.
enum Stop {
    /// The client went away or the socket failed.
    Gone,
    /// usher ended the session (and has said so to the client).
    Closed,
}

/// What the client said in EHLO/HELO.
struct Hello {
    domain: String,
    extended: bool,
}

/// Credentials from one SASL exchange.
type Credentials = (Vec<u8>, Secret<Vec<u8>>);

struct Front {
    shared: Arc<Shared>,
    conn_id: u64,
    listener: Arc<ListenerConfig>,
    stream: Stream,
    addrs: ClientAddrs,
    buf: Vec<u8>,
    deadline: Instant,
    hello: Option<Hello>,
    bad: u32,
    failures: u32,
    /// Turns `true` when the server stops (a farewell, then close).
    stop: watch::Receiver<bool>,
}

/// Serves one submission client connection up to its end, or up to the
/// relay, which it hands back to run in a task of its own.
pub async fn serve(shared: Arc<Shared>, conn: Conn) -> Served {
    let deadline = Instant::now() + shared.config.limits.prelogin_timeout;
    let shared_stop = shared.sessions.stop_signal();
    let mut front = Front {
        shared,
        conn_id: conn.id,
        listener: conn.listener,
        stream: conn.stream,
        addrs: conn.addrs,
        buf: Vec::new(),
        deadline,
        hello: None,
        bad: 0,
        failures: 0,
        stop: shared_stop,
    };
    let greeting = reply::greeting(front.hostname());
    if front.send(greeting.as_bytes()).await.is_err() {
        return Served::Done(Summary::default());
    }
    loop {
        match front.prelogin().await {
            Ok(Next::Relay(handoff)) => return Served::Relay(Box::pin(front.relay(*handoff))),
            Ok(Next::StartTls) => match front.starttls().await {
                Some(upgraded) => front = upgraded,
                None => return Served::Done(Summary::default()),
            },
            _ => return Served::Done(Summary::default()),
        }
    }
}

impl Front {
    fn hostname(&self) -> &str {
        &self.shared.config.hostname
    }

    fn line_limit(&self) -> usize {
        self.shared.config.limits.line_bytes
    }

    fn auth_allowed(&self) -> bool {
        self.stream.is_tls() || self.listener.plaintext_auth
    }

    fn starttls_offered(&self) -> bool {
        self.listener.tls == TlsMode::Starttls && !self.stream.is_tls()
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.stream.write_all(bytes).await.map_err(|_| Stop::Gone)?;
        self.stream.flush().await.map_err(|_| Stop::Gone)
    }

    /// Sends `text` and carries on.
    async fn reply(&mut self, text: &str) -> Result<Next, Stop> {
        self.send(text.as_bytes()).await?;
        Ok(Next::Continue)
    }

    /// Says why with `421` and ends the session.
    async fn close(&mut self, why: Closing) -> Stop {
        info!(reason = ?why, "usher ends the session");
        let line = why.line(self.hostname());
        let _ = self.send(line.as_bytes()).await;
        self.stream.linger_close().await;
        Stop::Closed
    }

    /// Answers a refused command; too many end the session.
    async fn error(&mut self, text: &str) -> Result<Next, Stop> {
        self.bad += 1;
        if self.bad >= self.shared.config.limits.bad_commands {
            return Err(self.close(Closing::TooManyErrors).await);
        }
        self.reply(text).await
    }

    /// Reads more bytes into the buffer, within the pre-AUTH deadline.
    async fn fill(&mut self) -> Result<(), Stop> {
        let mut chunk = [0u8; 4096];
        let read = tokio::select! {
            r = timeout_at(self.deadline, self.stream.read(&mut chunk)) => Some(r),
            _ = stopped(&mut self.stop) => None,
        };
        match read {
            None => Err(self.close(Closing::Shutdown).await),
            Some(Err(_)) => Err(self.close(Closing::Timeout).await),
            Some(Ok(Ok(0)) | Ok(Err(_))) => Err(Stop::Gone),
            Some(Ok(Ok(n))) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Takes the next whole line from the buffer, reading as needed.
    async fn next_line(&mut self) -> Result<Vec<u8>, Stop> {
        loop {
            match frame_line(&self.buf, self.line_limit()) {
                Framed::Line(n) => return Ok(self.buf.drain(..n).collect()),
                Framed::Incomplete => self.fill().await?,
                Framed::TooLong => return Err(self.close(Closing::LineTooLong).await),
            }
        }
    }

    /// Runs commands until AUTH succeeds, STARTTLS is accepted or the
    /// session ends.
    async fn prelogin(&mut self) -> Result<Next, Stop> {
        loop {
            let line = self.next_line().await?;
            match self.command(trim_eol(&line)).await? {
                Next::Continue => {}
                Next::Close => return Err(Stop::Closed),
                handoff => return Ok(handoff),
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<Next, Stop> {
        let command = match parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.refused(e).await,
        };
        match command {
            Command::Hello { extended, domain } => self.hello(extended, domain).await,
            Command::StartTls => self.starttls_command().await,
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial).await,
            Command::Rset | Command::Noop => self.reply(reply::OK).await,
            Command::Help => self.reply(reply::HELP).await,
            Command::Quit => self.quit().await,
            Command::Bdat { size } => self.bdat(size).await,
            Command::NeedsAuth => self.error(reply::AUTH_REQUIRED).await,
            Command::Xclient => self.error(reply::NOT_AUTHORIZED).await,
            Command::Unknown => self.error(reply::UNRECOGNIZED).await,
        }
    }

    async fn refused(&mut self, e: CommandError) -> Result<Next, Stop> {
        match e {
            CommandError::Syntax => self.error(reply::SYNTAX).await,
            CommandError::BadDomain => self.error(reply::BAD_DOMAIN).await,
            CommandError::UnknownMechanism => self.error(reply::UNKNOWN_MECHANISM).await,
            CommandError::BadBase64 => self.error(reply::CANNOT_DECODE).await,
            CommandError::BadChunkSize => Err(self.close(Closing::Unsynchronised).await),
        }
    }

    /// EHLO / HELO (RFC 5321 §4.1.1.1): EHLO lists what the backends
    /// support, plus what usher does itself.
    async fn hello(&mut self, extended: bool, domain: String) -> Result<Next, Stop> {
        self.hello = Some(Hello { domain, extended });
        if !extended {
            let text = reply::helo(self.hostname());
            return self.reply(&text).await;
        }
        let shared = self.shared.clone();
        let offer = match timeout_at(self.deadline, shared.submission.offer(&shared)).await {
            Ok(o) => o,
            Err(_) => return Err(self.close(Closing::Timeout).await),
        };
        let mut lines = vec![self.hostname().to_string()];
        lines.extend(offer);
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.auth_allowed() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(&reply::ehlo(&lines)).await
    }

    async fn quit(&mut self) -> Result<Next, Stop> {
        self.send(reply::BYE.as_bytes()).await?;
        let _ = self.stream.shutdown().await;
        Ok(Next::Close)
    }

    /// BDAT before AUTH: the chunk is skipped, then refused (case C33).
    /// A chunk larger than [`PRE_AUTH_CHUNK`] closes the session instead:
    /// skipping it would let an unauthenticated client stream without end.
    async fn bdat(&mut self, size: u64) -> Result<Next, Stop> {
        if size > PRE_AUTH_CHUNK {
            return Err(self.close(Closing::ChunkTooLarge).await);
        }
        self.skip(size).await?;
        self.error(reply::AUTH_REQUIRED).await
    }

    /// Discards `left` octets, buffered first, within the deadline.
    async fn skip(&mut self, mut left: u64) -> Result<(), Stop> {
        let buffered = self
            .buf
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        self.buf.drain(..buffered);
        left -= buffered as u64;
        let mut chunk = [0u8; 8192];
        while left > 0 {
            let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            match timeout_at(self.deadline, self.stream.read(&mut chunk[..want])).await {
                Err(_) => return Err(self.close(Closing::Timeout).await),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Stop::Gone),
                Ok(Ok(n)) => left -= n as u64,
            }
        }
        Ok(())
    }

    async fn starttls_command(&mut self) -> Result<Next, Stop> {
        if self.stream.is_tls() {
            return self.error(reply::TLS_ALREADY_ACTIVE).await;
        }
        if self.listener.tls != TlsMode::Starttls {
            return self.error(reply::NOT_IMPLEMENTED).await;
        }
        if self.shared.acceptor.is_none() {
            return self.reply(reply::TLS_UNAVAILABLE).await;
        }
        self.send(reply::READY_TO_START_TLS.as_bytes()).await?;
        Ok(Next::StartTls)
    }

    /// Replaces the cleartext stream by TLS; plaintext read ahead is
    /// dropped and the client must say EHLO again (RFC 3207 §4.2).
    async fn starttls(mut self) -> Option<Front> {
        self.buf.clear();
        self.hello = None;
        let acceptor = self.shared.acceptor.clone()?;
        let Stream::Plain(tcp) = self.stream else {
            return None;
        };
        self.stream = accept_tls(&acceptor, tcp, self.deadline).await?;
        Some(self)
    }

    /// AUTH (RFC 4954 §4): only after EHLO, only where passwords may be
    /// sent.
    async fn auth(
        &mut self,
        mechanism: Mechanism,
        initial: Option<Secret<Vec<u8>>>,
    ) -> Result<Next, Stop> {
        if !self.hello.as_ref().is_some_and(|h| h.extended) {
            return self.error(reply::EHLO_FIRST).await;
        }
        if !self.auth_allowed() {
            return self.error(reply::ENCRYPTION_REQUIRED).await;
        }
        let credentials = match mechanism {
            Mechanism::Plain => self.plain(initial).await?,
            Mechanism::Login => self.login_exchange(initial).await?,
        };
        match credentials {
            Some((user, password)) => self.authenticate(&user, password).await,
            None => Ok(Next::Continue),
        }
    }

    /// PLAIN (RFC 4616): `None` means the exchange ended and its answer
    /// was sent.
    async fn plain(
        &mut self,
        initial: Option<Secret<Vec<u8>>>,
    ) -> Result<Option<Credentials>, Stop> {
        let message = match initial {
            Some(m) => m,
            None => match self.sasl_step(reply::CHALLENGE_EMPTY).await? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let Some(plain) = split_plain(message.expose()) else {
            self.refuse_attempt(b"").await?;
            return Ok(None);
        };
        // usher submits only as the authenticated user itself.
        if !plain.authzid.is_empty() && plain.authzid != plain.authcid {
            self.refuse_attempt(&plain.authcid).await?;
            return Ok(None);
        }
        Ok(Some((plain.authcid, plain.password)))
    }

    /// LOGIN: user name (possibly on the AUTH line), then password.
    async fn login_exchange(
        &mut self,
        initial: Option<Secret<Vec<u8>>>,
    ) -> Result<Option<Credentials>, Stop> {
        let user = match initial {
            Some(u) => u,
            None => match self.sasl_step(reply::CHALLENGE_USERNAME).await? {
                Some(u) => u,
                None => return Ok(None),
            },
        };
        let Some(password) = self.sasl_step(reply::CHALLENGE_PASSWORD).await? else {
            return Ok(None);
        };
        Ok(Some((user.expose().clone(), password)))
    }

    /// Sends a `334` challenge and reads the client's answer. `None`
    /// means the exchange ended (cancelled or undecodable) and its answer
    /// was sent.
    async fn sasl_step(&mut self, challenge: &str) -> Result<Option<Secret<Vec<u8>>>, Stop> {
        self.send(challenge.as_bytes()).await?;
        let line = self.next_line().await?;
        match parse_sasl_response(trim_eol(&line)) {
            Ok(SaslResponse::Data(d)) => Ok(Some(d)),
            Ok(SaslResponse::Cancel) => {
                self.reply(reply::AUTH_CANCELLED).await?;
                Ok(None)
            }
            Err(_) => {
                self.error(reply::CANNOT_DECODE).await?;
                Ok(None)
            }
        }
    }

    /// Refuses an attempt that never reached the password check, after
    /// the same delay as a wrong password.
    async fn refuse_attempt(&mut self, user: &[u8]) -> Result<Next, Stop> {
        tokio::time::sleep(self.shared.config.auth.failure_delay).await;
        self.rejected(user).await
    }

    /// A failed login: one answer for every reason (RFC 4954 §6).
    async fn rejected(&mut self, user: &[u8]) -> Result<Next, Stop> {
        info!(
            user = &*String::from_utf8_lossy(user),
            "authentication failed"
        );
        metrics::login("submission", Outcome::Rejected);
        self.failures += 1;
        self.send(reply::AUTH_INVALID.as_bytes()).await?;
        if self.failures >= self.shared.config.limits.auth_failures {
            return Err(self.close(Closing::TooManyFailures).await);
        }
        Ok(Next::Continue)
    }

    /// No backend could take the session: a temporary failure (RFC 4954
    /// §6), and the client may try again.
    async fn unavailable(&mut self) -> Result<Next, Stop> {
        metrics::login("submission", Outcome::Unavailable);
        self.reply(reply::TEMPORARY_AUTH_FAILURE).await
    }

    /// Checks the password, picks a backend and logs in there.
    async fn authenticate(
        &mut self,
        login: &[u8],
        password: Secret<Vec<u8>>,
    ) -> Result<Next, Stop> {
        let verdict = match self
            .shared
            .auth
            .check(login, &password, self.addrs.peer.ip())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable");
                return self.unavailable().await;
            }
        };
        let user = match verdict {
            Verdict::Accepted(u) => *u,
            Verdict::Rejected => return self.rejected(login).await,
        };
        tracing::Span::current().record("user", user.login.as_str());
        let shared = self.shared.clone();
        let candidates = match shared.submission.candidates(&shared, &user).await {
            Ok(c) => c,
            Err(e) => {
                log_route_error(&user, &e);
                return self.unavailable().await;
            }
        };
        match self.first_login(candidates, &user, &password).await? {
            Some((logged_in, backend, lease)) => {
                tracing::Span::current().record("backend", backend.name.as_str());
                self.send(reply::AUTH_SUCCESSFUL.as_bytes()).await?;
                info!("logged in");
                metrics::login("submission", Outcome::Ok);
                let handoff = Handoff {
                    logged_in,
                    user,
                    backend,
                    lease,
                };
                Ok(Next::Relay(Box::new(handoff)))
            }
            None => self.unavailable().await,
        }
    }

    /// Tries the candidates in order until one accepts usher's login; a
    /// pool backend that is down passes the login to the next, all within
    /// one backend timeout.
    async fn first_login(
        &mut self,
        candidates: Candidates,
        user: &User,
        password: &Secret<Vec<u8>>,
    ) -> Result<Option<(LoggedIn, Backend, Lease)>, Stop> {
        let give_up = Instant::now() + self.shared.config.limits.backend_timeout;
        for backend in candidates.backends {
            let lease = self.shared.submission.lease(&backend.name);
            let error = match self
                .backend_login(&backend, user, password, give_up)
                .await?
            {
                Ok(logged_in) => {
                    self.shared.health.report(&backend.name, true);
                    return Ok(Some((logged_in, backend, lease)));
                }
                Err(e) => e,
            };
            warn!(backend = %backend.name, error = %error, "backend login failed");
            if !error.is_down() {
                break;
            }
            if error.counts_against_health() {
                self.shared.health.report(&backend.name, false);
            }
            if candidates.pinned || Instant::now() >= give_up {
                break;
            }
        }
        Ok(None)
    }

    /// Logs in at the backend while still watching the client: a client
    /// that leaves aborts the attempt (case C26). Client bytes that arrive
    /// meanwhile are kept for the relay (case C20).
    async fn backend_login(
        &mut self,
        backend: &Backend,
        user: &User,
        password: &Secret<Vec<u8>>,
        give_up: Instant,
    ) -> Result<Result<LoggedIn, BackendError>, Stop> {
        let shared = self.shared.clone();
        let (helo, esmtp) = match &self.hello {
            Some(h) => (h.domain.clone(), h.extended),
            None => (String::new(), false),
        };
        let who = Identity {
            user: &user.login,
            password,
            master: shared.master.as_ref().map(|(u, p)| (u.as_str(), p)),
            helo: &helo,
            esmtp,
            addrs: self.addrs,
        };
        let hostname = shared.config.hostname.as_str();
        let login = smtp_backend::login(backend, &shared.backend_tls, hostname, &who);
        let attempt = timeout_at(give_up, login);
        tokio::pin!(attempt);
        loop {
            let mut chunk = [0u8; 4096];
            tokio::select! {
                r = &mut attempt => return Ok(r.unwrap_or(Err(BackendError::Timeout))),
                n = self.stream.read(&mut chunk), if self.buf.len() < PIPELINE_BUFFER => match n {
                    Ok(0) | Err(_) => return Err(Stop::Gone),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }

    /// Copies bytes both ways until either side ends; says `421` on idle
    /// or kick.
    async fn relay(self, handoff: Handoff) -> Summary {
        let Handoff {
            logged_in,
            user,
            backend,
            lease,
        } = handoff;
        let shared = self.shared.clone();
        let counters = Arc::new(relay::Counters::default());
        let (_entry, kick) = shared.sessions.register(
            self.conn_id,
            &user.login,
            &backend.name,
            self.addrs.peer,
            &self.listener.name,
            counters.clone(),
        );
        let (end, mut client) = relay::run(Relay {
            client: self.stream,
            backend: logged_in.stream,
            client_pending: self.buf,
            backend_pending: logged_in.pending,
            idle: shared.config.limits.idle_timeout,
            counters: counters.clone(),
            kick,
        })
        .await;
        let farewell = match end {
            End::Idle => Some(Closing::Idle),
            End::Kicked if shared.sessions.stopping() => Some(Closing::Shutdown),
            End::Kicked => Some(Closing::Kicked),
            _ => None,
        };
        if let Some(why) = farewell {
            let line = why.line(&shared.config.hostname);
            let _ = client.write_all(line.as_bytes()).await;
        }
        let _ = client.shutdown().await;
        drop(lease);
        let summary = Summary::from_counters(&counters, end);
        metrics::session_ended("submission", summary.up, summary.down);
        summary
    }
}

fn log_route_error(user: &User, e: &RouteError) {
    match e {
        RouteError::Store(_) => {
            tracing::error!(user = user.login.as_str(), error = %e, "no backend")
        }
        _ => warn!(user = user.login.as_str(), error = %e, "no backend"),
    }
}
