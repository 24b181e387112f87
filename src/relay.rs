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
//! - when both legs are plain TCP and a direction moves bulk (a read filled
//!   a whole buffer), its bytes go socket → pipe → socket with splice(2)
//!   and never enter usher's memory, until a splice finds little again;
//!   the pipe, like a buffer, is borrowed only while bytes are in it, so an
//!   idle session holds no extra descriptors. Small interactive replies
//!   stay on buffer copies, which need no pipe (issue 5: measured);
//! - the session ends when either side closes, after `idle` with no bytes
//!   in either direction, or when it is kicked; only then may usher write
//!   its own line (`* BYE`, `421`) to the client.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::Stream;

/// Size of a copy buffer. Large reads mean fewer system calls on a big
/// FETCH; the size costs nothing per idle session since no idle direction
/// holds a buffer.
const BUFFER: usize = 64 * 1024;

/// Buffers each worker thread keeps for reuse; more are freed on return.
const POOL_KEEP: usize = 16;

/// Pipes each worker thread keeps for reuse. Each holds two descriptors,
/// so few are kept: descriptors are what limits the number of sessions.
const PIPES_KEEP: usize = 4;

thread_local! {
    /// Copy buffers not in use on this thread.
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    /// Empty pipes not in use on this thread.
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A kernel pipe that spliced bytes pass through; both ends non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per system call; if the kernel refuses
        // (past the per-user pipe allowance) the default 64 KiB still works.
        // SAFETY: F_SETPIPE_SZ on a pipe we own takes an int argument.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                SPLICE_CHUNK as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }
}

/// An empty pipe from this thread's pool, or a new one.
fn borrow_pipe() -> io::Result<Pipe> {
    match PIPES.with(|pipes| pipes.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns a pipe that is empty again; a pipe with bytes left in it is
/// only ever dropped.
fn return_pipe(pipe: Pipe) {
    PIPES.with(|pipes| {
        let mut pipes = pipes.borrow_mut();
        if pipes.len() < PIPES_KEEP {
            pipes.push(pipe);
        }
    });
}

/// Moves up to `len` bytes from `from` to `to` with splice(2), without
/// blocking; `WouldBlock` when the source is empty or the sink full.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both are open descriptors; null offsets mean "current
    // position", which sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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

impl End {
    /// The name the closing log line gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client closed",
            End::BackendClosed => "backend closed",
            End::Idle => "idle timeout",
            End::Kicked => "kicked",
            End::Error => "I/O error",
        }
    }
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
            up_bulk: false,
            down_bulk: false,
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
    /// `left` spliced bytes in `pipe` still to go to the destination.
    Piped { pipe: Pipe, left: usize, len: usize },
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
    /// `bulk` says whether this direction moves bulk now (see the module
    /// invariants); it is updated from what the reads find.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        (from, to): (&mut Stream, &mut Stream),
        bulk: &mut bool,
        count: &AtomicU64,
        clock: Clock<'_>,
    ) -> Poll<Option<End>> {
        loop {
            if let (Leg::Reading, Stream::Plain(source), true) = (&*self, &*from, *bulk) {
                if let Stream::Plain(_) = to {
                    match poll_splice_in(cx, source) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(())) => return Poll::Ready(Some(End::Error)),
                        Poll::Ready(Ok(Spliced::End)) => return Poll::Ready(None),
                        Poll::Ready(Ok(Spliced::Bytes(pipe, len))) => {
                            *bulk = len >= BULK_ENDS_BELOW;
                            *self = Leg::Piped {
                                pipe,
                                left: len,
                                len,
                            };
                            continue;
                        }
                        // No pipe to be had: copy through a buffer instead.
                        Poll::Ready(Ok(Spliced::NoPipe)) => {}
                    }
                }
            }
            match self {
                Leg::Piped { pipe, left, len } => {
                    let Stream::Plain(sink) = &*to else {
                        unreachable!("a leg is piped only between plain sockets");
                    };
                    match ready!(poll_splice_out(cx, pipe, sink, *left)) {
                        Ok(n) => *left -= n,
                        Err(()) => return Poll::Ready(Some(End::Error)),
                    }
                    if *left == 0 {
                        count.fetch_add(*len as u64, Ordering::Relaxed);
                        clock.tick();
                        if let Leg::Piped { pipe, .. } = std::mem::replace(self, Leg::Reading) {
                            return_pipe(pipe);
                        }
                    }
                }
                Leg::Reading => match poll_fill(cx, from) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(())) => return Poll::Ready(Some(End::Error)),
                    Poll::Ready(Ok(None)) => return Poll::Ready(None),
                    Poll::Ready(Ok(Some((buf, len)))) => {
                        *bulk = len == BUFFER;
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

/// A splice that finds fewer bytes than this ends a direction's bulk
/// mode: the transfer is over and buffer copies are cheaper again.
const BULK_ENDS_BELOW: usize = 16 * 1024;

/// Most bytes one splice moves, and the size asked for each pipe.
const SPLICE_CHUNK: usize = 1024 * 1024;

/// What one splice from a socket gave.
enum Spliced {
    /// `len` bytes, now in the borrowed pipe.
    Bytes(Pipe, usize),
    /// End of stream.
    End,
    /// No pipe could be made (out of descriptors).
    NoPipe,
}

/// Waits until `from` has bytes, then splices what it has (up to
/// [`SPLICE_CHUNK`]) into a borrowed pipe. The pipe goes straight back
/// when the socket turned out to be empty.
fn poll_splice_in(cx: &mut Context<'_>, from: &TcpStream) -> Poll<Result<Spliced, ()>> {
    loop {
        if ready!(from.poll_read_ready(cx)).is_err() {
            return Poll::Ready(Err(()));
        }
        let Ok(pipe) = borrow_pipe() else {
            return Poll::Ready(Ok(Spliced::NoPipe));
        };
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), SPLICE_CHUNK)
        });
        match moved {
            Ok(0) => {
                return_pipe(pipe);
                return Poll::Ready(Ok(Spliced::End));
            }
            Ok(len) => return Poll::Ready(Ok(Spliced::Bytes(pipe, len))),
            // The readiness was stale and is now cleared: wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return_pipe(pipe),
            Err(_) => return Poll::Ready(Err(())),
        }
    }
}

