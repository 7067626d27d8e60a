//! The child side of a pool: the worker loop and the chunk functions it runs.
//!
//! A worker is an ordinary `multiproc` child whose entry is [`worker_main`]: it decodes its
//! boot message (its socket, its shared page, the initializer's arguments), runs the
//! initializer, says "ready", then serves task frames until told to exit, until its parent goes
//! away, or until it has run `maxtasksperchild` tasks.
//!
//! Invariants the scheduler relies on:
//! * tasks run in the order they arrive, one at a time;
//! * before a task runs, its sequence number (and start time) is in the shared page, and it is
//!   cleared after: a death or a timeout blames exactly that task;
//! * results are batched while more input is already buffered, but never held more than
//!   [`FLUSH_AFTER_NS`] past a task's end, and always flushed before the worker blocks.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::transport::{
    FROM_FAILED, FROM_INIT_FAILED, FROM_OK, FROM_PANICKED, FROM_READY, FdOwned, MSG_HEAD, PAGE,
    PAGE_RUNNING, PAGE_STARTED, TO_EXIT, TO_TASK,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::frame;
use crate::function::{FnId, conjure};
use crate::platform::{self, Mapping};
use crate::start::child::catch_panic;

/// Results wait at most this long after a task ended before they are sent.
pub(crate) const FLUSH_AFTER_NS: u64 = 100_000;
/// How long an idle worker polls for its next task before it blocks (when tasks have been
/// coming that fast): waking a sleeping process on an idle vCPU costs tens of microseconds.
const SPIN_NS: u64 = 50_000;
/// Output is sent once this much is buffered.
const FLUSH_BYTES: usize = 64 * 1024;

/// A chunk function: decodes a `Vec<A>` from the payload, applies `F` to each item and appends
/// the encoded `(results, errors)` to `out`.
pub(crate) type ChunkFn = fn(payload: &[u8], fds: Vec<OwnedFd>, out: &mut Vec<u8>) -> Result<()>;

/// One item's failure inside a chunk: `(index in the chunk, panic message, backtrace)`.
pub(crate) type ItemError = (u32, String, String);

/// The chunk function for `F(A) -> R`.
pub(crate) fn chunk_fn<F, A, R>() -> ChunkFn
where
    F: Fn(A) -> R + Copy + 'static,
    A: DeserializeOwned,
    R: Serialize,
{
    run_chunk::<F, A, R>
}

fn run_chunk<F, A, R>(payload: &[u8], fds: Vec<OwnedFd>, out: &mut Vec<u8>) -> Result<()>
where
    F: Fn(A) -> R + Copy + 'static,
    A: DeserializeOwned,
    R: Serialize,
{
    let f: F = conjure::<F>();
    // Arguments: streamed from the wire format, or decoded at once by the codec (handles).
    let (mut de, mut codec_args) = match payload.split_first() {
        Some((&FMT_WIRE, rest)) if fds.is_empty() => (Some(super::wire::De::new(rest)), None),
        _ => (None, Some(decode_items::<A>(payload, fds)?.into_iter())),
    };
    let n = match (&mut de, &codec_args) {
        (Some(d), _) => d.seq_len().map_err(|e| Error::Decode(e.to_string()))?,
        (None, Some(it)) => it.len(),
        (None, None) => 0,
    };
    // Results: `(Vec<R>, Vec<ItemError>)` in the wire format, written as they come; the count
    // is patched at the end (items that panicked have no result).
    out.push(FMT_WIRE);
    let count_at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.reserve(n * std::mem::size_of::<R>());
    let mut errors: Vec<ItemError> = Vec::new();
    let (mut i, mut written, mut item_start) = (0usize, 0u32, out.len());
    loop {
        // One catch_unwind for the whole chunk; a panic resumes with the next item.
        let r = catch_panic(
            || -> Result<()> {
                while i < n {
                    item_start = out.len();
                    let a: A = match (&mut de, &mut codec_args) {
                        (Some(d), _) => d.read().map_err(|e| Error::Decode(e.to_string()))?,
                        (None, Some(it)) => {
                            it.next().ok_or_else(|| Error::Decode("short".into()))?
                        }
                        (None, None) => unreachable!("one source of arguments"),
                    };
                    let r = f(a);
                    super::wire::to_vec_into(&r, out).map_err(|e| Error::Encode(e.to_string()))?;
                    written += 1;
                    i += 1;
                }
                Ok(())
            },
            false,
        );
        match r {
            Ok(Ok(())) => break,
            Ok(Err(e)) => return Err(e),
            Err(Error::Panicked { message, backtrace }) => {
                out.truncate(item_start);
                errors.push((i as u32, message, backtrace));
            }
            Err(e) => {
                out.truncate(item_start);
                errors.push((i as u32, e.to_string(), String::new()));
            }
        }
        i += 1;
    }
    if de.as_ref().is_some_and(|d| !d.is_done()) {
        return Err(Error::Decode("trailing bytes after the arguments".into()));
    }
    out[count_at..count_at + 4].copy_from_slice(&written.to_le_bytes());
    super::wire::to_vec_into(&errors, out).map_err(|e| Error::Encode(e.to_string()))
}

