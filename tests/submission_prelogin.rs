//! The submission dialogue before AUTH succeeds, as transcripts: every
//! command in each state, the SASL exchanges, STARTTLS, the limits and
//! hostile input. Successful logins go on to a real Dovecot backend.
//!
//! Cases from ../shared/cases/submission.md: C12 (AUTH LOGIN / PLAIN with
//! and without an initial response), C14 (plaintext pipelined behind
//! STARTTLS), C21 (SASL response in the same write as AUTH), C33 (BDAT
//! before AUTH); from hostile-and-forwarding.md the SMTP sides of C07
//! (over-long lines and identities), C25 (slow clients) and C35 (control
//! characters in credentials).

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::smtp::{self, b64, command, keywords, open_implicit, open_starttls, reply, World};
use common::usher::UsherOpts;

const OK: &str = "250 2.0.0 Ok";
const AUTHENTICATED: &str = "235 2.7.0 Authentication successful";
const INVALID: &str = "535 5.7.8 Authentication credentials invalid";
const AUTH_REQUIRED: &str = "530 5.7.0 Authentication required";
const EHLO_FIRST: &str = "503 5.5.1 Error: send EHLO first";

/// Sends `line` and checks the whole reply is the one line `expected`.
async fn exchange(c: &mut Client, line: &str, expected: &str) {
    let r = command(c, line).await;
    assert_eq!(r, [expected], "reply to {line:?}");
}

// ---------------------------------------------------------------------
// C12: the SASL exchanges

#[tokio::test]
async fn auth_login_with_an_initial_response_goes_straight_to_password() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(
        &mut c,
        "AUTH LOGIN YWxpY2VAZXhhbXBsZS5jb20=",
        "334 UGFzc3dvcmQ6",
    )
    .await;
    exchange(&mut c, "c2VjcmV0", AUTHENTICATED).await;
}

#[tokio::test]
async fn auth_login_without_an_initial_response() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    exchange(&mut c, "YWxpY2VAZXhhbXBsZS5jb20=", "334 UGFzc3dvcmQ6").await;
    exchange(&mut c, "c2VjcmV0", AUTHENTICATED).await;
}

#[tokio::test]
async fn auth_plain_without_an_initial_response_gets_an_empty_334() {
    let w = World::start();
    let mut c = w.client().await;
    // "334" SP CRLF: the line keeps its space.
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    exchange(
        &mut c,
        "AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==",
        AUTHENTICATED,
    )
    .await;
}

#[tokio::test]
async fn auth_plain_with_an_initial_response_and_lowercase_verbs() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(
        &mut c,
        "auth plain AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==",
        AUTHENTICATED,
    )
    .await;
}

