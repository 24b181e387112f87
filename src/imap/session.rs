//! The IMAP pre-login server: greeting, capabilities, STARTTLS, ID, LOGIN
//! and AUTHENTICATE, then the hand-off to the relay.
//!
//! Invariants:
//! - bytes received after a STARTTLS command, in the same read or before
//!   the handshake, are never processed: the buffer is emptied at the
//!   upgrade (RFC 9051 §6.2.1, case C13);
//! - no password is accepted before TLS unless the listener allows it, and
//!   then LOGINDISABLED is advertised instead of the AUTH= mechanisms
//!   (RFC 9051 §6.2.3); a LOGIN literal is refused rather than invited
//!   with "+" there, so its password is never sent;
//! - bytes already buffered are consumed before the socket is read again,
//!   so pipelined commands and SASL responses never stall (cases C19, C21);
//! - the client gets a tagged OK only after the backend's tagged OK, and
//!   bytes pipelined behind the login reach the backend once, after it;
//! - every failure path clears the attempt's credentials: they live only in
//!   the handler that received them (case C11).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{info, warn};

use super::backend::{self as imap_backend, Credentials, LoggedIn};
use super::parse::{
    frame, line_len, parse_command, parse_sasl_line, split_plain, starts_login, trim_eol, Command,
    CommandKind, Frame, FrameLimits, Mechanism, ParseError, SaslLine,
};
use crate::auth::Verdict;
use crate::backend::{BackendError, ClientAddrs};
use crate::config::TlsMode;
use crate::metrics::{self, Outcome};
use crate::net::{accept_tls, Stream};
use crate::relay::{self, End, Relay};
use crate::route::{self, RouteError};
use crate::secret::Secret;
use crate::server::{Conn, Served, Shared, Summary};
use crate::sessions::stopped;
use crate::store::{Backend, User};

/// What the pre-login loop does after a command.
enum Next {
    Continue,
    Close,
    StartTls,
    Relay(Box<(LoggedIn, User, Backend)>),
}

/// Why the pre-login phase stopped reading.
enum Stop {
    /// The client went away or the socket failed.
    Gone,
    /// usher ended the session (and has said so to the client).
    Closed,
}

struct Front {
    shared: Arc<Shared>,
    conn_id: u64,
    listener: Arc<crate::config::ListenerConfig>,
    stream: Stream,
    addrs: ClientAddrs,
    buf: Vec<u8>,
    deadline: Instant,
    bad: u32,
    failures: u32,
    /// Turns `true` when the server stops (a farewell, then close).
    stop: watch::Receiver<bool>,
}

/// Serves one IMAP client connection up to its end, or up to the relay,
/// which it hands back to run in a task of its own.
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
        bad: 0,
        failures: 0,
        stop: shared_stop,
    };
    let greeting = format!("* OK [CAPABILITY {}] usher ready\r\n", front.capabilities());
    if front.send(greeting.as_bytes()).await.is_err() {
        return Served::Done(Summary::default());
    }
    loop {
        match front.prelogin().await {
            Ok(Next::Relay(handoff)) => {
                let (logged_in, user, backend) = *handoff;
                return Served::Relay(Box::pin(front.relay(logged_in, user, backend)));
            }
            Ok(Next::StartTls) => match front.starttls().await {
                Some(upgraded) => front = upgraded,
                None => return Served::Done(Summary::default()),
            },
            _ => return Served::Done(Summary::default()),
        }
    }
}

impl Front {
    fn limits(&self) -> FrameLimits {
        FrameLimits {
            line: self.shared.config.limits.line_bytes,
            literal: self.shared.config.limits.literal_bytes,
        }
    }

    fn login_allowed(&self) -> bool {
        self.stream.is_tls() || self.listener.plaintext_auth
    }

    /// The pre-login capability list (RFC 9051 §7.2.2): only what usher
    /// itself implements (case C16).
    fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR LITERAL+ ID");
        if self.listener.tls == TlsMode::Starttls && !self.stream.is_tls() {
            caps.push_str(" STARTTLS");
        }
        if self.login_allowed() {
            caps.push_str(" AUTH=PLAIN AUTH=LOGIN");
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.stream.write_all(bytes).await.map_err(|_| Stop::Gone)?;
        self.stream.flush().await.map_err(|_| Stop::Gone)
    }

    /// Says goodbye and ends the session.
    async fn bye(&mut self, text: &str) -> Stop {
        info!(reason = text, "usher ends the session");
        let _ = self.send(format!("* BYE {text}\r\n").as_bytes()).await;
        self.stream.linger_close().await;
        Stop::Closed
    }

