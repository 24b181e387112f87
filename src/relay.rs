//! The post-login byte pump.
//!
//! Invariants:
//! - bytes are copied as they arrive, never parsed, never batched: each
//!   read is written out before the next read in that direction (case C23);
//! - the two directions run independently, so a backend busy writing a
//!   large response never stalls on a client that is still sending;
//! - a direction that is waiting for bytes holds no buffer: it borrows one
//!   from a per-thread pool only for the read that found bytes and returns
//!   it once they are written, so an idle session costs its sockets and a
//!   few hundred bytes of state, not two copy buffers (issue 5);
//! - the session ends when either side closes, after `idle` with no bytes
//!   in either direction, or when it is kicked; only then may usher write
//!   its own line (`* BYE`, `421`) to the client.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::Stream;

/// Size of a copy buffer. Large reads mean fewer system calls on a big
/// FETCH; the size costs nothing per idle session since no idle direction
/// holds a buffer.
const BUFFER: usize = 64 * 1024;

/// Buffers each worker thread keeps for reuse; more are freed on return.
const POOL_KEEP: usize = 16;

thread_local! {
    /// Copy buffers not in use on this thread.
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer from this thread's pool, or a new one.
fn borrow_buffer() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUFFER].into_boxed_slice())
}

/// Returns a buffer to the pool of the thread that happens to run the
/// session now (tasks move between threads; the pools even out).
fn return_buffer(buffer: Box<[u8]>) {
    if buffer.len() != BUFFER {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_KEEP {
            pool.push(buffer);
        }
    });
}

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
pub async fn run(r: Relay) -> (End, Stream) {
    let Relay {
        mut client,
        mut backend,
        client_pending,
        backend_pending,
        idle: limit,
        counters,
        mut kick,
    } = r;
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let end = {
        let pump = Duplex {
            client: &mut client,
            backend: &mut backend,
            up: Leg::pending(client_pending),
            down: Leg::pending(backend_pending),
            counters: &counters,
            clock: Clock { last: &last, start },
        };
        tokio::select! {
            e = pump => e,
            e = idle(&last, start, limit) => e,
            e = kicked(&mut kick) => e,
        }
    };
    let _ = backend.shutdown().await;
    (end, client)
}

/// When a byte last moved, in milliseconds since `start`.
#[derive(Clone, Copy)]
struct Clock<'a> {
    last: &'a AtomicU64,
    start: Instant,
}

impl Clock<'_> {
    fn tick(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }
}

/// Where one direction of the copy stands.
enum Leg {
    /// Waiting for bytes from its source; holds no buffer.
    Reading,
    /// Writing `buf[at..len]` to its destination.
    Writing {
        buf: Box<[u8]>,
        at: usize,
        len: usize,
    },
    /// All `len` bytes written; flushing them (TLS records) before the
    /// buffer goes back.
    Flushing { buf: Box<[u8]>, len: usize },
}

impl Leg {
    /// Starts with `pending` (bytes read before the hand-off) if any; the
    /// pre-login buffer's spare capacity is freed either way.
    fn pending(pending: Vec<u8>) -> Leg {
        if pending.is_empty() {
            return Leg::Reading;
        }
        let len = pending.len();
        Leg::Writing {
            buf: pending.into_boxed_slice(),
            at: 0,
            len,
        }
    }

    /// Copies from `from` to `to` until either has nothing to give right
    /// now (`Pending`), `from` ends (`Ready(None)`) or a side fails.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut Stream,
        to: &mut Stream,
        count: &AtomicU64,
        clock: Clock<'_>,
    ) -> Poll<Option<End>> {
        loop {
            match self {
                Leg::Reading => match poll_fill(cx, from) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(())) => return Poll::Ready(Some(End::Error)),
                    Poll::Ready(Ok(None)) => return Poll::Ready(None),
                    Poll::Ready(Ok(Some((buf, len)))) => {
                        *self = Leg::Writing { buf, at: 0, len };
                    }
                },
                Leg::Writing { buf, at, len } => {
                    match ready!(Pin::new(&mut *to).poll_write(cx, &buf[*at..*len])) {
                        Ok(0) | Err(_) => return Poll::Ready(Some(End::Error)),
                        Ok(n) => *at += n,
                    }
                    if *at == *len {
                        let len = *len;
                        let buf = std::mem::take(buf);
                        *self = Leg::Flushing { buf, len };
                    }
                }
                Leg::Flushing { len, .. } => {
                    if ready!(Pin::new(&mut *to).poll_flush(cx)).is_err() {
                        return Poll::Ready(Some(End::Error));
                    }
                    count.fetch_add(*len as u64, Ordering::Relaxed);
                    clock.tick();
                    if let Leg::Flushing { buf, .. } = std::mem::replace(self, Leg::Reading) {
                        return_buffer(buf);
                    }
                }
            }
        }
    }
}

/// What one read gave: a borrowed buffer and how many bytes it holds, or
/// `None` at end of stream.
type Filled = Option<(Box<[u8]>, usize)>;

/// One read from `from` into a borrowed buffer: `Ok(Some)` with the bytes,
/// `Ok(None)` at end of stream. The buffer goes straight back when there
/// was nothing to read, so a waiting direction holds none.
fn poll_fill(cx: &mut Context<'_>, from: &mut Stream) -> Poll<Result<Filled, ()>> {
    let mut buf = borrow_buffer();
    let mut read = ReadBuf::new(&mut buf);
    let polled = Pin::new(from).poll_read(cx, &mut read);
    let len = read.filled().len();
    match polled {
        Poll::Ready(Ok(())) if len > 0 => Poll::Ready(Ok(Some((buf, len)))),
        other => {
            return_buffer(buf);
            match other {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(Ok(None)),
                Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            }
        }
    }
}

/// Both directions of one session, polled by one task: no split halves,
/// no lock between them.
struct Duplex<'a> {
    client: &'a mut Stream,
    backend: &'a mut Stream,
    up: Leg,
    down: Leg,
    counters: &'a Counters,
    clock: Clock<'a>,
}

impl Future for Duplex<'_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let up = this
            .up
            .poll_copy(cx, this.client, this.backend, &this.counters.up, this.clock);
        if let Poll::Ready(end) = up {
            return Poll::Ready(end.unwrap_or(End::ClientClosed));
        }
        let down = this.down.poll_copy(
            cx,
            this.backend,
            this.client,
            &this.counters.down,
            this.clock,
        );
        match down {
            Poll::Ready(end) => Poll::Ready(end.unwrap_or(End::BackendClosed)),
            Poll::Pending => Poll::Pending,
        }
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
