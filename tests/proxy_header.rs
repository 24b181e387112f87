//! Inbound PROXY protocol against the real usher binary and real Dovecot
//! backends (../shared/cases/hostile-and-forwarding.md C29, C31, C32).
//!
//! The test's own connections come from 127.0.0.1, which the `-lb`
//! listeners trust; an untrusted peer is played by connecting from
//! 127.0.0.2. Dovecot trusts usher on loopback (`login_trusted_networks`),
//! so its login line shows the address usher forwarded: `rip=` / `lip=`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::client::Client;
use common::dovecot::{Dovecot, DovecotOpts, Tuning};
use common::fake::{FakeImap, Script};
use common::smtp::{self, auth_plain, command};
use common::usher::{Usher, UsherOpts};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(15);

/// How long a refused connection may take to close.
const CLOSE: Duration = Duration::from_secs(5);

const TOKEN: &str = "proxy-header-test-token-0123456789";

/// Listeners that expect PROXY headers from 127.0.0.1 only.
fn lb_listeners() -> String {
    let mut out = String::new();
    for (name, protocol, tls) in [
        ("imap-lb", "imap", "starttls"),
        ("imaps-lb", "imap", "implicit"),
        ("submission-lb", "submission", "starttls"),
        ("submissions-lb", "submission", "implicit"),
    ] {
        out.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\n\
             address = \"127.0.0.1:0\"\ntls = \"{tls}\"\nplaintext_auth = true\n\
             proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n"
        ));
    }
    out
}

fn opts() -> UsherOpts {
    UsherOpts {
        extra: format!(
            "{}[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n",
            lb_listeners()
        ),
        ..UsherOpts::default()
    }
}

/// One Dovecot with alice behind an usher with the `-lb` listeners.
struct World {
    dovecot: Dovecot,
    usher: Usher,
}

impl World {
    fn start() -> World {
        World::start_with(opts())
    }

    fn start_with(opts: UsherOpts) -> World {
        let dovecot = Dovecot::start(DovecotOpts::default());
        let usher = Usher::start(opts);
        usher.add_backend("imap1", &dovecot);
        usher.add_user("alice@example.com", b"secret", "imap1");
        World { dovecot, usher }
    }

    fn dovecot_saw(&self, needle: &str) {
        assert!(
            self.dovecot.wait_for_log(needle, WAIT),
            "Dovecot never logged {needle:?}:\n{}",
            self.dovecot.log()
        );
    }
}

/// usher's log without the terminal colour codes around field names.
fn plain_log(usher: &Usher) -> String {
    let log = usher.log();
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A v1 header for a TCP4 or TCP6 client.
fn v1(source: &str, destination: &str) -> Vec<u8> {
    let s: SocketAddr = source.parse().unwrap();
    let d: SocketAddr = destination.parse().unwrap();
    let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// A v2 PROXY/STREAM header for an IPv4 client (C32's 465 example).
fn v2(source: [u8; 4], sport: u16, destination: [u8; 4], dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0x00, 0x0C]);
    h.extend(source);
    h.extend(destination);
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h
}

/// A connection from `source` (any 127/8 address is local on Linux).
async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let tcp: TcpStream = socket.connect(addr).await.expect("connect");
    Client::from_tcp(tcp)
}

/// Sends `header` in the clear, then greets (and TLS first if `tls`).
async fn behind(usher: &Usher, listener: &str, header: &[u8], tls: bool) -> Client {
    let mut c = Client::connect(usher.addr(listener)).await;
    c.send(header).await;
    if tls {
        c = c.upgrade().await;
    }
    c
}

async fn imap_login(c: &mut Client) {
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    c.send(b"a2 LOGOUT\r\n").await;
    c.expect("* BYE").await;
}

/// Asserts that usher ends the connection with `line` (a prefix).
async fn refused(c: &mut Client, line: &str) {
    assert!(
        c.closes_within(CLOSE).await,
        "still open; received:\n{}",
        c.transcript()
    );
    assert!(
        c.transcript().starts_with(line),
        "expected {line:?}, received:\n{}",
        c.transcript()
    );
}

// ---------------------------------------------------------------------
// A trusted balancer's header names the client

