//! Pre-login dialogue, limits and hostile input against the real usher
//! binary (../shared/cases/imap-prelogin.md and hostile-and-forwarding.md).
//! Backends here are scripted fakes: these cases need misbehaviour or only
//! need to see what usher sends.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::client::Client;
use common::fake::{FakeImap, Script};
use common::usher::{Usher, UsherOpts};

fn usher() -> Usher {
    Usher::start(UsherOpts::default())
}

fn usher_with(opts: UsherOpts) -> Usher {
    Usher::start(opts)
}

/// Registers `fake` as backend "fake" and alice on it.
fn with_fake(usher: &Usher, fake: &FakeImap) {
    let port = fake.addr.port().to_string();
    usher.ok(
        &[
            "backend",
            "add",
            "fake",
            "--host",
            "127.0.0.1",
            "--imap-port",
            &port,
        ],
        None,
    );
    usher.add_user("alice@example.com", b"secret", "fake");
}

async fn greeted(usher: &Usher, listener: &str) -> Client {
    let mut c = Client::connect(usher.addr(listener)).await;
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    c
}

fn ok_login() -> Script {
    Script::Greet {
        id_reply: "OK",
        login_reply: vec!["{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"],
    }
}

/// C06: hostile literal sizes get a tagged BAD before anything is buffered;
/// the session goes on; a huge non-synchronising literal ends it.
#[tokio::test]
async fn hostile_literal_sizes() {
    let u = usher();
    for size in [
        "400000000",
        "4294967296",
        "18446744073709551616",
        "-1",
        "",
        "1x",
    ] {
        let mut c = greeted(&u, "imap").await;
        c.send(format!("a1 LOGIN {{{size}}}\r\n")).await;
        let answer = c.line().await;
        assert!(answer.starts_with("a1 BAD"), "{size}: {answer}");
        c.send(b"a2 NOOP\r\n").await;
        c.expect("a2 OK").await;
    }
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 LOGIN {400000000+}\r\nxxxxxxxxxxxxxxxx").await;
    c.expect("* BYE").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);
}

/// C07: long lines and identities are refused before any lookup.
#[tokio::test]
async fn overlong_lines_and_identities() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    let mut long_id = b"\0".to_vec();
    long_id.extend(std::iter::repeat_n(b'a', 2000));
    long_id.extend_from_slice(b"@example.com\0secret");
    let b64 = base64_encode(&long_id);
    c.send(format!("a1 AUTHENTICATE PLAIN {b64}\r\n")).await;
    c.expect("a1 NO [AUTHENTICATIONFAILED]").await;

    let mut c = greeted(&u, "imap").await;
    c.send(format!(
        "a3 LOGIN alice@example.com {}\r\n",
        "x".repeat(70000)
    ))
    .await;
    c.expect("* BYE").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);

    let mut c = greeted(&u, "imap").await;
    c.send(format!(
        "a2 AUTHENTICATE PLAIN {}\r\n",
        "QUFB".repeat(17500)
    ))
    .await;
    c.expect("* BYE").await;

    // ID values are parsed but never forwarded; an over-long one is harmless.
    let mut c = greeted(&u, "imap").await;
    c.send(format!("a4 ID (\"name\" \"{}\")\r\n", "A".repeat(1025)))
        .await;
    c.expect("* ID NIL").await;
    c.expect("a4 OK").await;
    assert_eq!(
        fake.accepted.load(Ordering::SeqCst),
        0,
        "no backend contact for any of this"
    );
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// C13: plaintext pipelined behind STARTTLS is discarded, and the TLS
/// capability list drops STARTTLS and LOGINDISABLED.
#[tokio::test]
async fn starttls_discards_pipelined_plaintext() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    for starttls in ["a1 STARTTLS", "a1 starttls"] {
        let mut c = greeted(&u, "imap-strict").await;
        c.send(format!(
            "{starttls}\r\na2 LOGIN alice@example.com secret\r\n"
        ))
        .await;
        c.expect("a1 OK").await;
        let mut c = c.upgrade().await;
        c.send(b"a3 CAPABILITY\r\n").await;
        let caps = c.expect("* CAPABILITY").await;
        assert!(caps.contains("AUTH=PLAIN"), "{caps}");
        assert!(
            !caps.contains("STARTTLS") && !caps.contains("LOGINDISABLED"),
            "{caps}"
        );
        let rest = c.tagged("a3").await;
        assert!(rest.iter().all(|l| !l.starts_with("a2")), "{rest:?}");
        c.send(b"a4 STARTTLS\r\n").await;
        c.expect("a4 BAD").await;
    }
    assert_eq!(
        fake.accepted.load(Ordering::SeqCst),
        0,
        "the injected LOGIN never ran"
    );
}