    /// Reads more bytes into the buffer, within the pre-login deadline.
    async fn fill(&mut self) -> Result<(), Stop> {
        let mut chunk = [0u8; 4096];
        let read = tokio::select! {
            r = timeout_at(self.deadline, self.stream.read(&mut chunk)) => Some(r),
            _ = stopped(&mut self.stop) => None,
        };
        match read {
            None => Err(self.bye("Server shutting down").await),
            Some(Err(_)) => Err(self.bye("Login time limit reached").await),
            Some(Ok(Ok(0)) | Ok(Err(_))) => Err(Stop::Gone),
            Some(Ok(Ok(n))) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Runs commands until a login succeeds, STARTTLS is accepted or the
    /// session ends.
    async fn prelogin(&mut self) -> Result<Next, Stop> {
        // Offset up to which synchronising literals have their "+".
        let mut acked = 0;
        loop {
            let next = match frame(&self.buf, self.limits()) {
                Frame::Complete(n) => {
                    let cmd: Vec<u8> = self.buf.drain(..n).collect();
                    acked = 0;
                    self.command(&cmd).await?
                }
                Frame::Incomplete => {
                    self.fill().await?;
                    Next::Continue
                }
                Frame::AwaitLiteral { data_start, sync }
                    if sync && !self.login_allowed() && starts_login(&self.buf) =>
                {
                    // A tagged NO instead of "+" ends the command (RFC 9051
                    // §7.5), so the password is never sent in the clear.
                    let line: Vec<u8> = self.buf.drain(..data_start).collect();
                    acked = 0;
                    self.privacy_required(&tag_of(&line)).await?
                }
                Frame::AwaitLiteral { data_start, sync } => {
                    if sync && data_start > acked {
                        self.send(b"+ Ready for literal data\r\n").await?;
                        acked = data_start;
                    }
                    self.fill().await?;
                    Next::Continue
                }
                Frame::LineTooLong => return Err(self.bye("Line too long").await),
                Frame::BadLiteral { line_end, sync } => {
                    let line: Vec<u8> = self.buf.drain(..line_end).collect();
                    acked = 0;
                    if !sync {
                        // The octets are on their way and cannot be told
                        // apart from commands: hang up (case C06).
                        return Err(self.bye("Literal too large").await);
                    }
                    self.bad(&tag_of(&line), "Literal too large or invalid")
                        .await?
                }
            };
            match next {
                Next::Continue => {}
                Next::Close => return Err(Stop::Closed),
                handoff => return Ok(handoff),
            }
        }
    }

    /// Answers a bad command; too many end the session.
    async fn bad(&mut self, tag: &str, reason: &str) -> Result<Next, Stop> {
        self.bad += 1;
        if self.bad >= self.shared.config.limits.bad_commands {
            return Err(self.bye("Too many invalid commands").await);
        }
        self.send(format!("{tag} BAD {reason}\r\n").as_bytes())
            .await?;
        Ok(Next::Continue)
    }

    async fn command(&mut self, bytes: &[u8]) -> Result<Next, Stop> {
        let cmd = match parse_command(bytes) {
            Ok(cmd) => cmd,
            Err(ParseError::NoTag) => return self.bad("*", "Invalid tag").await,
            Err(ParseError::Syntax { tag, reason }) => return self.bad(&tag, reason).await,
        };
        let Command { tag, kind } = cmd;
        match kind {
            CommandKind::Capability => self.capability(&tag).await,
            CommandKind::Noop => self.ok(&tag, "NOOP completed").await,
            CommandKind::Logout => self.logout(&tag).await,
            CommandKind::Starttls => self.starttls_command(&tag).await,
            CommandKind::Id => self.id(&tag).await,
            CommandKind::Login { user, password } => self.login(&tag, &user, password).await,
            CommandKind::Authenticate { mechanism, initial } => {
                self.authenticate(&tag, mechanism, initial).await
            }
            CommandKind::NotYet(_) => self.bad(&tag, "Not authenticated; log in first").await,
            CommandKind::Unknown(_) => self.bad(&tag, "Unknown command").await,
        }
    }

    async fn ok(&mut self, tag: &str, text: &str) -> Result<Next, Stop> {
        self.send(format!("{tag} OK {text}\r\n").as_bytes()).await?;
        Ok(Next::Continue)
    }

    async fn capability(&mut self, tag: &str) -> Result<Next, Stop> {
        let text = format!(
            "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
            self.capabilities()
        );
        self.send(text.as_bytes()).await?;
        Ok(Next::Continue)
    }

    async fn logout(&mut self, tag: &str) -> Result<Next, Stop> {
        self.send(format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes())
            .await?;
        let _ = self.stream.shutdown().await;
        Ok(Next::Close)
    }

    /// RFC 2971: usher answers for itself and forwards nothing the client
    /// said (case C29).
    async fn id(&mut self, tag: &str) -> Result<Next, Stop> {
        self.send(format!("* ID NIL\r\n{tag} OK ID completed\r\n").as_bytes())
            .await?;
        Ok(Next::Continue)
    }

    async fn starttls_command(&mut self, tag: &str) -> Result<Next, Stop> {
        if self.listener.tls != TlsMode::Starttls || self.stream.is_tls() {
            return self.bad(tag, "STARTTLS not available").await;
        }
        self.send(format!("{tag} OK Begin TLS negotiation now\r\n").as_bytes())
            .await?;
        Ok(Next::StartTls)
    }

    /// Replaces the cleartext stream by TLS; plaintext read ahead is dropped.
    async fn starttls(mut self) -> Option<Front> {
        self.buf.clear();
        let acceptor = self.shared.acceptor.clone()?;
        let Stream::Plain(tcp) = self.stream else {
            return None;
        };
        self.stream = accept_tls(&acceptor, tcp, self.deadline).await?;
        Some(self)
    }

    async fn authenticate(
        &mut self,
        tag: &str,
        mechanism: Mechanism,
        initial: Option<Secret<Vec<u8>>>,
    ) -> Result<Next, Stop> {
        if !self.login_allowed() {
            return self.privacy_required(tag).await;
        }
        let (user, password) = match mechanism {
            Mechanism::Plain => {
                let message = match initial {
                    Some(m) => m,
                    None => match self.sasl_step(tag, b"").await? {
                        Some(m) => m,
                        None => return Ok(Next::Continue),
                    },
                };
                let Some(plain) = split_plain(message.expose()) else {
                    return self.bad(tag, "Malformed PLAIN message").await;
                };
                // usher logs in only as the authenticated user itself.
                if !plain.authzid.is_empty() && plain.authzid != plain.authcid {
                    return self.rejected(tag, &plain.authcid).await;
                }
                (plain.authcid, plain.password)
            }
            Mechanism::Login => {
                let user = match initial {
                    Some(u) => u,
                    None => match self.sasl_step(tag, b"VXNlcm5hbWU6").await? {
                        Some(u) => u,
                        None => return Ok(Next::Continue),
                    },
                };
                let Some(password) = self.sasl_step(tag, b"UGFzc3dvcmQ6").await? else {
                    return Ok(Next::Continue);
                };
                (user.expose().clone(), password)
            }
        };
        self.login(tag, &user, password).await
    }

    /// Sends a continuation with `challenge` and reads the client's answer.
    /// `None` means the exchange ended (cancelled or invalid) and the
    /// tagged answer was already sent.
    async fn sasl_step(
        &mut self,
        tag: &str,
        challenge: &[u8],
    ) -> Result<Option<Secret<Vec<u8>>>, Stop> {
        let mut prompt = b"+ ".to_vec();
        prompt.extend_from_slice(challenge);
        prompt.extend_from_slice(b"\r\n");
        self.send(&prompt).await?;
        let line = loop {
            if let Some(n) = line_len(&self.buf) {
                break self.buf.drain(..n).collect::<Vec<u8>>();
            }
            if self.buf.len() > self.limits().line {
                return Err(self.bye("Line too long").await);
            }
            self.fill().await?;
        };
        match parse_sasl_line(trim_eol(&line)) {
            Ok(SaslLine::Data(d)) => Ok(Some(d)),
            Ok(SaslLine::Cancel) => {
                self.send(format!("{tag} BAD Authentication cancelled\r\n").as_bytes())
                    .await?;
                Ok(None)
            }
            Err(_) => {
                self.bad(tag, "Invalid base64").await?;
                Ok(None)
            }
        }
    }

    async fn privacy_required(&mut self, tag: &str) -> Result<Next, Stop> {
        let text = format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS or the TLS port to log in\r\n");
        self.send(text.as_bytes()).await?;
        Ok(Next::Continue)
    }

    /// A failed login: the same answer for every reason (RFC 5530).
    async fn rejected(&mut self, tag: &str, user: &[u8]) -> Result<Next, Stop> {
        info!(
            user = &*String::from_utf8_lossy(user),
            "authentication failed"
        );
        metrics::login("imap", Outcome::Rejected);
        self.failures += 1;
        self.send(format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n").as_bytes())
            .await?;
        if self.failures >= self.shared.config.limits.auth_failures {
            return Err(self.bye("Too many authentication failures").await);
        }
        Ok(Next::Continue)
    }

    async fn unavailable(&mut self, tag: &str) -> Result<Next, Stop> {
        metrics::login("imap", Outcome::Unavailable);
        let text = format!("{tag} NO [UNAVAILABLE] Account is temporarily unavailable.\r\n");
        self.send(text.as_bytes()).await?;
        Ok(Next::Continue)
    }

    async fn login(
        &mut self,
        tag: &str,
        user_name: &[u8],
        password: Secret<Vec<u8>>,
    ) -> Result<Next, Stop> {
        if !self.login_allowed() {
            return self.privacy_required(tag).await;
        }
        let verdict = match self
            .shared
            .auth
            .check(user_name, &password, self.addrs.peer.ip())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable");
                return self.unavailable(tag).await;
            }
        };
        let user = match verdict {
            Verdict::Accepted(u) => u,
            Verdict::Rejected => return self.rejected(tag, user_name).await,
        };
        tracing::Span::current().record("user", user.login.as_str());
        let user = match route::after_hold(&self.shared, *user).await {
            Ok(Some(u)) => u,
            Ok(None) => return self.rejected(tag, user_name).await,
            Err(e) => {
                tracing::error!(error = %e, "store unavailable");
                return self.unavailable(tag).await;
            }
        };
        let mut backend = match route::backend_for(&self.shared, &user, route::Service::Imap).await
        {
            Ok(b) => b,
            Err(e) => {
                log_route_error(&user, &e);
                return self.unavailable(tag).await;
            }
        };
        loop {
            tracing::Span::current().record("backend", backend.name.as_str());
            let e = match self.backend_login(&backend, &user, &password).await? {
                Ok(logged_in) => {
                    self.shared.health.report(&backend.name, true);
                    let text = format!(
                        "{tag} OK [CAPABILITY {}] Logged in\r\n",
                        logged_in.capabilities
                    );
                    self.send(text.as_bytes()).await?;
                    info!("logged in");
                    metrics::login("imap", Outcome::Ok);
                    return Ok(Next::Relay(Box::new((logged_in, user, backend))));
                }
                Err(e) => e,
            };
            warn!(backend = %backend.name, error = %e, "backend login failed");
            if e.is_limit() {
                // Only the code goes to the client, never the backend's text.
                metrics::login("imap", Outcome::Unavailable);
                let text = format!("{tag} NO [LIMIT] Too many connections for this account\r\n");
                self.send(text.as_bytes()).await?;
                return Ok(Next::Continue);
            }
            if !e.is_down() {
                return self.unavailable(tag).await;
            }
            if e.counts_against_health() {
                self.shared.health.report(&backend.name, false);
            }
            // Could not reach it: the fallback, if usable, at once.
            match route::fallback_after(&self.shared, &user, route::Service::Imap, &backend.name)
                .await
            {
                Some(fb) => {
                    info!(from = %backend.name, to = %fb.name, "trying the fallback backend");
                    backend = fb;
                }
                None => return self.unavailable(tag).await,
            }
        }
    }

    /// Logs in at the backend while still watching the client: a client
    /// that leaves aborts the attempt (case C26). Client bytes that arrive
    /// meanwhile are kept for the relay.
    async fn backend_login(
        &mut self,
        backend: &Backend,
        user: &User,
        password: &Secret<Vec<u8>>,
    ) -> Result<Result<LoggedIn, BackendError>, Stop> {
        let shared = self.shared.clone();
        let master = shared.master.as_ref().map(|(u, p)| (u.as_str(), p));
        let creds = Credentials {
            user: &user.login,
            password,
            master,
        };
        let attempt = timeout(
            shared.config.limits.backend_timeout,
            imap_backend::login(
                backend,
                &shared.backend_tls,
                &creds,
                self.addrs,
                self.conn_id,
            ),
        );
        tokio::pin!(attempt);
        let cap = self.limits().line + self.limits().literal;
        loop {
            let mut chunk = [0u8; 4096];
            tokio::select! {
                r = &mut attempt => return Ok(r.unwrap_or(Err(BackendError::Timeout))),
                n = self.stream.read(&mut chunk), if self.buf.len() < cap => match n {
                    Ok(0) | Err(_) => return Err(Stop::Gone),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }

    async fn relay(self, logged_in: LoggedIn, user: User, backend: Backend) -> Summary {
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
        let farewell: &[u8] = match end {
            End::Idle => b"* BYE Autologout; idle for too long\r\n",
            End::Kicked if shared.sessions.stopping() => b"* BYE Server shutting down\r\n",
            End::Kicked => b"* BYE Session ended by the administrator\r\n",
            _ => b"",
        };
        if !farewell.is_empty() {
            let _ = client.write_all(farewell).await;
        }
        let _ = client.shutdown().await;
        let summary = Summary::from_counters(&counters, end);
        metrics::session_ended("imap", summary.up, summary.down);
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

/// The tag of a line that could not be framed, for its BAD answer.
fn tag_of(line: &[u8]) -> String {
    let tag: Vec<u8> = line
        .iter()
        .take_while(|&&b| b > b' ' && b < 0x7f && !b"(){%*\"\\+".contains(&b))
        .copied()
        .collect();
    if tag.is_empty() {
        "*".to_string()
    } else {
        String::from_utf8_lossy(&tag).into_owned()
    }
}
