//! A scripted IMAP backend, only for misbehaviour a real Dovecot will not
//! produce on demand: silence, BYE during login, odd untagged lines.
//! It records every line usher sends it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// How the fake backend behaves on each connection.
#[derive(Clone)]
pub enum Script {
    /// Accept and never say anything.
    Silent,
    /// Greet, answer ID with `id_reply` (a tagged status word such as
    /// "OK" or "BAD"), then answer the login with `login_reply` lines
    /// (`{tag}` is replaced by the login command's tag).
    Greet {
        id_reply: &'static str,
        login_reply: Vec<&'static str>,
    },
    /// Like Dovecot when its auth process is slow: first an untagged
    /// `* OK Waiting for authentication process to respond..`, the real
    /// greeting a moment later, then as `Greet`.
    SlowAuth { login_reply: Vec<&'static str> },
}

/// A running fake backend.
pub struct FakeImap {
    pub addr: SocketAddr,
    /// Every line received, in order, across connections.
    pub lines: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Connections that ended because usher closed them.
    pub closed_by_peer: Arc<AtomicUsize>,
}

impl FakeImap {
    pub async fn start(script: Script) -> FakeImap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeImap {
            addr: listener.local_addr().unwrap(),
            lines: Arc::default(),
            accepted: Arc::default(),
            closed_by_peer: Arc::default(),
        };
        let (lines, accepted, closed) = (
            fake.lines.clone(),
            fake.accepted.clone(),
            fake.closed_by_peer.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (script, lines, closed) = (script.clone(), lines.clone(), closed.clone());
                tokio::spawn(async move {
                    serve(tcp, script, lines).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        fake
    }

    pub fn received(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

async fn serve(tcp: tokio::net::TcpStream, script: Script, lines: Arc<Mutex<Vec<String>>>) {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let (id_reply, login_reply) = match script {
        Script::Greet {
            id_reply,
            login_reply,
        } => (id_reply, login_reply),
        Script::SlowAuth { login_reply } => {
            let waiting = b"* OK Waiting for authentication process to respond..\r\n";
            if w.write_all(waiting).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            ("OK", login_reply)
        }
        Script::Silent => {
            // Read until usher hangs up.
            let mut sink = String::new();
            while r.read_line(&mut sink).await.is_ok_and(|n| n > 0) {
                lines.lock().unwrap().push(std::mem::take(&mut sink));
            }
            return;
        }
    };
    let greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] fake ready\r\n";
    if w.write_all(greeting).await.is_err() {
        return;
    }
    let mut line = String::new();
    while r.read_line(&mut line).await.is_ok_and(|n| n > 0) {
        let text = std::mem::take(&mut line);
        lines.lock().unwrap().push(text.clone());
        let tag = text.split(' ').next().unwrap_or("*").to_string();
        let upper = text.to_ascii_uppercase();
        let reply = if upper.contains(" ID ") {
            format!("* ID NIL\r\n{tag} {id_reply} ID done\r\n")
        } else if upper.contains(" AUTHENTICATE ") {
            login_reply
                .iter()
                .map(|l| format!("{}\r\n", l.replace("{tag}", &tag)))
                .collect()
        } else if upper.contains(" LOGOUT") {
            format!("* BYE bye\r\n{tag} OK done\r\n")
        } else {
            format!("{tag} OK done\r\n")
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        if reply.starts_with("* BYE") {
            return;
        }
    }
}
