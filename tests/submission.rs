//! Submission end to end: clients through usher to real Dovecot submission
//! backends (dovecot-submissiond) that relay into a sink storing each
//! message. The bytes the client sent must arrive (apart from Dovecot's
//! `Received:` header); every reply after AUTH is the backend's.
//!
//! Cases from ../shared/cases/submission.md: C20 (pipelining across AUTH),
//! C28 (malformed backend replies), C33 (BDAT after AUTH), C34 (8BITMIME /
//! SMTPUTF8 as the backends offer them); from hostile-and-forwarding.md C30 against a real XCLIENT.
//! Also the honest EHLO, backend selection and the failure replies.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dovecot::{Dovecot, DovecotOpts};
use common::fake_smtp::{FakeSmtp, SmtpScript};
use common::net::free_port;
use common::sink::{Sink, SinkOpts};
use common::smtp::{
    self, add_case_users, auth_plain, command, keywords, message, open_implicit, open_starttls,
    reply, send_message, World,
};
use common::usher::{Usher, UsherOpts};

const WAIT: Duration = Duration::from_secs(20);

/// Usher's own `250 2.0.0 Ok`: after AUTH the client must never see it
/// for a message, a recipient or a chunk.
const USHERS_OK: &str = "250 2.0.0 Ok";

fn listener_v6() -> String {
    "[[listener]]\nname = \"submission6\"\nprotocol = \"submission\"\n\
     address = \"[::1]:0\"\ntls = \"starttls\"\nplaintext_auth = true\n"
        .to_string()
}

