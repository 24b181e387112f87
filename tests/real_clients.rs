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

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use common::dovecot::{example_ca_cert, Dovecot, DovecotOpts};
use common::smtp::World;
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

/// Where `got` first departs from `want`, with some context, for failure
/// messages about large messages.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |bytes: &[u8]| {
        let from = at.saturating_sub(80);
        String::from_utf8_lossy(&bytes[from..bytes.len().min(at + 80)]).into_owned()
    };
    format!(
        "{} octets, expected {}; first difference at octet {at}:\n got: {:?}\nwant: {:?}",
        got.len(),
        want.len(),
        around(got),
        around(want)
    )
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
    let waited = idle["seconds"].as_f64().unwrap();
    if waited > 5.0 {
        // Not usher's doing: see IDLE_TIMEOUT in imaplib_session.py.
        eprintln!(
            "note: IDLE saw the new message after {waited} s; Dovecot checks \
             every 30 s when it has no inotify instance left"
        );
    }
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

// ---------------------------------------------------------------------
// IMAP: mbsync

/// How many messages the mbsync tests sync.
const MBSYNC_MESSAGES: usize = 120;

/// The index of the message with the multi-megabyte attachment.
const BIG_ONE: usize = 57;

/// One message of the generated Maildir.
#[derive(Clone)]
struct Generated {
    /// `<mbsync-NNN@usher.test>`, unique: how copies are matched up.
    message_id: String,
    /// The file's exact bytes (LF line ends, as Maildir keeps them).
    bytes: Vec<u8>,
    /// Maildir flags (`:2,` info, letters sorted); `None` for a message
    /// in `new/`.
    flags: Option<&'static str>,
}

/// A deterministic stream of pseudo-random octets (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Base64 in lines of 76 characters, LF-terminated.
fn base64_lines(data: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(text.len() + text.len() / 76 + 1);
    for chunk in text.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out
}

/// Message `i` of the generated Maildir: plain ASCII, 8-bit UTF-8 and
/// Latin-1 bodies, raw UTF-8 and encoded-word headers, folded headers,
/// multipart/alternative, multipart/mixed with a small attachment, lines
/// starting with a dot or `From `, bodies from empty to tens of kilobytes;
/// message [`BIG_ONE`] carries a 3 MiB base64 attachment.
fn generated_message(i: usize) -> Generated {
    let message_id = format!("<mbsync-{i:03}@usher.test>");
    let date = format!(
        "Date: {}, {:02} Nov 2026 {:02}:{:02}:{:02} +0100\n",
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][i % 7],
        i % 28 + 1,
        i % 24,
        (i * 7) % 60,
        (i * 13) % 60
    );
    let mut head = format!(
        "From: Sender {i} <sender{i}@example.net>\nTo: {USER}\n{date}Message-ID: {message_id}\n"
    );
    let lines = (i * 37) % 300;
    let body = match i % 8 {
        0 => {
            head.push_str(&format!("Subject: plain ascii {i}\n"));
            (0..lines)
                .map(|n| format!("line {n} of message {i}\n"))
                .collect()
        }
        1 => {
            head.push_str(&format!(
                "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_{i}?=\nMIME-Version: 1.0\n\
                 Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
            ));
            (0..lines)
                .map(|n| format!("{n}: K\u{f6}ln \u{20ac} \u{1f4ec} \u{65e5}\u{672c}\n"))
                .collect()
        }
        2 => {
            // Raw UTF-8 in headers (RFC 6532) and a long folded header.
            head.push_str(&format!(
                "Subject: r\u{e9}sum\u{e9} \u{2013} {i}\nX-Long: {}\n",
                (0..30)
                    .map(|n| format!("word{n}"))
                    .collect::<Vec<_>>()
                    .join("\n\t")
            ));
            format!(".\n.leading dot\n..two dots\nFrom the start of a line\n{i}\n")
        }
        3 => {
            head.push_str(&format!(
                "Subject: alternative {i}\nMIME-Version: 1.0\n\
                 Content-Type: multipart/alternative; boundary=\"alt-{i}\"\n"
            ));
            format!(
                "This is a multi-part message in MIME format.\n\n--alt-{i}\n\
                 Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n\
                 Plain caf\u{e9} {i}\n\n--alt-{i}\nContent-Type: text/html; charset=utf-8\n\
                 Content-Transfer-Encoding: quoted-printable\n\n\
                 <p>caf=C3=A9 {i}</p>=\n\n--alt-{i}--\n"
            )
        }
        4 => {
            head.push_str(&format!(
                "Subject: with attachment {i}\nMIME-Version: 1.0\n\
                 Content-Type: multipart/mixed; boundary=\"mix-{i}\"\n"
            ));
            format!(
                "--mix-{i}\nContent-Type: text/plain\n\nsee attached\n\n--mix-{i}\n\
                 Content-Type: application/octet-stream; name=\"blob{i}.bin\"\n\
                 Content-Transfer-Encoding: base64\n\
                 Content-Disposition: attachment; filename=\"blob{i}.bin\"\n\n{}\
                 --mix-{i}--\n",
                base64_lines(&noise(100 + i * 211, i as u64))
            )
        }
        5 => {
            // Latin-1 octets that are not UTF-8.
            head.push_str(&format!(
                "Subject: latin-1 {i}\nContent-Type: text/plain; charset=iso-8859-1\n\
                 Content-Transfer-Encoding: 8bit\n"
            ));
            let body = b"caf\xe9 na\xefve \xff\xfe\n".repeat(lines / 20 + 1);
            return finish(message_id, head, body, i);
        }
        6 => {
            head.push_str(&format!("Subject: empty body {i}\n"));
            String::new()
        }
        _ => {
            head.push_str(&format!("Subject: long lines {i}\n"));
            (0..lines / 10 + 1)
                .map(|n| format!("{n} {}\n", "x".repeat(900 + n)))
                .collect()
        }
    };
    finish(message_id, head, body.into_bytes(), i)
}

