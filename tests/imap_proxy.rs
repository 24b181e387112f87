//! End to end through usher to real Dovecot backends: routing by the store,
//! backend login, relay, and the pre-login cases that need a backend
//! (../shared/cases/imap-prelogin.md).

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::dovecot::{Dovecot, DovecotOpts};
use common::usher::{Usher, UsherOpts};

/// Two Dovecot backends behind one usher, with the cases' users.
struct World {
    imap1: Dovecot,
    imap2: Dovecot,
    usher: Usher,
}

fn world_with(opts: UsherOpts) -> World {
    let (imap1, imap2) = std::thread::scope(|s| {
        let a = s.spawn(|| Dovecot::start(DovecotOpts::default()));
        let b = s.spawn(|| Dovecot::start(DovecotOpts::default()));
        (a.join().unwrap(), b.join().unwrap())
    });
    let usher = Usher::start(opts);
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    usher.add_user("alice@example.com", b"secret", "imap1");
    usher.add_user("bob@example.com", b"hunter2", "imap2");
    usher.add_user("carol@example.com", "accentué1!".as_bytes(), "imap1");
    usher.add_user("dave@example.com", b"pa\"ss\\word", "imap2");
    usher.add_user("josé@example.com", b"secret", "imap1");
    usher.add_user("alice.backslash@example.com", b"se\\cr\\et", "imap2");
    usher.ok(
        &[
            "user",
            "alias-add",
            "EXAMPLE\\alice",
            "alice.backslash@example.com",
        ],
        None,
    );
    World {
        imap1,
        imap2,
        usher,
    }
}

fn world() -> World {
    world_with(UsherOpts::default())
}

impl World {
    async fn client(&self) -> Client {
        let mut c = Client::connect(self.usher.addr("imap")).await;
        c.expect("* OK [CAPABILITY IMAP4rev1").await;
        c
    }
}

fn message(subject: &str) -> Vec<u8> {
    format!("From: t@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n").into_bytes()
}

async fn append(c: &mut Client, tag: &str, msg: &[u8]) {
    c.send(format!("{tag} APPEND INBOX {{{}}}\r\n", msg.len()))
        .await;
    c.expect("+ ").await;
    c.send(msg).await;
    c.send(b"\r\n").await;
    let lines = c.tagged(tag).await;
    assert!(
        lines.last().unwrap().starts_with(&format!("{tag} OK")),
        "{lines:?}"
    );
}

fn files_containing(d: &Dovecot, user: &str, needle: &str) -> usize {
    d.message_files(user)
        .iter()
        .filter(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).contains(needle))
        .count()
}

#[tokio::test]
async fn each_users_append_lands_on_their_own_backend() {
    let w = world();
    for (user, pw, subject) in [
        ("alice@example.com", "secret", "for-alice"),
        ("bob@example.com", "hunter2", "for-bob"),
    ] {
        let mut c = w.client().await;
        c.send(format!("a1 LOGIN {user} {pw}\r\n")).await;
        let ok = c.expect("a1 OK [CAPABILITY ").await;
        assert!(ok.contains("IDLE"), "backend capabilities: {ok}");
        append(&mut c, "a2", &message(subject)).await;
        c.send(b"a3 LOGOUT\r\n").await;
        c.tagged("a3").await;
    }
    assert_eq!(
        files_containing(&w.imap1, "alice@example.com", "for-alice"),
        1
    );
    assert_eq!(files_containing(&w.imap2, "bob@example.com", "for-bob"), 1);
    assert_eq!(
        files_containing(&w.imap2, "alice@example.com", "for-alice"),
        0
    );
    assert_eq!(files_containing(&w.imap1, "bob@example.com", "for-bob"), 0);
    // The backend saw the login for the right user.
    assert!(w.imap1.log().contains("alice@example.com"));
    assert!(!w.imap1.log().contains("bob@example.com"));
}

