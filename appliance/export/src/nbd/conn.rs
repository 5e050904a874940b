//! One client connection: a state machine driven by a poller on one reactor.
//!
//! Each pass of the connection's poller, in order:
//! 1. **reap**: bdev completions from the connection's channel;
//! 2. **receive**: non-blocking `recv` into a staging buffer (or, for the
//!    bulk of a large write, straight into the write's DMA buffer), then the
//!    handshake state machine, or request headers and write payloads;
//! 3. **pump**: reads waiting for buffers get them, in arrival order, and go
//!    to the bdev;
//! 4. **send**: replies that are ready leave in one `sendmsg` per batch
//!    (headers and DMA buffers gathered, no copy);
//! 5. when closing: finish once nothing is in flight, flush if anything was
//!    written, close.
//!
//! Requests and buffers are preallocated per connection: `max_requests`
//! request slots and `segments_per_connection` buffers of `segment_size`
//! bytes (a "segment": one buffer, one bdev I/O). A READ or WRITE spans
//! `ceil(length / segment_size)` segments. Nothing is allocated per request.
//!
//! Ordering rules that keep this deadlock-free with a bounded buffer set:
//! * replies are queued when complete and leave in queue order (so a simple
//!   reply's data is contiguous on the wire); only a *streaming* read (one
//!   with more segments than the connection has buffers) is queued before
//!   it is complete, and its reply waits for each segment in turn;
//! * reads take buffers strictly in arrival order, and a streaming read
//!   starts only when every buffer is free, so the buffers it waits for are
//!   never held by replies queued behind it;
//! * write segments go to the bdev as soon as their bytes arrive and give
//!   their buffer back on completion, independently of the client.
//!
//! Durability: a write's reply is queued only after every segment completed;
//! with FUA, only after a flush that was submitted after them completed; a
//! FLUSH is submitted when it is received, after every earlier reply's I/O
//! completed, and replied to when the bdev says the flush is done.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hotcopy_bdev::{BdevChannel, BdevIo, IoError, IoStatus, IoType};
use hotcopy_runtime::sys::sock::send_vectored;
use hotcopy_runtime::{BufferPool, DmaBuf, HugepageMode, PollStatus, Poller, Reactor};

use super::handshake::{greeting, ExportInfo, Handshake, Step};
use super::proto::{self, Command, Geometry, Request};
use super::server::{ExportShared, ServerShared, StatShard};

/// Bytes of the staging buffer each connection receives into: one `recv`
/// brings in dozens of small requests.
const STAGE_LEN: usize = 128 * 1024;
/// A write segment with at least this many bytes still to come is received
/// straight into its DMA buffer instead of through the staging buffer.
const DIRECT_MIN: u32 = 16 * 1024;
/// `recv` calls per pass, so one busy client cannot starve the others on the
/// same reactor.
const RECV_BATCH: usize = 8;
/// Pieces gathered into one `sendmsg`.
const IOV_BATCH: usize = 64;
/// Unsent handshake replies after which the connection stops reading
/// options until the client takes them (a client that sends `NBD_OPT_LIST`
/// in a loop without reading cannot grow the buffer without bound).
const MAX_HANDSHAKE_BACKLOG: usize = 64 * 1024;
/// Token bit of I/O that belongs to a request as a whole (flush, trim,
/// write-zeroes, the flush after a FUA write); the low bits are the request.
const CTRL_TOKEN: u64 = 1 << 32;
/// Token of the flush a connection issues before it closes. Bit 63 stays
/// clear in every token: the bdev layer leaves it to virtual bdevs (cow,
/// snapshot, instant restore) for their own I/O, and a token with it set
/// would be taken for theirs (the flush-on-close of a writable export hung
/// when this was `u64::MAX`).
const FINAL_TOKEN: u64 = 1 << 33;

/// An accepted socket.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    /// Makes the socket non-blocking (and TCP_NODELAY: replies are small and
    /// latency-bound).
    pub fn prepare(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)
            }
            Sock::Unix(s) => s.set_nonblocking(true),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn peer(&self) -> String {
        match self {
            Sock::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Sock::Unix(_) => "unix".into(),
        }
    }
}

/// Counts a connection as live from accept until it is finished or dropped
/// (also when the message carrying it to a reactor is never run).
pub(crate) struct ConnGuard(Arc<ServerShared>);

impl ConnGuard {
    pub fn new(shared: Arc<ServerShared>) -> Self {
        shared.live_conns.fetch_add(1, Ordering::AcqRel);
        ConnGuard(shared)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.live_conns.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Creates the connection on the current reactor and registers its poller.
/// The poller owns its own handle and drops it when the connection is done.
pub(crate) fn spawn(sock: Sock, guard: ConnGuard) {
    let shared = guard.0.clone();
    let core = Reactor::try_current().map(|r| r.core()).unwrap_or(0);
    StatShard::add(&shared.shard_at(core).connections, 1);
    let mut conn = Conn::new(sock, shared, guard, core);
    tracing::debug!(peer = %conn.peer, core, "NBD connection");
    let me: Rc<RefCell<Option<Poller>>> = Rc::new(RefCell::new(None));
    let handle = me.clone();
    let poller = Poller::builder().name("nbd_conn").register(move || {
        let status = conn.poll();
        if conn.finished {
            handle.borrow_mut().take();
        }
        status
    });
    *me.borrow_mut() = Some(poller);
}

/// What the receive side is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Waiting for a request header.
    Header,
    /// Receiving segment `seg` of the payload of write request `req` into
    /// buffer `slot` (assigned when one is free).
    Payload {
        req: u16,
        seg: u32,
        slot: Option<u16>,
        filled: u32,
    },
    /// Skipping the payload of refused write `req`, whose error reply is
    /// queued once the payload has gone by.
    Discard { req: u16, left: u32 },
}

/// Why the receive side stopped consuming.
enum Need {
    /// Everything staged was consumed: read more from the socket.
    Input,
    /// Waiting for a request slot, a buffer, or the client to take replies.
    Blocked,
    /// The receive side closed.
    Stop,
}

struct Conn {
    sock: Sock,
    peer: String,
    shared: Arc<ServerShared>,
    core: usize,
    guard: Option<ConnGuard>,
    hs: Option<Handshake>,
    /// Handshake output not yet sent.
    out: Vec<u8>,
    out_sent: usize,
    tx: Option<Tx>,
    stage: Box<[u8]>,
    st_start: usize,
    st_end: usize,
    rx: Rx,
    rx_open: bool,
    /// The socket cannot send any more (peer gone, hard disconnect, timeout).
    broken: bool,
    /// Set once closing began: the deadline for the client to take replies.
    closing: Option<Instant>,
    finished: bool,
}

impl Conn {
    fn new(sock: Sock, shared: Arc<ServerShared>, guard: ConnGuard, core: usize) -> Self {
        Conn {
            peer: sock.peer(),
            sock,
            shared,
            core,
            guard: Some(guard),
            hs: Some(Handshake::new()),
            out: greeting().to_vec(),
            out_sent: 0,
            tx: None,
            stage: vec![0u8; STAGE_LEN].into_boxed_slice(),
            st_start: 0,
            st_end: 0,
            rx: Rx::Header,
            rx_open: true,
            broken: false,
            closing: None,
            finished: false,
        }
    }

