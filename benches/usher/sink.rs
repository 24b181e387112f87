//! An SMTP server that accepts every message and keeps none: where the
//! backends' submission service relays the benchmark's mail.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A running sink; counts the messages it accepted.
pub struct Sink {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
}

/// Binds 127.0.0.1 on a free port and serves until the runtime ends.
pub async fn start() -> std::io::Result<Sink> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, count.clone()));
        }
    });
    Ok(Sink { addr, accepted })
}

/// One relay connection: every command succeeds, DATA is read and dropped.
async fn serve(stream: TcpStream, accepted: Arc<AtomicU64>) -> std::io::Result<()> {
    let mut conn = BufReader::with_capacity(64 * 1024, stream);
    conn.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match &verb[..] {
            b"EHLO" => b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            b"DATA" => {
                conn.get_mut().write_all(b"354 go on\r\n").await?;
                skip_message(&mut conn, &mut line).await?;
                accepted.fetch_add(1, Ordering::Relaxed);
                b"250 2.0.0 dropped\r\n"
            }
            b"QUIT" => {
                conn.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 2.0.0 ok\r\n",
        };
        conn.get_mut().write_all(reply).await?;
    }
}

/// Reads up to and including the line that is a lone dot.
async fn skip_message(conn: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        line.clear();
        if conn.read_until(b'\n', line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(());
        }
    }
}
