//! The SMTP backend client: greet a submission backend, secure the
//! connection, forward the client's identity and log in for the user.
//!
//! The order on the wire (RFC 5321 §4.1.1.1, RFC 3207 §4, RFC 4954 §4):
//! greeting `220` → `EHLO <usher>` → [`STARTTLS` → TLS → `EHLO <usher>`]
//! → [`XCLIENT …` → `220` → `EHLO <client's name>`] → `AUTH PLAIN …` →
//! `235`. Implicit-TLS backends get TLS before the greeting.
//!
//! Invariants:
//! - every backend reply is read as whole `ddd-`/`ddd ` line groups within
//!   [`BACKEND_REPLY_LIMITS`]; a malformed, mixed-code or over-long reply
//!   is a protocol error, handled like any backend failure (case C28);
//! - nothing a backend says reaches the client: the caller turns every
//!   error into its own `454` (case C27);
//! - bytes a backend sends between its STARTTLS reply and the handshake
//!   are an error, never read as a reply inside TLS (RFC 3207 §4);
//! - XCLIENT values are xtext (RFC 3461 §4), IPv6 addresses carry
//!   `IPV6:`, only attributes the backend lists are sent, each line stays
//!   within 512 octets, and EHLO follows the last `220` (Postfix
//!   XCLIENT_README, case C30);
//! - credentials travel only inside SASL PLAIN's base64, so no user octet
//!   is ever pasted into a command line (case C35).

use std::net::IpAddr;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::parse::{extensions, find, parse_reply, xtext, Extension, Reply, BACKEND_REPLY_LIMITS};
use crate::backend::{connect_backend, BackendError, BackendTls, ClientAddrs};
use crate::config::TlsMode;
use crate::net::Stream;
use crate::secret::Secret;
use crate::store::{Backend, LoginMode};

/// Longest XCLIENT command line, CRLF included (Postfix's limit).
pub const XCLIENT_LINE_MAX: usize = 512;

/// Whom usher logs in as, and who the client is.
pub struct Identity<'a> {
    /// The user whose mail is submitted.
    pub user: &'a str,
    /// The client's password, used for passthrough backends.
    pub password: &'a Secret<Vec<u8>>,
    /// Master user and password, used for master backends.
    pub master: Option<(&'a str, &'a Secret<String>)>,
    /// The client's EHLO/HELO argument (one clean token) and whether it
    /// came with EHLO.
    pub helo: &'a str,
    pub esmtp: bool,
    pub addrs: ClientAddrs,
}

/// A logged-in backend connection, ready for the relay.
pub struct LoggedIn {
    pub stream: Stream,
    /// Bytes the backend sent after its `235`.
    pub pending: Vec<u8>,
}