    fn stats(&self) -> &StatShard {
        self.shared.shard_at(self.core)
    }

    fn poll(&mut self) -> PollStatus {
        if self.finished {
            return PollStatus::Idle;
        }
        let mut work = 0;
        if self.closing.is_none()
            && (self.shared.stopping.load(Ordering::Relaxed)
                || self
                    .tx
                    .as_ref()
                    .is_some_and(|t| t.export.removed.load(Ordering::Relaxed)))
        {
            self.begin_close("server stopping or export removed");
        }
        if let Some(tx) = self.tx.as_mut() {
            work += tx.reap();
        }
        work += self.receive();
        if let Some(tx) = self.tx.as_mut() {
            work += tx.pump();
        }
        work += self.send();
        if let Some(tx) = self.tx.as_mut() {
            // Buffers freed by sends can start waiting reads at once.
            work += tx.pump();
        }
        if self.closing.is_some() {
            work += self.try_finish();
        }
        PollStatus::from_count(work)
    }

    // ---- closing -------------------------------------------------------

    /// Stops reading; requests already received run to completion and are
    /// replied to (within the drain timeout), then the connection closes.
    fn begin_close(&mut self, why: &str) {
        if self.closing.is_some() {
            return;
        }
        tracing::debug!(peer = %self.peer, why, "NBD connection closing");
        self.rx_open = false;
        self.closing = Some(Instant::now() + self.shared.opts.drain_timeout);
        if let Some(tx) = self.tx.as_mut() {
            tx.orphan_rx(self.rx);
        }
        self.rx = Rx::Header;
    }

    /// A hard disconnect: nothing more is sent; I/O in flight still drains
    /// before the channel is dropped.
    fn hard_close(&mut self, why: &str) {
        tracing::debug!(peer = %self.peer, why, "NBD hard disconnect");
        self.sock.shutdown();
        self.mark_broken();
        self.begin_close(why);
    }

    fn mark_broken(&mut self) {
        self.broken = true;
        if let Some(tx) = self.tx.as_mut() {
            tx.abandon_replies();
        }
    }

    fn try_finish(&mut self) -> usize {
        if !self.broken && self.closing.is_some_and(|d| Instant::now() > d) {
            tracing::warn!(peer = %self.peer, "NBD client did not take its replies in time");
            self.sock.shutdown();
            self.mark_broken();
        }
        if let Some(tx) = self.tx.as_mut() {
            if !tx.idle() {
                return 0;
            }
            match tx.final_flush {
                FinalFlush::Needed => {
                    tx.submit_final_flush();
                    return 1;
                }
                FinalFlush::InFlight => return 0,
                FinalFlush::NotNeeded | FinalFlush::Done => {}
            }
        }
        if !self.broken && self.out_sent < self.out.len() {
            return 0;
        }
        self.finished = true;
        self.sock.shutdown();
        // Dropping the transmission state releases the channel and buffers
        // and the export's connection count; the guard the live count.
        self.tx = None;
        self.guard = None;
        tracing::debug!(peer = %self.peer, "NBD connection closed");
        1
    }

    // ---- receive -------------------------------------------------------