/// Payload tag: the pool's fixed-width format ([`super::wire`]).
const FMT_WIRE: u8 = 0;
/// Payload tag: the crate's codec (values holding handles, whose descriptors ride along).
const FMT_CODEC: u8 = 1;

/// Appends a chunk of arguments; returns duplicates of the descriptors of handles inside.
pub(crate) fn encode_items<A: Serialize>(items: &[A], buf: &mut Vec<u8>) -> Result<Vec<OwnedFd>> {
    let start = buf.len();
    buf.reserve(1 + 4 + std::mem::size_of_val(items));
    buf.push(FMT_WIRE);
    if super::wire::to_vec_into(items, buf).is_ok() {
        return Ok(Vec::new());
    }
    buf.truncate(start);
    buf.push(FMT_CODEC);
    codec::encode_into(items, buf)?
        .into_iter()
        .map(platform::dup_raw)
        .collect()
}

fn decode_items<A: DeserializeOwned>(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<A>> {
    match payload.split_first() {
        Some((&FMT_WIRE, rest)) if fds.is_empty() => {
            super::wire::from_slice(rest).map_err(|e| Error::Decode(e.to_string()))
        }
        Some((&FMT_CODEC, rest)) => codec::decode(rest, fds),
        _ => Err(Error::Decode("unknown chunk format".into())),
    }
}

/// Decodes a chunk's results, appending them to `out`; returns the chunk's item errors.
pub(crate) fn decode_results_into<R: DeserializeOwned>(
    b: &[u8],
    out: &mut Vec<R>,
) -> Result<Vec<ItemError>> {
    let derr = |e: super::wire::WireError| Error::Decode(e.to_string());
    match b.split_first() {
        Some((&FMT_WIRE, rest)) => {
            let mut de = super::wire::De::new(rest);
            let n = de.seq_len().map_err(derr)?;
            out.reserve(n.min(rest.len()));
            for _ in 0..n {
                out.push(de.read().map_err(derr)?);
            }
            let errs: Vec<ItemError> = de.read().map_err(derr)?;
            if !de.is_done() {
                return Err(Error::Decode("trailing bytes after the results".into()));
            }
            Ok(errs)
        }
        _ => {
            let (res, errs): (Vec<R>, Vec<ItemError>) = decode_results(b)?;
            out.extend(res);
            Ok(errs)
        }
    }
}

/// Decodes a chunk's `(results, errors)` as the worker encoded them.
pub(crate) fn decode_results<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    match b.split_first() {
        Some((&FMT_WIRE, rest)) => {
            super::wire::from_slice(rest).map_err(|e| Error::Decode(e.to_string()))
        }
        Some((&FMT_CODEC, rest)) => codec::decode_plain(rest),
        _ => Err(Error::Decode("unknown result format".into())),
    }
}

/// The identity of a chunk function, encoded as it travels.
pub(crate) fn chunk_fn_id(f: ChunkFn) -> Vec<u8> {
    let mut v = Vec::new();
    codec::encode_plain(&FnId::from_addr(f as usize), &mut v).expect("an id encodes");
    v
}

/// What the pool tells a new worker.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct BootCommon {
    /// Exit after this many tasks (0: never).
    pub(crate) maxtasks: u64,
    /// Write start times in the shared page (only needed for timeouts).
    pub(crate) timing: bool,
}

