//! The systems under test: two Dovecot backends holding the mail, usher in
//! front of them, and a third Dovecot in proxy mode in front of the same
//! backends. Everything listens on 127.0.0.1, on ports the kernel chose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::common::dovecot::{
    example_ca_cert, hash_password, Dovecot, DovecotOpts, ProxyUser, Tuning,
};
use crate::common::usher::{Usher, UsherOpts};
use crate::load::{self, Target, PASSWORD};

/// The three ways a client reaches its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Straight to the user's backend: the baseline.
    Direct,
    /// Through usher.
    Usher,
    /// Through Dovecot's own proxy mode (passdb with `proxy=y`).
    DovecotProxy,
}

impl Way {
    pub const ALL: [Way; 3] = [Way::Direct, Way::Usher, Way::DovecotProxy];

    pub fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Usher => "usher",
            Way::DovecotProxy => "dovecot-proxy",
        }
    }
}

/// The password scheme every user's hash is in, the same at the backends
/// (direct logins), in usher's store and in the Dovecot proxy's passdb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// `{SSHA512}`: one SHA-512, so that the proxies' own work shows.
    Cheap,
    /// `{ARGON2ID}` with `doveadm pw`'s costs (m=64 MiB, t=3, p=1).
    Argon2id,
}

impl Hash {
    pub fn name(self) -> &'static str {
        match self {
            Hash::Cheap => "ssha512",
            Hash::Argon2id => "argon2id",
        }
    }

    fn dovecot_scheme(self) -> &'static str {
        match self {
            Hash::Cheap => "SSHA512",
            Hash::Argon2id => "ARGON2ID",
        }
    }
}

/// How big the world is.
pub struct Size {
    pub users: usize,
    /// Concurrent sessions the services must hold (the idle scenario).
    pub sessions: usize,
}

/// Everything running for one hash scheme; dropping it stops it all.
pub struct World {
    pub backends: Vec<Dovecot>,
    pub proxy: Dovecot,
    pub usher: Usher,
    /// Kept so that the sink's task outlives every run.
    pub sink: crate::sink::Sink,
    tls: TlsConnector,
}

impl World {
    /// Starts the backends, the Dovecot proxy and usher, with `size.users`
    /// users whose password hashes are in `hash`.
    pub fn start(rt: &tokio::runtime::Runtime, hash: Hash, size: &Size) -> anyhow::Result<World> {
        let sink = rt.block_on(crate::sink::start())?;
        let opts = DovecotOpts {
            submission: Some(sink.addr.port()),
            tls: true,
        };
        let tuning = Tuning {
            clients: size.sessions,
            ..Tuning::default()
        };
        let backends: Vec<Dovecot> = (0..2)
            .map(|_| Dovecot::start_tuned(opts.clone(), tuning.clone()))
            .collect();
        let proxy = Dovecot::start_tuned(
            opts,
            Tuning {
                proxy: true,
                ..tuning
            },
        );
        // One hash for everyone: the same password, the same cost.
        let hash = hash_password(hash.dovecot_scheme(), PASSWORD);
        let users: Vec<String> = (0..size.users).map(load::user).collect();
        let entries: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), &hash[..])).collect();
        for backend in &backends {
            backend.add_hashed_users(&entries);
        }
        for service in ["imap", "submission"] {
            let proxy_users: Vec<ProxyUser> = users
                .iter()
                .enumerate()
                .map(|(i, user)| ProxyUser {
                    user: user.clone(),
                    hash: hash.clone(),
                    backend_port: port_of(&backends[i % 2], service),
                })
                .collect();
            proxy.set_proxy_users(service, &proxy_users);
        }
        let usher = start_usher(size.sessions);
        for (i, backend) in backends.iter().enumerate() {
            let name = format!("b{i}");
            usher.add_backend(&name, backend);
            let submission = port_of(backend, "submission").to_string();
            usher.ok(
                &["backend", "set", &name, "--submission-port", &submission],
                None,
            );
            let lines: String = users
                .iter()
                .skip(i)
                .step_by(2)
                .map(|u| format!("{u} {hash}\n"))
                .collect();
            usher.ok(
                &["user", "import", "--hashed", "--backend", &name],
                Some(lines.as_bytes()),
            );
        }
        Ok(World {
            backends,
            proxy,
            usher,
            sink,
            tls: tls_connector()?,
        })
    }

    /// Where clients of `way` connect, for IMAP (`tls`: IMAPS) or
    /// submission. User `i` goes to backend `i % 2` directly, the same
    /// backend the proxies route it to.
    pub fn target(&self, way: Way, protocol: Protocol) -> Target {
        let addrs = match way {
            Way::Direct => self
                .backends
                .iter()
                .map(|b| protocol.dovecot_addr(b))
                .collect(),
            Way::DovecotProxy => vec![protocol.dovecot_addr(&self.proxy)],
            Way::Usher => vec![self.usher.addr(protocol.usher_listener())],
        };
        Target {
            addrs,
            tls: (protocol == Protocol::Imaps).then(|| self.tls.clone()),
        }
    }

    /// The processes whose CPU and memory count for `way`: the proxy's
    /// tree, or for direct the backends' trees (the baseline).
    pub fn watched(&self, way: Way) -> Vec<u32> {
        match way {
            Way::Direct => self.backends.iter().filter_map(Dovecot::pid).collect(),
            Way::DovecotProxy => self.proxy.pid().into_iter().collect(),
            Way::Usher => vec![self.usher.pid()],
        }
    }

    /// Restarts the proxy of `way` (for direct: the backends) so that a
    /// memory measurement starts from fresh processes, not from ones whose
    /// heaps earlier runs have grown (imap processes serve many sessions
    /// and outlive them here).
    pub fn refresh(&mut self, way: Way) -> anyhow::Result<()> {
        match way {
            Way::Direct => self.backends.iter_mut().try_for_each(restart_quietly)?,
            Way::DovecotProxy => restart_quietly(&mut self.proxy)?,
            Way::Usher => self.usher.restart(),
        }
        Ok(())
    }
}