    fn receive(&mut self) -> usize {
        let mut work = 0;
        let mut reads = 0;
        loop {
            if !self.rx_open {
                break;
            }
            match self.consume() {
                Need::Input => {}
                Need::Blocked | Need::Stop => break,
            }
            if reads == RECV_BATCH {
                break;
            }
            reads += 1;
            match self.fill() {
                Ok(Some(0)) => {
                    let mid =
                        self.st_start < self.st_end || self.rx != Rx::Header || self.hs.is_some();
                    let why = if mid {
                        "client disconnected mid-message"
                    } else {
                        "client closed the connection"
                    };
                    self.begin_close(why);
                    break;
                }
                Ok(Some(_)) => work += 1,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "NBD receive failed");
                    self.mark_broken();
                    self.begin_close("receive failed");
                    break;
                }
            }
        }
        work
    }

    /// Reads from the socket: straight into the write segment being
    /// received when much of it is still missing, otherwise into the staging
    /// buffer. `Ok(None)`: nothing to read now.
    fn fill(&mut self) -> io::Result<Option<usize>> {
        if self.st_start == self.st_end {
            self.st_start = 0;
            self.st_end = 0;
            if let (
                Rx::Payload {
                    slot: Some(s),
                    filled,
                    ..
                },
                Some(tx),
            ) = (&mut self.rx, self.tx.as_mut())
            {
                let seg = &mut tx.segs[*s as usize];
                if seg.len - *filled >= DIRECT_MIN {
                    let Some(buf) = seg.buf.as_mut() else {
                        return Ok(None);
                    };
                    return match self.sock.recv(&mut buf[*filled as usize..seg.len as usize]) {
                        Ok(n) => {
                            *filled += n as u32;
                            Ok(Some(n))
                        }
                        Err(e) if again(&e) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
            }
        }
        if self.st_end == self.stage.len() {
            if self.st_start == 0 {
                return Ok(None);
            }
            self.stage.copy_within(self.st_start..self.st_end, 0);
            self.st_end -= self.st_start;
            self.st_start = 0;
        }
        match self.sock.recv(&mut self.stage[self.st_end..]) {
            Ok(n) => {
                self.st_end += n;
                Ok(Some(n))
            }
            Err(e) if again(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Consumes staged bytes: handshake, request headers, payloads.
    fn consume(&mut self) -> Need {
        loop {
            if !self.rx_open {
                return Need::Stop;
            }
            if let Some(hs) = self.hs.as_mut() {
                if self.out.len() - self.out_sent > MAX_HANDSHAKE_BACKLOG {
                    return Need::Blocked;
                }
                let input = &self.stage[self.st_start..self.st_end];
                let (used, step) = hs.advance(input, &*self.shared, &mut self.out);
                self.st_start += used;
                match step {
                    Step::NeedMore => return Need::Input,
                    Step::Close(reason) => {
                        if reason.is_protocol_error() {
                            StatShard::add(&self.stats().protocol_errors, 1);
                        }
                        self.hs = None;
                        self.begin_close(&reason.to_string());
                        return Need::Stop;
                    }
                    Step::Go {
                        export,
                        info,
                        structured,
                    } => {
                        self.hs = None;
                        if let Err(why) = self.enter(export, info, structured) {
                            tracing::warn!(peer = %self.peer, why, "NBD connection refused");
                            self.begin_close(&why);
                            return Need::Stop;
                        }
                        continue;
                    }
                }
            }
            let Some(tx) = self.tx.as_mut() else {
                return Need::Stop;
            };
            let staged = self.st_end - self.st_start;
            match self.rx {
                Rx::Header => {
                    if staged < proto::REQUEST_LEN {
                        return Need::Input;
                    }
                    if tx.free_reqs.is_empty() {
                        return Need::Blocked;
                    }
                    let head = &self.stage[self.st_start..self.st_start + proto::REQUEST_LEN];
                    let parsed = proto::parse_request(head);
                    self.st_start += proto::REQUEST_LEN;
                    match parsed {
                        Ok(req) => self.on_request(req),
                        Err(e) => {
                            StatShard::add(&self.stats().protocol_errors, 1);
                            self.begin_close(&e.to_string());
                            return Need::Stop;
                        }
                    }
                }
                Rx::Payload {
                    req,
                    seg,
                    slot,
                    filled,
                } => {
                    let s = match slot {
                        Some(s) => s,
                        None => match tx.take_write_slot(req, seg) {
                            Some(s) => s,
                            None => return Need::Blocked,
                        },
                    };
                    let sg = &mut tx.segs[s as usize];
                    let take = ((sg.len - filled) as usize).min(staged);
                    if let Some(buf) = sg.buf.as_mut() {
                        buf[filled as usize..filled as usize + take]
                            .copy_from_slice(&self.stage[self.st_start..self.st_start + take]);
                    }
                    self.st_start += take;
                    let filled = filled + take as u32;
                    if filled < sg.len {
                        self.rx = Rx::Payload {
                            req,
                            seg,
                            slot: Some(s),
                            filled,
                        };
                        return Need::Input;
                    }
                    tx.submit_write_seg(s);
                    self.rx = if seg + 1 < tx.reqs[req as usize].nseg {
                        Rx::Payload {
                            req,
                            seg: seg + 1,
                            slot: None,
                            filled: 0,
                        }
                    } else {
                        Rx::Header
                    };
                }
                Rx::Discard { req, left } => {
                    let take = (left as usize).min(staged);
                    self.st_start += take;
                    let left = left - take as u32;
                    if left > 0 {
                        self.rx = Rx::Discard { req, left };
                        return Need::Input;
                    }
                    tx.reply(req);
                    self.rx = Rx::Header;
                }
            }
        }
    }

    /// Enters transmission on `export`: this reactor's channel and the
    /// connection's buffers.
    fn enter(
        &mut self,
        export: Arc<ExportShared>,
        info: ExportInfo,
        structured: bool,
    ) -> Result<(), String> {
        // Count first, then check: `remove_export` sets `removed` and then
        // waits for the count, so one of the two always sees the other.
        export.conns.fetch_add(1, Ordering::SeqCst);
        let guard = ExportConn(export.clone());
        if export.removed.load(Ordering::SeqCst) || self.shared.stopping.load(Ordering::SeqCst) {
            return Err(format!("export {:?} is going away", info.name));
        }
        let ch = export
            .desc
            .channel()
            .map_err(|e| format!("export {:?}: {e}", info.name))?;
        let opts = &self.shared.opts;
        let pool = BufferPool::new(
            opts.segment_size,
            opts.segments_per_connection,
            HugepageMode::Auto,
        )
        .map_err(|e| format!("export {:?}: {e}", info.name))?;
        let geo = Geometry {
            size: info.size,
            min_block: info.min_block,
            max_payload: opts.max_payload,
            flags: info.flags,
        };
        tracing::debug!(peer = %self.peer, export = %info.name, structured, "NBD transmission");
        self.tx = Some(Tx::new(
            guard,
            ch,
            &pool,
            geo,
            structured,
            opts.segment_size as u32,
            opts.max_requests,
            self.shared.clone(),
            self.core,
        ));
        Ok(())
    }

    /// Starts one request whose header was just consumed.
    fn on_request(&mut self, req: Request) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        StatShard::add(&tx.stats().requests, 1);
        let payload = proto::payload_len(&req);
        let cmd_of_kind = if req.kind == proto::CMD_READ {
            Command::Read
        } else {
            Command::Flush
        };
        let v = match proto::validate(&req, &tx.geo) {
            Ok(v) => v,
            Err(rej) => {
                let r = tx.alloc(req.handle, cmd_of_kind, false, 0, 0);
                let q = &mut tx.reqs[r as usize];
                q.err = rej.errno;
                q.msg = rej.message;
                if payload == 0 {
                    tx.reply(r);
                } else if payload <= tx.geo.max_payload {
                    self.rx = Rx::Discard {
                        req: r,
                        left: payload,
                    };
                } else {
                    // The payload is not read: reply, then close (the
                    // protocol allows a hard disconnect for a payload this
                    // large; the reply tells the client why).
                    tx.reply(r);
                    StatShard::add(&tx.stats().protocol_errors, 1);
                    self.begin_close("write payload larger than the maximum block size");
                }
                return;
            }
        };
        match v.cmd {
            Command::Disconnect => self.begin_close("client sent NBD_CMD_DISC"),
            Command::Read => {
                let r = tx.alloc(req.handle, Command::Read, false, v.offset, v.length);
                if v.length == 0 {
                    tx.reply(r);
                } else {
                    tx.pending.push_back(r);
                }
            }
            Command::Write => {
                tx.dirty = true;
                let r = tx.alloc(req.handle, Command::Write, v.fua, v.offset, v.length);
                if v.length == 0 {
                    tx.reply(r);
                } else {
                    self.rx = Rx::Payload {
                        req: r,
                        seg: 0,
                        slot: None,
                        filled: 0,
                    };
                }
            }
            Command::Flush => {
                let r = tx.alloc(req.handle, Command::Flush, false, 0, 0);
                tx.submit_ctrl(r, IoType::Flush);
            }
            Command::Trim | Command::WriteZeroes => {
                tx.dirty = true;
                let r = tx.alloc(req.handle, v.cmd, v.fua, v.offset, v.length);
                if v.length == 0 {
                    tx.reply(r);
                } else if v.cmd == Command::Trim {
                    tx.submit_ctrl(r, IoType::Unmap);
                } else {
                    tx.submit_ctrl(r, IoType::WriteZeroes);
                }
            }
        }
    }

    // ---- send ----------------------------------------------------------

    fn send(&mut self) -> usize {
        let mut work = 0;
        loop {
            if self.broken {
                return work;
            }
            if self.out_sent < self.out.len() {
                let piece = [IoSlice::new(&self.out[self.out_sent..])];
                match send_vectored(self.sock.fd(), &piece) {
                    Ok(n) => {
                        work += 1;
                        self.out_sent += n;
                        if self.out_sent < self.out.len() {
                            return work;
                        }
                        self.out.clear();
                        self.out_sent = 0;
                        continue;
                    }
                    Err(e) if again(&e) => return work,
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "NBD send failed");
                        self.mark_broken();
                        self.begin_close("send failed");
                        return work;
                    }
                }
            }
            let Some(tx) = self.tx.as_mut() else {
                return work;
            };
            match tx.send_some(self.sock.fd()) {
                Sent::All => work += 1,
                Sent::Partial => return work + 1,
                Sent::Nothing => return work,
                Sent::Fatal => {
                    self.hard_close("a read failed after its reply header was sent");
                    return work;
                }
                Sent::Failed(e) => {
                    if again(&e) {
                        return work;
                    }
                    tracing::debug!(peer = %self.peer, error = %e, "NBD send failed");
                    self.mark_broken();
                    self.begin_close("send failed");
                    return work;
                }
            }
        }
    }
}

fn again(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Keeps an export's connection count while a connection uses it.
struct ExportConn(Arc<ExportShared>);

impl Drop for ExportConn {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::ops::Deref for ExportConn {
    type Target = ExportShared;
    fn deref(&self) -> &ExportShared {
        &self.0
    }
}

// ---- transmission state -----------------------------------------------

/// A buffer and the bdev I/O it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegState {
    Free,
    /// A write segment receiving its payload.
    Filling,
    InFlight,
    /// Completed with this NBD error (0: success); read data waits to be sent.
    Done(u32),
}

struct Seg {
    /// The segment's buffer; `None` only while the bdev has it.
    buf: Option<DmaBuf>,
    state: SegState,
    req: u16,
    idx: u32,
    len: u32,
    /// Structured replies: this segment's chunk header.
    chunk: [u8; 40],
    chunk_len: u8,
}

impl Seg {
    /// The segment's data, as read.
    fn data(&self) -> &[u8] {
        match self.buf.as_deref() {
            Some(b) => &b[..(self.len as usize).min(b.len())],
            None => &[],
        }
    }
}

/// How a queued reply is laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// A simple reply header, nothing else.
    Simple,
    /// A simple reply header (no error), then each segment's data in order.
    SimpleRead,
    /// Structured: per segment an `OFFSET_DATA` chunk with its data, or an
    /// `ERROR_OFFSET` chunk; the last one carries `DONE`.
    Chunks,
    /// Structured: one `ERROR` chunk with `DONE`, and its message.
    ChunkError,
    /// Structured: a `NONE` chunk with `DONE` (a zero-length read).
    NoneDone,
}

struct Req {
    in_use: bool,
    handle: u64,
    cmd: Command,
    fua: bool,
    offset: u64,
    len: u32,
    nseg: u32,
    submitted: u32,
    completed: u32,
    /// bdev I/O of this request not yet completed.
    io_out: u32,
    /// First NBD error (0: none so far).
    err: u32,
    msg: &'static str,
    /// A read with more segments than the connection has buffers.
    streaming: bool,
    /// No more segments are submitted; what completes is dropped.
    abandon: bool,
    /// Every payload byte of a write has arrived.
    received: bool,
    /// The flush after a FUA write, trim or write-zeroes is in flight.
    post_flush: bool,
    queued: bool,
    reply_sent: bool,
    kind: Reply,
    hdr: [u8; 32],
    hdr_len: u8,
    /// Buffer slot of read segment `k`, at `k % ring.len()`.
    ring: Box<[u16]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalFlush {
    NotNeeded,
    Needed,
    InFlight,
    Done,
}

/// One piece of a reply on the wire.
enum Piece<'a> {
    Bytes(&'a [u8]),
    /// The next piece is a segment still being read (streaming reads only).
    Wait,
    End,
    /// A simple reply's segment failed after its header went out.
    Fatal,
}

enum Sent {
    All,
    Partial,
    Nothing,
    Fatal,
    Failed(io::Error),
}

struct Tx {
    export: ExportConn,
    ch: BdevChannel,
    shared: Arc<ServerShared>,
    core: usize,
    bs: u64,
    geo: Geometry,
    structured: bool,
    seg_size: u32,
    segs: Vec<Seg>,
    free_segs: Vec<u16>,
    reqs: Vec<Req>,
    free_reqs: Vec<u16>,
    /// Reads waiting for buffers, in arrival order.
    pending: VecDeque<u16>,
    /// Replies ready to send, in order.
    ready: VecDeque<u16>,
    /// Progress within `ready.front()`: piece index and byte offset.
    cur_piece: u32,
    cur_off: usize,
    done: Vec<BdevIo>,
    dirty: bool,
    /// Replies can no longer be delivered.
    broken: bool,
    final_flush: FinalFlush,
}

impl Tx {
    #[allow(clippy::too_many_arguments, reason = "one constructor, called once")]
    fn new(
        export: ExportConn,
        ch: BdevChannel,
        pool: &BufferPool,
        geo: Geometry,
        structured: bool,
        seg_size: u32,
        max_requests: usize,
        shared: Arc<ServerShared>,
        core: usize,
    ) -> Tx {
        let nsegs = pool.count();
        let segs: Vec<Seg> = (0..nsegs)
            .map(|_| Seg {
                buf: pool.get(seg_size as usize),
                state: SegState::Free,
                req: 0,
                idx: 0,
                len: 0,
                chunk: [0; 40],
                chunk_len: 0,
            })
            .collect();
        let ring_len = nsegs
            .min(geo.max_payload.div_ceil(seg_size) as usize)
            .max(1);
        let reqs = (0..max_requests)
            .map(|_| Req {
                in_use: false,
                handle: 0,
                cmd: Command::Read,
                fua: false,
                offset: 0,
                len: 0,
                nseg: 0,
                submitted: 0,
                completed: 0,
                io_out: 0,
                err: 0,
                msg: "",
                streaming: false,
                abandon: false,
                received: false,
                post_flush: false,
                queued: false,
                reply_sent: false,
                kind: Reply::Simple,
                hdr: [0; 32],
                hdr_len: 0,
                ring: vec![0u16; ring_len].into_boxed_slice(),
            })
            .collect();
        Tx {
            bs: geo.min_block.max(1) as u64,
            export,
            ch,
            shared,
            core,
            geo,
            structured,
            seg_size,
            free_segs: (0..nsegs as u16).rev().collect(),
            segs,
            free_reqs: (0..max_requests as u16).rev().collect(),
            reqs,
            pending: VecDeque::with_capacity(max_requests),
            ready: VecDeque::with_capacity(max_requests),
            cur_piece: 0,
            cur_off: 0,
            done: Vec::with_capacity(nsegs + max_requests + 1),
            dirty: false,
            broken: false,
            final_flush: FinalFlush::NotNeeded,
        }
    }

    fn stats(&self) -> &StatShard {
        self.shared.shard_at(self.core)
    }

    /// Whether nothing is in flight and every request is finished.
    fn idle(&mut self) -> bool {
        if self.ch.inflight() > 0 || self.free_reqs.len() < self.reqs.len() {
            return false;
        }
        if self.final_flush == FinalFlush::NotNeeded && self.dirty && self.export.can_flush {
            self.final_flush = FinalFlush::Needed;
        }
        true
    }

    fn submit_final_flush(&mut self) {
        self.final_flush = FinalFlush::InFlight;
        self.ch.submit(BdevIo::flush(FINAL_TOKEN));
    }

    /// Takes a request slot (the caller checked one is free).
    fn alloc(&mut self, handle: u64, cmd: Command, fua: bool, offset: u64, len: u32) -> u16 {
        let r = self.free_reqs.pop().unwrap_or(0);
        let seg = self.seg_size as u64;
        let q = &mut self.reqs[r as usize];
        debug_assert!(!q.in_use, "request slot handed out twice");
        let nseg = if matches!(cmd, Command::Read | Command::Write) {
            (len as u64).div_ceil(seg) as u32
        } else {
            0
        };
        *q = Req {
            in_use: true,
            handle,
            cmd,
            fua,
            offset,
            len,
            nseg,
            submitted: 0,
            completed: 0,
            io_out: 0,
            err: 0,
            msg: "",
            streaming: cmd == Command::Read && nseg as usize > self.segs.len(),
            abandon: false,
            received: false,
            post_flush: false,
            queued: false,
            reply_sent: false,
            kind: Reply::Simple,
            hdr: [0; 32],
            hdr_len: 0,
            ring: std::mem::take(&mut q.ring),
        };
        r
    }

    fn maybe_free(&mut self, r: u16) {
        let q = &mut self.reqs[r as usize];
        if q.in_use && q.reply_sent && q.io_out == 0 {
            q.in_use = false;
            self.free_reqs.push(r);
        }
    }

    fn free_seg(&mut self, s: u16) {
        let sg = &mut self.segs[s as usize];
        if sg.state != SegState::Free {
            sg.state = SegState::Free;
            self.free_segs.push(s);
        }
    }

    /// Frees every completed segment of read `r` (its data will not be sent).
    fn release_read_segs(&mut self, r: u16) {
        let q = &self.reqs[r as usize];
        let ring_len = q.ring.len() as u32;
        let (first, end) = (q.submitted.saturating_sub(ring_len), q.submitted);
        for k in first..end {
            let s = self.reqs[r as usize].ring[(k % ring_len) as usize];
            let sg = &self.segs[s as usize];
            if sg.req == r && sg.idx == k && matches!(sg.state, SegState::Done(_)) {
                self.free_seg(s);
            }
        }
    }

    /// Byte range of segment `k` of request `q`.
    fn seg_range(&self, q: &Req, k: u32) -> (u64, u32) {
        let start = k as u64 * self.seg_size as u64;
        let len = (q.len as u64 - start).min(self.seg_size as u64) as u32;
        (q.offset + start, len)
    }

    // ---- writes ----

    fn take_write_slot(&mut self, r: u16, k: u32) -> Option<u16> {
        let s = self.free_segs.pop()?;
        let (_, len) = self.seg_range(&self.reqs[r as usize], k);
        let sg = &mut self.segs[s as usize];
        sg.state = SegState::Filling;
        sg.req = r;
        sg.idx = k;
        sg.len = len;
        if let Some(b) = sg.buf.as_mut() {
            b.set_len(len as usize);
        }
        Some(s)
    }

    fn submit_write_seg(&mut self, s: u16) {
        let sg = &mut self.segs[s as usize];
        let (r, k) = (sg.req, sg.idx);
        sg.state = SegState::InFlight;
        let buf = sg.buf.take();
        let (off, len) = self.seg_range(&self.reqs[r as usize], k);
        let q = &mut self.reqs[r as usize];
        q.submitted += 1;
        q.io_out += 1;
        if q.submitted == q.nseg {
            q.received = true;
        }
        let mut io = BdevIo::new(IoType::Write, off / self.bs, len as u64 / self.bs, s as u64);
        io.buf = buf;
        self.ch.submit(io);
    }

    // ---- flush, trim, write-zeroes ----

    fn submit_ctrl(&mut self, r: u16, t: IoType) {
        let q = &mut self.reqs[r as usize];
        q.io_out += 1;
        let token = CTRL_TOKEN | r as u64;
        let io = match t {
            IoType::Flush => BdevIo::flush(token),
            IoType::Unmap => BdevIo::unmap(q.offset / self.bs, q.len as u64 / self.bs, token),
            _ => BdevIo::write_zeroes(q.offset / self.bs, q.len as u64 / self.bs, token),
        };
        self.ch.submit(io);
    }

    // ---- reads ----

    /// Gives buffers to waiting reads, strictly in arrival order.
    fn pump(&mut self) -> usize {
        let mut work = 0;
        while let Some(&r) = self.pending.front() {
            let nsegs = self.segs.len();
            let q = &self.reqs[r as usize];
            if q.abandon || self.broken {
                self.pending.pop_front();
                continue;
            }
            if q.streaming && q.submitted == 0 && self.free_segs.len() < nsegs {
                break;
            }
            while self.reqs[r as usize].submitted < self.reqs[r as usize].nseg {
                let Some(s) = self.free_segs.pop() else {
                    return work;
                };
                let q = &self.reqs[r as usize];
                let k = q.submitted;
                let (off, len) = self.seg_range(q, k);
                let ring_at = (k as usize) % q.ring.len();
                let sg = &mut self.segs[s as usize];
                sg.state = SegState::InFlight;
                sg.req = r;
                sg.idx = k;
                sg.len = len;
                let mut buf = sg.buf.take();
                if let Some(b) = buf.as_mut() {
                    b.set_len(len as usize);
                }
                let q = &mut self.reqs[r as usize];
                q.ring[ring_at] = s;
                q.submitted += 1;
                q.io_out += 1;
                let mut io =
                    BdevIo::new(IoType::Read, off / self.bs, len as u64 / self.bs, s as u64);
                io.buf = buf;
                self.ch.submit(io);
                work += 1;
            }
            self.pending.pop_front();
        }
        work
    }

    // ---- completions ----

    fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let n = self.ch.poll(&mut |io| done.push(io));
        for io in done.drain(..) {
            self.complete(io);
        }
        self.done = done;
        n
    }

    fn complete(&mut self, mut io: BdevIo) {
        let token = io.token;
        if token == FINAL_TOKEN {
            self.final_flush = FinalFlush::Done;
            if !io.status.is_success() {
                tracing::warn!(export = %self.export.info.name, status = ?io.status, "NBD: flush at close failed");
            }
            return;
        }
        if token & CTRL_TOKEN != 0 {
            self.ctrl_done((token & 0xffff) as u16, io.status);
            return;
        }
        let s = token as u16;
        let errno = nbd_errno(io.status);
        let sg = &mut self.segs[s as usize];
        sg.buf = io.take_buf();
        let (r, k, len) = (sg.req, sg.idx, sg.len);
        let q = &mut self.reqs[r as usize];
        q.io_out -= 1;
        q.completed += 1;
        if errno != 0 && q.err == 0 {
            q.err = errno;
            q.msg = errno_message(errno);
        }
        if q.cmd == Command::Write {
            self.free_seg(s);
            if errno == 0 {
                StatShard::add(&self.stats().bytes_written, len as u64);
            }
            let q = &self.reqs[r as usize];
            if q.received && q.completed == q.nseg && !q.reply_sent {
                self.write_done(r);
            }
            self.maybe_free(r);
            return;
        }
        // A read segment.
        if errno == 0 {
            StatShard::add(&self.stats().bytes_read, len as u64);
        }
        let q = &self.reqs[r as usize];
        if q.abandon || q.reply_sent || self.broken {
            self.free_seg(s);
            self.maybe_free(r);
            return;
        }
        let (off, _) = self.seg_range(q, k);
        let (handle, last) = (q.handle, k + 1 == q.nseg);
        let structured = self.structured;
        let sg = &mut self.segs[s as usize];
        sg.state = SegState::Done(errno);
        if structured {
            let n = if errno == 0 {
                proto::encode_offset_data(&mut sg.chunk, last, handle, off, len)
            } else {
                proto::encode_error_offset_chunk(&mut sg.chunk, last, handle, errno, off)
            };
            sg.chunk_len = n as u8;
        }
        let q = &self.reqs[r as usize];
        if q.queued {
            return;
        }
        if q.streaming {
            if k == 0 {
                self.first_segment_done(r, errno);
            }
        } else if q.completed == q.nseg {
            self.read_done(r);
        }
    }

    fn ctrl_done(&mut self, r: u16, status: IoStatus) {
        let errno = nbd_errno(status);
        let can_flush = self.export.can_flush;
        let q = &mut self.reqs[r as usize];
        q.io_out -= 1;
        if errno != 0 && q.err == 0 {
            q.err = errno;
            q.msg = errno_message(errno);
        }
        if q.post_flush {
            q.post_flush = false;
        } else if matches!(q.cmd, Command::Trim | Command::WriteZeroes)
            && q.err == 0
            && q.fua
            && can_flush
        {
            q.post_flush = true;
            self.submit_ctrl(r, IoType::Flush);
            return;
        }
        self.reply(r);
    }

    fn write_done(&mut self, r: u16) {
        let q = &mut self.reqs[r as usize];
        if q.err == 0 && q.fua && self.export.can_flush {
            q.post_flush = true;
            self.submit_ctrl(r, IoType::Flush);
        } else {
            self.reply(r);
        }
    }

    /// A read whose segments all completed.
    fn read_done(&mut self, r: u16) {
        if self.structured {
            self.queue(r, Reply::Chunks);
        } else if self.reqs[r as usize].err != 0 {
            self.release_read_segs(r);
            self.queue(r, Reply::Simple);
        } else {
            self.queue(r, Reply::SimpleRead);
        }
    }

    /// A streaming read's first segment completed: its reply starts.
    fn first_segment_done(&mut self, r: u16, errno: u32) {
        if self.structured {
            self.queue(r, Reply::Chunks);
        } else if errno != 0 {
            self.reqs[r as usize].abandon = true;
            self.pending.retain(|&x| x != r);
            self.release_read_segs(r);
            self.queue(r, Reply::Simple);
        } else {
            self.queue(r, Reply::SimpleRead);
        }
    }

    /// Queues the reply of a request that is not a successful read.
    fn reply(&mut self, r: u16) {
        let q = &self.reqs[r as usize];
        let kind = if q.err != 0 {
            if self.structured {
                Reply::ChunkError
            } else {
                Reply::Simple
            }
        } else if q.cmd == Command::Read && self.structured {
            Reply::NoneDone
        } else {
            Reply::Simple
        };
        self.queue(r, kind);
    }

    fn queue(&mut self, r: u16, kind: Reply) {
        if self.reqs[r as usize].err != 0 {
            StatShard::add(&self.stats().errors, 1);
        }
        if self.broken {
            self.release_read_segs(r);
            let q = &mut self.reqs[r as usize];
            q.reply_sent = true;
            q.abandon = true;
            self.maybe_free(r);
            return;
        }
        let q = &mut self.reqs[r as usize];
        q.kind = kind;
        q.queued = true;
        let n = match kind {
            Reply::Simple => proto::encode_simple_reply(&mut q.hdr, q.err, q.handle),
            Reply::SimpleRead => proto::encode_simple_reply(&mut q.hdr, 0, q.handle),
            Reply::ChunkError => {
                let msg_len = q.msg.len().min(proto::MAX_STRING) as u16;
                proto::encode_error_chunk(&mut q.hdr, true, q.handle, q.err, msg_len)
            }
            Reply::NoneDone => proto::encode_none_done(&mut q.hdr, q.handle),
            Reply::Chunks => 0,
        };
        q.hdr_len = n as u8;
        self.ready.push_back(r);
    }

    // ---- closing ----

    /// The receive side closed mid-request: that request gets no reply.
    fn orphan_rx(&mut self, rx: Rx) {
        let r = match rx {
            Rx::Header => return,
            Rx::Payload { req, slot, .. } => {
                if let Some(s) = slot {
                    self.free_seg(s);
                }
                req
            }
            Rx::Discard { req, .. } => req,
        };
        let q = &mut self.reqs[r as usize];
        q.reply_sent = true;
        q.abandon = true;
        self.maybe_free(r);
    }

    /// The socket is gone: drop every reply, and every read not yet started.
    fn abandon_replies(&mut self) {
        self.broken = true;
        while let Some(r) = self.ready.pop_front() {
            self.release_read_segs(r);
            let q = &mut self.reqs[r as usize];
            q.reply_sent = true;
            q.abandon = true;
            self.maybe_free(r);
        }
        while let Some(r) = self.pending.pop_front() {
            let q = &mut self.reqs[r as usize];
            q.reply_sent = true;
            q.abandon = true;
            self.maybe_free(r);
        }
        self.cur_piece = 0;
        self.cur_off = 0;
    }

    // ---- sending ----

    /// Segment `k` of read `r`, once it completed.
    fn seg_of(&self, r: u16, k: u32) -> Result<&Seg, Piece<'_>> {
        let q = &self.reqs[r as usize];
        if k >= q.submitted {
            return Err(Piece::Wait);
        }
        let s = q.ring[(k as usize) % q.ring.len()];
        let sg = &self.segs[s as usize];
        if sg.req != r || sg.idx != k {
            // Never happens; refuse to send someone else's data.
            return Err(Piece::Fatal);
        }
        match sg.state {
            SegState::Done(_) => Ok(sg),
            SegState::InFlight | SegState::Filling => Err(Piece::Wait),
            SegState::Free => Err(Piece::Fatal),
        }
    }

    /// Piece `i` of the reply of request `r`.
    fn piece(&self, r: u16, i: u32) -> Piece<'_> {
        let q = &self.reqs[r as usize];
        match q.kind {
            Reply::Simple | Reply::NoneDone => match i {
                0 => Piece::Bytes(&q.hdr[..q.hdr_len as usize]),
                _ => Piece::End,
            },
            Reply::ChunkError => match i {
                0 => Piece::Bytes(&q.hdr[..q.hdr_len as usize]),
                1 => Piece::Bytes(&q.msg.as_bytes()[..q.msg.len().min(proto::MAX_STRING)]),
                _ => Piece::End,
            },
            Reply::SimpleRead => {
                if i == 0 {
                    return Piece::Bytes(&q.hdr[..q.hdr_len as usize]);
                }
                let k = i - 1;
                if k >= q.nseg {
                    return Piece::End;
                }
                match self.seg_of(r, k) {
                    Ok(sg) if sg.state == SegState::Done(0) => Piece::Bytes(sg.data()),
                    Ok(_) => Piece::Fatal,
                    Err(p) => p,
                }
            }
            Reply::Chunks => {
                let k = i / 2;
                if k >= q.nseg {
                    return Piece::End;
                }
                match self.seg_of(r, k) {
                    Ok(sg) if i.is_multiple_of(2) => {
                        Piece::Bytes(&sg.chunk[..sg.chunk_len as usize])
                    }
                    Ok(sg) if sg.state == SegState::Done(0) => Piece::Bytes(sg.data()),
                    Ok(_) => Piece::Bytes(&[]),
                    Err(p) => p,
                }
            }
        }
    }

    /// Piece `i` of reply `r` is on the wire: free what it held.
    fn piece_sent(&mut self, r: u16, i: u32) {
        let q = &self.reqs[r as usize];
        let k = match q.kind {
            Reply::SimpleRead if i >= 1 => i - 1,
            Reply::Chunks if i % 2 == 1 => i / 2,
            _ => return,
        };
        let s = q.ring[(k as usize) % q.ring.len()];
        self.free_seg(s);
    }

    /// Sends as much of the ready replies as the socket takes.
    fn send_some(&mut self, fd: BorrowedFd<'_>) -> Sent {
        let mut iov = [IoSlice::new(&[]); IOV_BATCH];
        let mut cnt = 0;
        let mut total = 0;
        let mut fatal = false;
        'replies: for (qi, &r) in self.ready.iter().enumerate() {
            let (mut i, mut off) = if qi == 0 {
                (self.cur_piece, self.cur_off)
            } else {
                (0, 0)
            };
            loop {
                match self.piece(r, i) {
                    Piece::Bytes(b) => {
                        if off < b.len() {
                            iov[cnt] = IoSlice::new(&b[off..]);
                            cnt += 1;
                            total += b.len() - off;
                            if cnt == IOV_BATCH {
                                break 'replies;
                            }
                        }
                    }
                    Piece::End => break,
                    Piece::Wait => break 'replies,
                    Piece::Fatal => {
                        fatal = cnt == 0;
                        break 'replies;
                    }
                }
                i += 1;
                off = 0;
            }
        }
        if fatal {
            return Sent::Fatal;
        }
        if cnt == 0 {
            // Zero-length pieces and finished replies still advance.
            self.advance(0);
            return Sent::Nothing;
        }
        match send_vectored(fd, &iov[..cnt]) {
            Ok(n) => {
                self.advance(n);
                if n == total {
                    Sent::All
                } else {
                    Sent::Partial
                }
            }
            Err(e) => Sent::Failed(e),
        }
    }

    /// Moves the send cursor over `n` bytes, freeing what was sent and
    /// retiring finished replies.
    fn advance(&mut self, mut n: usize) {
        while let Some(&r) = self.ready.front() {
            let len = match self.piece(r, self.cur_piece) {
                Piece::Bytes(b) => b.len(),
                Piece::End => {
                    self.ready.pop_front();
                    self.cur_piece = 0;
                    self.cur_off = 0;
                    self.reqs[r as usize].reply_sent = true;
                    self.maybe_free(r);
                    continue;
                }
                Piece::Wait | Piece::Fatal => break,
            };
            let rem = len - self.cur_off.min(len);
            if rem > n {
                self.cur_off += n;
                n = 0;
                break;
            }
            n -= rem;
            self.piece_sent(r, self.cur_piece);
            self.cur_piece += 1;
            self.cur_off = 0;
        }
        debug_assert_eq!(n, 0, "sent bytes beyond the queued replies");
    }
}

/// The NBD error for a bdev completion status.
fn nbd_errno(status: IoStatus) -> u32 {
    match status {
        IoStatus::Success => 0,
        IoStatus::Failed(IoError::ReadOnly) => proto::EPERM,
        IoStatus::Failed(IoError::OutOfRange) | IoStatus::Failed(IoError::Unsupported) => {
            proto::EINVAL
        }
        IoStatus::Failed(IoError::Device(e))
            if e == libc_enospc() || e == libc_edquot() || e == libc_efbig() =>
        {
            proto::ENOSPC
        }
        IoStatus::Pending | IoStatus::Failed(_) => proto::EIO,
    }
}

// errno values as the kernel reports them (Linux): the bdev layer passes
// device errors through unchanged.
const fn libc_enospc() -> i32 {
    28
}
const fn libc_edquot() -> i32 {
    122
}
const fn libc_efbig() -> i32 {
    27
}

/// A message for structured error replies.
fn errno_message(errno: u32) -> &'static str {
    match errno {
        proto::EPERM => "operation not permitted",
        proto::EINVAL => "invalid request",
        proto::ENOSPC => "no space left on the device",
        _ => "I/O error on the bdev",
    }
}