/// A body of at least `size` octets: 8-bit-free lines of varying length,
/// some starting with a dot, one a lone dot, all CRLF.
fn big_body(size: usize) -> Vec<u8> {
    let mut body =
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: big\r\n\r\n".to_vec();
    let mut i = 0usize;
    while body.len() < size {
        let line = match i % 97 {
            0 => ".".to_string(),
            1 => format!("..two dots {i}"),
            2 => format!(".one dot {i}"),
            n => format!(
                "{i:08} {}",
                "abcdefghijklmnopqrstuvwxyz0123456789".repeat(n % 3 + 1)
            ),
        };
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    body
}

// ---------------------------------------------------------------------
// Bytes arrive unchanged

#[tokio::test]
async fn five_megabyte_message_arrives_byte_for_byte_over_implicit_tls() {
    let w = World::start();
    let (mut c, ehlo) = open_implicit(w.usher.addr("submissions")).await;
    assert!(
        !keywords(&ehlo).contains(&"STARTTLS".to_string()),
        "{ehlo:?}"
    );
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    let body = big_body(5 * 1024 * 1024);
    let started = Instant::now();
    let done = send_message(
        &mut c,
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        &body,
    )
    .await;
    assert!(done[0].starts_with("250 2.0.0 Ok: queued as"), "{done:?}");
    let m = &w.sink.wait_for(1, WAIT)[0];
    println!(
        "5 MB message accepted after {:?} ({} octets)",
        started.elapsed(),
        body.len()
    );
    assert_eq!(m.mail, "MAIL FROM:<alice@example.com>");
    assert_eq!(m.rcpts, ["RCPT TO:<bob@example.org>"]);
    assert!(m.without_trace() == body, "message changed on the way");
    command(&mut c, "QUIT").await;
}

/// C34, the 8BITMIME half through Dovecot: 8-bit body octets (UTF-8 and
/// a lone Latin-1 octet) are relayed unchanged.
#[tokio::test]
async fn eight_bit_body_arrives_unchanged() {
    let w = World::start();
    let mut c = w.alice().await;
    let mut body = "Subject: Gr\u{fc}\u{df}e\r\nContent-Type: text/plain; charset=utf-8\r\n\
                    Content-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln\r\n"
        .as_bytes()
        .to_vec();
    body.extend_from_slice(b"latin-1 \xe9t\xe9\r\n\xff\xfe high octets\r\n");
    let done = send_message(
        &mut c,
        "MAIL FROM:<alice@example.com> BODY=8BITMIME",
        "RCPT TO:<bob@example.org>",
        &body,
    )
    .await;
    assert!(done[0].starts_with("250 "), "{done:?}");
    let m = &w.sink.wait_for(1, WAIT)[0];
    assert!(m.mail.contains("BODY=8BITMIME"), "{}", m.mail);
    assert_eq!(m.without_trace(), &body[..]);
}

/// C34 with a backend that offers SMTPUTF8 (the sink itself, logged in
/// with the master user): usher advertises it, a UTF-8 user logs in, and
/// the envelope and body reach the backend unchanged.
#[tokio::test]
async fn smtputf8_when_the_backend_offers_it() {
    let sink = Sink::start(SinkOpts {
        auth: true,
        ..SinkOpts::default()
    });
    let usher = Usher::start(UsherOpts::default());
    usher.add_submission_backend("utf8", sink.port(), &[]);
    add_case_users(&usher);
    let (mut c, ehlo) = open_starttls(usher.addr("submission")).await;
    let kw = keywords(&ehlo);
    for k in ["8BITMIME", "SMTPUTF8", "AUTH PLAIN LOGIN"] {
        assert!(kw.contains(&k.to_string()), "{k} missing: {ehlo:?}");
    }
    let r = command(&mut c, "AUTH PLAIN AGpvc8OpQGV4YW1wbGUuY29tAHNlY3JldA==").await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    // The backend login names the UTF-8 user with its exact octets.
    assert_eq!(
        sink.auths(),
        ["jos\u{e9}@example.com\0master\0masterpw".as_bytes()]
    );
    let mail = "MAIL FROM:<jos\u{e9}@example.com> SMTPUTF8 BODY=8BITMIME";
    let rcpt = "RCPT TO:<b\u{f6}b@example.org>";
    let body = "Subject: Gr\u{fc}\u{df}e\r\n\r\nGr\u{fc}\u{df}e\r\n".as_bytes();
    let done = send_message(&mut c, mail, rcpt, body).await;
    assert_eq!(done, ["250 2.0.0 Ok: queued as 1"]);
    let m = &sink.wait_for(1, WAIT)[0];
    assert_eq!(m.mail, mail);
    assert_eq!(m.rcpts, [rcpt]);
    assert_eq!(m.data, body);
}

/// C34, the other half: Dovecot 2.3 refuses `MAIL … SMTPUTF8`, so usher
/// must not advertise it, alone or beside a backend that has it.
#[tokio::test]
async fn no_smtputf8_when_a_backend_lacks_it() {
    let w = World::start();
    let (_, ehlo) = open_starttls(w.usher.addr("submission")).await;
    assert!(
        !keywords(&ehlo).contains(&"SMTPUTF8".to_string()),
        "{ehlo:?}"
    );
    let other = Sink::start(SinkOpts {
        auth: true,
        ..SinkOpts::default()
    });
    w.usher.add_submission_backend("utf8", other.port(), &[]);
    let (_, ehlo) = open_starttls(w.usher.addr("submission")).await;
    let kw = keywords(&ehlo);
    assert!(!kw.contains(&"SMTPUTF8".to_string()), "{ehlo:?}");
    assert!(!kw.contains(&"DSN".to_string()), "{ehlo:?}");
    assert!(kw.contains(&"8BITMIME".to_string()), "{ehlo:?}");
}

/// C20: AUTH with an initial response, MAIL, RCPT and DATA in one write.
/// Every reply arrives, in order, and the message arrives once.
#[tokio::test]
async fn pipelined_transaction_in_one_write() {
    let w = World::start();
    let mut c = w.client().await;
    c.send(format!(
        "AUTH PLAIN {}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
        smtp::plain("alice@example.com", "secret")
    ))
    .await;
    c.expect("235 2.7.0 Authentication successful").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("354 ").await;
    let body = message("pipelined");
    c.send(smtp::dot_stuff(&body)).await;
    let done = reply(&mut c).await;
    assert!(done[0].starts_with("250 2.0.0 Ok: queued"), "{done:?}");
    // A second transaction pipelined whole, DATA content included.
    let second = message("second");
    let mut burst =
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n".to_vec();
    burst.extend_from_slice(&smtp::dot_stuff(&second));
    burst.extend_from_slice(b"QUIT\r\n");
    c.send(burst).await;
    for prefix in [
        "250 2.1.0",
        "250 2.1.5",
        "354 ",
        "250 2.0.0 Ok: queued",
        "221 ",
    ] {
        c.expect(prefix).await;
    }
    let got = w.sink.wait_for(2, WAIT);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].without_trace(), &body[..]);
    assert_eq!(got[1].without_trace(), &second[..]);
    assert_eq!(got[1].rcpts, ["RCPT TO:<carol@example.org>"]);
}

