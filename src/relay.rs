//! The post-login byte pump.
//!
//! Invariants:
//! - bytes are copied as they arrive, never parsed, never batched: each
//!   read is written out before the next read in that direction (case C23);
//! - the two directions run independently, so a backend busy writing a
//!   large response never stalls on a client that is still sending;
//! - the session ends when either side closes, after `idle` with no bytes
//!   in either direction, or when it is kicked; only then may usher write
//!   its own line (`* BYE`, `421`) to the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::Stream;

/// Size of each direction's copy buffer.
const BUFFER: usize = 16 * 1024;

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClosed,
    BackendClosed,
    Idle,
    Kicked,
    Error,
}

/// Byte counters of one session, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client to backend.
    pub up: AtomicU64,
    /// Backend to client.
    pub down: AtomicU64,
}

/// Everything the relay needs.
pub struct Relay {
    pub client: Stream,
    pub backend: Stream,
    /// Client bytes read before the hand-off (pipelined behind the login).
    pub client_pending: Vec<u8>,
    /// Backend bytes read after its tagged OK.
    pub backend_pending: Vec<u8>,
    pub idle: Duration,
    pub counters: Arc<Counters>,
    /// Becomes `true` when the session must end.
    pub kick: watch::Receiver<bool>,
}

/// Runs the relay; returns why it ended and the client stream, so the
/// caller can say goodbye on idle or kick.
pub async fn run(mut r: Relay) -> (End, Stream) {
    let (mut cr, mut cw) = tokio::io::split(r.client);
    let (mut br, mut bw) = tokio::io::split(r.backend);
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let end = {
        let up = pump(
            &mut cr,
            &mut bw,
            &r.client_pending,
            &r.counters.up,
            &last,
            start,
        );
        let down = pump(
            &mut br,
            &mut cw,
            &r.backend_pending,
            &r.counters.down,
            &last,
            start,
        );
        tokio::select! {
            e = up => e.unwrap_or(End::ClientClosed),
            e = down => e.unwrap_or(End::BackendClosed),
            e = idle(&last, start, r.idle) => e,
            e = kicked(&mut r.kick) => e,
        }
    };
    let _ = bw.shutdown().await;
    (end, cr.unsplit(cw))
}

/// Copies one direction until end of file (`Ok`) or an error.
async fn pump<R, W>(
    from: &mut ReadHalf<R>,
    to: &mut WriteHalf<W>,
    pending: &[u8],
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> Option<End>
where
    R: AsyncRead,
    W: AsyncWrite,
{
    if !pending.is_empty() {
        if to.write_all(pending).await.is_err() {
            return Some(End::Error);
        }
        count.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return None,
            Ok(n) => n,
            Err(_) => return Some(End::Error),
        };
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            return Some(End::Error);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Resolves once no byte has moved for `limit`.
async fn idle(last: &AtomicU64, start: Instant, limit: Duration) -> End {
    loop {
        let seen = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = start + seen + limit;
        if Instant::now() >= deadline {
            return End::Idle;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

async fn kicked(kick: &mut watch::Receiver<bool>) -> End {
    // A dropped sender means nobody can kick; wait forever then.
    if kick.wait_for(|k| *k).await.is_err() {
        std::future::pending::<()>().await;
    }
    End::Kicked
}