#[derive(Serialize)]
pub(crate) struct BootOut<'a, A> {
    pub(crate) sock: super::transport::FdRef<'a>,
    pub(crate) page: super::transport::FdRef<'a>,
    pub(crate) common: BootCommon,
    pub(crate) args: &'a A,
}

#[derive(Deserialize)]
struct BootIn<A> {
    sock: FdOwned,
    page: FdOwned,
    common: BootCommon,
    args: A,
}

/// The initializer of a pool built without one.
pub(crate) fn no_initializer(_: ()) {}

/// The worker's entry point, for initializer `I(A)`. Returns when the worker is done; the child
/// then exits with code 0.
pub(crate) fn worker_main<I, A>(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>>
where
    I: Fn(A) + Copy + 'static,
    A: DeserializeOwned,
{
    let boot: BootIn<A> = codec::decode(payload, fds)?;
    let sock = boot.sock.0;
    let page = Mapping::new(boot.page.0.as_fd(), PAGE)?;
    drop(boot.page);
    let init: I = conjure::<I>();
    let args = boot.args;
    let mut out = Vec::new();
    match catch_panic(move || init(args), false) {
        Ok(()) => {
            push_msg(&mut out, FROM_READY, 0, |_| Ok(()));
            let _ = platform::write_all(sock.as_fd(), &out);
        }
        Err(e) => {
            let (message, backtrace) = match e {
                Error::Panicked { message, backtrace } => (message, backtrace),
                other => (other.to_string(), String::new()),
            };
            push_msg(&mut out, FROM_INIT_FAILED, 0, |o| {
                codec::encode_plain(&(message, backtrace), o)
            });
            let _ = platform::write_all(sock.as_fd(), &out);
            return Ok(Vec::new());
        }
    }
    serve(sock, &page, boot.common);
    Ok(Vec::new())
}

/// Appends one message; `body` writes its body.
fn push_msg(out: &mut Vec<u8>, kind: u8, seq: u64, body: impl FnOnce(&mut Vec<u8>) -> Result<()>) {
    let start = out.len();
    out.extend_from_slice(&[0; frame::HEADER]);
    out.push(kind);
    out.extend_from_slice(&seq.to_le_bytes());
    if let Err(e) = body(out) {
        out.truncate(start + frame::HEADER + 1);
        out[start + frame::HEADER] = FROM_FAILED;
        out.extend_from_slice(&seq.to_le_bytes());
        let _ = codec::encode_plain(&e.to_string(), out);
    }
    let len = out.len() - start - frame::HEADER;
    let h = frame::header(len, 0).expect("below 4 GiB");
    out[start..start + frame::HEADER].copy_from_slice(&h);
}

fn serve(sock: OwnedFd, page: &Mapping, common: BootCommon) {
    let running = page.atomic_u64(PAGE_RUNNING);
    let started = page.atomic_u64(PAGE_STARTED);
    // Grown on demand (below): an idle worker keeps 4 pages of it, not 16.
    let mut inbuf = vec![0u8; 16 * 1024];
    let (mut s, mut e) = (0usize, 0usize);
    let mut fds: std::collections::VecDeque<OwnedFd> = std::collections::VecDeque::new();
    let mut got_fds = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(FLUSH_BYTES);
    let mut first_unflushed: Option<u64> = None;
    let mut done: u64 = 0;
    // Adaptive spinning before a blocking read: only while tasks have been arriving within
    // SPIN_NS of asking (a busy caller), so an idle worker sleeps at once.
    let mut last_gap: u64 = 0;
    loop {
        // A complete frame in the buffer?
        let mut frame_len = None;
        if e - s >= frame::HEADER {
            let h: [u8; frame::HEADER] = inbuf[s..s + 8].try_into().expect("8 bytes");
            match frame::parse_header(&h, frame::DEFAULT_MAX_FRAME) {
                Ok((len, nfds)) => frame_len = Some((len, nfds)),
                Err(_) => return,
            }
        }
        if let Some((len, nfds)) = frame_len.filter(|(len, _)| e - s >= frame::HEADER + len) {
            let body_at = s + frame::HEADER;
            s += frame::HEADER + len;
            if len < MSG_HEAD || fds.len() < nfds {
                return;
            }
            let kind = inbuf[body_at];
            let seq = u64::from_le_bytes(inbuf[body_at + 1..body_at + 9].try_into().expect("8"));
            if kind == TO_EXIT {
                let _ = platform::write_all(sock.as_fd(), &out);
                return;
            }
            if kind != TO_TASK {
                return;
            }
            let task_fds: Vec<OwnedFd> = fds.drain(..nfds).collect();
            let rest = &inbuf[body_at + MSG_HEAD..body_at + len];
            running.store(seq, Ordering::Relaxed);
            if common.timing {
                started.store(platform::monotonic_ns(), Ordering::Relaxed);
            }
            std::sync::atomic::fence(Ordering::Release);
            run_task(&mut out, seq, rest, task_fds);
            running.store(0, Ordering::Release);
            done += 1;
            let now = platform::monotonic_ns();
            let first = *first_unflushed.get_or_insert(now);
            let last = common.maxtasks != 0 && done >= common.maxtasks;
            if out.len() >= FLUSH_BYTES || now - first > FLUSH_AFTER_NS || last {
                if platform::write_all(sock.as_fd(), &out).is_err() {
                    return;
                }
                out.clear();
                first_unflushed = None;
            }
            if last {
                return;
            }
            continue;
        }
        // Need more input: send what we have first (we may block).
        if !out.is_empty() {
            if platform::write_all(sock.as_fd(), &out).is_err() {
                return;
            }
            out.clear();
            first_unflushed = None;
        }
        if s == e {
            s = 0;
            e = 0;
        }
        let need = match frame_len {
            Some((len, _)) => (frame::HEADER + len).saturating_sub(e - s).max(16 * 1024),
            None => 16 * 1024,
        };
        if inbuf.len() - e < need {
            inbuf.copy_within(s..e, 0);
            e -= s;
            s = 0;
            if inbuf.len() - e < need {
                inbuf.resize(e + need, 0);
            }
        }
        let wait_start = platform::monotonic_ns();
        let mut got = Err(std::io::ErrorKind::WouldBlock.into());
        if last_gap < SPIN_NS {
            loop {
                got = platform::recv_with_fds_nowait(sock.as_fd(), &mut inbuf[e..], &mut got_fds);
                let waiting =
                    matches!(&got, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock);
                if !waiting || platform::monotonic_ns() - wait_start >= SPIN_NS {
                    break;
                }
                std::thread::yield_now();
            }
        }
        if matches!(&got, Err(err) if err.kind() == std::io::ErrorKind::WouldBlock) {
            got = platform::recv_with_fds(sock.as_fd(), &mut inbuf[e..], &mut got_fds);
        }
        last_gap = platform::monotonic_ns() - wait_start;
        match got {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                e += n;
                fds.extend(got_fds.drain(..));
            }
        }
    }
}

