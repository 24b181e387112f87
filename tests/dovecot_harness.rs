//! Self-test of the Dovecot test backend (`tests/common/dovecot.rs`): the
//! logins usher relies on work, instances keep their mail apart, and stop
//! and restart behave.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use common::dovecot::{self, Dovecot, DovecotOpts, MASTER_PASSWORD, MASTER_USER};
use common::net;

/// How long a test waits for a log line or a port.
const PATIENCE: Duration = Duration::from_secs(10);

/// A password with everything that is awkward on the wire.
const HOSTILE_PASSWORD: &str = "p\"w\\ d é";

const MESSAGE: &str = "From: alice@example.com\r\n\
                       To: alice@example.com\r\n\
                       Subject: harness\r\n\
                       Message-ID: <harness@example.com>\r\n\
                       \r\n\
                       Hello.\r\n";

/// A line-oriented client over plain TCP for IMAP and SMTP transcripts.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects and returns the client with the server's greeting.
    fn connect(port: u16) -> (Client, String) {
        let stream = TcpStream::connect(net::loopback(port)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut client = Client {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        let greeting = client.line();
        (client, greeting)
    }

    /// Connects to an IMAP server and checks its greeting.
    fn imap(port: u16) -> Client {
        let (client, greeting) = Client::connect(port);
        assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read line");
        assert!(!line.is_empty(), "server closed the connection");
        line
    }

    /// Sends `tag command` and returns the tagged reply line.
    fn command(&mut self, tag: &str, command: &str) -> String {
        self.transcript(tag, command).pop().expect("tagged reply")
    }

    /// Sends `tag command` and returns every reply line, the tagged last.
    fn transcript(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until_tagged(tag)
    }

    /// Reads until the line tagged `tag` and returns it.
    fn tagged(&mut self, tag: &str) -> String {
        self.until_tagged(tag).pop().expect("tagged reply")
    }

    /// Reads lines up to and including the one tagged `tag`.
    fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let prefix = format!("{tag} ");
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let done = line.starts_with(&prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Sends `literal` as a synchronising IMAP literal after `head`, then
    /// `tail`, and returns the tagged reply.
    fn with_literal(&mut self, tag: &str, head: &str, literal: &[u8], tail: &str) -> String {
        self.send(format!("{tag} {head} {{{}}}\r\n", literal.len()).as_bytes());
        let continuation = self.line();
        assert!(continuation.starts_with('+'), "literal: {continuation}");
        self.send(literal);
        self.send(format!("{tail}\r\n").as_bytes());
        self.tagged(tag)
    }

    /// Reads SMTP reply lines up to the last one of a reply.
    fn smtp_reply(&mut self) -> String {
        loop {
            let line = self.line();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    fn smtp(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.smtp_reply()
    }
}

/// The SASL PLAIN response that logs in as `user` with the master user.
fn master_plain(user: &str) -> String {
    BASE64.encode(format!("{user}\0{MASTER_USER}\0{MASTER_PASSWORD}"))
}

fn login_with_master_plain(port: u16, user: &str) -> Client {
    let mut client = Client::imap(port);
    let reply = client.command("a", &format!("AUTHENTICATE PLAIN {}", master_plain(user)));
    assert!(reply.starts_with("a OK"), "AUTHENTICATE PLAIN: {reply}");
    client
}

fn append(client: &mut Client, message: &str) {
    let reply = client.with_literal("b", "APPEND INBOX", message.as_bytes(), "");
    assert!(reply.starts_with("b OK"), "APPEND: {reply}");
}

#[test]
fn master_user_logs_in_with_plain_authzid() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    let mut client = login_with_master_plain(dovecot.imap_port(), "alice@example.com");
    let reply = client.command("b", "SELECT INBOX");
    assert!(reply.starts_with("b OK"), "SELECT: {reply}");
    assert!(dovecot.wait_for_log("Login: user=<alice@example.com>", PATIENCE));
    assert!(dovecot.wait_for_log("Master user logging in as alice@example.com", PATIENCE));
}

#[test]
fn master_user_logs_in_with_separator() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    let mut client = Client::imap(dovecot.imap_port());
    let login = format!("LOGIN carol@example.com*{MASTER_USER} {MASTER_PASSWORD}");
    let reply = client.command("a", &login);
    assert!(reply.starts_with("a OK"), "LOGIN: {reply}");
    assert!(dovecot.wait_for_log("Login: user=<carol@example.com>", PATIENCE));
}

#[test]
fn wrong_master_password_is_refused() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    let mut client = Client::imap(dovecot.imap_port());
    let plain = BASE64.encode(format!("alice@example.com\0{MASTER_USER}\0nope"));
    let reply = client.command("a", &format!("AUTHENTICATE PLAIN {plain}"));
    assert!(reply.starts_with("a NO"), "AUTHENTICATE PLAIN: {reply}");
}

#[test]
fn added_user_logs_in_with_own_hostile_password() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    dovecot.add_user("bob@example.com", HOSTILE_PASSWORD);
    let mut client = Client::imap(dovecot.imap_port());
    let password = HOSTILE_PASSWORD.as_bytes();
    let reply = client.with_literal("a", "LOGIN bob@example.com", password, "");
    assert!(reply.starts_with("a OK"), "LOGIN: {reply}");
    assert!(dovecot.wait_for_log("Login: user=<bob@example.com>", PATIENCE));
}