/// C31: no greeting before the header; v1 (TCP4, TCP6) and v2 on a
/// cleartext listener; Dovecot and usher's own log see the client.
#[tokio::test]
async fn cleartext_v1_and_v2_name_the_client_to_dovecot() {
    let w = World::start();
    let mut waiting = Client::connect(w.usher.addr("imap-lb")).await;
    assert_eq!(
        waiting.try_line(Duration::from_millis(500)).await,
        None,
        "usher greets only after the header"
    );
    waiting.send(v1("192.0.2.10:53211", "192.0.2.1:143")).await;
    imap_login(&mut waiting).await;
    w.dovecot_saw("rip=192.0.2.10, lip=192.0.2.1");

    let mut c = behind(
        &w.usher,
        "imap-lb",
        &v2([192, 0, 2, 11], 40000, [192, 0, 2, 1], 143),
        false,
    )
    .await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.11, lip=192.0.2.1");

    let header = v1("[2001:db8::10]:53211", "[2001:db8::1]:143");
    let mut c = behind(&w.usher, "imap-lb", &header, false).await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=2001:db8::10, lip=2001:db8::1");

    // v1 UNKNOWN (a balancer's own health check): the socket's address.
    let mut c = behind(&w.usher, "imap-lb", b"PROXY UNKNOWN\r\n", false).await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=127.0.0.1, lip=127.0.0.1");

    let log = plain_log(&w.usher);
    assert!(log.contains("client.addr=192.0.2.10:53211"), "{log}");
    assert!(log.contains("proxy.addr=127.0.0.1:"), "{log}");
}

/// The header, then STARTTLS as usual.
#[tokio::test]
async fn starttls_after_the_header() {
    let w = World::start();
    let header = v2([192, 0, 2, 12], 53212, [192, 0, 2, 1], 143);
    let mut c = behind(&w.usher, "imap-lb", &header, false).await;
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    c.send(b"a0 STARTTLS\r\n").await;
    c.expect("a0 OK").await;
    let mut c = c.upgrade().await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    w.dovecot_saw("rip=192.0.2.12, lip=192.0.2.1");
}

/// C32: on the implicit-TLS listener the header comes in the clear, then
/// the TLS handshake; v1 and v2.
#[tokio::test]
async fn implicit_tls_reads_the_header_before_the_handshake() {
    let w = World::start();
    let mut c = behind(
        &w.usher,
        "imaps-lb",
        &v1("192.0.2.10:53211", "192.0.2.1:993"),
        true,
    )
    .await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.10, lip=192.0.2.1");
    let header = v2([192, 0, 2, 13], 53213, [192, 0, 2, 1], 993);
    let mut c = behind(&w.usher, "imaps-lb", &header, true).await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.13, lip=192.0.2.1");
}

