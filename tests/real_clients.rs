//! Real mail clients through usher to real Dovecot backends.
//!
//! IMAP (issue 2): Python's imaplib, driven by `tests/clients/
//! imaplib_session.py`, logs in three ways (a synchronising literal, SASL
//! PLAIN, imaplib's quoted `login()`), SELECTs, APPENDs, FETCHes and IDLEs
//! until a message appended by a second connection shows up; mbsync
//! (isync) pushes a Maildir of over a hundred varied messages through
//! usher and pulls it back into an empty one, compared byte for byte.
//!
//! Submission (issue 3): swaks (AUTH PLAIN and LOGIN, STARTTLS and
//! implicit TLS, PIPELINING) and Python's smtplib (`tests/clients/
//! smtplib_session.py`) submit through usher to Dovecot's submission
//! service, which relays into the test's sink; the sink must hold exactly
//! the bytes the client sent below the one `Received:` field Dovecot adds.
//!
//! Every client runs as a child process with a time limit; passwords go to
//! it through the environment (or a `PassCmd` reading the environment),
//! never through its arguments.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use common::dovecot::{example_ca_cert, Dovecot, DovecotOpts};
use common::usher::{Usher, UsherOpts};

/// How long one client run may take before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The user every test logs in as.
const USER: &str = "alice@example.com";

/// A double quote, a backslash, a space and non-ASCII UTF-8 (two-, three-
/// and four-octet sequences).
const HARD_PASSWORD: &str = "p\"a\\ss w\u{f6}rd \u{20ac}\u{1f4ec}";

/// What smtplib and imaplib's quoted `login()` can send: both encode the
/// password as ASCII, so it has the quote, backslash and space only.
const ASCII_PASSWORD: &str = "q\"uo\\ted pass";

// ---------------------------------------------------------------------
// Child processes

/// Runs `cmd` with stdin closed; kills it after `timeout` and panics with
/// what it printed.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let collect = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status: status.unwrap_or_else(|| child.wait().unwrap()),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "{what} ran longer than {timeout:?} and was killed\n{}",
        describe(&output)
    );
    output
}

/// A child's exit status and output, for failure messages.
fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A file of the client scripts in `tests/clients/`.
fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// The one JSON object a Python driver printed; panics with its output
/// when it failed.
fn json_report(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "driver failed\n{}",
        describe(output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e})\n{}", describe(output)))
}

fn b64_decode(value: &Value) -> Vec<u8> {
    let text = value.as_str().expect("base64 string in the report");
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64 in the report")
}

/// `bytes` with every CRLF turned into LF: how Dovecot's Maildir stores a
/// message that arrived with CRLF line ends (`mail_save_crlf = no`).
fn crlf_to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

// ---------------------------------------------------------------------
// IMAP: the world

/// Two Dovecot backends behind one usher; [`USER`] lives on `home`, so
/// nothing of theirs may ever appear on `other`.
struct ImapWorld {
    home: Dovecot,
    other: Dovecot,
    usher: Usher,
}

fn imap_world(password: &str) -> ImapWorld {
    let (home, other) = thread::scope(|s| {
        let a = s.spawn(|| Dovecot::start(DovecotOpts::default()));
        let b = s.spawn(|| Dovecot::start(DovecotOpts::default()));
        (a.join().unwrap(), b.join().unwrap())
    });
    let usher = Usher::start(UsherOpts::default());
    usher.add_backend("other", &other);
    usher.add_backend("home", &home);
    usher.add_user(USER, password.as_bytes(), "home");
    ImapWorld { home, other, usher }
}

impl ImapWorld {
    /// The contents of every message file of [`USER`] on `home`, sorted,
    /// after checking that `other` has none.
    fn stored_messages(&self) -> Vec<Vec<u8>> {
        assert!(
            self.other.message_files(USER).is_empty() && !self.other.maildir(USER).exists(),
            "mail of {USER} reached the wrong backend"
        );
        let mut contents: Vec<Vec<u8>> = self
            .home
            .message_files(USER)
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect();
        contents.sort();
        contents
    }
}

// ---------------------------------------------------------------------
// IMAP: imaplib