fn run_task(out: &mut Vec<u8>, seq: u64, rest: &[u8], fds: Vec<OwnedFd>) {
    let start = out.len();
    let r = catch_panic(
        || -> Result<()> {
            let (id, payload) = postcard::take_from_bytes::<FnId>(rest)
                .map_err(|e| Error::Decode(e.to_string()))?;
            // SAFETY: the worker checked the parent's build id at start (child_main), and the
            // parent only sends ids made by `chunk_fn_id` from `ChunkFn` pointers of this build,
            // so the address is a `ChunkFn` in this executable.
            let f = unsafe { std::mem::transmute::<usize, ChunkFn>(id.addr()) };
            push_msg(out, FROM_OK, seq, |o| f(payload, fds, o));
            Ok(())
        },
        false,
    );
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            out.truncate(start);
            push_msg(out, FROM_FAILED, seq, |o| {
                codec::encode_plain(&e.to_string(), o)
            });
        }
        Err(Error::Panicked { message, backtrace }) => {
            out.truncate(start);
            push_msg(out, FROM_PANICKED, seq, |o| {
                codec::encode_plain(&(message, backtrace), o)
            });
        }
        Err(e) => {
            out.truncate(start);
            push_msg(out, FROM_FAILED, seq, |o| {
                codec::encode_plain(&e.to_string(), o)
            });
        }
    }
}