/// C20, buffer-full variant: 200 recipients (about 6 KB) behind AUTH in
/// one write; nothing is lost, every reply comes.
#[tokio::test]
async fn pipelined_burst_of_two_hundred_recipients() {
    let w = World::start();
    let mut c = w.client().await;
    let mut burst = format!(
        "AUTH PLAIN {}\r\nMAIL FROM:<alice@example.com>\r\n",
        smtp::plain("alice@example.com", "secret")
    );
    for i in 0..200 {
        burst.push_str(&format!(
            "RCPT TO:<recipient-number-{i:03}@example.org>\r\n"
        ));
    }
    burst.push_str("DATA\r\n");
    assert!(burst.len() > 6000);
    c.send(burst).await;
    c.expect("235 ").await;
    c.expect("250 2.1.0").await;
    for _ in 0..200 {
        c.expect("250 2.1.5").await;
    }
    c.expect("354 ").await;
    let body = message("many");
    c.send(smtp::dot_stuff(&body)).await;
    c.expect("250 2.0.0 Ok: queued").await;
    let m = &w.sink.wait_for(1, WAIT)[0];
    assert_eq!(m.rcpts.len(), 200);
    assert_eq!(m.rcpts[199], "RCPT TO:<recipient-number-199@example.org>");
    assert_eq!(m.without_trace(), &body[..]);
}

/// Bytes pipelined behind AUTH reach the backend exactly once, in order
/// (the sink as the backend records every command line it gets).
#[tokio::test]
async fn pipelined_commands_reach_the_backend_exactly_once() {
    let sink = Sink::start(SinkOpts {
        auth: true,
        ..SinkOpts::default()
    });
    let usher = Usher::start(UsherOpts::default());
    usher.add_submission_backend("direct", sink.port(), &[]);
    add_case_users(&usher);
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    c.send(format!(
        "AUTH PLAIN {}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<r1@example.org>\r\n\
         RCPT TO:<r2@example.org>\r\nNOOP\r\nDATA\r\n",
        smtp::plain("alice@example.com", "secret")
    ))
    .await;
    for p in [
        "235 ",
        "250 2.1.0",
        "250 2.1.5",
        "250 2.1.5",
        "250 2.0.0",
        "354 ",
    ] {
        c.expect(p).await;
    }
    c.send(b"Subject: once\r\n\r\nx\r\n.\r\n").await;
    c.expect("250 2.0.0 Ok: queued as 1").await;
    let lines = sink.lines();
    let after_auth: Vec<&String> = lines
        .iter()
        .skip_while(|l| !l.starts_with("AUTH "))
        .skip(1)
        .collect();
    assert_eq!(
        after_auth,
        [
            "MAIL FROM:<alice@example.com>",
            "RCPT TO:<r1@example.org>",
            "RCPT TO:<r2@example.org>",
            "NOOP",
            "DATA",
        ]
    );
    assert_eq!(lines.iter().filter(|l| l.starts_with("AUTH ")).count(), 1);
}