/// Joins header and body; picks the flags; adds the big attachment to
/// message [`BIG_ONE`].
fn finish(message_id: String, head: String, body: Vec<u8>, i: usize) -> Generated {
    let mut bytes = head.into_bytes();
    bytes.push(b'\n');
    bytes.extend_from_slice(&body);
    if i == BIG_ONE {
        let blob = base64_lines(&noise(3 * 1024 * 1024, 0x5eed));
        bytes = format!(
            "From: big@example.net\nTo: {USER}\nMessage-ID: {message_id}\n\
             Subject: three megabytes\nMIME-Version: 1.0\n\
             Content-Type: multipart/mixed; boundary=\"big\"\n\n--big\n\
             Content-Type: text/plain\n\nthe attachment follows\n\n--big\n\
             Content-Type: application/octet-stream; name=\"big.bin\"\n\
             Content-Transfer-Encoding: base64\n\n{blob}--big--\n"
        )
        .into_bytes();
    }
    let flags = [
        None,
        Some("S"),
        Some("FS"),
        Some("RS"),
        Some(""),
        Some("DS"),
    ][i % 6];
    Generated {
        message_id,
        bytes,
        flags,
    }
}

/// The generated messages, all of them.
fn generated_messages() -> Vec<Generated> {
    (0..MBSYNC_MESSAGES).map(generated_message).collect()
}

/// Writes `messages` into a new Maildir at `dir` (`cur/`, `new/`, `tmp/`).
fn write_maildir(dir: &Path, messages: &[Generated]) {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for (i, m) in messages.iter().enumerate() {
        let base = format!("1796000000.M{i}P1.generated");
        let path = match m.flags {
            None => dir.join("new").join(base),
            Some(flags) => dir.join("cur").join(format!("{base}:2,{flags}")),
        };
        std::fs::write(path, &m.bytes).unwrap();
    }
}

/// A message file as (Message-ID, flags, bytes), the flags from its name
/// (`None` in `new/`).
fn read_maildir_file(path: &Path) -> (String, Option<String>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let in_new = path.parent().unwrap().ends_with("new");
    let flags = match name.split_once(":2,") {
        Some((_, flags)) => Some(flags.to_string()),
        None if in_new => None,
        None => Some(String::new()),
    };
    (message_id_of(&bytes), flags, bytes)
}