/// Every user of the cases, by every mechanism and form: the exact
/// octets of names and passwords survive (UTF-8, quotes, backslashes,
/// an alias).
#[tokio::test]
async fn every_mechanism_and_form_reaches_the_same_result() {
    let w = World::start();
    let users: &[(&str, &str)] = &[
        ("carol@example.com", "accentué1!"),
        ("dave@example.com", "pa\"ss\\word"),
        ("EXAMPLE\\alice", "se\\cr\\et"),
        ("jos\u{e9}@example.com", "secret"),
    ];
    for (user, pw) in users {
        for form in 0..4 {
            let mut c = w.client().await;
            match form {
                0 => {
                    exchange(
                        &mut c,
                        &format!("AUTH PLAIN {}", smtp::plain(user, pw)),
                        AUTHENTICATED,
                    )
                    .await
                }
                1 => {
                    exchange(&mut c, "AUTH PLAIN", "334 ").await;
                    exchange(&mut c, &smtp::plain(user, pw), AUTHENTICATED).await;
                }
                2 => {
                    exchange(
                        &mut c,
                        &format!("AUTH LOGIN {}", b64(user)),
                        "334 UGFzc3dvcmQ6",
                    )
                    .await;
                    exchange(&mut c, &b64(pw), AUTHENTICATED).await;
                }
                _ => {
                    exchange(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
                    exchange(&mut c, &b64(user), "334 UGFzc3dvcmQ6").await;
                    exchange(&mut c, &b64(pw), AUTHENTICATED).await;
                }
            }
            let r = command(&mut c, "QUIT").await;
            assert!(r[0].starts_with("221 "), "{user} form {form}: {r:?}");
        }
    }
    // The alias logs in as its canonical user.
    assert!(w.dovecot.wait_for_log(
        "Master user logging in as alice.backslash@example.com",
        Duration::from_secs(10)
    ));
    assert!(w
        .dovecot
        .log()
        .contains("Master user logging in as jos\u{e9}@example.com"));
}

/// `*` cancels at every step; a later AUTH starts afresh.
#[tokio::test]
async fn star_cancels_and_a_fresh_auth_works() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    exchange(&mut c, "*", "501 5.7.0 Authentication cancelled").await;
    exchange(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    exchange(&mut c, "*", "501 5.7.0 Authentication cancelled").await;
    exchange(
        &mut c,
        "AUTH LOGIN YWxpY2VAZXhhbXBsZS5jb20=",
        "334 UGFzc3dvcmQ6",
    )
    .await;
    exchange(&mut c, "*", "501 5.7.0 Authentication cancelled").await;
    // Nothing of the cancelled exchanges is left behind.
    exchange(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    exchange(&mut c, "YWxpY2VAZXhhbXBsZS5jb20=", "334 UGFzc3dvcmQ6").await;
    exchange(&mut c, "c2VjcmV0", AUTHENTICATED).await;
}

/// `=` is an empty initial response; empty and undecodable responses.
#[tokio::test]
async fn empty_and_undecodable_responses() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(&mut c, "AUTH PLAIN =", INVALID).await;
    exchange(&mut c, "AUTH LOGIN =", "334 UGFzc3dvcmQ6").await;
    exchange(&mut c, "c2VjcmV0", INVALID).await;
    // Three failures end the session.
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    exchange(&mut c, "", INVALID).await;
    c.expect("421 4.4.2 usher.test").await;
    assert!(c.closes_within(Duration::from_secs(5)).await);

    let mut c = w.client().await;
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    exchange(&mut c, "not base64!", "501 5.5.2 Cannot decode response").await;
    exchange(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    exchange(&mut c, "YWxp Y2U=", "501 5.5.2 Cannot decode response").await;
    exchange(&mut c, "AUTH PLAIN %%%", "501 5.5.2 Cannot decode response").await;
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    exchange(
        &mut c,
        &smtp::plain("alice@example.com", "secret"),
        AUTHENTICATED,
    )
    .await;
}

/// usher submits only as the authenticated user: an authorization
/// identity naming someone else is refused.
#[tokio::test]
async fn authzid_must_be_the_user_itself() {
    let w = World::start();
    let mut c = w.client().await;
    let other = b64("bob@example.com\0alice@example.com\0secret");
    exchange(&mut c, &format!("AUTH PLAIN {other}"), INVALID).await;
    let same = b64("alice@example.com\0alice@example.com\0secret");
    exchange(&mut c, &format!("AUTH PLAIN {same}"), AUTHENTICATED).await;
    assert!(!w.dovecot.log().contains("as bob@example.com"));
}

// ---------------------------------------------------------------------
// C21: the response in the same write as AUTH

#[tokio::test]
async fn sasl_response_pipelined_behind_auth_is_not_stalled() {
    let w = World::start();
    let mut c = w.client().await;
    let started = Instant::now();
    c.send(b"AUTH PLAIN\r\nAGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==\r\n")
        .await;
    assert_eq!(c.line().await, "334 ");
    assert_eq!(c.line().await, AUTHENTICATED);
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut c = w.client().await;
    let started = Instant::now();
    c.send(b"AUTH LOGIN\r\nYWxpY2VAZXhhbXBsZS5jb20=\r\nc2VjcmV0\r\nNOOP\r\n")
        .await;
    assert_eq!(c.line().await, "334 VXNlcm5hbWU6");
    assert_eq!(c.line().await, "334 UGFzc3dvcmQ6");
    assert_eq!(c.line().await, AUTHENTICATED);
    // The NOOP behind went to Dovecot, which answers it itself.
    let noop = c.line().await;
    assert!(noop.starts_with("250 2.0.0") && noop != OK, "{noop}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Even the one-byte-at-a-time client gets its answer.
#[tokio::test]
async fn auth_fed_byte_by_byte() {
    let w = World::start();
    let mut c = w.client().await;
    for b in format!(
        "AUTH PLAIN {}\r\n",
        smtp::plain("alice@example.com", "secret")
    )
    .bytes()
    {
        c.send([b]).await;
    }
    assert_eq!(c.line().await, AUTHENTICATED);
}

// ---------------------------------------------------------------------
// C14 and the rest of STARTTLS

/// Plaintext pipelined behind STARTTLS is thrown away: the injected AUTH
/// neither authenticates nor reaches the store or the backend, and EHLO
/// state starts afresh inside TLS.
#[tokio::test]
async fn commands_pipelined_after_starttls_are_discarded() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    let kw = keywords(&ehlo);
    assert!(kw.contains(&"STARTTLS".to_string()) && kw.contains(&"PIPELINING".to_string()));
    c.send(format!(
        "STARTTLS\r\nAUTH PLAIN {}\r\n",
        smtp::plain("alice@example.com", "secret")
    ))
    .await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS");
    let mut c = c.upgrade().await;
    exchange(&mut c, "MAIL FROM:<alice@example.com>", AUTH_REQUIRED).await;
    // No EHLO inside TLS yet: AUTH must wait for one.
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        EHLO_FIRST,
    )
    .await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    let kw = keywords(&ehlo);
    assert!(!kw.contains(&"STARTTLS".to_string()), "{ehlo:?}");
    assert!(kw.contains(&"AUTH PLAIN LOGIN".to_string()), "{ehlo:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !w.dovecot.log().contains("Login: user="),
        "{}",
        w.dovecot.log()
    );
    let log = w.usher.log();
    assert!(
        !log.contains("logged in") && !log.contains("authentication failed"),
        "{log}"
    );
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
}

/// Cleartext sent after the `220` but before the handshake is never read
/// as a command: the handshake fails and the connection closes.
#[tokio::test]
async fn cleartext_after_the_220_breaks_the_handshake() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    command(&mut c, "EHLO client.example.net").await;
    exchange(&mut c, "STARTTLS", "220 2.0.0 Ready to start TLS").await;
    let before = c.transcript().len();
    c.send(b"EHLO evil.example\r\nNOOP\r\n").await;
    assert!(c.closes_within(Duration::from_secs(10)).await);
    let after = &c.transcript()[before..];
    assert!(!after.contains("250"), "{}", c.transcript());
}

#[tokio::test]
async fn starttls_where_it_does_not_belong() {
    let w = World::start();
    let mut c = w.client().await;
    exchange(&mut c, "STARTTLS", "503 5.5.1 Error: TLS already active").await;
    exchange(
        &mut c,
        "STARTTLS now",
        "501 5.5.4 Syntax error in parameters or arguments",
    )
    .await;
    let (mut c, ehlo) = open_implicit(w.usher.addr("submissions")).await;
    let kw = keywords(&ehlo);
    assert!(!kw.contains(&"STARTTLS".to_string()), "{ehlo:?}");
    assert!(kw.contains(&"AUTH PLAIN LOGIN".to_string()), "{ehlo:?}");
    exchange(&mut c, "STARTTLS", "503 5.5.1 Error: TLS already active").await;
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
}

/// No password on a cleartext connection unless the listener allows it:
/// AUTH is not advertised and answers `538 5.7.11`.
#[tokio::test]
async fn cleartext_auth_is_refused_on_a_strict_listener() {
    let w = World::start();
    let addr = w.usher.addr("submission-strict");
    let mut c = smtp::connect(addr).await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    let kw = keywords(&ehlo);
    assert!(kw.contains(&"STARTTLS".to_string()), "{ehlo:?}");
    assert!(!kw.iter().any(|k| k.starts_with("AUTH")), "{ehlo:?}");
    let refused = "538 5.7.11 Encryption required for requested authentication mechanism";
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        refused,
    )
    .await;
    // The 538 comes before any SASL exchange: no 334, no password read.
    exchange(&mut c, "AUTH LOGIN", refused).await;
    exchange(&mut c, "NOOP", OK).await;
    let (mut c, _) = open_starttls(addr).await;
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
    assert!(w
        .dovecot
        .wait_for_log("Login: user=<alice@example.com>", Duration::from_secs(10)));
}