/// C01: non-synchronising literals get no continuation; synchronising ones do.
#[tokio::test]
async fn literal_plus_and_synchronising_literal_logins() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 LOGIN {17+}\r\nalice@example.com {6+}\r\nsecret\r\n")
        .await;
    c.expect("a1 OK [CAPABILITY").await;

    let mut c = w.client().await;
    c.send(b"a1 LOGIN {17}\r\n").await;
    c.expect("+ ").await;
    c.send(b"alice@example.com {6}\r\n").await;
    c.expect("+ ").await;
    c.send(b"secret\r\n").await;
    c.expect("a1 OK").await;
}

/// C02: quoted `\\` is one backslash, literal backslashes stay.
#[tokio::test]
async fn backslashes_in_quoted_and_literal_credentials() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a01 LOGIN \"EXAMPLE\\\\alice\" {8}\r\n").await;
    c.expect("+ ").await;
    c.send(b"se\\cr\\et\r\n").await;
    c.expect("a01 OK").await;

    let mut c = w.client().await;
    c.send(b"a02 LOGIN dave@example.com \"pa\\\"ss\\\\word\"\r\n")
        .await;
    c.expect("a02 OK").await;
}

/// C03: UTF-8 octets compared exactly; Latin-1 is another password.
#[tokio::test]
async fn utf8_password_exact_octets() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 LOGIN carol@example.com {11}\r\n").await;
    c.expect("+ ").await;
    c.send("accentué1!\r\n".as_bytes()).await;
    c.expect("a1 OK").await;

    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE PLAIN AGNhcm9sQGV4YW1wbGUuY29tAGFjY2VudHXDqTEh\r\n")
        .await;
    c.expect("a1 OK").await;

    let mut c = w.client().await;
    c.send(b"a1 LOGIN carol@example.com {10}\r\n").await;
    c.expect("+ ").await;
    c.send(b"accentu\xe91!\r\n").await;
    c.expect("a1 NO [AUTHENTICATIONFAILED]").await;
    c.send("a2 LOGIN carol@example.com \"accentué1!\"\r\n".as_bytes())
        .await;
    c.expect("a2 OK").await;

    // A UTF-8 login name.
    let mut c = w.client().await;
    c.send("a1 LOGIN {17}\r\n".as_bytes()).await;
    c.expect("+ ").await;
    c.send("josé@example.com secret\r\n".as_bytes()).await;
    c.expect("a1 OK").await;
}

/// C08: AUTHENTICATE without SASL-IR uses "+ " and a failure leaves the
/// session open for LOGIN.
#[tokio::test]
async fn authenticate_plain_two_step_and_retry() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(b"AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==\r\n").await;
    c.expect("a1 OK [CAPABILITY").await;

    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(b"AGFsaWNlQGV4YW1wbGUuY29tAG5vcGU=\r\n").await;
    assert_eq!(
        c.line().await,
        "a1 NO [AUTHENTICATIONFAILED] Authentication failed."
    );
    c.send(b"a2 LOGIN alice@example.com secret\r\n").await;
    c.expect("a2 OK").await;
}

/// AUTHENTICATE LOGIN, with and without the user name up front.
#[tokio::test]
async fn authenticate_login_mechanism() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE LOGIN\r\n").await;
    assert_eq!(c.line().await, "+ VXNlcm5hbWU6");
    c.send(b"YWxpY2VAZXhhbXBsZS5jb20=\r\n").await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(b"c2VjcmV0\r\n").await;
    c.expect("a1 OK").await;

    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE LOGIN YWxpY2VAZXhhbXBsZS5jb20=\r\n")
        .await;
    assert_eq!(c.line().await, "+ UGFzc3dvcmQ6");
    c.send(b"c2VjcmV0\r\n").await;
    c.expect("a1 OK").await;
}

