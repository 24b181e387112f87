//! A scripted SMTP backend, only for misbehaviour a real Dovecot will not
//! produce on demand: silence, multi-line or short replies to AUTH, an
//! endless EHLO reply, XCLIENT. It records every line usher sends it,
//! line end included, so tests can check exact wire bytes.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// What the fake says; each field is sent as is (empty: nothing).
#[derive(Clone, Debug)]
pub struct SmtpScript {
    /// Sent on connect; with an empty greeting the fake stays silent and
    /// only reads.
    pub greeting: String,
    /// The answer to each EHLO.
    pub ehlo: String,
    /// The answer to each XCLIENT.
    pub xclient: String,
    /// The answer to AUTH.
    pub auth: String,
    /// The answer to any other command (MAIL, RCPT, NOOP …).
    pub other: String,
}

impl SmtpScript {
    /// A backend that greets, offers AUTH PLAIN and accepts it.
    pub fn accepting() -> SmtpScript {
        SmtpScript {
            greeting: "220 fake.test ESMTP\r\n".into(),
            ehlo: "250-fake.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n".into(),
            xclient: "220 fake.test ESMTP\r\n".into(),
            auth: "235 2.7.0 Authentication successful\r\n".into(),
            other: "250 2.0.0 Ok\r\n".into(),
        }
    }

    /// A backend that accepts TCP connections and never says a word.
    pub fn silent() -> SmtpScript {
        SmtpScript {
            greeting: String::new(),
            ..SmtpScript::accepting()
        }
    }
}

/// A running fake backend; its threads end with the test process.
pub struct FakeSmtp {
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Connections that ended because usher closed them.
    pub closed_by_peer: Arc<AtomicUsize>,
}

impl FakeSmtp {
    pub fn start(script: SmtpScript) -> FakeSmtp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake smtp");
        let fake = FakeSmtp {
            port: listener.local_addr().unwrap().port(),
            lines: Arc::default(),
            accepted: Arc::default(),
            closed_by_peer: Arc::default(),
        };
        let (lines, accepted, closed) = (
            fake.lines.clone(),
            fake.accepted.clone(),
            fake.closed_by_peer.clone(),
        );
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (script, lines, closed) = (script.clone(), lines.clone(), closed.clone());
                thread::spawn(move || {
                    if serve(tcp, &script, &lines).is_ok() {
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        fake
    }

    /// Every line received, in order, across connections, CRLF included.
    pub fn received(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Whether any received line contains `needle`.
    pub fn saw(&self, needle: &str) -> bool {
        self.received().iter().any(|l| l.contains(needle))
    }
}

/// Serves one connection; `Ok` when the peer closed it.
fn serve(tcp: TcpStream, script: &SmtpScript, lines: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut w = tcp.try_clone()?;
    let mut r = BufReader::new(tcp);
    let silent = script.greeting.is_empty();
    w.write_all(script.greeting.as_bytes())?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        lines.lock().unwrap().push(text.clone());
        if silent {
            continue;
        }
        let verb = text
            .split([' ', '\r', '\n'])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" => script.ehlo.as_str(),
            "XCLIENT" => script.xclient.as_str(),
            "AUTH" => script.auth.as_str(),
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => script.other.as_str(),
        };
        w.write_all(reply.as_bytes())?;
    }
}