/// C16: every pre-login capability works; nothing post-login is offered.
#[tokio::test]
async fn prelogin_capabilities_are_usher_own() {
    let u = usher();
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 CAPABILITY\r\n").await;
    let caps = c.expect("* CAPABILITY").await;
    for cap in [
        "IMAP4rev1",
        "ID",
        "SASL-IR",
        "LITERAL+",
        "AUTH=PLAIN",
        "AUTH=LOGIN",
    ] {
        assert!(caps.split(' ').any(|c| c == cap), "{cap} missing: {caps}");
    }
    for cap in ["IDLE", "UIDPLUS", "MOVE", "ENABLE"] {
        assert!(!caps.contains(cap), "{cap} offered: {caps}");
    }
    c.expect("a1 OK").await;
    c.send(b"a2 ID (\"name\" \"ExampleSync\" \"version\" \"8.0.0\")\r\n")
        .await;
    assert_eq!(c.line().await, "* ID NIL");
    c.expect("a2 OK").await;
    c.send(b"a3 ID NIL\r\n").await;
    assert_eq!(c.line().await, "* ID NIL");
    c.expect("a3 OK").await;
    c.send(b"a4 XCLIENT ADDR=198.51.100.99\r\n").await;
    c.expect("a4 BAD").await;
    c.send(b"a5 LOGOUT\r\n").await;
    c.expect("* BYE").await;
    c.expect("a5 OK").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);
}

/// Commands split at every byte give the same answers as one write.
#[tokio::test]
async fn byte_by_byte_login_matches_one_write() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let cmd = b"a1 LOGIN {17+}\r\nalice@example.com \"secret\"\r\n";
    let mut c = greeted(&u, "imap").await;
    for b in cmd.iter() {
        c.send([*b]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        c.line().await,
        "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"
    );
}

/// The same input split into two writes at every position gives the same
/// answers: AUTHENTICATE with an initial response, then a NOOP pipelined
/// behind it that must reach the backend once, after the login.
#[tokio::test]
async fn authenticate_and_pipelined_noop_split_at_every_byte() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let plain = base64_encode(b"\0alice@example.com\0secret");
    let input = format!("a1 AUTHENTICATE PLAIN {plain}\r\na2 NOOP\r\n");
    for split in 1..input.len() {
        let (first, second) = input.as_bytes().split_at(split);
        let mut c = greeted(&u, "imap").await;
        c.send(first).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        c.send(second).await;
        assert_eq!(
            c.line().await,
            "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in",
            "split at {split}"
        );
        assert_eq!(c.line().await, "a2 OK done", "split at {split}");
    }
    let noops = fake
        .received()
        .iter()
        .filter(|l| l.contains("a2 NOOP"))
        .count();
    assert_eq!(noops, input.len() - 1, "each NOOP reached the backend once");
}

/// C25: a silent client and a dribbling client are both cut at the
/// pre-login deadline, which is total, not per byte.
#[tokio::test]
async fn prelogin_deadline_is_total() {
    let u = usher_with(UsherOpts {
        prelogin_timeout: "2s",
        ..UsherOpts::default()
    });
    let start = Instant::now();
    let mut silent = greeted(&u, "imap").await;
    let mut dribbler = greeted(&u, "imap").await;
    dribbler.send(b"a1 LOGIN alice").await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        dribbler.send(b"x").await;
    }
    assert_eq!(silent.line().await, "* BYE Login time limit reached");
    assert!(silent.closes_within(Duration::from_secs(1)).await);
    dribbler.expect("* BYE").await;
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

/// When usher ends a session before login, its log says why.
#[tokio::test]
async fn sessions_usher_ends_say_why_in_the_log() {
    let u = usher();
    let mut c = greeted(&u, "imap").await;
    c.send(format!("a1 NOOP {}\r\n", "x".repeat(70_000))).await;
    c.expect("* BYE Line too long").await;
    let mut c = Client::connect(u.addr("imaps")).await;
    c.send(b"not a TLS client hello\r\n").await;
    assert!(c.closes_within(Duration::from_secs(5)).await);
    let said = || {
        let log = u.log();
        log.contains("usher ends the session reason=\"Line too long\"")
            && log.contains("TLS handshake failed")
    };
    assert!(
        common::net::poll_until(Duration::from_secs(5), said),
        "{}",
        u.log()
    );
}