/// C33 after AUTH: Dovecot offers CHUNKING, so BDAT is relayed untouched
/// (".line" is not dot-stuffed) and the only success reply is the
/// backend's.
#[tokio::test]
async fn bdat_is_relayed_byte_for_byte() {
    let w = World::start();
    let (mut c, ehlo) = open_starttls(w.usher.addr("submission")).await;
    assert!(
        keywords(&ehlo).contains(&"CHUNKING".to_string()),
        "{ehlo:?}"
    );
    auth_plain(&mut c, "alice@example.com", "secret").await;
    assert!(command(&mut c, "MAIL FROM:<alice@example.com>").await[0].starts_with("250 2.1.0"));
    assert!(command(&mut c, "RCPT TO:<bob@example.org>").await[0].starts_with("250 2.1.5"));
    let chunk = b"Subject: t\r\n\r\n.line\r\n";
    assert_eq!(chunk.len(), 21);
    c.send(b"BDAT 21 LAST\r\n").await;
    c.send(chunk).await;
    let done = reply(&mut c).await;
    assert_eq!(done.len(), 1);
    assert!(done[0].starts_with("250 2.0.0 Ok: queued as 1"), "{done:?}");
    let m = &w.sink.wait_for(1, WAIT)[0];
    assert_eq!(m.without_trace(), chunk);

    // Several chunks, split mid-line, with CR, LF and dots at the edges.
    let body = b"Subject: chunks\r\n\r\nline one\r\n.\r\n..x\r\nend\r\n".to_vec();
    let parts = [&body[..5], &body[5..19], &body[19..30], &body[30..]];
    assert!(command(&mut c, "MAIL FROM:<alice@example.com>").await[0].starts_with("250"));
    assert!(command(&mut c, "RCPT TO:<bob@example.org>").await[0].starts_with("250"));
    for (i, part) in parts.iter().enumerate() {
        let last = if i + 1 == parts.len() { " LAST" } else { "" };
        c.send(format!("BDAT {}{last}\r\n", part.len())).await;
        c.send(part).await;
        let r = reply(&mut c).await;
        assert!(r[0].starts_with("250 "), "chunk {i}: {r:?}");
        assert_ne!(r[0], USHERS_OK, "chunk {i} acknowledged by usher");
    }
    let m = &w.sink.wait_for(2, WAIT)[1];
    assert_eq!(m.without_trace(), &body[..]);
}

/// A message the backend does not accept is not acknowledged: Dovecot's
/// relay is down, so Dovecot refuses, and the client sees that refusal.
#[tokio::test]
async fn a_refusing_backend_is_never_covered_for() {
    let dead = free_port();
    let dovecot = Dovecot::start(DovecotOpts {
        submission: Some(dead),
        tls: false,
    });
    let usher = Usher::start(UsherOpts::default());
    usher.add_submission_backend("sub1", dovecot.submission_port().unwrap(), &[]);
    add_case_users(&usher);
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    // Dovecot connects to its relay only for MAIL.
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    let mut refusals = 0;
    for cmd in [
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        "DATA",
    ] {
        let r = command(&mut c, cmd).await;
        if !r[0].starts_with('2') && !r[0].starts_with('3') {
            refusals += 1;
            assert!(r[0].starts_with('4') || r[0].starts_with('5'), "{r:?}");
            break;
        }
    }
    assert_eq!(
        refusals, 1,
        "Dovecot accepted a transaction it cannot relay"
    );
    // Dovecot's refusal (`421 4.4.0 … Failed to connect to relay server`)
    // closes its side; usher passes that on and closes too.
    assert!(c.closes_within(WAIT).await);
}

// ---------------------------------------------------------------------
// Honest EHLO

#[tokio::test]
async fn ehlo_lists_what_dovecot_offers_and_nothing_more() {
    let w = World::start();
    let mut c = smtp::connect(w.usher.addr("submission-strict")).await;
    let clear = command(&mut c, "EHLO client.example.net").await;
    assert_eq!(clear[0], "250-usher.test");
    assert_eq!(
        keywords(&clear),
        [
            "SIZE",
            "PIPELINING",
            "8BITMIME",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "STARTTLS"
        ]
    );
    let (_, inside) = open_starttls(w.usher.addr("submission")).await;
    assert_eq!(
        keywords(&inside),
        [
            "SIZE",
            "PIPELINING",
            "8BITMIME",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "AUTH PLAIN LOGIN"
        ]
    );
    // Dovecot also lists BURL and XCLIENT; those are not for clients.
    let all = inside.join("\n");
    assert!(!all.contains("BURL") && !all.contains("XCLIENT"), "{all}");
}