/// The message imaplib APPENDs: CRLF line ends throughout (imaplib turns
/// every bare CR or LF into CRLF), 8-bit UTF-8, a line of a lone dot, a
/// long line.
fn imaplib_message(subject: &str) -> Vec<u8> {
    let long = "0123456789abcdef".repeat(120);
    format!(
        "From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n\
         Subject: {subject} =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n\
         Message-ID: <{subject}@usher.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\
         \r\nGr\u{fc}\u{df}e aus K\u{f6}ln \u{2709} \u{1f4ec}\r\n.\r\n.leading dot\r\n\
         \ttab and \"quotes\" and \\backslash\r\n\r\n{long}\r\nend\r\n"
    )
    .into_bytes()
}

/// What one run of the imaplib driver reported, with the messages it used.
struct ImaplibRun {
    report: Value,
    message: Vec<u8>,
    idle_message: Vec<u8>,
}

/// Runs `imaplib_session.py` against usher's `listener` with `--tls tls`
/// and `--login login`, as [`USER`] with `password`.
fn run_imaplib(
    w: &ImapWorld,
    listener: &str,
    tls: &str,
    login: &str,
    password: &str,
) -> ImaplibRun {
    let dir = tempfile::tempdir().unwrap();
    let message = imaplib_message(&format!("imaplib-{login}"));
    let idle_message = imaplib_message(&format!("imaplib-{login}-idle"));
    std::fs::write(dir.path().join("message.eml"), &message).unwrap();
    std::fs::write(dir.path().join("idle.eml"), &idle_message).unwrap();
    let addr = w.usher.addr(listener);
    let mut cmd = Command::new("python3");
    cmd.arg(client_script("imaplib_session.py"))
        .args(["--host", "localhost", "--port", &addr.port().to_string()])
        .args(["--tls", tls, "--login", login])
        .arg("--ca")
        .arg(example_ca_cert())
        .arg("--message")
        .arg(dir.path().join("message.eml"))
        .arg("--idle-message")
        .arg(dir.path().join("idle.eml"))
        .env("USHER_USER", USER)
        .env("USHER_PASSWORD", password);
    let output = run_bounded(cmd, CHILD_TIMEOUT);
    ImaplibRun {
        report: json_report(&output),
        message,
        idle_message,
    }
}

