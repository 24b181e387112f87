//! Routing that survives change, end to end with real Dovecot backends:
//! failover while a client IDLEs, recovery within a probe interval, moves,
//! password changes and drains made by the CLI in another process while
//! usher runs, placement over weighted backends, sessions and kicks
//! through the admin endpoint.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::dovecot::{Dovecot, DovecotOpts};
use common::fake::{FakeImap, Script};
use common::usher::{Usher, UsherOpts};

const TOKEN: &str = "routing-test-token-0123456789";
/// `health.interval` of these tests.
const PROBE: Duration = Duration::from_millis(500);

fn usher() -> Usher {
    Usher::start(UsherOpts {
        extra: format!(
            "[health]\ninterval = \"{}ms\"\ntimeout = \"1s\"\ndown_after = 2\n\n\
             [admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
            PROBE.as_millis()
        ),
        ..UsherOpts::default()
    })
}

fn dovecots<const N: usize>() -> [Dovecot; N] {
    std::thread::scope(|s| {
        let started: Vec<_> = (0..N)
            .map(|_| s.spawn(|| Dovecot::start(DovecotOpts::default())))
            .collect();
        let all: Vec<Dovecot> = started.into_iter().map(|h| h.join().unwrap()).collect();
        all.try_into().ok().unwrap()
    })
}

/// Logins of `user` a backend has seen (master logins through usher).
fn logins(d: &Dovecot, user: &str) -> usize {
    d.log().matches(&format!("Login: user=<{user}>")).count()
}

/// Waits until `d` has seen `n` logins of `user`.
fn wait_logins(d: &Dovecot, user: &str, n: usize) -> bool {
    common::net::poll_until(Duration::from_secs(5), || logins(d, user) >= n)
}

async fn connect(usher: &Usher) -> Client {
    let mut c = Client::connect(usher.addr("imap")).await;
    c.expect("* OK ").await;
    c
}

/// Logs in; returns the client and the tagged reply.
async fn login(usher: &Usher, user: &str, password: &str) -> (Client, String) {
    let mut c = connect(usher).await;
    c.send(format!("a LOGIN \"{user}\" \"{password}\"\r\n"))
        .await;
    let reply = c.tagged("a").await.pop().unwrap();
    (c, reply)
}