/// Only extensions every healthy backend offers; SIZE the smallest; a
/// backend that is down does not count.
#[tokio::test]
async fn ehlo_is_the_intersection_of_the_pool() {
    let w = World::start();
    let small = Sink::start(SinkOpts {
        auth: true,
        extensions: ["PIPELINING", "SIZE 1000000", "8BITMIME", "SMTPUTF8", "DSN"]
            .map(String::from)
            .to_vec(),
    });
    w.usher.add_submission_backend("small", small.port(), &[]);
    let (_, ehlo) = open_starttls(w.usher.addr("submission")).await;
    assert_eq!(
        keywords(&ehlo),
        ["SIZE 1000000", "PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN"]
    );
    let smaller = Sink::start(SinkOpts {
        auth: true,
        extensions: ["SIZE 5000", "PIPELINING", "8BITMIME"]
            .map(String::from)
            .to_vec(),
    });
    w.usher
        .add_submission_backend("smaller", smaller.port(), &[]);
    let (_, ehlo) = open_starttls(w.usher.addr("submission")).await;
    assert_eq!(
        keywords(&ehlo),
        ["SIZE 5000", "PIPELINING", "8BITMIME", "AUTH PLAIN LOGIN"]
    );
    // A dead backend says nothing, so it cannot widen or narrow the offer.
    w.usher.add_submission_backend("dead", free_port(), &[]);
    let (_, again) = open_starttls(w.usher.addr("submission")).await;
    assert_eq!(keywords(&again), keywords(&ehlo));
}

#[tokio::test]
async fn without_a_known_backend_nothing_optional_is_offered() {
    let usher = Usher::start(UsherOpts::default());
    add_case_users(&usher);
    let (_, ehlo) = open_starttls(usher.addr("submission")).await;
    assert_eq!(keywords(&ehlo), ["AUTH PLAIN LOGIN"]);
    usher.add_submission_backend("dead", free_port(), &[]);
    let (_, ehlo) = open_starttls(usher.addr("submission")).await;
    assert_eq!(keywords(&ehlo), ["AUTH PLAIN LOGIN"]);
}

// ---------------------------------------------------------------------
// Backend selection and login

/// Two Dovecot backends, each relaying into its own sink.
struct Two {
    sinks: [Sink; 2],
    dovecots: [Dovecot; 2],
    usher: Usher,
}

fn two_backends() -> Two {
    let sinks = [
        Sink::start(SinkOpts::default()),
        Sink::start(SinkOpts::default()),
    ];
    let (a, b) = std::thread::scope(|s| {
        let start = |port| {
            s.spawn(move || {
                Dovecot::start(DovecotOpts {
                    submission: Some(port),
                    tls: true,
                })
            })
        };
        let a = start(sinks[0].port());
        let b = start(sinks[1].port());
        (a.join().unwrap(), b.join().unwrap())
    });
    let usher = Usher::start(UsherOpts {
        backend_timeout: "3s",
        ..UsherOpts::default()
    });
    usher.add_submission_backend("sub1", a.submission_port().unwrap(), &["--tls", "starttls"]);
    usher.add_submission_backend("sub2", b.submission_port().unwrap(), &["--tls", "starttls"]);
    add_case_users(&usher);
    Two {
        sinks,
        dovecots: [a, b],
        usher,
    }
}

impl Two {
    /// Sends one message as `user` and returns the index of the sink it
    /// reached.
    async fn deliver(&self, user: &str, password: &str, subject: &str) -> usize {
        let (mut c, _) = open_starttls(self.usher.addr("submission")).await;
        let r = auth_plain(&mut c, user, password).await;
        assert_eq!(r, ["235 2.7.0 Authentication successful"], "{user}");
        let done = send_message(
            &mut c,
            &format!("MAIL FROM:<{user}>"),
            "RCPT TO:<bob@example.org>",
            &message(subject),
        )
        .await;
        assert!(done[0].starts_with("250 "), "{done:?}");
        command(&mut c, "QUIT").await;
        self.which(subject)
    }