/// How long the processes of a stopped Dovecot may take to go away.
const DOVECOT_GONE: Duration = Duration::from_secs(20);

/// Restarts `d` once every process of its previous run has exited: after
/// thousands of sessions, login and imap processes outlive the master for
/// a moment, and a new master refuses to start beside their sockets.
fn restart_quietly(d: &mut Dovecot) -> anyhow::Result<()> {
    d.stop();
    let name = d
        .dir()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let deadline = Instant::now() + DOVECOT_GONE;
    while crate::procfs::any_cmdline_contains(&name) {
        if Instant::now() > deadline {
            bail!("processes of dovecot {name} still run {DOVECOT_GONE:?} after it stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Seen after thousands of TLS sessions: the new master still finds a
    // listener on its old socket. Waiting and trying again gets past it.
    for attempt in 1..=RESTART_ATTEMPTS {
        let restarted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.restart()));
        if restarted.is_ok() {
            return Ok(());
        }
        eprintln!("dovecot {name}: restart {attempt} of {RESTART_ATTEMPTS} failed; waiting");
        std::thread::sleep(Duration::from_secs(3));
    }
    bail!("dovecot {name} did not restart")
}

/// How often a restart is tried (see [`restart_quietly`]).
const RESTART_ATTEMPTS: usize = 4;

/// Which service a target is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Imap,
    Imaps,
    Submission,
}

impl Protocol {
    fn dovecot_addr(self, d: &Dovecot) -> SocketAddr {
        let port = match self {
            Protocol::Imap => d.imap_port(),
            Protocol::Imaps => d.imaps_port().expect("TLS is on"),
            Protocol::Submission => d.submission_port().expect("submission is on"),
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn usher_listener(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Imaps => "imaps",
            Protocol::Submission => "submission",
        }
    }
}

fn port_of(d: &Dovecot, service: &str) -> u16 {
    match service {
        "imap" => d.imap_port(),
        _ => d.submission_port().expect("submission is on"),
    }
}

/// Trusts the example CA that signed every listener's certificate.
fn tls_connector() -> anyhow::Result<TlsConnector> {
    let pem = std::fs::read(example_ca_cert())?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// usher as the test harness runs it, at the production log level, with
/// room for every session and the imported legacy hashes kept as they are
/// (both proxies check the same scheme at the same cost).
fn start_usher(sessions: usize) -> Usher {
    Usher::start(UsherOpts {
        limits: format!("max_connections = {}\n", sessions.max(1000) * 2),
        auth: "rewrite_legacy_hashes = false\n".into(),
        log_filter: "info",
        ..UsherOpts::default()
    })
}