/// Too many bad commands end the session with a BYE.
#[tokio::test]
async fn bad_command_limit() {
    let u = usher_with(UsherOpts {
        limits: "bad_commands = 3".into(),
        ..UsherOpts::default()
    });
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 FROB\r\na2 SELECT INBOX\r\n\r\n").await;
    c.expect("a1 BAD").await;
    c.expect("a2 BAD").await;
    c.expect("* BYE Too many invalid commands").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);
}

/// Failed logins per connection are capped.
#[tokio::test]
async fn auth_failure_limit() {
    let u = usher();
    let mut c = greeted(&u, "imap").await;
    for tag in ["a1", "a2"] {
        c.send(format!("{tag} LOGIN nobody@example.com nope\r\n"))
            .await;
        c.expect(&format!("{tag} NO [AUTHENTICATIONFAILED]")).await;
    }
    c.send(b"a3 LOGIN nobody@example.com nope\r\n").await;
    c.expect("a3 NO").await;
    c.expect("* BYE").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);
}

/// The connection cap turns extra clients away with a BYE.
#[tokio::test]
async fn connection_cap() {
    let u = usher_with(UsherOpts {
        limits: "max_connections = 2".into(),
        ..UsherOpts::default()
    });
    let _a = greeted(&u, "imap").await;
    let _b = greeted(&u, "imap").await;
    let mut c = Client::connect(u.addr("imap")).await;
    c.expect("* BYE Too many connections").await;
    assert!(c.closes_within(Duration::from_secs(2)).await);
}

/// C35: control characters in decoded credentials never reach a backend.
#[tokio::test]
async fn control_characters_in_sasl_credentials() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA0KYTIgREVMRVRFIElOQk9Y\r\n")
        .await;
    c.expect("a1 NO [AUTHENTICATIONFAILED]").await;
    c.send(b"a2 AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlYwByZXQ=\r\n")
        .await;
    let answer = c.line().await;
    assert!(
        answer.starts_with("a2 BAD") || answer.starts_with("a2 NO"),
        "{answer}"
    );
    assert_eq!(fake.accepted.load(Ordering::SeqCst), 0);
    assert!(fake.received().iter().all(|l| !l.contains("DELETE")));
}

/// C29: usher sends its own ID with the socket's client address; what the
/// client claimed is never forwarded; a backend that rejects ID still
/// logs the user in.
#[tokio::test]
async fn client_address_forwarded_by_id() {
    for id_reply in ["OK", "BAD"] {
        let fake = FakeImap::start(Script::Greet {
            id_reply,
            login_reply: vec!["{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in"],
        })
        .await;
        let u = usher();
        with_fake(&u, &fake);
        let mut c = greeted(&u, "imap").await;
        c.send(b"a1 ID (\"name\" \"ExampleMail\" \"x-originating-ip\" \"198.51.100.99\")\r\n")
            .await;
        c.expect("* ID NIL").await;
        c.expect("a1 OK").await;
        c.send(b"a2 LOGIN alice@example.com secret\r\n").await;
        c.expect("a2 OK").await;
        let lines = fake.received();
        let id = lines
            .iter()
            .find(|l| l.contains(" ID "))
            .expect("usher sent ID");
        assert!(id.contains("\"x-originating-ip\" \"127.0.0.1\""), "{id}");
        assert!(id.contains("\"x-connected-port\""), "{id}");
        assert!(
            !lines.iter().any(|l| l.contains("198.51.100.99")),
            "{lines:?}"
        );
        let id_pos = lines.iter().position(|l| l.contains(" ID ")).unwrap();
        let auth_pos = lines
            .iter()
            .position(|l| l.contains("AUTHENTICATE"))
            .unwrap();
        assert!(id_pos < auth_pos, "ID goes before the login");
    }
}

/// C17: untagged CAPABILITY before the tagged OK is the list the client gets.
#[tokio::test]
async fn untagged_capability_during_backend_login() {
    let fake = FakeImap::start(Script::Greet {
        id_reply: "OK",
        login_reply: vec![
            "* CAPABILITY IMAP4rev1 IDLE MOVE UIDPLUS CONDSTORE",
            "{tag} OK Logged in",
        ],
    })
    .await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    assert_eq!(
        c.line().await,
        "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE UIDPLUS CONDSTORE] Logged in"
    );
}

