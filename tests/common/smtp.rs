//! SMTP transcript helpers on top of [`Client`]: whole replies, the usual
//! opening of a submission session, SASL blobs.

use std::net::SocketAddr;

use base64::Engine;

use super::client::Client;
use super::dovecot::{Dovecot, DovecotOpts};
use super::sink::{Sink, SinkOpts};
use super::usher::{Usher, UsherOpts};

/// Reads one whole reply (`ddd-` lines up to the `ddd ` line).
pub async fn reply(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = c.line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return lines;
        }
    }
}

/// Sends `line` (CRLF added) and reads the whole reply.
pub async fn command(c: &mut Client, line: &str) -> Vec<String> {
    c.send(format!("{line}\r\n")).await;
    reply(c).await
}

/// The extension keywords of an EHLO reply (after the host name line).
pub fn keywords(ehlo: &[String]) -> Vec<String> {
    ehlo.iter().skip(1).map(|l| l[4..].to_string()).collect()
}

/// Connects in cleartext and reads the greeting.
pub async fn connect(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).await;
    c.expect("220 ").await;
    c
}

/// The usual 587 opening: greeting, EHLO, STARTTLS, TLS, EHLO again.
/// Returns the client and the EHLO reply inside TLS.
pub async fn open_starttls(addr: SocketAddr) -> (Client, Vec<String>) {
    let mut c = connect(addr).await;
    command(&mut c, "EHLO client.example.net").await;
    c.send(b"STARTTLS\r\n").await;
    c.expect("220 2.0.0").await;
    let mut c = c.upgrade().await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    (c, ehlo)
}

/// The 465 opening: TLS, greeting, EHLO.
pub async fn open_implicit(addr: SocketAddr) -> (Client, Vec<String>) {
    let mut c = Client::connect_tls(addr).await;
    c.expect("220 ").await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    (c, ehlo)
}

pub fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The base64 PLAIN message for `user` / `password` (no authzid).
pub fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}"))
}

/// The user table of the cases (../shared/cases/submission.md): login,
/// password as exact octets.
pub const CASE_USERS: &[(&str, &[u8])] = &[
    ("alice@example.com", b"secret"),
    ("bob@example.com", b"hunter2"),
    ("carol@example.com", "accentué1!".as_bytes()),
    ("dave@example.com", b"pa\"ss\\word"),
    ("jos\u{e9}@example.com", b"secret"),
    ("alice.backslash@example.com", b"se\\cr\\et"),
];

/// Adds [`CASE_USERS`] as pool users, and `EXAMPLE\alice` as an alias of
/// the backslash user.
pub fn add_case_users(usher: &Usher) {
    for (login, password) in CASE_USERS {
        usher.add_pool_user(login, password);
    }
    usher.ok(
        &[
            "user",
            "alias-add",
            "EXAMPLE\\alice",
            "alice.backslash@example.com",
        ],
        None,
    );
}

/// One real Dovecot submission backend (`sub1`, reached with STARTTLS
/// verified against the example CA, master-user login) relaying into a
/// sink, behind one usher with the cases' users.
pub struct World {
    pub sink: Sink,
    pub dovecot: Dovecot,
    pub usher: Usher,
}

impl World {
    pub fn start() -> World {
        World::start_with(UsherOpts::default(), &["--tls", "starttls"])
    }

    /// With `opts` for usher and `flags` for the backend (`usher backend
    /// add` options).
    pub fn start_with(opts: UsherOpts, flags: &[&str]) -> World {
        let sink = Sink::start(SinkOpts::default());
        let dovecot = Dovecot::start(DovecotOpts {
            submission: Some(sink.port()),
            tls: true,
        });
        let usher = Usher::start(opts);
        usher.add_submission_backend("sub1", dovecot.submission_port().unwrap(), flags);
        add_case_users(&usher);
        World {
            sink,
            dovecot,
            usher,
        }
    }

    /// A 587 session after STARTTLS and EHLO.
    pub async fn client(&self) -> Client {
        open_starttls(self.usher.addr("submission")).await.0
    }

    /// A 587 session logged in as alice.
    pub async fn alice(&self) -> Client {
        let mut c = self.client().await;
        let r = auth_plain(&mut c, "alice@example.com", "secret").await;
        assert_eq!(r, ["235 2.7.0 Authentication successful"]);
        c
    }
}

/// `AUTH PLAIN` with an initial response; returns the reply.
pub async fn auth_plain(c: &mut Client, user: &str, password: &str) -> Vec<String> {
    command(c, &format!("AUTH PLAIN {}", plain(user, password))).await
}

/// Dot-stuffs `body` for DATA (RFC 5321 §4.5.2) and appends the end mark;
/// `body` must end with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 50 + 8);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// MAIL, RCPT, DATA and the dot-stuffed `body`; asserts each step and
/// returns the final reply (the backend's).
pub async fn send_message(c: &mut Client, mail: &str, rcpt: &str, body: &[u8]) -> Vec<String> {
    let r = command(c, mail).await;
    assert!(r[0].starts_with("250"), "{mail}: {r:?}");
    let r = command(c, rcpt).await;
    assert!(r[0].starts_with("250"), "{rcpt}: {r:?}");
    let r = command(c, "DATA").await;
    assert!(r[0].starts_with("354"), "DATA: {r:?}");
    c.send(dot_stuff(body)).await;
    reply(c).await
}

/// A short message with `subject`.
pub fn message(subject: &str) -> Vec<u8> {
    format!(
        "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\r\n\
         body of {subject}\r\n.starts with a dot\r\n.\r\nend\r\n"
    )
    .into_bytes()
}