/// C10 and C11: `*` cancels, bad base64 fails, and neither leaves state
/// behind for the next attempt.
#[tokio::test]
async fn cancel_and_invalid_base64_then_fresh_login() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    c.expect("+ ").await;
    c.send(b"*\r\n").await;
    assert_eq!(c.line().await, "a1 BAD Authentication cancelled");
    c.send(b"a2 AUTHENTICATE LOGIN\r\n").await;
    c.expect("+ VXNlcm5hbWU6").await;
    c.send(b"YWxpY2VAZXhhbXBsZS5jb20=\r\n").await;
    c.expect("+ UGFzc3dvcmQ6").await;
    c.send(b"c2Vj!!cmV0\r\n").await;
    c.expect("a2 BAD").await;
    c.send(b"a3 AUTHENTICATE PLAIN AGFs$$$aWNl\r\n").await;
    c.expect("a3 BAD").await;
    c.send(b"a4 AUTHENTICATE PLAIN AGJvYkBleGFtcGxlLmNvbQBodW50ZXIy\r\n")
        .await;
    c.expect("a4 OK").await;
    c.send(b"a5 LOGOUT\r\n").await;
    c.tagged("a5").await;
    // bob's login reached bob's backend, and alice's never reached any.
    assert!(w
        .imap2
        .wait_for_log("bob@example.com", Duration::from_secs(5)));
    assert!(!w.imap1.log().contains("alice@example.com"));
    assert!(!w.imap2.log().contains("alice@example.com"));
}

/// C17: the login OK carries the backend's post-login list, not usher's.
#[tokio::test]
async fn login_ok_carries_backend_capabilities() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    let ok = c.expect("a1 OK [CAPABILITY IMAP4rev1").await;
    for absent in ["AUTH=", "STARTTLS", "LOGINDISABLED"] {
        assert!(!ok.contains(absent), "{absent} in {ok}");
    }
    c.send(b"a2 CAPABILITY\r\n").await;
    let lines = c.tagged("a2").await;
    assert!(
        lines[0].starts_with("* CAPABILITY") && lines[0].contains("IDLE"),
        "{lines:?}"
    );
    assert!(!lines[0].contains("AUTH="), "{lines:?}");
}

/// C19: commands pipelined behind LOGIN run once, after it, in order; after
/// a failed LOGIN they are answered locally.
#[tokio::test]
async fn pipelined_commands_across_login() {
    let w = world();
    let mut c = w.client().await;
    c.send(b"a1 CAPABILITY\r\na2 LOGIN alice@example.com secret\r\na3 SELECT INBOX\r\na4 NOOP\r\n")
        .await;
    c.expect("* CAPABILITY").await;
    c.expect("a1 OK").await;
    c.expect("a2 OK [CAPABILITY").await;
    let select = c.tagged("a3").await;
    assert!(
        select.last().unwrap().starts_with("a3 OK [READ-WRITE]"),
        "{select:?}"
    );
    c.expect("a4 OK").await;
    assert!(
        c.try_line(Duration::from_millis(300)).await.is_none(),
        "nothing more, nothing twice"
    );

    let mut c = w.client().await;
    c.send(b"a2 LOGIN alice@example.com wrong\r\na3 SELECT INBOX\r\n")
        .await;
    c.expect("a2 NO [AUTHENTICATIONFAILED]").await;
    c.expect("a3 BAD").await;
}