    fn which(&self, subject: &str) -> usize {
        let needle = format!("Subject: {subject}\r\n");
        let deadline = Instant::now() + WAIT;
        loop {
            for (i, sink) in self.sinks.iter().enumerate() {
                let found = sink
                    .messages()
                    .iter()
                    .any(|m| String::from_utf8_lossy(&m.data).contains(&needle));
                if found {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "{subject} never arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test]
async fn a_pinned_user_goes_to_their_backend() {
    let t = two_backends();
    t.usher.add_user("pinned@example.com", b"pw", "sub2");
    for i in 0..4 {
        let sink = t
            .deliver("pinned@example.com", "pw", &format!("pin{i}"))
            .await;
        assert_eq!(sink, 1, "message {i} went to sub1");
    }
}

/// Least connections: while one session holds a backend, the next login
/// goes to the other one.
#[tokio::test]
async fn unpinned_users_go_to_the_least_busy_backend() {
    let t = two_backends();
    for round in 0..3 {
        let (mut held, _) = open_starttls(t.usher.addr("submission")).await;
        auth_plain(&mut held, "alice@example.com", "secret").await;
        let subject = format!("held{round}");
        send_message(
            &mut held,
            "MAIL FROM:<alice@example.com>",
            "RCPT TO:<bob@example.org>",
            &message(&subject),
        )
        .await;
        let busy = t.which(&subject);
        // `held` stays open: the next session must land on the other.
        let other = t
            .deliver("carol@example.com", "accentué1!", &format!("free{round}"))
            .await;
        assert_ne!(busy, other, "round {round}: both sessions on one backend");
        command(&mut held, "QUIT").await;
    }
    // Submission never writes a placement for an unpinned user.
    let list = t.usher.ok(&["user", "show", "alice@example.com"], None);
    assert!(!list.contains("sub1") && !list.contains("sub2"), "{list}");
}

#[tokio::test]
async fn a_failed_pool_backend_passes_the_login_on() {
    let mut t = two_backends();
    t.dovecots[0].stop();
    for i in 0..4 {
        let sink = t
            .deliver("alice@example.com", "secret", &format!("fo{i}"))
            .await;
        assert_eq!(sink, 1);
    }
}

/// A pinned user whose backend is down gets `454 4.7.0`, never another
/// backend, and the log names the backend.
#[tokio::test]
async fn a_pinned_user_with_a_dead_backend_gets_454() {
    let mut t = two_backends();
    t.usher.add_user("pinned@example.com", b"pw", "sub2");
    t.dovecots[1].stop();
    let (mut c, _) = open_starttls(t.usher.addr("submission")).await;
    let r = auth_plain(&mut c, "pinned@example.com", "pw").await;
    assert_eq!(r, ["454 4.7.0 Temporary authentication failure"]);
    // The session goes on: a NOOP is still answered by usher.
    assert_eq!(command(&mut c, "NOOP").await, [USHERS_OK]);
    assert!(t.sinks[0].messages().is_empty());
    let log = t.usher.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("sub2")),
        "no warning naming sub2:\n{log}"
    );
}

#[tokio::test]
async fn no_backend_reachable_gives_454_and_a_warning() {
    let usher = Usher::start(UsherOpts::default());
    usher.add_submission_backend("gone", free_port(), &[]);
    add_case_users(&usher);
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["454 4.7.0 Temporary authentication failure"]);
    // Pipelined mail commands behind a failed AUTH are refused by usher.
    c.send(b"MAIL FROM:<alice@example.com>\r\n").await;
    c.expect("530 5.7.0").await;
    let log = usher.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("gone")),
        "no warning naming the backend:\n{log}"
    );
}

/// A backend that accepts TCP and never greets costs one backend timeout,
/// then `454`.
#[tokio::test]
async fn a_silent_backend_times_out_with_454() {
    let fake = FakeSmtp::start(SmtpScript::silent());
    let usher = Usher::start(UsherOpts {
        backend_timeout: "1s",
        ..UsherOpts::default()
    });
    usher.add_submission_backend("mute", fake.port, &[]);
    add_case_users(&usher);
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    let started = Instant::now();
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["454 4.7.0 Temporary authentication failure"]);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}