#[tokio::test]
async fn a_permissive_listener_takes_cleartext_auth() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    assert!(keywords(&ehlo).contains(&"AUTH PLAIN LOGIN".to_string()));
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
}

// ---------------------------------------------------------------------
// Every command in its state

#[tokio::test]
async fn mail_commands_before_auth_get_530() {
    let w = World::start();
    let mut c = w.client().await;
    for line in [
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        "DATA",
        "VRFY alice",
        "EXPN staff",
        "mail from:<alice@example.com> BODY=8BITMIME",
    ] {
        exchange(&mut c, line, AUTH_REQUIRED).await;
    }
    assert!(w.sink.lines().iter().all(|l| !l.starts_with("MAIL")));
}

#[tokio::test]
async fn harmless_commands_before_auth() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    // Before EHLO.
    exchange(&mut c, "NOOP", OK).await;
    exchange(&mut c, "RSET", OK).await;
    exchange(&mut c, "NOOP with an argument", OK).await;
    exchange(&mut c, "HELP", "214 2.0.0 usher: see RFC 6409").await;
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        EHLO_FIRST,
    )
    .await;
    // HELO is answered, but AUTH is an ESMTP extension.
    exchange(&mut c, "HELO client.example.net", "250 usher.test").await;
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        EHLO_FIRST,
    )
    .await;
    let ehlo = command(&mut c, "EHLO [192.0.2.10]").await;
    assert_eq!(ehlo[0], "250-usher.test");
    let ehlo = command(&mut c, "EHLO b\u{fc}cher.example").await;
    assert_eq!(ehlo[0], "250-usher.test");
    exchange(
        &mut c,
        "RSET extra",
        "501 5.5.4 Syntax error in parameters or arguments",
    )
    .await;
    exchange(&mut c, "QUIT", "221 2.0.0 Bye").await;
    assert!(c.closes_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn unknown_and_malformed_commands() {
    let w = World::start();
    let mut c = w.client().await;
    let unknown = "500 5.5.2 Error: command not recognized";
    let bad_domain = "501 5.5.4 Invalid EHLO/HELO argument";
    exchange(&mut c, "FOO bar", unknown).await;
    exchange(&mut c, "", unknown).await;
    exchange(&mut c, "EHLO", bad_domain).await;
    // C30: no second XCLIENT attribute can hide in the EHLO argument.
    exchange(&mut c, "EHLO x ADDR=203.0.113.66", bad_domain).await;
    exchange(
        &mut c,
        "AUTH",
        "501 5.5.4 Syntax error in parameters or arguments",
    )
    .await;
    exchange(
        &mut c,
        "AUTH CRAM-MD5",
        "504 5.5.4 Unrecognized authentication type",
    )
    .await;
    // C31: client PROXY and XCLIENT lines are not honoured.
    exchange(
        &mut c,
        "PROXY TCP4 198.51.100.99 192.0.2.1 9999 587",
        unknown,
    )
    .await;
    exchange(
        &mut c,
        "XCLIENT ADDR=198.51.100.99",
        "550 5.7.0 Error: insufficient authorization",
    )
    .await;
    // A refused EHLO leaves the session in the state it was in (RFC 5321
    // §4.1.4): the EHLO given before still stands.
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
}

/// AUTH before any EHLO is out of sequence, and so is AUTH after a HELO
/// (SMTP AUTH is an ESMTP extension); a refused EHLO does not count.
#[tokio::test]
async fn auth_needs_a_successful_ehlo_first() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    let auth = format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret"));
    exchange(&mut c, &auth, EHLO_FIRST).await;
    exchange(&mut c, "EHLO", "501 5.5.4 Invalid EHLO/HELO argument").await;
    exchange(&mut c, &auth, EHLO_FIRST).await;
    command(&mut c, "HELO client.example.net").await;
    exchange(&mut c, &auth, EHLO_FIRST).await;
    command(&mut c, "EHLO client.example.net").await;
    exchange(&mut c, &auth, AUTHENTICATED).await;
}