/// C21: a SASL response already buffered behind AUTHENTICATE is used at once.
#[tokio::test]
async fn sasl_response_in_the_same_write() {
    let w = world();
    let mut c = w.client().await;
    let start = Instant::now();
    c.send(b"a1 AUTHENTICATE PLAIN\r\nAGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==\r\n")
        .await;
    assert_eq!(c.line().await, "+ ");
    c.expect("a1 OK").await;
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// C23: IDLE is relayed; a message appended elsewhere shows up at once.
#[tokio::test]
async fn idle_sees_a_new_message() {
    let w = world();
    let mut idler = w.client().await;
    idler
        .send(b"a1 LOGIN bob@example.com hunter2\r\na2 SELECT INBOX\r\n")
        .await;
    idler.expect("a1 OK").await;
    idler.tagged("a2").await;
    idler.send(b"a3 IDLE\r\n").await;
    idler.expect("+ ").await;

    let mut other = w.client().await;
    other.send(b"b1 LOGIN bob@example.com hunter2\r\n").await;
    other.expect("b1 OK").await;
    append(&mut other, "b2", &message("while idling")).await;

    let exists = idler.expect("* ").await;
    assert!(
        exists.ends_with("EXISTS") || exists.contains("RECENT"),
        "{exists}"
    );
    idler.send(b"DONE\r\n").await;
    let done = idler.tagged("a3").await;
    assert!(done.last().unwrap().starts_with("a3 OK"), "{done:?}");
}

/// Wrong password, unknown user and disabled user: same answer, similar time.
#[tokio::test]
async fn failures_look_alike() {
    let w = world_with(UsherOpts {
        failure_delay: "300ms",
        ..UsherOpts::default()
    });
    w.usher.ok(&["user", "disable", "bob@example.com"], None);
    let mut answers = Vec::new();
    let mut times = Vec::new();
    for login in [
        "alice@example.com wrong",
        "nobody@example.com secret",
        "bob@example.com hunter2",
    ] {
        let mut c = w.client().await;
        let start = Instant::now();
        c.send(format!("a1 LOGIN {login}\r\n")).await;
        answers.push(c.line().await);
        times.push(start.elapsed());
    }
    assert!(
        answers
            .iter()
            .all(|a| a == "a1 NO [AUTHENTICATIONFAILED] Authentication failed."),
        "{answers:?}"
    );
    let (min, max) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    assert!(*min >= Duration::from_millis(300), "{times:?}");
    assert!(*max - *min < Duration::from_millis(250), "{times:?}");
    // Enabled again, bob gets in.
    w.usher.ok(&["user", "enable", "bob@example.com"], None);
    let mut c = w.client().await;
    c.send(b"a1 LOGIN bob@example.com hunter2\r\n").await;
    c.expect("a1 OK").await;
}

/// Failures beyond the free ones from one client cost more each time,
/// whichever user they try; a good login is not slowed.
#[tokio::test]
async fn repeated_failures_grow_the_delay() {
    let w = world_with(UsherOpts {
        failure_delay: "100ms",
        ..UsherOpts::default()
    });
    let mut times = Vec::new();
    for i in 0..5 {
        let mut c = w.client().await;
        let start = Instant::now();
        c.send(format!("a1 LOGIN guess{i}@example.com wrong\r\n"))
            .await;
        c.expect("a1 NO [AUTHENTICATIONFAILED]").await;
        times.push(start.elapsed());
    }
    // Three at the base delay, then 200 ms, then 400 ms.
    assert!(times[2] < Duration::from_millis(190), "{times:?}");
    assert!(times[3] >= Duration::from_millis(200), "{times:?}");
    assert!(times[4] >= Duration::from_millis(400), "{times:?}");
    let mut c = w.client().await;
    let start = Instant::now();
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    assert!(start.elapsed() < Duration::from_millis(400));
}

/// Implicit TLS and STARTTLS both reach the backend.
#[tokio::test]
async fn tls_listeners_log_in() {
    let w = world();
    let mut c = Client::connect_tls(w.usher.addr("imaps")).await;
    let greeting = c.expect("* OK [CAPABILITY").await;
    assert!(
        greeting.contains("AUTH=PLAIN") && !greeting.contains("STARTTLS"),
        "{greeting}"
    );
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;

    let mut c = Client::connect(w.usher.addr("imap-strict")).await;
    let greeting = c.expect("* OK [CAPABILITY").await;
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH="), "{greeting}");
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 NO [PRIVACYREQUIRED]").await;
    c.send(b"a2 STARTTLS\r\n").await;
    c.expect("a2 OK").await;
    let mut c = c.upgrade().await;
    c.send(b"a3 LOGIN alice@example.com secret\r\n").await;
    c.expect("a3 OK").await;
}

/// A TLS client that hangs up without a close_notify alert, as most mail
/// clients do, ends its session as an ordinary client close, not an error.
#[tokio::test]
async fn tls_client_closing_without_close_notify_is_an_ordinary_end() {
    let w = world();
    let mut c = Client::connect_tls(w.usher.addr("imaps")).await;
    c.expect("* OK [CAPABILITY").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    drop(c);
    let closed = || {
        w.usher
            .log()
            .lines()
            .find(|l| l.contains("connection closed") && l.contains("alice@example.com"))
            .map(str::to_string)
    };
    assert!(
        common::net::poll_until(Duration::from_secs(5), || closed().is_some()),
        "{}",
        w.usher.log()
    );
    let line = closed().unwrap();
    assert!(line.contains("end=\"client closed\""), "{line}");
}

/// No password (client's or master) reaches usher's log.
#[tokio::test]
async fn passwords_never_reach_the_log() {
    let w = world();
    w.usher
        .add_user("eve@example.com", b"Tr0ub4dor&3-unique", "imap1");
    let mut c = w.client().await;
    c.send(b"a1 LOGIN eve@example.com Tr0ub4dor&3-unique\r\n")
        .await;
    c.expect("a1 OK").await;
    c.send(b"a2 LOGOUT\r\n").await;
    c.tagged("a2").await;
    let mut c = w.client().await;
    c.send(b"a1 LOGIN eve@example.com Wr0ng-unique-guess\r\n")
        .await;
    c.expect("a1 NO").await;
    c.send(b"a2 AUTHENTICATE PLAIN AGV2ZUBleGFtcGxlLmNvbQBTYXNsLXVuaXF1ZS1ndWVzcw==\r\n")
        .await;
    c.expect("a2 NO").await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = w.usher.log();
    assert!(log.contains("eve@example.com"), "the log names the user");
    for secret in [
        "Tr0ub4dor",
        "Wr0ng-unique",
        "Sasl-unique",
        common::dovecot::MASTER_PASSWORD,
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// Users imported with their existing Dovecot hashes log in with their
/// passwords; after the first login their hash is argon2id. A bad import
/// line names itself and adds nobody.
#[tokio::test]
async fn imported_legacy_hashes_log_in_and_are_rewritten() {
    let w = world();
    let password = "pa ss\"wörd";
    let mut lines = String::new();
    for (i, scheme) in ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "SSHA512"]
        .iter()
        .enumerate()
    {
        let out = std::process::Command::new("doveadm")
            .args(["pw", "-s", scheme, "-p", password])
            .output()
            .unwrap();
        let hash = String::from_utf8(out.stdout).unwrap();
        lines.push_str(&format!("legacy{i}@example.com {}\n", hash.trim()));
    }
    let bad = format!("{lines}oops@example.com {{MD5}}nothing\n");
    let out = w.usher.cli(
        &["user", "import", "--hashed", "--backend", "imap1"],
        Some(bad.as_bytes()),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 5"),
        "{out:?}"
    );
    assert!(!w.usher.ok(&["user", "list"], None).contains("legacy0"));
    let out = w.usher.ok(
        &["user", "import", "--hashed", "--backend", "imap1"],
        Some(lines.as_bytes()),
    );
    assert!(out.contains("added 4 user(s)"), "{out}");

    let db = w.usher.dir().join("usher.db");
    let hash_of = |login: &str| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\
                 'select password_hash from users where login=?', (sys.argv[2],)).fetchone()[0])",
            ])
            .arg(&db)
            .arg(login)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    for i in 0..4 {
        let login = format!("legacy{i}@example.com");
        assert!(!hash_of(&login).starts_with("$argon2id$"));
        let mut c = w.client().await;
        c.send(format!("a1 LOGIN {login} {{{}+}}\r\n", password.len()))
            .await;
        c.send(password.as_bytes()).await;
        c.send(b"\r\n").await;
        c.expect("a1 OK").await;
        assert!(hash_of(&login).starts_with("$argon2id$"), "{login}");
        // And the rewritten hash still takes the same password.
        let mut c = w.client().await;
        c.send(format!("a1 LOGIN {login} {{{}+}}\r\n", password.len()))
            .await;
        c.send(password.as_bytes()).await;
        c.send(b"\r\n").await;
        c.expect("a1 OK").await;
    }
}