/// A header split over several TCP segments, and one sent together with
/// the first command: usher takes exactly the header.
#[tokio::test]
async fn split_headers_and_pipelined_bytes() {
    let w = World::start();
    let header = v1("192.0.2.14:53214", "192.0.2.1:143");
    let mut c = Client::connect(w.usher.addr("imap-lb")).await;
    for part in header.chunks(9) {
        c.send(part).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.14");

    // v2 one byte at a time, then TLS.
    let header = v2([192, 0, 2, 15], 53215, [192, 0, 2, 1], 993);
    let mut c = Client::connect(w.usher.addr("imaps-lb")).await;
    for b in &header {
        c.send([*b]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = c.upgrade().await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.15");

    // Header and a command in one write: the command is not lost.
    let mut bytes = v1("192.0.2.16:53216", "192.0.2.1:143");
    bytes.extend(b"a0 NOOP\r\n");
    let mut c = behind(&w.usher, "imap-lb", &bytes, false).await;
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    c.expect("a0 OK").await;
}

/// C29 with a header: the ID usher sends carries the header's addresses,
/// and nothing the client claimed.
#[tokio::test]
async fn id_carries_the_headers_addresses() {
    let fake = FakeImap::start(Script::Greet {
        id_reply: "OK",
        login_reply: vec!["{tag} OK [CAPABILITY IMAP4rev1] Logged in"],
    })
    .await;
    let usher = Usher::start(opts());
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
    let header = v1("192.0.2.10:53211", "192.0.2.1:993");
    let mut c = behind(&usher, "imaps-lb", &header, true).await;
    c.expect("* OK").await;
    c.send(b"a1 ID (\"x-originating-ip\" \"198.51.100.99\")\r\n")
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
    for part in [
        "\"x-originating-ip\" \"192.0.2.10\"",
        "\"x-originating-port\" \"53211\"",
        "\"x-connected-ip\" \"192.0.2.1\"",
        "\"x-connected-port\" \"993\"",
    ] {
        assert!(id.contains(part), "{part} missing from {id}");
    }
    assert!(
        !lines.iter().any(|l| l.contains("198.51.100.99")),
        "{lines:?}"
    );
}

/// The session registry lists the forwarded address, and a kick by that
/// address finds the session.
#[tokio::test]
async fn sessions_are_listed_and_kicked_by_the_forwarded_address() {
    let w = World::start();
    let mut c = behind(
        &w.usher,
        "imap-lb",
        &v1("192.0.2.17:53217", "192.0.2.1:143"),
        false,
    )
    .await;
    c.expect("* OK").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    let admin = w.usher.addr("admin").to_string();
    let listing = w.usher.ok(&["sessions", "--admin", &admin], None);
    assert!(listing.contains("192.0.2.17:53217"), "{listing}");
    let kicked = w
        .usher
        .ok(&["kick", "--client", "192.0.2.17", "--admin", &admin], None);
    assert!(kicked.contains("ended 1 session"), "{kicked}");
    assert!(c.closes_within(CLOSE).await);
}

// ---------------------------------------------------------------------
// Headers that are not honoured

/// C31: from a peer outside trusted_proxies a header is never honoured:
/// on the cleartext listener usher greets at once and the line is an
/// unknown command; on the implicit-TLS listener it is refused. A direct
/// client from that peer is served as itself.
#[tokio::test]
async fn untrusted_peer_header_is_never_honoured() {
    let w = World::start();
    let untrusted = Ipv4Addr::new(127, 0, 0, 2);
    let spoof = v1("198.51.100.99:9999", "192.0.2.1:143");

    let mut c = connect_from(untrusted, w.usher.addr("imap-lb")).await;
    c.send(&spoof).await;
    c.expect("* OK [CAPABILITY IMAP4rev1").await;
    let reply = c.line().await;
    assert!(reply.starts_with("PROXY BAD"), "{reply}");
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    w.dovecot_saw("rip=127.0.0.2");

    let mut c = connect_from(untrusted, w.usher.addr("imaps-lb")).await;
    c.send(&spoof).await;
    refused(&mut c, "* BYE PROXY protocol error").await;
    let mut c = connect_from(untrusted, w.usher.addr("imaps-lb")).await;
    c.send(v2([198, 51, 100, 99], 9999, [192, 0, 2, 1], 993))
        .await;
    refused(&mut c, "* BYE PROXY protocol error").await;

    // Without a header the untrusted peer is an ordinary TLS client.
    let c = connect_from(untrusted, w.usher.addr("imaps-lb")).await;
    let mut c = c.upgrade().await;
    imap_login(&mut c).await;

    assert!(!w.dovecot.log().contains("198.51.100.99"));
    assert!(w.usher.log().contains("PROXY header refused"));
}

/// C31: the header counts only as the first bytes. A second one later is
/// an unknown command and changes nothing; a trusted peer that sends no
/// header (a command, or a TLS ClientHello on 993) is refused.
#[tokio::test]
async fn header_only_as_the_first_bytes() {
    let w = World::start();
    let mut c = behind(
        &w.usher,
        "imap-lb",
        &v1("192.0.2.18:53218", "192.0.2.1:143"),
        false,
    )
    .await;
    c.expect("* OK").await;
    c.send(v1("198.51.100.99:9999", "192.0.2.1:143")).await;
    let reply = c.line().await;
    assert!(reply.starts_with("PROXY BAD"), "{reply}");
    c.send(b"a1 XCLIENT ADDR=198.51.100.99\r\n").await;
    c.expect("a1 BAD").await;
    c.send(b"a2 LOGIN alice@example.com secret\r\n").await;
    c.expect("a2 OK").await;
    w.dovecot_saw("rip=192.0.2.18");
    assert!(!w.dovecot.log().contains("198.51.100.99"));

    let mut c = behind(&w.usher, "imap-lb", b"a1 CAPABILITY\r\n", false).await;
    refused(&mut c, "* BYE PROXY protocol error").await;

    // A balancer configured without send-proxy in front of 993.
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(common::client::tls_config());
    let tcp = TcpStream::connect(w.usher.addr("imaps-lb")).await.unwrap();
    let handshake = tokio::time::timeout(WAIT, connector.connect(name, tcp)).await;
    assert!(matches!(handshake, Ok(Err(_))), "the handshake must fail");
    assert!(w.usher.log().contains("trusted peer sent no PROXY header"));
}

/// Over-long and malformed headers end the connection with `* BYE`, at
/// once, and usher goes on serving.
#[tokio::test]
async fn oversize_and_garbage_headers() {
    let w = World::start();
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(300, b'1');
    let mut huge = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    huge.extend([0u8; 64]);
    let mut bad_version = v2([192, 0, 2, 10], 1, [192, 0, 2, 1], 2);
    bad_version[12] = 0x11;
    let mut short_addresses = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04".to_vec();
    short_addresses.extend([192, 0, 2, 10]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("v1 without end", long),
        ("v2 announcing 64 KiB", huge),
        ("v2 version 1", bad_version),
        ("v2 IPv4 with 4 address bytes", short_addresses),
        (
            "v1 bad address",
            b"PROXY TCP4 999.0.2.10 192.0.2.1 1 2\r\n".to_vec(),
        ),
        (
            "v1 bare LF",
            b"PROXY TCP4 192.0.2.10 192.0.2.1 1 2\n".to_vec(),
        ),
        (
            "v1 port out of range",
            b"PROXY TCP4 192.0.2.10 192.0.2.1 70000 2\r\n".to_vec(),
        ),
        ("v1 not UTF-8", b"PROXY \xff\xfe\xfd\r\n".to_vec()),
        (
            "v1 family mismatch",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n".to_vec(),
        ),
        (
            "almost PROXY",
            b"PROXZ TCP4 192.0.2.10 192.0.2.1 1 2\r\n".to_vec(),
        ),
        ("NUL bytes", vec![0u8; 64]),
    ];
    for listener in ["imap-lb", "imaps-lb"] {
        for (name, bytes) in &cases {
            let mut c = Client::connect(w.usher.addr(listener)).await;
            c.send(bytes).await;
            assert!(
                c.closes_within(CLOSE).await,
                "{listener}, {name}: still open:\n{}",
                c.transcript()
            );
            assert!(
                c.transcript().starts_with("* BYE PROXY protocol error"),
                "{listener}, {name}: {}",
                c.transcript()
            );
        }
    }
    let mut c = behind(
        &w.usher,
        "imaps-lb",
        &v1("192.0.2.19:1", "192.0.2.1:993"),
        true,
    )
    .await;
    imap_login(&mut c).await;
    w.dovecot_saw("rip=192.0.2.19");
}

/// A header that stops half way is bounded by the pre-login timeout.
#[tokio::test]
async fn incomplete_header_times_out() {
    let usher = Usher::start(UsherOpts {
        prelogin_timeout: "2s",
        ..opts()
    });
    for (listener, line) in [
        ("imap-lb", "* BYE Disconnected for inactivity."),
        ("submission-lb", "421 4.4.2"),
    ] {
        let mut c = Client::connect(usher.addr(listener)).await;
        c.send(b"PROXY TCP4 192.0.2").await;
        let started = std::time::Instant::now();
        refused(&mut c, line).await;
        assert!(started.elapsed() >= Duration::from_millis(1500));
    }
}

// ---------------------------------------------------------------------
// Submission

/// C31/C32 on submission: the header's client goes to Dovecot by XCLIENT,
/// on 587 (STARTTLS) and 465 (implicit TLS); an untrusted peer's header
/// is an unknown command.
#[tokio::test]
async fn submission_forwards_the_headers_client_by_xclient() {
    let w = smtp::World::start_with(opts(), &["--tls", "starttls", "--forward", "xclient"]);

    let mut c = behind(
        &w.usher,
        "submission-lb",
        &v1("192.0.2.20:53220", "192.0.2.1:587"),
        false,
    )
    .await;
    c.expect("220 ").await;
    command(&mut c, "EHLO client.example.net").await;
    c.send(b"STARTTLS\r\n").await;
    c.expect("220 2.0.0").await;
    let mut c = c.upgrade().await;
    command(&mut c, "EHLO client.example.net").await;
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    assert!(
        w.dovecot.wait_for_log("rip=192.0.2.20", WAIT),
        "{}",
        w.dovecot.log()
    );

    let header = v2([192, 0, 2, 21], 53221, [192, 0, 2, 1], 465);
    let mut c = behind(&w.usher, "submissions-lb", &header, true).await;
    c.expect("220 ").await;
    command(&mut c, "EHLO client.example.net").await;
    let r = auth_plain(&mut c, "alice@example.com", "secret").await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    assert!(
        w.dovecot.wait_for_log("rip=192.0.2.21", WAIT),
        "{}",
        w.dovecot.log()
    );

    let untrusted = Ipv4Addr::new(127, 0, 0, 2);
    let mut c = connect_from(untrusted, w.usher.addr("submission-lb")).await;
    c.send(v1("198.51.100.99:9999", "192.0.2.1:587")).await;
    c.expect("220 ").await;
    let r = smtp::reply(&mut c).await;
    assert!(r[0].starts_with('5'), "{r:?}");
    let mut c = connect_from(untrusted, w.usher.addr("submissions-lb")).await;
    c.send(v1("198.51.100.99:9999", "192.0.2.1:465")).await;
    refused(&mut c, "421 4.7.0 PROXY protocol error").await;
    assert!(!w.dovecot.log().contains("198.51.100.99"));
}

/// A backend set to `--forward xclient` (as for a Dovecot that serves
/// submission too) still learns an IMAP client's address, through ID:
/// `id` and `xclient` both mean each protocol's own way.
#[tokio::test]
async fn a_backend_forwarding_by_xclient_gets_imap_clients_by_id() {
    let w = World::start();
    w.usher
        .ok(&["backend", "set", "imap1", "--forward", "xclient"], None);
    let mut c = connect_from(Ipv4Addr::new(127, 0, 0, 2), w.usher.addr("imap")).await;
    c.expect("* OK").await;
    c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
    c.expect("a1 OK").await;
    w.dovecot_saw("rip=127.0.0.2");
}

/// `--forward proxy`: usher opens each backend connection with a PROXY v2
/// header, the client's addresses for a session and LOCAL for its own
/// probes, so a Dovecot whose listeners require the header (haproxy = yes)
/// stays healthy and logs the real client.
#[tokio::test]
async fn a_backend_forwarding_by_proxy_header_sees_the_client() {
    let dovecot = Dovecot::start_tuned(
        DovecotOpts::default(),
        Tuning {
            haproxy: true,
            ..Tuning::default()
        },
    );
    let usher = Usher::start(UsherOpts {
        extra: "[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\ndown_after = 1\n".into(),
        ..UsherOpts::default()
    });
    usher.add_backend("imap1", &dovecot);
    usher.ok(&["backend", "set", "imap1", "--forward", "proxy"], None);
    usher.add_user("alice@example.com", b"secret", "imap1");
    // Several probe rounds, each a LOCAL header: the backend stays up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for from in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)] {
        let mut c = connect_from(from, usher.addr("imap")).await;
        c.expect("* OK").await;
        c.send(b"a1 LOGIN alice@example.com secret\r\n").await;
        c.expect("a1 OK").await;
        c.send(b"a2 SELECT INBOX\r\n").await;
        c.expect("* FLAGS").await;
        let needle = format!("rip={from}");
        assert!(
            dovecot.wait_for_log(&needle, WAIT),
            "Dovecot never logged {needle:?}:\n{}",
            dovecot.log()
        );
    }
    let log = usher.log();
    assert!(!log.contains("backend is down"), "{log}");
}