// ---------------------------------------------------------------------
// C33 before AUTH: BDAT is refused, its octets skipped

#[tokio::test]
async fn bdat_before_auth_skips_its_chunk() {
    let w = World::start();
    let (mut c, ehlo) = open_starttls(w.usher.addr("submission")).await;
    assert!(keywords(&ehlo).contains(&"CHUNKING".to_string()));
    // The six chunk octets are "QUIT\r\n": they must not end the session.
    c.send(b"BDAT 6 LAST\r\nQUIT\r\n").await;
    assert_eq!(c.line().await, AUTH_REQUIRED);
    exchange(&mut c, "NOOP", OK).await;
    // A big chunk, arriving in pieces, full of command-like lines.
    let chunk = "QUIT\r\nAUTH PLAIN x\r\n".repeat(1000);
    c.send(format!("BDAT {} LAST\r\n", chunk.len())).await;
    for piece in chunk.as_bytes().chunks(4096) {
        c.send(piece).await;
    }
    assert_eq!(c.line().await, AUTH_REQUIRED);
    exchange(&mut c, "NOOP", OK).await;
    exchange(&mut c, "BDAT 0 LAST", AUTH_REQUIRED).await;
    assert!(w.sink.messages().is_empty());
    exchange(
        &mut c,
        &format!("AUTH PLAIN {}", smtp::plain("alice@example.com", "secret")),
        AUTHENTICATED,
    )
    .await;
}