/// The Message-ID header's value of a generated message.
fn message_id_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text
        .find("\nMessage-ID: ")
        .unwrap_or_else(|| panic!("no Message-ID in {:?}", &text[..text.len().min(300)]));
    let value = &text[start + "\nMessage-ID: ".len()..];
    value[..value.find('\n').unwrap()].to_string()
}

/// Every message file of the Maildir at `dir` by Message-ID; panics on a
/// duplicate.
fn maildir_by_id(dir: &Path) -> BTreeMap<String, (Option<String>, Vec<u8>)> {
    let mut map = BTreeMap::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let (id, flags, bytes) = read_maildir_file(&entry.unwrap().path());
            assert!(
                map.insert(id.clone(), (flags, bytes)).is_none(),
                "{id} twice"
            );
        }
    }
    map
}

/// A temporary directory with an mbsyncrc for one channel `box` between
/// usher's `listener` (INBOX of [`USER`]) and the Maildir `maildir`.
fn mbsyncrc(dir: &Path, usher: &Usher, listener: &str, ssl_type: &str, maildir: &Path) -> PathBuf {
    let text = format!(
        "IMAPAccount usher
Host localhost
Port {port}
User {USER}
PassCmd \"printenv USHER_PASSWORD\"
SSLType {ssl_type}
CertificateFile {ca}
Timeout 20

IMAPStore far
Account usher

MaildirStore near
Path {dir}/
Inbox {maildir}

Channel box
Far :far:
Near :near:
Create Near
Expunge None
SyncState *
",
        port = usher.addr(listener).port(),
        ca = example_ca_cert().display(),
        dir = dir.display(),
        maildir = maildir.display(),
    );
    let path = dir.join(format!(
        "mbsyncrc-{}",
        maildir.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `mbsync -c rc <direction> box` with `password` in its environment
/// (read by `PassCmd`); panics unless it succeeds.
fn mbsync(rc: &Path, direction: &str, password: &str) -> Output {
    let mut cmd = Command::new("/usr/bin/mbsync");
    cmd.arg("-c")
        .arg(rc)
        .args([direction, "box"])
        .env("HOME", rc.parent().unwrap())
        .env("USHER_PASSWORD", password);
    let output = run_bounded(cmd, CHILD_TIMEOUT);
    assert!(
        output.status.success(),
        "mbsync {direction} failed\n{}",
        describe(&output)
    );
    output
}

/// `stored` with the one `X-TUID:` line mbsync put into it taken out, and
/// that line.
///
/// mbsync (isync 1.4) marks every message it copies, in either direction,
/// with a header `X-TUID: ` followed by 12 base64 characters, inserted as
/// the last line of the header section (after dropping any `X-TUID` the
/// message already had), so that it can find the copy again if it does not
/// learn its UID. So a pushed message reaches the backend with one such
/// line, and a pulled one arrives with one (a new value). Exactly that
/// line is removed here, and only if it has exactly that form and place;
/// the generated messages carry no `X-TUID`, so a second one would be left
/// in and fail the comparison.
fn without_tuid(stored: &[u8]) -> (Vec<u8>, String) {
    let blank = stored
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("a header section ending in a blank line")
        + 1;
    let line_start = stored[..blank - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = String::from_utf8_lossy(&stored[line_start..blank]).into_owned();
    let tuid = line
        .strip_prefix("X-TUID: ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("last header line is not an X-TUID line: {line:?}"));
    assert!(
        tuid.len() == 12
            && tuid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
        "unexpected X-TUID line {line:?}"
    );
    let mut rest = stored[..line_start].to_vec();
    rest.extend_from_slice(&stored[blank..]);
    (rest, line)
}

/// Maildir flags as letters, a message in `new/` having none. (Where a
/// copy sits, `new/` or `cur/`, is not compared: that is `\Recent`, which
/// no IMAP client can set, and mbsync files what it copies under `cur/`.)
fn letters(flags: &Option<String>) -> &str {
    flags.as_deref().unwrap_or("")
}

/// Checks that `copies` (a Maildir by Message-ID) holds exactly the
/// `originals`, each as `expected(original)` with the original's flags.
fn assert_same_messages(
    what: &str,
    originals: &[Generated],
    copies: &BTreeMap<String, (Option<String>, Vec<u8>)>,
    mut check: impl FnMut(&Generated, &[u8]),
) {
    let ids: Vec<&String> = copies.keys().collect();
    let expected: Vec<&String> = originals.iter().map(|m| &m.message_id).collect();
    assert_eq!(ids, expected, "{what}: other messages than the originals");
    for m in originals {
        let (flags, bytes) = &copies[&m.message_id];
        let want = m.flags.unwrap_or("");
        assert_eq!(letters(flags), want, "{what}: flags of {}", m.message_id);
        check(m, bytes);
    }
}

/// The generated Maildir, pushed up through usher's STARTTLS listener
/// with mbsync, lands in the user's Maildir on `home` with every message
/// and its flags; pulled down again over implicit TLS into an empty
/// Maildir, every message is byte for byte the original. The only change
/// on the way is mbsync's own `X-TUID:` line (see [`without_tuid`]): one
/// on the backend's copy, one on the pulled copy.
#[test]
fn mbsync_round_trip_up_and_back_down_is_byte_for_byte() {
    let w = imap_world(HARD_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let originals = generated_messages();
    let big = originals[BIG_ONE].bytes.len();
    assert!(big > 4_000_000, "the big message has {big} octets");
    let up = dir.path().join("up");
    write_maildir(&up, &originals);

    // Up: every message reaches the backend, with one X-TUID line more.
    let rc = mbsyncrc(dir.path(), &w.usher, "imap", "STARTTLS", &up);
    mbsync(&rc, "--push", HARD_PASSWORD);
    assert!(w.other.message_files(USER).is_empty());
    let stored = maildir_by_id(&w.home.maildir(USER));
    assert_same_messages("backend", &originals, &stored, |m, bytes| {
        let (rest, _) = without_tuid(bytes);
        assert!(
            rest == m.bytes,
            "backend copy of {} differs beyond the X-TUID line: {}",
            m.message_id,
            first_difference(&rest, &m.bytes)
        );
    });

    // Down: an empty Maildir receives the originals again, each with the
    // X-TUID line of this copy in place of the upload's.
    let down = dir.path().join("down");
    let rc = mbsyncrc(dir.path(), &w.usher, "imaps", "IMAPS", &down);
    mbsync(&rc, "--pull", HARD_PASSWORD);
    let pulled = maildir_by_id(&down);
    assert_same_messages("pulled", &originals, &pulled, |m, bytes| {
        assert!(
            without_tuid(bytes).0 == m.bytes,
            "pulled copy of {} differs from the original beyond the X-TUID line: {}",
            m.message_id,
            first_difference(&without_tuid(bytes).0, &m.bytes)
        );
    });
}

/// Messages delivered straight into the backend's Maildir (no mbsync
/// header in them), pulled with mbsync through usher's implicit-TLS
/// listener into an empty Maildir: each arrives byte for byte, with only
/// mbsync's `X-TUID:` line added (see [`without_tuid`]).
#[test]
fn mbsync_pull_of_delivered_messages_is_byte_for_byte() {
    let w = imap_world(HARD_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let originals: Vec<Generated> = generated_messages()
        .into_iter()
        .map(|m| Generated { flags: None, ..m })
        .collect();
    for m in &originals {
        w.home.put_message(USER, &m.bytes);
    }
    let down = dir.path().join("down");
    let rc = mbsyncrc(dir.path(), &w.usher, "imaps", "IMAPS", &down);
    mbsync(&rc, "--pull", HARD_PASSWORD);
    let pulled = maildir_by_id(&down);
    assert_same_messages("pulled", &originals, &pulled, |m, bytes| {
        let (rest, _) = without_tuid(bytes);
        assert!(
            rest == m.bytes,
            "pulled copy of {} differs beyond the X-TUID line: {}",
            m.message_id,
            first_difference(&rest, &m.bytes)
        );
    });
}

// ---------------------------------------------------------------------
// Submission

/// How long the sink may take to receive a relayed message.
const SINK_WAIT: Duration = Duration::from_secs(20);

/// Who submits: a pool user of its own, beside the cases' users that
/// [`World`] adds.
const SUBMITTER: &str = "erin@example.com";

/// The envelope every submission test uses.
const MAIL_FROM: &str = SUBMITTER;
const RCPT_TO: &str = "bob@example.org";

/// A Dovecot submission backend relaying into a sink, behind usher, with
/// [`SUBMITTER`] logging in with `password`.
fn submission_world(password: &str) -> World {
    let w = World::start();
    w.usher.add_pool_user(SUBMITTER, password.as_bytes());
    w
}

/// The message a submission client sends: CRLF throughout, 8-bit UTF-8,
/// lines that need dot-stuffing (a lone dot, leading dots), a quote and a
/// backslash, a long line. No `%TOKEN%` (swaks would replace it) and no
/// backslash before an `n`.
fn submission_message(client: &str) -> Vec<u8> {
    let long = "0123456789abcdef".repeat(60);
    format!(
        "From: Alice <{MAIL_FROM}>\r\nTo: Bob <{RCPT_TO}>\r\n\
         Subject: via {client} =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n\
         Message-ID: <{client}@usher.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\
         \r\nGr\u{fc}\u{df}e aus K\u{f6}ln \u{20ac} \u{1f4ec}\r\n.\r\n.leading dot\r\n\
         ..two dots\r\n\"quoted\" and C:\\Temp\\x\r\n\r\n{long}\r\nend\r\n"
    )
    .into_bytes()
}

/// Splits the relay's trace off the top of `data`: exactly one
/// `Received:` field, its first line and the folded continuation lines
/// (starting with a space or a tab), each ending in CRLF. Returns the
/// field's lines and the rest, which must then be the client's bytes.
fn split_received(data: &[u8]) -> (Vec<String>, &[u8]) {
    let mut lines = Vec::new();
    let mut rest = data;
    loop {
        let continued = !lines.is_empty() && (rest.starts_with(b" ") || rest.starts_with(b"\t"));
        if !(lines.is_empty() || continued) {
            break;
        }
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a CRLF-terminated trace line")
            + 2;
        lines.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end..];
    }
    assert!(
        lines[0].starts_with("Received: from "),
        "the relayed message does not start with a Received field: {lines:?}"
    );
    (lines, rest)
}

/// The one message in the sink: the envelope as the client gave it, and
/// the content exactly `sent` below one `Received:` field of Dovecot's
/// that records an authenticated submission.
fn assert_arrived_unchanged(w: &World, sent: &[u8]) {
    let messages = w.sink.wait_for(1, SINK_WAIT);
    assert_eq!(messages.len(), 1, "{:?}", w.sink.lines());
    let m = &messages[0];
    assert!(
        m.mail.starts_with(&format!("MAIL FROM:<{MAIL_FROM}>")),
        "{}",
        m.mail
    );
    assert_eq!(m.rcpts, [format!("RCPT TO:<{RCPT_TO}>")]);
    let (trace, rest) = split_received(&m.data);
    assert!(
        trace.concat().contains("with ESMTPSA"),
        "Dovecot's trace should show an authenticated TLS submission: {trace:?}"
    );
    assert!(
        rest == sent,
        "the relayed message differs below its Received field: {}",
        first_difference(rest, sent)
    );
}

/// Runs swaks against usher's `listener` with `tls` (`--tls` for
/// STARTTLS, `--tlsc` for TLS on connect), `--auth mech` as [`SUBMITTER`] and
/// `--pipeline`, the password in `SWAKS_OPT_auth_password`; returns the
/// transcript it printed and the message it sent.
fn run_swaks(
    w: &World,
    listener: &str,
    tls: &str,
    mech: &str,
    password: &str,
) -> (String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let message = submission_message(&format!("swaks-{listener}-{mech}"));
    let path = dir.path().join("message.eml");
    std::fs::write(&path, &message).unwrap();
    let addr = w.usher.addr(listener);
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port", &addr.port().to_string()])
        .args([
            "--ehlo",
            "client.example.net",
            "--from",
            MAIL_FROM,
            "--to",
            RCPT_TO,
        ])
        .args([tls, "--tls-verify", "--tls-ca-path"])
        .arg(example_ca_cert())
        .args(["--auth", mech, "--auth-user", SUBMITTER, "--pipeline"])
        .args(["--timeout", "20"])
        .arg("--data")
        .arg(format!("@{}", path.display()))
        .env("SWAKS_OPT_auth_password", password);
    let output = run_bounded(cmd, CHILD_TIMEOUT);
    assert!(
        output.status.success(),
        "swaks failed\n{}",
        describe(&output)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        message,
    )
}

/// What swaks sent as the message, rebuilt from its transcript: the
/// lines it printed (` ~> ` inside TLS) after the DATA command's 354 up to
/// the lone dot, each with CRLF, dot-stuffing removed.
fn swaks_sent_message(transcript: &str) -> Vec<u8> {
    let mut lines = transcript
        .lines()
        .skip_while(|l| !l.starts_with("<~  354 "));
    assert!(lines.next().is_some(), "no 354 in\n{transcript}");
    let mut sent = Vec::new();
    for line in lines.filter_map(|l| l.strip_prefix(" ~> ")) {
        if line == "." {
            return sent;
        }
        sent.extend_from_slice(line.strip_prefix('.').unwrap_or(line).as_bytes());
        sent.extend_from_slice(b"\r\n");
    }
    panic!("no end of data in\n{transcript}");
}

/// One swaks submission through usher, and what must have happened:
/// exit status 0, the EHLO inside TLS offering PIPELINING, the AUTH
/// exchange carrying the password's exact octets and answered 235, MAIL,
/// RCPT and DATA sent in one go before their three replies (the
/// backend's), and the sink holding what swaks sent.
fn swaks_case(listener: &str, tls: &str, mech: &str) {
    let w = submission_world(HARD_PASSWORD);
    let (transcript, file) = run_swaks(&w, listener, tls, mech, HARD_PASSWORD);
    let lines: Vec<&str> = transcript.lines().collect();
    let has = |wanted: &str| lines.contains(&wanted);
    assert!(has("<~  250-PIPELINING"), "{transcript}");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match mech {
        "PLAIN" => {
            let response = b64(format!("\0{SUBMITTER}\0{HARD_PASSWORD}").as_bytes());
            assert!(has(&format!(" ~> AUTH PLAIN {response}")), "{transcript}");
        }
        _ => {
            assert!(has(" ~> AUTH LOGIN"), "{transcript}");
            assert!(
                has(&format!(" ~> {}", b64(SUBMITTER.as_bytes()))),
                "{transcript}"
            );
            assert!(
                has(&format!(" ~> {}", b64(HARD_PASSWORD.as_bytes()))),
                "{transcript}"
            );
        }
    }
    assert!(
        has("<~  235 2.7.0 Authentication successful"),
        "{transcript}"
    );

    let mail = lines
        .iter()
        .position(|l| l.starts_with(" ~> MAIL FROM:"))
        .unwrap_or_else(|| panic!("no MAIL in\n{transcript}"));
    let batch = &lines[mail..mail + 6];
    assert_eq!(
        batch[..3],
        [
            format!(" ~> MAIL FROM:<{MAIL_FROM}>"),
            format!(" ~> RCPT TO:<{RCPT_TO}>"),
            " ~> DATA".to_string()
        ],
        "not pipelined:\n{transcript}"
    );
    // Dovecot's own replies: usher answers nothing itself after AUTH.
    assert_eq!(
        batch[3..],
        ["<~  250 2.1.0 Ok", "<~  250 2.1.5 Ok", "<~  354 OK"],
        "{transcript}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<~  250 2.0.0 Ok: queued as ")),
        "{transcript}"
    );

    // swaks ends the data with CRLF before the dot even when the file
    // already ends with CRLF: it sends the file plus one CRLF.
    let sent = swaks_sent_message(&transcript);
    let mut expected = file.clone();
    expected.extend_from_slice(b"\r\n");
    assert!(
        sent == expected,
        "swaks sent other bytes than expected: {}",
        first_difference(&sent, &expected)
    );
    assert_arrived_unchanged(&w, &sent);
}

#[test]
fn swaks_auth_plain_over_starttls_with_pipelining() {
    swaks_case("submission", "--tls", "PLAIN");
}

#[test]
fn swaks_auth_login_over_starttls_with_pipelining() {
    swaks_case("submission", "--tls", "LOGIN");
}

#[test]
fn swaks_auth_plain_over_implicit_tls_with_pipelining() {
    swaks_case("submissions", "--tlsc", "PLAIN");
}

#[test]
fn swaks_auth_login_over_implicit_tls_with_pipelining() {
    swaks_case("submissions", "--tlsc", "LOGIN");
}

/// Runs `smtplib_session.py` against usher's `listener` with `--tls tls`
/// and `--auth auth`, as [`SUBMITTER`] with [`ASCII_PASSWORD`], 8BITMIME.
fn run_smtplib(w: &World, listener: &str, tls: &str, auth: &str) -> (Value, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let message = submission_message(&format!("smtplib-{listener}-{auth}"));
    let path = dir.path().join("message.eml");
    std::fs::write(&path, &message).unwrap();
    let addr = w.usher.addr(listener);
    let mut cmd = Command::new("python3");
    cmd.arg(client_script("smtplib_session.py"))
        .args(["--host", "localhost", "--port", &addr.port().to_string()])
        .args(["--tls", tls, "--auth", auth, "--eight-bit"])
        .args(["--mail-from", MAIL_FROM, "--rcpt-to", RCPT_TO])
        .arg("--ca")
        .arg(example_ca_cert())
        .arg("--message")
        .arg(&path)
        .env("USHER_USER", SUBMITTER)
        .env("USHER_PASSWORD", ASCII_PASSWORD);
    let output = run_bounded(cmd, CHILD_TIMEOUT);
    (json_report(&output), message)
}

/// One smtplib submission and what must have happened: login answered
/// 235, no recipient refused, QUIT answered 221, and the sink holding the
/// exact bytes given to `sendmail()` (smtplib adds only dot-stuffing and
/// the end mark, which the sink takes off again).
fn smtplib_case(listener: &str, tls: &str, auth: &str) -> Value {
    let w = submission_world(ASCII_PASSWORD);
    let (report, message) = run_smtplib(&w, listener, tls, auth);
    assert_eq!(report["auth"][0], 235, "{report:#}");
    assert_eq!(report["refused"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["quit"][0], 221, "{report:#}");
    assert!(report["ehlo"]["8bitmime"].is_string(), "{report:#}");
    assert_arrived_unchanged(&w, &message);
    assert!(
        w.sink.messages()[0].mail.contains("BODY=8BITMIME"),
        "{:?}",
        w.sink.messages()[0].mail
    );
    report
}

/// `login()` after `starttls()`: smtplib picks AUTH PLAIN from usher's
/// EHLO, which offered STARTTLS before TLS and no longer inside it.
#[test]
fn smtplib_login_and_sendmail_over_starttls() {
    let report = smtplib_case("submission", "starttls", "login");
    assert!(
        report["ehlo_before_tls"]["starttls"].is_string(),
        "{report:#}"
    );
    assert!(report["ehlo"]["starttls"].is_null(), "{report:#}");
    assert_eq!(report["ehlo"]["auth"], " PLAIN LOGIN", "{report:#}");
}

/// `login()` on `SMTP_SSL` (implicit TLS).
#[test]
fn smtplib_login_and_sendmail_over_smtp_ssl() {
    let report = smtplib_case("submissions", "implicit", "login");
    assert!(report["ehlo_before_tls"].is_null(), "{report:#}");
}

/// AUTH LOGIN chosen explicitly (with smtplib's initial response, the
/// user name on the AUTH line) over `SMTP_SSL`.
#[test]
fn smtplib_auth_login_and_sendmail_over_smtp_ssl() {
    smtplib_case("submissions", "implicit", "LOGIN");
}
