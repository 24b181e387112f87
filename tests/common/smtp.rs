//! SMTP transcript helpers on top of [`Client`]: whole replies, the usual
//! opening of a submission session, SASL blobs.

use std::net::SocketAddr;

use base64::Engine;

use super::client::Client;

/// Reads one whole reply (`ddd-` lines up to the `ddd ` line).
pub async fn reply(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = c.line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return lines;
        }
    }
}

/// Sends `line` (CRLF added) and reads the whole reply.
pub async fn command(c: &mut Client, line: &str) -> Vec<String> {
    c.send(format!("{line}\r\n")).await;
    reply(c).await
}

/// The extension keywords of an EHLO reply (after the host name line).
pub fn keywords(ehlo: &[String]) -> Vec<String> {
    ehlo.iter().skip(1).map(|l| l[4..].to_string()).collect()
}

/// Connects in cleartext and reads the greeting.
pub async fn connect(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).await;
    c.expect("220 ").await;
    c
}

/// The usual 587 opening: greeting, EHLO, STARTTLS, TLS, EHLO again.
/// Returns the client and the EHLO reply inside TLS.
pub async fn open_starttls(addr: SocketAddr) -> (Client, Vec<String>) {
    let mut c = connect(addr).await;
    command(&mut c, "EHLO client.example.net").await;
    c.send(b"STARTTLS\r\n").await;
    c.expect("220 2.0.0").await;
    let mut c = c.upgrade().await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    (c, ehlo)
}

/// The 465 opening: TLS, greeting, EHLO.
pub async fn open_implicit(addr: SocketAddr) -> (Client, Vec<String>) {
    let mut c = Client::connect_tls(addr).await;
    c.expect("220 ").await;
    let ehlo = command(&mut c, "EHLO client.example.net").await;
    (c, ehlo)
}

pub fn b64(data: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The base64 PLAIN message for `user` / `password` (no authzid).
pub fn plain(user: &str, password: &str) -> String {
    b64(format!("\0{user}\0{password}"))
}