/// Waits until `to` takes bytes, then splices up to `left` of the pipe's
/// bytes into it; how many it took.
fn poll_splice_out(
    cx: &mut Context<'_>,
    pipe: &Pipe,
    to: &TcpStream,
    left: usize,
) -> Poll<Result<usize, ()>> {
    loop {
        if ready!(to.poll_write_ready(cx)).is_err() {
            return Poll::Ready(Err(()));
        }
        let moved = to.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
        });
        match moved {
            Ok(0) => return Poll::Ready(Err(())),
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(Err(())),
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
                // Most mail clients close TLS without a close_notify
                // alert (RFC 8446 §6.1 would want one); once the protocol
                // said goodbye that is an ordinary end, not a failure.
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(None))
                }
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
    /// Whether each direction moves bulk now (spliced when both are plain).
    up_bulk: bool,
    down_bulk: bool,
    counters: &'a Counters,
    clock: Clock<'a>,
}

impl Future for Duplex<'_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let up = this.up.poll_copy(
            cx,
            (this.client, this.backend),
            &mut this.up_bulk,
            &this.counters.up,
            this.clock,
        );
        if let Poll::Ready(end) = up {
            return Poll::Ready(end.unwrap_or(End::ClientClosed));
        }
        let down = this.down.poll_copy(
            cx,
            (this.backend, this.client),
            &mut this.down_bulk,
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
    crate::sessions::stopped(kick).await;
    End::Kicked
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Two connected loopback sockets.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Plain TCP on both legs takes the splice path: a megabyte each way
    /// arrives intact behind the pending bytes, and is counted.
    #[tokio::test]
    async fn plain_legs_relay_every_byte_in_order() {
        let (mut client, client_side) = socket_pair().await;
        let (backend_side, mut backend) = socket_pair().await;
        let (_kick_tx, kick) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let relay = tokio::spawn(run(Relay {
            client: Stream::Plain(client_side),
            backend: Stream::Plain(backend_side),
            client_pending: b"early ".to_vec(),
            backend_pending: b"late ".to_vec(),
            idle: Duration::from_secs(60),
            counters: counters.clone(),
            kick,
        }));
        let up: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (mut got_up, mut got_down) = (vec![0u8; 6 + up.len()], vec![0u8; 5 + down.len()]);
        let (mut client_rx, mut client_tx) = client.split();
        let (mut backend_rx, mut backend_tx) = backend.split();
        let (w1, w2, r1, r2) = tokio::join!(
            client_tx.write_all(&up),
            backend_tx.write_all(&down),
            backend_rx.read_exact(&mut got_up),
            client_rx.read_exact(&mut got_down),
        );
        w1.unwrap();
        w2.unwrap();
        r1.unwrap();
        r2.unwrap();
        assert_eq!(&got_up[..6], b"early ");
        assert!(got_up[6..] == up[..]);
        assert_eq!(&got_down[..5], b"late ");
        assert!(got_down[5..] == down[..]);
        drop(client);
        let (end, _) = relay.await.unwrap();
        assert_eq!(end, End::ClientClosed);
        assert_eq!(counters.up.load(Ordering::Relaxed), 6 + up.len() as u64);
        assert_eq!(counters.down.load(Ordering::Relaxed), 5 + down.len() as u64);
    }
}