/// Logs in, selects INBOX and enters IDLE.
async fn idling(usher: &Usher, user: &str, password: &str) -> Client {
    let (mut c, reply) = login(usher, user, password).await;
    assert!(reply.starts_with("a OK"), "{reply}");
    c.send(b"b SELECT INBOX\r\n").await;
    let sel = c.tagged("b").await;
    assert!(sel.last().unwrap().starts_with("b OK"), "{sel:?}");
    c.send(b"c IDLE\r\n").await;
    c.expect("+ ").await;
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_stops_during_idle_and_comes_back_within_a_probe_interval() {
    let [mut imap1, imap2] = dovecots::<2>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    usher.add_user("alice@example.com", b"secret", "imap1");
    usher.ok(&["user", "fallback", "alice@example.com", "imap2"], None);
    usher.add_user("bob@example.com", b"hunter2", "imap1");

    let mut idle = idling(&usher, "alice@example.com", "secret").await;
    assert!(wait_logins(&imap1, "alice@example.com", 1));
    imap1.stop();
    // The relay ends with the backend: Dovecot says goodbye and usher closes.
    assert!(
        idle.closes_within(Duration::from_secs(3)).await,
        "the IDLE client was not disconnected:\n{}",
        idle.transcript()
    );

    // Alice has a fallback: served there at once.
    let started = Instant::now();
    let (_alice, reply) = login(&usher, "alice@example.com", "secret").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(
        wait_logins(&imap2, "alice@example.com", 1),
        "{}",
        imap2.log()
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Bob has none: a quick, temporary refusal, never a hang.
    for _ in 0..3 {
        let started = Instant::now();
        let (_bob, reply) = login(&usher, "bob@example.com", "hunter2").await;
        assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(usher.log().contains("backend is down"), "{}", usher.log());

    // Back: within one probe interval (plus the probe's own time) logins
    // go to imap1 again.
    imap1.restart();
    tokio::time::sleep(PROBE + Duration::from_millis(300)).await;
    let before = logins(&imap1, "bob@example.com");
    let (_bob, reply) = login(&usher, "bob@example.com", "hunter2").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(wait_logins(&imap1, "bob@example.com", before + 1));
    let before = logins(&imap1, "alice@example.com");
    let (_alice, reply) = login(&usher, "alice@example.com", "secret").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(wait_logins(&imap1, "alice@example.com", before + 1));
    // The state changes are logged once each, not on every probe.
    let log = usher.log();
    assert_eq!(log.matches("backend is down").count(), 1, "{log}");
    assert_eq!(log.matches("backend is up again").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_user_ends_the_idle_session_and_the_next_login_lands_on_the_new_backend() {
    let [imap1, imap2] = dovecots::<2>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    usher.add_user("alice@example.com", b"secret", "imap1");
    usher.add_user("bob@example.com", b"hunter2", "imap1");

    let mut alice = idling(&usher, "alice@example.com", "secret").await;
    let mut bob = idling(&usher, "bob@example.com", "hunter2").await;
    assert!(wait_logins(&imap1, "alice@example.com", 1));

    let started = Instant::now();
    let mover = {
        let config = usher.config_path().to_owned();
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_usher"))
                .arg("--config")
                .arg(config)
                .args(["user", "move", "Alice@Example.com", "imap2"])
                .output()
                .unwrap()
        })
    };
    assert!(
        alice.closes_within(Duration::from_secs(2)).await,
        "alice's session outlived the move:\n{}",
        alice.transcript()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        alice.transcript().contains("* BYE"),
        "{}",
        alice.transcript()
    );
    // Bob was not moved: his session goes on.
    bob.send(b"DONE\r\n").await;
    bob.expect("c OK").await;

    let out = mover.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("moved alice@example.com from imap1 to imap2"));

    let (mut again, reply) = login(&usher, "alice@example.com", "secret").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(
        wait_logins(&imap2, "alice@example.com", 1),
        "{}",
        imap2.log()
    );
    assert_eq!(logins(&imap1, "alice@example.com"), 1);
    // And the mailbox she works on now is imap2's.
    let msg = b"Subject: after the move\r\n\r\nhello\r\n";
    again
        .send(format!("b APPEND INBOX {{{}}}\r\n", msg.len()))
        .await;
    again.expect("+ ").await;
    again.send(msg).await;
    again.send(b"\r\n").await;
    assert!(again.tagged("b").await.pop().unwrap().starts_with("b OK"));
    assert_eq!(imap2.message_files("alice@example.com").len(), 1);
    assert!(imap1.message_files("alice@example.com").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn password_change_disable_and_remove_from_the_cli_take_effect_at_once() {
    let [imap1] = dovecots::<1>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_user("alice@example.com", b"old password", "imap1");
    usher.add_user("carol@example.com", b"carol", "imap1");
    usher.add_user("dave@example.com", b"dave", "imap1");

    let mut open = idling(&usher, "alice@example.com", "old password").await;
    let started = Instant::now();
    usher.ok(
        &["user", "passwd", "alice@example.com", "--password-stdin"],
        Some(b"new password\n"),
    );
    assert!(
        open.closes_within(Duration::from_secs(1)).await,
        "the open session survived the password change:\n{}",
        open.transcript()
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(open.transcript().contains("* BYE"), "{}", open.transcript());
    let (_c, reply) = login(&usher, "alice@example.com", "old password").await;
    assert!(reply.starts_with("a NO [AUTHENTICATIONFAILED]"), "{reply}");
    let (_c, reply) = login(&usher, "alice@example.com", "new password").await;
    assert!(reply.starts_with("a OK"), "{reply}");

    let mut carol = idling(&usher, "carol@example.com", "carol").await;
    usher.ok(&["user", "disable", "carol@example.com"], None);
    assert!(carol.closes_within(Duration::from_secs(1)).await);
    let (_c, reply) = login(&usher, "carol@example.com", "carol").await;
    assert!(reply.starts_with("a NO [AUTHENTICATIONFAILED]"), "{reply}");

    let mut dave = idling(&usher, "dave@example.com", "dave").await;
    usher.ok(&["user", "remove", "dave@example.com"], None);
    assert!(dave.closes_within(Duration::from_secs(1)).await);
    let (_c, reply) = login(&usher, "dave@example.com", "dave").await;
    assert!(reply.starts_with("a NO [AUTHENTICATIONFAILED]"), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_listed_and_kicked_by_user_backend_and_client() {
    let [imap1, imap2] = dovecots::<2>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    usher.add_user("alice@example.com", b"secret", "imap1");
    usher.add_user("bob@example.com", b"hunter2", "imap2");
    usher.ok(
        &["user", "alias-add", "al@example.com", "alice@example.com"],
        None,
    );
    let admin = usher.addr("admin").to_string();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin", &admin]);
        usher.ok(&all, None)
    };

    let mut alice = idling(&usher, "alice@example.com", "secret").await;
    let mut bob = idling(&usher, "bob@example.com", "hunter2").await;
    let listing = cli(&["sessions"]);
    let line = |user: &str| {
        listing
            .lines()
            .find(|l| l.contains(user))
            .unwrap_or_else(|| panic!("{user} missing from:\n{listing}"))
            .to_string()
    };
    assert!(line("alice@example.com").contains("imap1"), "{listing}");
    assert!(
        line("alice@example.com").contains("127.0.0.1:"),
        "{listing}"
    );
    assert!(line("bob@example.com").contains("imap2"), "{listing}");
    assert!(listing.contains("2 session(s)"), "{listing}");

    // The same picture for Prometheus.
    let (_c, reply) = login(&usher, "alice@example.com", "wrong").await;
    assert!(reply.starts_with("a NO"), "{reply}");
    let metrics = reqwest_like_get(&admin, "/metrics", TOKEN);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for want in [
        "usher_sessions 2",
        "usher_logins_total{protocol=\"imap\",outcome=\"ok\"} 2",
        "usher_logins_total{protocol=\"imap\",outcome=\"rejected\"} 1",
        "usher_backend_up{backend=\"imap1\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    assert!(reqwest_like_get(&admin, "/metrics", "").starts_with("HTTP/1.1 401"));

    assert!(cli(&["kick", "--backend", "imap1"]).contains("ended 1 session"));
    assert!(alice.closes_within(Duration::from_secs(1)).await);
    assert!(alice.transcript().contains("* BYE"));
    bob.send(b"DONE\r\n").await;
    bob.expect("c OK").await;

    let mut alice = idling(&usher, "alice@example.com", "secret").await;
    assert!(cli(&["kick", "--user", "AL@example.com"]).contains("ended 1 session"));
    assert!(alice.closes_within(Duration::from_secs(1)).await);

    assert!(cli(&["kick", "--client", "127.0.0.1"]).contains("ended 1 session"));
    assert!(bob.closes_within(Duration::from_secs(1)).await);
    assert!(cli(&["sessions"]).contains("0 session(s)"));

    // The endpoint wants its token; the CLI says what went wrong.
    let wrong = reqwest_like_get(&admin, "/sessions", "not-the-token");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let none = reqwest_like_get(&admin, "/sessions", "");
    assert!(none.starts_with("HTTP/1.1 401"), "{none}");
    let out = usher.cli(&["kick", "--client", "not-an-ip", "--admin", &admin], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an IP address"),
        "{out:?}"
    );
}

/// A bare HTTP/1.1 GET; returns the whole response.
fn reqwest_like_get(addr: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_stops_placements_and_spreads_its_kicks() {
    let [imap1, imap2] = dovecots::<2>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    let users: Vec<String> = (0..4).map(|i| format!("u{i}@example.com")).collect();
    for u in &users {
        usher.add_user(u, b"pw", "imap1");
    }
    let mut clients = Vec::new();
    for u in &users {
        clients.push(idling(&usher, u, "pw").await);
    }
    let started = Instant::now();
    let out = usher.ok(&["backend", "drain", "imap1", "--kick-over", "2s"], None);
    assert!(out.contains("draining"), "{out}");
    let mut ended = Vec::new();
    for c in &mut clients {
        assert!(c.closes_within(Duration::from_secs(4)).await);
        ended.push(started.elapsed());
    }
    ended.sort();
    // Spread: the last goes well after the first, within the 2 s asked.
    let spread = ended[3] - ended[0];
    assert!(
        spread >= Duration::from_millis(1000) && spread <= Duration::from_millis(2600),
        "{ended:?}"
    );
    // No new user is placed on a draining backend.
    for i in 0..20 {
        let login = format!("new{i}@example.com");
        usher.add_pool_user(&login, b"pw");
        let (_c, reply) = login_owned(&usher, &login).await;
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    let list = usher.ok(&["user", "list"], None);
    let placed: Vec<&str> = list.lines().filter(|l| l.starts_with("new")).collect();
    assert_eq!(placed.len(), 20);
    assert!(placed.iter().all(|l| l.contains("imap2")), "{list}");
}

async fn login_owned(usher: &Usher, user: &str) -> (Client, String) {
    login(usher, user, "pw").await
}

/// Backend of each user, from `usher user list`.
fn assignments(usher: &Usher) -> std::collections::HashMap<String, String> {
    usher
        .ok(&["user", "list"], None)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((cols.first()?.to_string(), cols.get(2)?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_follows_weights_and_a_new_backend_moves_nobody() {
    let [imap1, imap2, imap3, imap4] = dovecots::<4>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_backend("imap2", &imap2);
    usher.add_backend("imap3", &imap3);
    usher.ok(&["backend", "set", "imap2", "--weight", "200"], None);
    let users: Vec<String> = (0..1000).map(|i| format!("user{i}@example.com")).collect();
    // One CLI call per user would take minutes: one import.
    add_pool_users(&usher, &users);

    log_in_all(&usher, &users).await;
    let before = assignments(&usher);
    let share = |name: &str| before.values().filter(|b| *b == name).count();
    let (a, b, c) = (share("imap1"), share("imap2"), share("imap3"));
    assert_eq!(a + b + c, 1000, "{before:?}");
    // Weights 1:2:1 → 250/500/250, within 4 % of all users.
    for (got, want) in [(a, 250), (b, 500), (c, 250)] {
        assert!(got.abs_diff(want) <= 40, "spread {a}/{b}/{c}");
    }
    // Every login reached the backend the store names.
    let reached: usize = [&imap1, &imap2, &imap3]
        .iter()
        .map(|d| d.log().matches("Login: user=<user").count())
        .sum();
    assert_eq!(reached, 1000);

    usher.add_backend("imap4", &imap4);
    log_in_all(&usher, &users[..200]).await;
    assert_eq!(assignments(&usher), before, "a new backend moved someone");
    assert_eq!(imap4.log().matches("Login: user=<user").count(), 0);
    // New users do reach it, in about its share (1/5).
    let newcomers: Vec<String> = (0..200).map(|i| format!("late{i}@example.com")).collect();
    add_pool_users(&usher, &newcomers);
    log_in_all(&usher, &newcomers).await;
    let after = assignments(&usher);
    let on4 = newcomers
        .iter()
        .filter(|u| after.get(*u).map(String::as_str) == Some("imap4"))
        .count();
    assert!((20..=60).contains(&on4), "{on4} of 200 on imap4");
}

/// Adds unassigned users with password "pw" in one `usher user import`.
fn add_pool_users(usher: &Usher, users: &[String]) {
    let input: String = users.iter().map(|u| format!("{u} pw\n")).collect();
    let out = usher.ok(&["user", "import"], Some(input.as_bytes()));
    assert!(
        out.contains(&format!("added {} user(s)", users.len())),
        "{out}"
    );
}

/// Logs every user in and out, eight at a time.
async fn log_in_all(usher: &Usher, users: &[String]) {
    let addr = usher.addr("imap");
    let chunks: Vec<Vec<String>> = users
        .chunks(users.len().div_ceil(8))
        .map(<[String]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        tasks.push(tokio::spawn(async move {
            for u in chunk {
                let mut c = Client::connect(addr).await;
                c.expect("* OK ").await;
                c.send(format!("a LOGIN {u} pw\r\n")).await;
                let reply = c.tagged("a").await.pop().unwrap();
                assert!(reply.starts_with("a OK"), "{u}: {reply}");
                c.send(b"b LOGOUT\r\n").await;
                c.tagged("b").await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_usher_says_goodbye_to_every_session() {
    let [imap1] = dovecots::<1>();
    let mut usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.add_user("alice@example.com", b"secret", "imap1");
    usher.add_user("bob@example.com", b"hunter2", "imap1");
    let mut alice = idling(&usher, "alice@example.com", "secret").await;
    let mut bob = idling(&usher, "bob@example.com", "hunter2").await;
    tokio::task::block_in_place(|| usher.stop());
    for c in [&mut alice, &mut bob] {
        assert!(c.closes_within(Duration::from_secs(2)).await);
        assert!(
            c.transcript().contains("* BYE Server shutting down"),
            "{}",
            c.transcript()
        );
    }
    assert!(usher.log().contains("stopping"), "{}", usher.log());
}

/// With `health.test_user`, a probe is a whole login: a backend that still
/// greets but refuses every login is marked down, its users go to their
/// fallback, and a working Dovecot sees the probe's logins and stays up.
#[tokio::test(flavor = "multi_thread")]
async fn test_logins_find_a_backend_that_greets_but_cannot_log_in() {
    let broken = FakeImap::start(Script::Greet {
        id_reply: "OK",
        login_reply: vec!["{tag} NO [UNAVAILABLE] Internal error occurred."],
    })
    .await;
    let [good] = dovecots::<1>();
    let usher = Usher::start(UsherOpts {
        extra: format!(
            "[health]\ninterval = \"{}ms\"\ntimeout = \"1s\"\ndown_after = 2\n\
             test_user = \"probe@example.com\"\n",
            PROBE.as_millis()
        ),
        ..UsherOpts::default()
    });
    let port = broken.addr.port().to_string();
    usher.ok(
        &[
            "backend",
            "add",
            "broken",
            "--host",
            "127.0.0.1",
            "--imap-port",
            &port,
        ],
        None,
    );
    usher.add_backend("good", &good);
    usher.add_user("alice@example.com", b"secret", "broken");
    usher.ok(&["user", "fallback", "alice@example.com", "good"], None);

    let down = common::net::poll_until(Duration::from_secs(5), || {
        usher
            .log()
            .lines()
            .any(|l| l.contains("backend is down") && l.contains("broken"))
    });
    assert!(down, "{}", usher.log());
    assert!(
        wait_logins(&good, "probe@example.com", 2),
        "no probe logins at the working backend:\n{}",
        good.log()
    );
    // The probe logs in as the master user for the test user, and says
    // goodbye (no connection is left to time out).
    assert!(good.log().contains("Logged out"), "{}", good.log());
    let log = usher.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("backend is down") && l.contains("good")),
        "{log}"
    );

    // Alice's backend is down: she is served by her fallback at once.
    let (_alice, reply) = login(&usher, "alice@example.com", "secret").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert!(wait_logins(&good, "alice@example.com", 1), "{}", good.log());
}

/// A removed backend leaves the health map at the next probe round, so no
/// stale "down" stays in `/health` to keep an alert firing.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_backend_leaves_the_health_report() {
    let [imap1] = dovecots::<1>();
    let usher = usher();
    usher.add_backend("imap1", &imap1);
    usher.ok(
        &[
            "backend",
            "add",
            "gone",
            "--host",
            "127.0.0.1",
            "--imap-port",
            &common::net::free_port().to_string(),
        ],
        None,
    );
    let admin = usher.addr("admin").to_string();
    let health = || reqwest_like_get(&admin, "/health", TOKEN);
    assert!(
        common::net::poll_until(Duration::from_secs(5), || health().contains("\"gone\"")),
        "{}",
        health()
    );
    usher.ok(&["backend", "remove", "gone"], None);
    assert!(
        common::net::poll_until(Duration::from_secs(5), || !health().contains("\"gone\"")),
        "{}",
        health()
    );
    assert!(health().contains("\"imap1\""), "{}", health());
}