#[test]
fn added_user_is_refused_with_wrong_password() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    dovecot.add_user("bob@example.com", HOSTILE_PASSWORD);
    let mut client = Client::imap(dovecot.imap_port());
    let reply = client.with_literal("a", "LOGIN bob@example.com", b"p\"w\\ d e", "");
    assert!(reply.starts_with("a NO"), "LOGIN: {reply}");
}

#[test]
fn changed_password_takes_effect_at_once() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    dovecot.add_user("bob@example.com", "old password");
    let mut client = Client::imap(dovecot.imap_port());
    let reply = client.command("a", "LOGIN bob@example.com \"old password\"");
    assert!(reply.starts_with("a OK"), "old password before: {reply}");

    // Dovecot reads the file again only in a later second than its last
    // read; add_user waits for that, so a login right after sees the change.
    dovecot.add_user("Bob@Example.com", "new password");
    let mut client = Client::imap(dovecot.imap_port());
    let reply = client.command("a", "LOGIN bob@example.com \"old password\"");
    assert!(reply.starts_with("a NO"), "old password after: {reply}");
    let reply = client.command("b", "LOGIN bob@example.com \"new password\"");
    assert!(reply.starts_with("b OK"), "new password after: {reply}");
}

#[test]
fn two_instances_keep_their_mail_apart() {
    let (one, two) = thread::scope(|scope| {
        let one = scope.spawn(|| Dovecot::start(DovecotOpts::default()));
        let two = scope.spawn(|| Dovecot::start(DovecotOpts::default()));
        (
            one.join().expect("start one"),
            two.join().expect("start two"),
        )
    });
    assert_ne!(one.imap_port(), two.imap_port());
    let mut client = login_with_master_plain(one.imap_port(), "alice@example.com");
    append(&mut client, MESSAGE);
    login_with_master_plain(two.imap_port(), "alice@example.com");

    let files = one.message_files("alice@example.com");
    assert_eq!(files.len(), 1, "instance one: {files:?}");
    let stored = std::fs::read_to_string(&files[0]).expect("read message");
    assert!(stored.contains("Subject: harness"), "stored: {stored}");
    assert!(one.wait_for_log("save: box=INBOX", PATIENCE));
    assert_eq!(
        two.message_files("alice@example.com"),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn put_message_shows_up_in_imap() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    dovecot.put_message("dave@example.com", MESSAGE.as_bytes());
    let mut client = login_with_master_plain(dovecot.imap_port(), "dave@example.com");
    let lines = client.transcript("b", "SELECT INBOX");
    assert!(lines.contains(&"* 1 EXISTS\r\n".to_string()), "{lines:?}");
}

#[test]
fn stop_closes_the_port_and_restart_reopens_it() {
    let mut dovecot = Dovecot::start(DovecotOpts::default());
    let port = dovecot.imap_port();
    dovecot.stop();
    assert!(!net::is_listening(port), "port {port} open after stop");
    assert!(!dovecot.is_running());

    dovecot.restart();
    assert_eq!(dovecot.imap_port(), port);
    login_with_master_plain(port, "alice@example.com");

    dovecot.restart();
    login_with_master_plain(port, "alice@example.com");
}

#[test]
fn drop_closes_the_port() {
    let dovecot = Dovecot::start(DovecotOpts::default());
    let port = dovecot.imap_port();
    drop(dovecot);
    assert!(!net::is_listening(port), "port {port} open after drop");
}

#[test]
fn tls_instance_serves_the_example_certificate() {
    let dovecot = Dovecot::start(DovecotOpts {
        tls: true,
        ..DovecotOpts::default()
    });
    let mut client = Client::imap(dovecot.imap_port());
    let reply = client.command("a", "CAPABILITY");
    assert!(reply.starts_with("a OK"), "CAPABILITY: {reply}");
    let imaps = dovecot.imaps_port().expect("imaps port with tls");
    let transcript = openssl_s_client(imaps);
    assert!(transcript.contains("Verification: OK"), "{transcript}");
    assert!(transcript.contains("* OK"), "{transcript}");
    assert!(transcript.contains("a OK Logout"), "{transcript}");
}

#[test]
fn submission_relays_to_the_given_port() {
    let (relay_port, received) = spawn_relay();
    let dovecot = Dovecot::start(DovecotOpts {
        submission: Some(relay_port),
        ..DovecotOpts::default()
    });
    let port = dovecot.submission_port().expect("submission port");
    let (mut client, greeting) = Client::connect(port);
    assert!(greeting.starts_with("220 "), "greeting: {greeting}");
    assert!(client.smtp("EHLO client.example").starts_with("250 "));
    let auth = client.smtp(&format!("AUTH PLAIN {}", master_plain("alice@example.com")));
    assert!(auth.starts_with("235 "), "AUTH: {auth}");
    assert!(client
        .smtp("MAIL FROM:<alice@example.com>")
        .starts_with("250 "));
    assert!(client.smtp("RCPT TO:<bob@example.org>").starts_with("250 "));
    assert!(client.smtp("DATA").starts_with("354 "));
    let end = client.smtp(&format!("{MESSAGE}."));
    assert!(end.starts_with("250 "), "end of DATA: {end}");

    let relayed = received
        .recv_timeout(PATIENCE)
        .expect("relay got a message");
    assert!(relayed.contains("Subject: harness"), "relayed: {relayed}");
}

/// Talks TLS to `port` with openssl, verifying against the example CA, and
/// logs out; returns what openssl printed.
fn openssl_s_client(port: u16) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-brief", "-ign_eof", "-verify_return_error"])
        .arg("-CAfile")
        .arg(dovecot::example_ca_cert())
        .args(["-servername", "localhost", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    // -ign_eof keeps the connection open until Dovecot answers LOGOUT.
    let mut stdin = child.stdin.take().expect("openssl stdin");
    stdin.write_all(b"a LOGOUT\r\n").expect("write to openssl");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A one-message SMTP server on a free port; sends the DATA it receives.
fn spawn_relay() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind(net::loopback(0)).expect("bind relay");
    let port = listener.local_addr().expect("relay address").port();
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("relay accept");
        if let Some(data) = serve_smtp(stream) {
            let _ = sender.send(data);
        }
    });
    (port, receiver)
}

/// Accepts one message over SMTP and returns its DATA.
fn serve_smtp(stream: TcpStream) -> Option<String> {
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 relay.test ESMTP\r\n").ok()?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-relay.test\r\n250 8BITMIME\r\n",
            "DATA" => {
                writer.write_all(b"354 go ahead\r\n").ok()?;
                let data = read_data(&mut reader)?;
                writer.write_all(b"250 2.0.0 queued\r\n").ok()?;
                return Some(data);
            }
            "QUIT" => return None,
            _ => b"250 ok\r\n",
        };
        writer.write_all(reply).ok()?;
    }
}

/// Reads SMTP DATA up to the lone dot.
fn read_data(reader: &mut impl BufRead) -> Option<String> {
    let mut data = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == ".\r\n" {
            return Some(data);
        }
        data.push_str(&line);
    }
}
