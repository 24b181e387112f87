//! A small, real SMTP server inside the test process: it accepts every
//! message and keeps its exact bytes with its envelope.
//!
//! It serves on a loopback port the kernel chose ([`Sink::port`]), one
//! thread per connection, and speaks EHLO, MAIL, RCPT, DATA (dot-unstuffed,
//! RFC 5321 §4.5.2), BDAT (RFC 3030, chunks taken byte for byte), RSET,
//! NOOP and QUIT, with PIPELINING. Its EHLO lists
//! [`SinkOpts::extensions`]; with [`SinkOpts::auth`] it also offers and
//! accepts any `AUTH PLAIN` (recorded), so usher can use it directly as a
//! submission backend whose extensions a test chooses (SMTPUTF8, SIZE …).
//!
//! Dovecot's submission service relays to it in the end-to-end tests:
//! [`Sink::wait_for`] returns once that many messages arrived.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;

/// One accepted message.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The MAIL command line as received, without CRLF.
    pub mail: String,
    /// The RCPT command lines as received, without CRLF.
    pub rcpts: Vec<String>,
    /// The content: after dot-unstuffing for DATA, the chunks joined for
    /// BDAT.
    pub data: Vec<u8>,
    /// Whether it came with BDAT.
    pub chunked: bool,
}

impl Message {
    /// The content after the trace headers a relay put on top
    /// (`Received:` and its folded continuation lines).
    pub fn without_trace(&self) -> &[u8] {
        let mut rest = &self.data[..];
        let mut in_trace = false;
        loop {
            let folded = in_trace && (rest.starts_with(b"\t") || rest.starts_with(b" "));
            if !rest.starts_with(b"Received:") && !folded {
                return rest;
            }
            in_trace = true;
            match rest.windows(2).position(|w| w == b"\r\n") {
                Some(i) => rest = &rest[i + 2..],
                None => return &[],
            }
        }
    }
}

/// What the sink offers.
#[derive(Debug, Clone)]
pub struct SinkOpts {
    /// EHLO extension lines (after the host name).
    pub extensions: Vec<String>,
    /// Offer and accept any AUTH PLAIN.
    pub auth: bool,
}

impl Default for SinkOpts {
    fn default() -> Self {
        SinkOpts {
            extensions: [
                "PIPELINING",
                "8BITMIME",
                "SMTPUTF8",
                "CHUNKING",
                "ENHANCEDSTATUSCODES",
                "DSN",
            ]
            .map(String::from)
            .to_vec(),
            auth: false,
        }
    }
}

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    /// Decoded AUTH PLAIN messages.
    auths: Vec<Vec<u8>>,
    /// Every command line received (not message content), without CRLF.
    lines: Vec<String>,
    connections: usize,
}

/// A running sink; its threads end with the test process.
#[derive(Clone)]
pub struct Sink {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Sink {
    pub fn start(opts: SinkOpts) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        let sink = Sink {
            port: listener.local_addr().unwrap().port(),
            state: Arc::default(),
        };
        let state = sink.state.clone();
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let (state, opts) = (state.clone(), opts.clone());
                thread::spawn(move || {
                    state.0.lock().unwrap().connections += 1;
                    let _ = serve(tcp, &opts, &state);
                });
            }
        });
        sink
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn messages(&self) -> Vec<Message> {
        self.state.0.lock().unwrap().messages.clone()
    }

    pub fn auths(&self) -> Vec<Vec<u8>> {
        self.state.0.lock().unwrap().auths.clone()
    }

    pub fn lines(&self) -> Vec<String> {
        self.state.0.lock().unwrap().lines.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.0.lock().unwrap().connections
    }

    /// Waits until at least `n` messages arrived; panics after `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let (lock, arrived) = &*self.state;
        let mut state = lock.lock().unwrap();
        while state.messages.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "sink got {} of {n} messages; commands: {:?}",
                state.messages.len(),
                state.lines
            );
            state = arrived.wait_timeout(state, left).unwrap().0;
        }
        state.messages.clone()
    }
}

fn serve(tcp: TcpStream, opts: &SinkOpts, state: &(Mutex<State>, Condvar)) -> std::io::Result<()> {
    let mut w = tcp.try_clone()?;
    let mut r = BufReader::new(tcp);
    w.write_all(b"220 sink.test ESMTP sink\r\n")?;
    let mut current = Message::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        state.0.lock().unwrap().lines.push(text.clone());
        let verb = text
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: Vec<u8> = match verb.as_str() {
            "EHLO" => ehlo(opts).into_bytes(),
            "HELO" => b"250 sink.test\r\n".to_vec(),
            "AUTH" if opts.auth => auth(&text, state),
            "MAIL" => {
                current = Message {
                    mail: text,
                    ..Message::default()
                };
                b"250 2.1.0 Ok\r\n".to_vec()
            }
            "RCPT" => {
                current.rcpts.push(text);
                b"250 2.1.5 Ok\r\n".to_vec()
            }
            "DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                current.data = read_data(&mut r)?;
                deliver(std::mem::take(&mut current), state)
            }
            "BDAT" => {
                let mut words = text.split_ascii_whitespace().skip(1);
                let size: usize = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                let mut chunk = vec![0u8; size];
                r.read_exact(&mut chunk)?;
                current.data.extend_from_slice(&chunk);
                current.chunked = true;
                if last {
                    deliver(std::mem::take(&mut current), state)
                } else {
                    format!("250 2.0.0 {size} octets received\r\n").into_bytes()
                }
            }
            "RSET" => {
                current = Message::default();
                b"250 2.0.0 Ok\r\n".to_vec()
            }
            "NOOP" => b"250 2.0.0 Ok\r\n".to_vec(),
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n".to_vec(),
        };
        w.write_all(&reply)?;
    }
}

fn ehlo(opts: &SinkOpts) -> String {
    let mut lines = vec!["sink.test".to_string()];
    lines.extend(opts.extensions.iter().cloned());
    if opts.auth {
        lines.push("AUTH PLAIN".into());
    }
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

fn auth(line: &str, state: &(Mutex<State>, Condvar)) -> Vec<u8> {
    let blob = line.split_ascii_whitespace().nth(2).unwrap_or_default();
    match base64::engine::general_purpose::STANDARD.decode(blob) {
        Ok(plain) => {
            state.0.lock().unwrap().auths.push(plain);
            b"235 2.7.0 Authentication successful\r\n".to_vec()
        }
        Err(_) => b"501 5.5.2 Cannot decode\r\n".to_vec(),
    }
}

/// Reads DATA content up to the lone dot, removing dot-stuffing.
fn read_data(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(data);
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(unstuffed);
    }
}

fn deliver(message: Message, state: &(Mutex<State>, Condvar)) -> Vec<u8> {
    let (lock, arrived) = state;
    let mut s = lock.lock().unwrap();
    s.messages.push(message);
    let n = s.messages.len();
    arrived.notify_all();
    format!("250 2.0.0 Ok: queued as {n}\r\n").into_bytes()
}