/// A BDAT chunk before AUTH larger than usher skips (64 KiB) closes the
/// session at once, before its octets are read: an unauthenticated client
/// cannot make usher read without end.
#[tokio::test]
async fn huge_bdat_before_auth_closes_at_once() {
    let w = World::start();
    let mut c = w.client().await;
    let started = Instant::now();
    c.send(b"BDAT 999999999999 LAST\r\n").await;
    let bye = c.line().await;
    assert!(bye.starts_with("421 4.4.2 usher.test"), "{bye}");
    assert!(bye.contains("BDAT chunk too large"), "{bye}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
    assert!(started.elapsed() < Duration::from_secs(4));
    // The largest chunk usher still skips.
    let mut c = w.client().await;
    c.send(format!("BDAT {} LAST\r\n", 64 * 1024)).await;
    c.send(vec![b'x'; 64 * 1024]).await;
    assert_eq!(c.line().await, AUTH_REQUIRED);
    exchange(&mut c, "NOOP", OK).await;
}

/// A BDAT whose size cannot be read cannot be skipped: usher closes.
#[tokio::test]
async fn bdat_with_an_unreadable_size_closes() {
    let w = World::start();
    for line in [
        "BDAT",
        "BDAT x LAST",
        "BDAT -1",
        "BDAT 18446744073709551616 LAST",
    ] {
        let mut c = w.client().await;
        c.send(format!("{line}\r\nNOOP\r\n")).await;
        let bye = c.line().await;
        assert!(bye.starts_with("421 4.4.2 usher.test"), "{line}: {bye}");
        assert!(c.closes_within(Duration::from_secs(5)).await, "{line}");
    }
}

// ---------------------------------------------------------------------
// C35 and C07: hostile credentials and over-long input

#[tokio::test]
async fn control_characters_and_extra_nuls_in_credentials() {
    let w = World::start();
    let blobs = [
        // "\0alice@example.com\0secret\r\na2 DELETE INBOX"
        "AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA0KYTIgREVMRVRFIElOQk9Y".to_string(),
        // "\0alice@example.com\0sec\0ret": not the password "sec"
        "AGFsaWNlQGV4YW1wbGUuY29tAHNlYwByZXQ=".to_string(),
        smtp::plain("alice@example.com\r\nRSET", "secret"),
        // an over-long authentication identity
        smtp::plain(&format!("{}@example.com", "a".repeat(2000)), "secret"),
    ];
    for blob in &blobs {
        let mut c = w.client().await;
        exchange(&mut c, &format!("AUTH PLAIN {blob}"), INVALID).await;
    }
    let mut c = w.client().await;
    exchange(
        &mut c,
        "AUTH LOGIN YWxpY2VAZXhhbXBsZS5jb20=",
        "334 UGFzc3dvcmQ6",
    )
    .await;
    exchange(&mut c, &b64("secret\r\nRSET"), INVALID).await;
    std::thread::sleep(Duration::from_millis(300));
    let log = w.dovecot.log();
    assert!(!log.contains("Login: user="), "{log}");
    assert!(!log.contains("DELETE") && !log.contains("RSET"), "{log}");
}

#[tokio::test]
async fn over_long_lines_close_with_421() {
    let w = World::start();
    let mut c = w.client().await;
    c.send(format!("NOOP {}\r\nNOOP\r\n", "x".repeat(70_000)))
        .await;
    let bye = c.line().await;
    assert!(bye.starts_with("421 4.4.2 usher.test"), "{bye}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
    // The tail of the long line was never read as a command.
    assert!(!c.transcript().contains(OK), "{}", c.transcript());

    // The same for a SASL response.
    let mut c = w.client().await;
    exchange(&mut c, "AUTH PLAIN", "334 ").await;
    c.send(format!("{}\r\n", "A".repeat(70_000))).await;
    let bye = c.line().await;
    assert!(bye.starts_with("421 4.4.2 usher.test"), "{bye}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn too_many_errors_close_with_421() {
    let w = World::start();
    let mut c = w.client().await;
    for _ in 0..9 {
        exchange(&mut c, "FOO", "500 5.5.2 Error: command not recognized").await;
    }
    c.send(b"FOO\r\n").await;
    let bye = c.line().await;
    assert!(bye.starts_with("421 4.4.2 usher.test"), "{bye}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
}

// ---------------------------------------------------------------------
// C25: the pre-AUTH deadline

fn impatient() -> World {
    World::start_with(
        UsherOpts {
            prelogin_timeout: "1s",
            ..UsherOpts::default()
        },
        &["--tls", "starttls"],
    )
}

async fn times_out(c: &mut Client, started: Instant) {
    let bye = c.line().await;
    assert_eq!(bye, "421 4.4.2 usher.test Error: timeout exceeded");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_idle_client_gets_421_at_the_deadline() {
    let w = impatient();
    let started = Instant::now();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    command(&mut c, "EHLO client.example.net").await;
    times_out(&mut c, started).await;
}

/// The deadline is absolute: a byte now and then does not extend it.
#[tokio::test]
async fn a_dribbling_client_gets_421_at_the_deadline() {
    let w = impatient();
    let started = Instant::now();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    command(&mut c, "EHLO client.example.net").await;
    c.send(b"AUTH PL").await;
    let dribble = async {
        for b in b"AIN ".iter().cycle().take(50) {
            tokio::time::sleep(Duration::from_millis(150)).await;
            c.send([*b]).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(700), dribble).await;
    times_out(&mut c, started).await;
}

/// A client that stops in the middle of a SASL exchange.
#[tokio::test]
async fn a_stalled_sasl_exchange_gets_421() {
    let w = impatient();
    let started = Instant::now();
    let mut c = smtp::connect(w.usher.addr("submission")).await;
    command(&mut c, "EHLO client.example.net").await;
    c.send(b"AUTH LOGIN\r\n").await;
    assert_eq!(reply(&mut c).await, ["334 VXNlcm5hbWU6"]);
    times_out(&mut c, started).await;
}

/// SIGTERM: every connection hears why it ends — a submission session
/// after AUTH, one before AUTH and an IMAP one before login — and usher
/// waits for those farewells before it exits.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_usher_says_why_to_logged_in_and_waiting_clients() {
    let mut w = World::start();
    let mut sending = w.alice().await;
    let mut waiting = w.client().await;
    let mut imap = Client::connect(w.usher.addr("imap")).await;
    imap.expect("* OK").await;
    tokio::task::block_in_place(|| w.usher.stop());
    for c in [&mut sending, &mut waiting] {
        let bye = c.line().await;
        assert!(
            bye.starts_with("421 4.3.2 usher.test Server shutting down"),
            "{bye}"
        );
        assert!(c.closes_within(Duration::from_secs(5)).await);
    }
    assert_eq!(imap.line().await, "* BYE Server shutting down");
    assert!(imap.closes_within(Duration::from_secs(5)).await);
}