/// Passthrough: usher logs in with the user's own password.
#[tokio::test]
async fn passthrough_login_uses_the_clients_password() {
    let w = World::start_with(
        UsherOpts::default(),
        &["--tls", "starttls", "--login", "passthrough"],
    );
    w.dovecot.add_user("alice@example.com", "secret");
    let mut c = w.alice().await;
    let done = send_message(
        &mut c,
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        &message("passthrough"),
    )
    .await;
    assert!(done[0].starts_with("250 "));
    assert!(w
        .dovecot
        .wait_for_log("user=<alice@example.com>, method=PLAIN", WAIT));
    assert!(!w.dovecot.log().contains("Master user logging in"));
    // The store and the backend disagree about bob: the backend refuses,
    // so usher must not say 235.
    let mut c = w.client().await;
    let r = auth_plain(&mut c, "bob@example.com", "hunter2").await;
    assert_eq!(r, ["454 4.7.0 Temporary authentication failure"]);
}

/// Backends reached with implicit TLS, verified against the CA; and one
/// whose certificate cannot be verified is not used.
#[tokio::test]
async fn implicit_tls_backend_and_an_unverifiable_one() {
    let sink = Sink::start(SinkOpts::default());
    let dovecot = Dovecot::start(DovecotOpts {
        submission: Some(sink.port()),
        tls: true,
    });
    let usher = Usher::start(UsherOpts::default());
    let port = dovecot.submissions_port().unwrap();
    usher.add_submission_backend("tls", port, &["--tls", "implicit"]);
    add_case_users(&usher);
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    assert_eq!(
        auth_plain(&mut c, "alice@example.com", "secret").await,
        ["235 2.7.0 Authentication successful"]
    );
    send_message(
        &mut c,
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        &message("implicit"),
    )
    .await;
    sink.wait_for(1, WAIT);
    // The leaf certificate is no CA: verification must fail.
    let leaf = common::dovecot::example_certs_dir().join("localhost.crt");
    usher.ok(
        &["backend", "set", "tls", "--ca", leaf.to_str().unwrap()],
        None,
    );
    let (mut c, _) = open_starttls(usher.addr("submission")).await;
    assert_eq!(
        auth_plain(&mut c, "alice@example.com", "secret").await,
        ["454 4.7.0 Temporary authentication failure"]
    );
}

/// C30 against Dovecot: with XCLIENT the backend sees the client's own
/// (IPv6) address, not usher's.
#[tokio::test]
async fn xclient_gives_dovecot_the_clients_ipv6_address() {
    let w = World::start_with(
        UsherOpts {
            extra: listener_v6(),
            ..UsherOpts::default()
        },
        &["--tls", "starttls", "--forward", "xclient"],
    );
    let (mut c, _) = open_starttls(w.usher.addr("submission6")).await;
    assert_eq!(
        auth_plain(&mut c, "alice@example.com", "secret").await,
        ["235 2.7.0 Authentication successful"]
    );
    send_message(
        &mut c,
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.org>",
        &message("xclient"),
    )
    .await;
    let m = &w.sink.wait_for(1, WAIT)[0];
    let trace = String::from_utf8_lossy(&m.data[..m.data.len() - m.without_trace().len()]);
    assert!(
        trace.starts_with("Received: from client.example.net ([::1])"),
        "{trace}"
    );
    assert!(
        w.dovecot.wait_for_log("rip=::1", WAIT),
        "{}",
        w.dovecot.log()
    );
}

// ---------------------------------------------------------------------
// Failures before AUTH succeeds