/// The wire entries of the login exchange as (direction, text).
fn wire(report: &Value) -> Vec<(String, String)> {
    report["wire"]
        .as_array()
        .expect("wire in the report")
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The tag of the first command sent in the login exchange.
fn login_tag(wire: &[(String, String)]) -> String {
    let (dir, first) = &wire[0];
    assert_eq!(dir, "C", "{wire:?}");
    first.split(' ').next().unwrap().to_string()
}

/// Everything after the login: the backend's capabilities in the tagged
/// OK, SELECT, the APPENDed message FETCHed back unchanged, IDLE seeing
/// the second connection's message, LOGOUT, and both messages stored on
/// `home` (with LF line ends, as Dovecot stores them) and nowhere else.
fn assert_session_after_login(w: &ImapWorld, run: &ImaplibRun) {
    let r = &run.report;
    assert_eq!(r["login"][0], "OK", "{r:#}");
    let ok_text = r["login"][1].as_str().unwrap();
    assert!(
        ok_text.starts_with("[CAPABILITY IMAP4rev1") && ok_text.contains(" IDLE"),
        "tagged OK should carry the backend's capabilities: {ok_text}"
    );
    assert_eq!(r["select"], serde_json::json!(["OK", 0]), "{r:#}");
    assert!(
        b64_decode(&r["fetched_b64"]) == run.message,
        "FETCH BODY[] differs from what was APPENDed"
    );

    let idle = &r["idle"];
    assert!(
        idle["continuation"].as_str().unwrap().starts_with("+"),
        "{idle:#}"
    );
    assert_eq!(idle["exists"], "* 2 EXISTS", "{idle:#}");
    let done = idle["done"].as_str().unwrap();
    assert!(
        done.split(' ').nth(1) == Some("OK"),
        "IDLE ended with {done}"
    );
    assert!(
        b64_decode(&r["idle_fetched_b64"]) == run.idle_message,
        "the message seen while idling differs from what was APPENDed"
    );
    assert_eq!(r["logout"][0], "BYE", "{r:#}");

    let mut expected = vec![crlf_to_lf(&run.message), crlf_to_lf(&run.idle_message)];
    expected.sort();
    assert!(
        w.stored_messages() == expected,
        "the backend's Maildir does not hold exactly the two APPENDed messages"
    );
}

/// The password as a synchronising literal over STARTTLS: `{n}` counts
/// its UTF-8 octets, usher answers `+`, the octets go out unchanged.
#[test]
fn imaplib_literal_login_with_quote_backslash_space_and_utf8_over_starttls() {
    let w = imap_world(HARD_PASSWORD);
    let run = run_imaplib(&w, "imap", "starttls", "literal", HARD_PASSWORD);
    let r = &run.report;
    assert!(
        r["capabilities_before_tls"]
            .as_array()
            .unwrap()
            .contains(&"STARTTLS".into()),
        "{r:#}"
    );
    let wire = wire(r);
    let tag = login_tag(&wire);
    let octets = HARD_PASSWORD.len();
    assert_eq!(
        wire[..4],
        [
            ("C".into(), format!("{tag} LOGIN {USER} {{{octets}}}\r\n")),
            ("S".into(), wire[1].1.clone()),
            ("C".into(), HARD_PASSWORD.to_string()),
            ("C".into(), "\r\n".into()),
        ],
        "{wire:?}"
    );
    assert!(wire[1].1.starts_with("+"), "no continuation: {wire:?}");
    let last = &wire.last().unwrap().1;
    assert!(last.starts_with(&format!("{tag} OK ")), "{wire:?}");
    assert_session_after_login(&w, &run);
}

/// AUTHENTICATE PLAIN (no initial response) over implicit TLS with the
/// same password: the base64 response carries its exact octets.
#[test]
fn imaplib_authenticate_plain_with_utf8_password_over_implicit_tls() {
    let w = imap_world(HARD_PASSWORD);
    let run = run_imaplib(&w, "imaps", "implicit", "plain", HARD_PASSWORD);
    let r = &run.report;
    assert!(r["capabilities_before_tls"].is_null(), "{r:#}");
    let wire = wire(r);
    let tag = login_tag(&wire);
    let response =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{HARD_PASSWORD}"));
    assert_eq!(wire[0].1, format!("{tag} AUTHENTICATE PLAIN\r\n"));
    assert!(wire[1].1.starts_with("+"), "no continuation: {wire:?}");
    assert_eq!(
        wire[2..4],
        [("C".into(), response), ("C".into(), "\r\n".into())]
    );
    assert_session_after_login(&w, &run);
}

/// imaplib's own `login()` quotes the password (`\"` and `\\`); it can
/// send only ASCII, so this password has the quote, backslash and space.
#[test]
fn imaplib_quoted_login_with_quote_backslash_and_space_over_starttls() {
    let w = imap_world(ASCII_PASSWORD);
    let run = run_imaplib(&w, "imap", "starttls", "quoted", ASCII_PASSWORD);
    let wire = wire(&run.report);
    let tag = login_tag(&wire);
    assert_eq!(
        wire[0].1,
        format!("{tag} LOGIN {USER} \"q\\\"uo\\\\ted pass\"\r\n")
    );
    assert!(wire[1].1.starts_with(&format!("{tag} OK ")), "{wire:?}");
    assert_session_after_login(&w, &run);
}

/// A wrong password through the same driver: a tagged NO with
/// `[AUTHENTICATIONFAILED]`, and nothing reaches either backend.
#[test]
fn imaplib_literal_login_with_wrong_password_is_refused() {
    let w = imap_world(HARD_PASSWORD);
    let wrong = HARD_PASSWORD.replace('\u{20ac}', "E");
    let run = run_imaplib(&w, "imap", "starttls", "literal", &wrong);
    let r = &run.report;
    assert_eq!(r["login"][0], "NO", "{r:#}");
    assert!(
        r["login"][1]
            .as_str()
            .unwrap()
            .starts_with("[AUTHENTICATIONFAILED]"),
        "{r:#}"
    );
    assert!(w.stored_messages().is_empty());
    assert!(!w.home.log().contains("Login: user=<"), "{}", w.home.log());
}