/// Where passwords need TLS, a LOGIN literal gets a tagged NO in place of
/// "+": the client never sends the password in the clear, and the session
/// stays in step for STARTTLS. Non-synchronising literals are already on
/// their way; they are read and refused the same way.
#[tokio::test]
async fn cleartext_login_literal_is_refused_before_the_password_is_sent() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap-strict").await;
    c.send(b"a1 LOGIN alice@example.com {6}\r\n").await;
    c.expect("a1 NO [PRIVACYREQUIRED]").await;
    c.send(b"a2 login {17}\r\n").await;
    c.expect("a2 NO [PRIVACYREQUIRED]").await;
    c.send(b"a3 LOGIN alice@example.com {6+}\r\nsecret\r\n")
        .await;
    c.expect("a3 NO [PRIVACYREQUIRED]").await;
    c.send(b"a4 NOOP\r\n").await;
    c.expect("a4 OK").await;
    let invited = c.transcript().lines().any(|l| l.starts_with('+'));
    assert!(!invited, "{}", c.transcript());
    c.send(b"a5 STARTTLS\r\n").await;
    c.expect("a5 OK").await;
    let mut c = c.upgrade().await;
    c.send(b"a6 LOGIN alice@example.com {6}\r\n").await;
    c.expect("+ ").await;
    c.send(b"secret\r\n").await;
    c.expect("a6 OK").await;
    assert_eq!(fake.accepted.load(Ordering::SeqCst), 1);
}

/// A user name is the client's text: a line break or an escape sequence in
/// it must not let the client write lines of its own into usher's log.
#[tokio::test]
async fn user_names_cannot_forge_log_lines() {
    let u = usher();
    let forged = "x@example.com\n2026-01-01T00:00:00Z  INFO usher: logged in user=forged\x1b[31m";
    for listener in ["imap", "submission"] {
        let mut c = Client::connect(u.addr(listener)).await;
        if listener == "imap" {
            c.expect("* OK").await;
            c.send(format!("a1 LOGIN {{{}+}}\r\n{forged} pw\r\n", forged.len()))
                .await;
            c.expect("a1 NO [AUTHENTICATIONFAILED]").await;
        } else {
            c.expect("220 ").await;
            common::smtp::command(&mut c, "EHLO client.example.net").await;
            let plain = base64_encode(format!("\0{forged}\0pw").as_bytes());
            let reply = common::smtp::command(&mut c, &format!("AUTH PLAIN {plain}")).await;
            assert!(reply[0].starts_with("535 "), "{reply:?}");
        }
    }
    let log = u.log();
    assert!(!log.contains('\x1b'), "raw escape in the log:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01")),
        "forged line in the log:\n{log}"
    );
    assert_eq!(log.matches("authentication failed").count(), 2, "{log}");
}

/// Logins that time out at a slow backend are answered `NO [UNAVAILABLE]`
/// but do not mark it down: under a burst of reconnects that would refuse
/// everyone. Only probes (and connections that cannot be made) judge it.
#[tokio::test]
async fn slow_logins_do_not_mark_a_backend_down() {
    let fake = FakeImap::start(Script::Silent).await;
    let u = usher_with(UsherOpts {
        backend_timeout: "1s",
        extra: "[health]\ninterval = \"60s\"\ntimeout = \"1s\"\ndown_after = 3\n".into(),
        ..UsherOpts::default()
    });
    with_fake(&u, &fake);
    for _ in 0..3 {
        let mut c = greeted(&u, "imap").await;
        let start = Instant::now();
        c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
        c.expect("a1 NO [UNAVAILABLE]").await;
        // Each attempt still went to the backend and waited for it.
        assert!(start.elapsed() >= Duration::from_millis(900));
    }
    assert!(!u.log().contains("backend is down"), "{}", u.log());
}

/// The state rules before login, as a table: each command gets the answer
/// of its kind, and none of them reaches a backend.
#[tokio::test]
async fn prelogin_commands_refused_where_they_do_not_belong() {
    let fake = FakeImap::start(ok_login()).await;
    let u = usher();
    with_fake(&u, &fake);
    let table = [
        (
            "imap",
            "a1 SELECT INBOX",
            "a1 BAD Not authenticated; log in first",
        ),
        (
            "imap",
            "a2 uid fetch 1:* (FLAGS)",
            "a2 BAD Not authenticated; log in first",
        ),
        ("imap", "a3 IDLE", "a3 BAD Not authenticated; log in first"),
        ("imap", "a4 XYZZY plugh", "a4 BAD Unknown command"),
        ("imap", "a5 CAPA", "a5 BAD Unknown command"),
        ("imaps", "a6 STARTTLS", "a6 BAD STARTTLS not available"),
        (
            "imap-strict",
            "a7 AUTHENTICATE PLAIN",
            "a7 NO [PRIVACYREQUIRED]",
        ),
        (
            "imap-strict",
            "a8 LOGIN alice@example.com secret",
            "a8 NO [PRIVACYREQUIRED]",
        ),
    ];
    for (listener, command, answer) in table {
        let mut c = if listener == "imaps" {
            Client::connect_tls(u.addr(listener)).await
        } else {
            Client::connect(u.addr(listener)).await
        };
        c.expect("* OK").await;
        c.send(format!("{command}\r\n")).await;
        let line = c.line().await;
        assert!(
            line.starts_with(answer),
            "{listener}: {command:?} got {line:?}"
        );
        c.send(b"z NOOP\r\n").await;
        c.expect("z OK").await;
    }
    assert_eq!(fake.accepted.load(Ordering::SeqCst), 0);
}