/// Wrong credentials: `535 5.7.8` after the penalty delay, the same for
/// an unknown user; the third failure also ends the session.
#[tokio::test]
async fn wrong_credentials_get_535_after_the_delay() {
    let w = World::start_with(
        UsherOpts {
            failure_delay: "600ms",
            ..UsherOpts::default()
        },
        &["--tls", "starttls"],
    );
    let mut c = w.client().await;
    for (user, pw) in [
        ("alice@example.com", "wrong"),
        ("nobody@example.com", "secret"),
    ] {
        let started = Instant::now();
        let r = auth_plain(&mut c, user, pw).await;
        let took = started.elapsed();
        assert_eq!(
            r,
            ["535 5.7.8 Authentication credentials invalid"],
            "{user}"
        );
        assert!(took >= Duration::from_millis(600), "{user}: {took:?}");
    }
    let r = auth_plain(&mut c, "alice@example.com", "nope").await;
    assert_eq!(r, ["535 5.7.8 Authentication credentials invalid"]);
    let bye = c.line().await;
    assert!(bye.starts_with("421 4.4.2 usher.test"), "{bye}");
    assert!(c.closes_within(Duration::from_secs(5)).await);
    assert!(!w.dovecot.log().contains("Login: user="));
}

/// Case C28: a backend whose replies are multi-line where usher expects one
/// line, endless, or shorter than a reply code. Each costs the client one
/// `454`, never a panic or unbounded memory, and usher goes on serving.
#[tokio::test]
async fn malformed_backend_replies_give_one_454() {
    let accepting = SmtpScript::accepting();
    let scripts = [
        (
            "two-line greeting, two-line 535",
            SmtpScript {
                greeting: "220-backend.example.com ESMTP\r\n220 second greeting line\r\n".into(),
                auth: "535-5.7.8 first line\r\n535 5.7.8 Authentication failed\r\n".into(),
                ..accepting.clone()
            },
        ),
        (
            "endless EHLO",
            SmtpScript {
                ehlo: "250-x\r\n".repeat(100_000),
                ..accepting.clone()
            },
        ),
        (
            "short AUTH reply",
            SmtpScript {
                auth: "25\r\n".into(),
                ..accepting.clone()
            },
        ),
        (
            "mixed codes",
            SmtpScript {
                auth: "235-2.7.0 fine\r\n535 5.7.8 not fine\r\n".into(),
                ..accepting.clone()
            },
        ),
    ];
    for (what, script) in scripts {
        let fake = FakeSmtp::start(script);
        let usher = Usher::start(UsherOpts::default());
        usher.add_submission_backend("odd", fake.port, &[]);
        add_case_users(&usher);
        for attempt in 0..2 {
            let (mut c, _) = open_starttls(usher.addr("submission")).await;
            let r = auth_plain(&mut c, "alice@example.com", "secret").await;
            assert_eq!(
                r,
                ["454 4.7.0 Temporary authentication failure"],
                "{what}, attempt {attempt}"
            );
        }
        assert!(fake.accepted.load(Ordering::SeqCst) >= 1, "{what}");
        let log = usher.log();
        assert!(!log.contains("panicked"), "{what}:\n{log}");
    }
}

/// Submission logins and sessions are counted in `/metrics` like IMAP's.
#[tokio::test]
async fn submission_logins_are_counted_in_metrics() {
    let token = "submission-metrics-token-0123456789";
    let w = World::start_with(
        UsherOpts {
            extra: format!("[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"),
            ..UsherOpts::default()
        },
        &["--tls", "starttls"],
    );
    let (mut c, _) = open_starttls(w.usher.addr("submission")).await;
    assert_eq!(
        auth_plain(&mut c, "alice@example.com", "wrong").await,
        ["535 5.7.8 Authentication credentials invalid"]
    );
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    command(&mut c, "QUIT").await;
    drop(c);
    let admin = w.usher.addr("admin");
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let wanted = [
        "usher_logins_total{protocol=\"submission\",outcome=\"ok\"} 1",
        "usher_logins_total{protocol=\"submission\",outcome=\"rejected\"} 1",
        "usher_sessions_ended_total{protocol=\"submission\"} 1",
    ];
    let all_there = || {
        let m = scrape();
        wanted.iter().all(|w| m.contains(w))
    };
    assert!(common::net::poll_until(WAIT, all_there), "{}", scrape());
}