/// An SMTP connection to a backend, read reply by reply.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads one whole reply.
    async fn reply(&mut self) -> Result<Reply, BackendError> {
        loop {
            match parse_reply(&self.buf, BACKEND_REPLY_LIMITS) {
                Ok(Some((reply, n))) => {
                    self.buf.drain(..n);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(BackendError::Protocol(e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(BackendError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn command(&mut self, line: &[u8]) -> Result<Reply, BackendError> {
        self.send(line).await?;
        self.reply().await
    }

    /// EHLO (RFC 5321 §4.1.1.1); returns the extensions listed.
    async fn ehlo(&mut self, name: &str) -> Result<Vec<Extension>, BackendError> {
        let reply = self.command(format!("EHLO {name}\r\n").as_bytes()).await?;
        if reply.code != 250 {
            return Err(refused("EHLO", &reply));
        }
        Ok(extensions(&reply))
    }

    /// STARTTLS (RFC 3207 §4), then the handshake verified for the host.
    async fn starttls(
        mut self,
        exts: &[Extension],
        backend: &Backend,
        tls: &BackendTls,
    ) -> Result<Conn, BackendError> {
        if find(exts, "STARTTLS").is_none() {
            return Err(BackendError::Tls("backend does not offer STARTTLS".into()));
        }
        let reply = self.command(b"STARTTLS\r\n").await?;
        if reply.code != 220 {
            return Err(BackendError::Tls(format!(
                "STARTTLS refused: {}",
                reply.code
            )));
        }
        if !self.buf.is_empty() {
            return Err(BackendError::Protocol("data after STARTTLS reply".into()));
        }
        let Stream::Plain(tcp) = self.stream else {
            return Err(BackendError::Protocol("STARTTLS inside TLS".into()));
        };
        let stream = tls
            .wrap(tcp, &backend.host, backend.ca_file.as_deref())
            .await?;
        Ok(Conn::new(stream))
    }

    /// Sends the client's identity as XCLIENT; returns whether `LOGIN=`
    /// was among the attributes the backend accepted.
    async fn xclient(&mut self, ext: &Extension, who: &Identity<'_>) -> Result<bool, BackendError> {
        let attrs: Vec<(&str, String)> = xclient_attributes(who)
            .into_iter()
            .filter(|(name, _)| ext.params.iter().any(|p| p.eq_ignore_ascii_case(name)))
            .collect();
        let (lines, sent) = xclient_lines(&attrs);
        for line in lines {
            let reply = self.command(line.as_bytes()).await?;
            // The backend restarts the session and greets again.
            if !reply.is_positive() {
                return Err(refused("XCLIENT", &reply));
            }
        }
        Ok(sent.contains(&"LOGIN"))
    }

    /// AUTH PLAIN with an initial response (RFC 4954 §4, RFC 4616).
    async fn auth_plain(
        &mut self,
        ext: &Extension,
        mode: LoginMode,
        who: &Identity<'_>,
    ) -> Result<(), BackendError> {
        if !ext.params.iter().any(|m| m.eq_ignore_ascii_case("PLAIN")) {
            return Err(BackendError::Config(
                "backend does not offer AUTH PLAIN".into(),
            ));
        }
        let message = plain_message(mode, who)?;
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend_from_slice(message.expose().as_bytes());
        line.extend_from_slice(b"\r\n");
        let reply = self.command(&line).await?;
        match reply.code {
            235 => Ok(()),
            334 => Err(BackendError::Protocol("unexpected AUTH challenge".into())),
            _ => Err(refused("AUTH", &reply)),
        }
    }

    fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buf)
    }
}

/// A backend's refusal, for the log only: the code and the start of the
/// first line, escaped.
fn refused(command: &str, reply: &Reply) -> BackendError {
    let first = reply.lines.first().map(String::as_str).unwrap_or("");
    let text: String = first.chars().take(80).collect();
    BackendError::Refused(format!("{command}: {} {text:?}", reply.code))
}

/// Connects, reads the greeting and says EHLO, with TLS as the backend is
/// configured; returns the connection and the extensions it lists.
async fn open(
    backend: &Backend,
    tls: &BackendTls,
    hostname: &str,
    client: Option<ClientAddrs>,
) -> Result<(Conn, Vec<Extension>), BackendError> {
    let port = backend.submission_port.ok_or_else(|| {
        BackendError::Config(format!("backend {} has no submission_port", backend.name))
    })?;
    let tcp = connect_backend(backend, port, client).await?;
    let stream = match backend.tls {
        TlsMode::Implicit => {
            tls.wrap(tcp, &backend.host, backend.ca_file.as_deref())
                .await?
        }
        _ => Stream::Plain(tcp),
    };
    let mut conn = Conn::new(stream);
    let greeting = conn.reply().await?;
    if greeting.code != 220 {
        return Err(refused("greeting", &greeting));
    }
    let mut exts = conn.ehlo(hostname).await?;
    if backend.tls == TlsMode::Starttls {
        conn = conn.starttls(&exts, backend, tls).await?;
        // RFC 3207 §4.2: forget what was learned before TLS.
        exts = conn.ehlo(hostname).await?;
    }
    Ok((conn, exts))
}

/// Logs in at `backend` for `who`; the caller bounds it with a timeout.
pub async fn login(
    backend: &Backend,
    tls: &BackendTls,
    hostname: &str,
    who: &Identity<'_>,
) -> Result<LoggedIn, BackendError> {
    let (mut conn, mut exts) = open(backend, tls, hostname, Some(who.addrs)).await?;
    let mut login_forwarded = false;
    if backend.forward.is_native() {
        match find(&exts, "XCLIENT").cloned() {
            Some(ext) => {
                login_forwarded = conn.xclient(&ext, who).await?;
                exts = conn.ehlo(who.helo).await?;
            }
            None => tracing::debug!(backend = %backend.name, "backend does not offer XCLIENT"),
        }
    }
    match find(&exts, "AUTH").cloned() {
        Some(ext) => conn.auth_plain(&ext, backend.login, who).await?,
        // A backend that trusts usher's XCLIENT (Postfix) takes LOGIN= as
        // the authentication and offers no AUTH afterwards.
        None if login_forwarded => {}
        None => return Err(BackendError::Config("backend offers no AUTH".into())),
    }
    let (stream, pending) = conn.into_parts();
    Ok(LoggedIn { stream, pending })
}

/// Greets `backend` and returns the extensions its EHLO lists, as an
/// unauthenticated client sees them; the caller bounds it with a timeout.
pub async fn probe(
    backend: &Backend,
    tls: &BackendTls,
    hostname: &str,
) -> Result<Vec<Extension>, BackendError> {
    let (mut conn, exts) = open(backend, tls, hostname, None).await?;
    // A polite end; the answer does not matter.
    let _ = conn.send(b"QUIT\r\n").await;
    Ok(exts)
}

/// Every XCLIENT attribute usher can send, values already xtext-encoded.
fn xclient_attributes(who: &Identity<'_>) -> Vec<(&'static str, String)> {
    let proto = if who.esmtp { "ESMTP" } else { "SMTP" };
    vec![
        ("ADDR", xtext(address(who.addrs.peer.ip()).as_bytes())),
        ("PORT", who.addrs.peer.port().to_string()),
        ("PROTO", proto.to_string()),
        ("HELO", xtext(who.helo.as_bytes())),
        ("LOGIN", xtext(who.user.as_bytes())),
        ("DESTADDR", xtext(address(who.addrs.local.ip()).as_bytes())),
        ("DESTPORT", who.addrs.local.port().to_string()),
    ]
}

/// An address as XCLIENT writes it: IPv6 with the `IPV6:` prefix, an
/// IPv4-mapped IPv6 address as plain IPv4.
fn address(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    }
}

/// Packs `attrs` into XCLIENT lines of at most [`XCLIENT_LINE_MAX`]
/// octets; returns the lines and the names of the attributes they carry.
/// An attribute that cannot fit even alone is left out.
fn xclient_lines<'a>(attrs: &[(&'a str, String)]) -> (Vec<String>, Vec<&'a str>) {
    const VERB: &str = "XCLIENT";
    let mut lines = Vec::new();
    let mut sent = Vec::new();
    let mut line = String::from(VERB);
    for (name, value) in attrs {
        let attr = format!(" {name}={value}");
        if VERB.len() + attr.len() + 2 > XCLIENT_LINE_MAX {
            continue;
        }
        if line.len() + attr.len() + 2 > XCLIENT_LINE_MAX {
            lines.push(format!("{line}\r\n"));
            line = String::from(VERB);
        }
        line.push_str(&attr);
        sent.push(*name);
    }
    if line.len() > VERB.len() {
        lines.push(format!("{line}\r\n"));
    }
    (lines, sent)
}