/// Dovecot with a slow auth process says `* OK Waiting for authentication
/// process to respond..` before its real greeting: usher waits for the
/// real one and the login goes through with the backend's capabilities.
#[tokio::test]
async fn extra_untagged_ok_before_the_real_greeting() {
    let fake = FakeImap::start(Script::SlowAuth {
        login_reply: vec!["{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"],
    })
    .await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\na2 NOOP\r\n")
        .await;
    assert_eq!(
        c.line().await,
        "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"
    );
    // The pipelined NOOP reached the backend after the login, once.
    assert_eq!(c.line().await, "a2 OK done");
    let sent = fake.received();
    let noops = sent.iter().filter(|l| l.contains("NOOP")).count();
    assert_eq!(noops, 1, "{sent:?}");
}

/// C27: a backend that refuses usher's login gives one temporary failure
/// line, no backend text, and the session stays usable.
#[tokio::test]
async fn backend_refusal_is_one_unavailable_line() {
    for reply in [
        vec!["* BYE Internal error occurred."],
        vec!["{tag} NO [AUTHENTICATIONFAILED] Authentication failed."],
    ] {
        let fake = FakeImap::start(Script::Greet {
            id_reply: "OK",
            login_reply: reply,
        })
        .await;
        let u = usher();
        with_fake(&u, &fake);
        let mut c = greeted(&u, "imap").await;
        c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
        assert_eq!(
            c.line().await,
            "a1 NO [UNAVAILABLE] Account is temporarily unavailable."
        );
        c.send(b"a2 NOOP\r\n").await;
        assert_eq!(c.line().await, "a2 OK NOOP completed");
        assert!(u.log().contains("backend login failed") && u.log().contains("fake"));
    }
}

/// A backend refusing for a limit of its own (Dovecot's connections per
/// user and address) gives the client `NO [LIMIT]`, not UNAVAILABLE, and
/// still none of the backend's text.
#[tokio::test]
async fn backend_limit_refusal_is_passed_on_as_limit() {
    let fake = FakeImap::start(Script::Greet {
        id_reply: "OK",
        login_reply: vec!["{tag} NO [LIMIT] Maximum number of connections from user+IP exceeded"],
    })
    .await;
    let u = usher();
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    assert_eq!(
        c.line().await,
        "a1 NO [LIMIT] Too many connections for this account"
    );
    c.send(b"a2 NOOP\r\n").await;
    c.expect("a2 OK").await;
}

/// C26: a backend that never greets gives NO [UNAVAILABLE] after the
/// backend timeout; a refused port answers at once; a client that leaves
/// meanwhile makes usher drop the backend connection.
#[tokio::test]
async fn silent_or_dead_backend() {
    let fake = FakeImap::start(Script::Silent).await;
    let u = usher_with(UsherOpts {
        backend_timeout: "1s",
        ..UsherOpts::default()
    });
    with_fake(&u, &fake);
    let mut c = greeted(&u, "imap").await;
    let start = Instant::now();
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 NO [UNAVAILABLE]").await;
    assert!(start.elapsed() < Duration::from_secs(3));
    c.send(b"a2 LOGOUT\r\n").await;
    c.expect("* BYE").await;

    // The client leaves while usher waits for the backend.
    let before = fake.closed_by_peer.load(Ordering::SeqCst);
    let mut c = greeted(&u, "imap").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(c);
    let start = Instant::now();
    while fake.closed_by_peer.load(Ordering::SeqCst) == before {
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "backend socket left open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A port nobody listens on: an immediate temporary failure.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port().to_string();
    drop(dead);
    u.ok(
        &[
            "backend",
            "add",
            "dead",
            "--host",
            "127.0.0.1",
            "--imap-port",
            &port,
        ],
        None,
    );
    u.add_user("bob@example.com", b"hunter2", "dead");
    let mut c = greeted(&u, "imap").await;
    let start = Instant::now();
    c.send(b"a1 LOGIN bob@example.com hunter2\r\n").await;
    c.expect("a1 NO [UNAVAILABLE]").await;
    assert!(start.elapsed() < Duration::from_millis(900));
    assert!(u.log().contains("dead"), "the warning names the backend");
}