/// SASL PLAIN for the backend, base64-encoded: the master user with the
/// user as authorization identity, or the user's own password.
fn plain_message(mode: LoginMode, who: &Identity<'_>) -> Result<Secret<String>, BackendError> {
    let mut msg = Vec::new();
    match mode {
        LoginMode::Master => {
            let (master, password) = who.master.ok_or_else(|| {
                BackendError::Config(
                    "backend login is master, but no master user is configured".into(),
                )
            })?;
            msg.extend_from_slice(who.user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(master.as_bytes());
            msg.push(0);
            msg.extend_from_slice(password.expose().as_bytes());
        }
        LoginMode::Passthrough => {
            msg.push(0);
            msg.extend_from_slice(who.user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(who.password.expose());
        }
    }
    Ok(Secret::new(
        base64::engine::general_purpose::STANDARD.encode(msg),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity<'a>(user: &'a str, pw: &'a Secret<Vec<u8>>, peer: &str) -> Identity<'a> {
        Identity {
            user,
            password: pw,
            master: None,
            helo: "client.example.net",
            esmtp: true,
            addrs: ClientAddrs {
                peer: peer.parse().unwrap(),
                local: "192.0.2.1:587".parse().unwrap(),
            },
        }
    }

    #[test]
    fn xclient_matches_case_c30() {
        let pw = Secret::new(b"secret".to_vec());
        let who = identity("alice+test=1@example.com", &pw, "[2001:db8::10]:53211");
        let attrs: Vec<_> = xclient_attributes(&who)
            .into_iter()
            .filter(|(n, _)| ["ADDR", "PORT", "PROTO", "HELO", "LOGIN"].contains(n))
            .collect();
        let (lines, sent) = xclient_lines(&attrs);
        assert_eq!(
            lines,
            ["XCLIENT ADDR=IPV6:2001:db8::10 PORT=53211 PROTO=ESMTP \
              HELO=client.example.net LOGIN=alice+2Btest+3D1@example.com\r\n"]
        );
        assert!(sent.contains(&"LOGIN"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_plain_ipv4() {
        assert_eq!(address("::ffff:192.0.2.10".parse().unwrap()), "192.0.2.10");
        assert_eq!(address("192.0.2.10".parse().unwrap()), "192.0.2.10");
    }

    #[test]
    fn long_xclient_is_split_and_oversized_values_dropped() {
        let long_user = "u".repeat(300);
        let huge = "h".repeat(600);
        let attrs = vec![
            ("ADDR", "192.0.2.10".to_string()),
            ("HELO", "h".repeat(250)),
            ("LOGIN", long_user.clone()),
            ("NAME", huge),
        ];
        let (lines, sent) = xclient_lines(&attrs);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for l in &lines {
            assert!(l.len() <= XCLIENT_LINE_MAX, "{}", l.len());
            assert!(l.starts_with("XCLIENT ") && l.ends_with("\r\n"));
        }
        assert!(lines[1].contains(&long_user));
        assert_eq!(sent, ["ADDR", "HELO", "LOGIN"]);
    }

    #[test]
    fn plain_for_master_and_passthrough() {
        let pw = Secret::new(b"userpw".to_vec());
        let mpw = Secret::new("masterpw".to_string());
        let mut who = identity("alice@example.com", &pw, "192.0.2.10:53211");
        who.master = Some(("master", &mpw));
        let decode = |s: Secret<String>| {
            base64::engine::general_purpose::STANDARD
                .decode(s.expose())
                .unwrap()
        };
        let raw = decode(plain_message(LoginMode::Master, &who).unwrap());
        assert_eq!(raw, b"alice@example.com\0master\0masterpw");
        let raw = decode(plain_message(LoginMode::Passthrough, &who).unwrap());
        assert_eq!(raw, b"\0alice@example.com\0userpw");
        who.master = None;
        assert!(plain_message(LoginMode::Master, &who).is_err());
    }
}
