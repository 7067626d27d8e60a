//! Pipe rows of `multiproc bench` (`pipe_rtt`, `pipe_small`, `pipe_large`), measured as
//! `bench/python/mp_pipe.py` measures Python: a duplex [`Pipe`](crate::Pipe) between this
//! process and a child made with [`spawn`](crate::spawn).
//!
//! * [`rtt`]: round trip of an 8-byte value (`send`/`recv` both ways), median of `n` after 100
//!   unmeasured ones.
//! * [`small`]: the child sends `n` 8-byte values (`send`), this process receives them
//!   (`recv`); messages per second.
//! * [`large`]: the child sends `n` 1 MiB buffers (`send_bytes`), this process receives them
//!   (`recv_bytes`); bytes per second.
//! * [`typed_large`]: the same 1 MiB as a serde `Vec<u8>` value (`send`/`recv`), to show what
//!   `send_bytes` saves.
//!
//! The streaming child says "ready" and waits for "go" before the timed part, so the child's
//! start is not measured (as in the Python script). The raw limits are in [`super::raw`].

use std::time::Instant;

use crate::error::{Error, Result};
use crate::{Connection, JoinHandle, Pipe};

use super::median;

/// One small message: 8 bytes, `None` ends a stream.
type Small = Option<[u8; 8]>;

const SMALL: [u8; 8] = *b"xxxxxxxx";
const WARM: usize = 100;

/// One mebibyte, the size of a `large` message.
pub const MIB: usize = 1 << 20;

fn echo(mut c: Connection<Small>) {
    while let Ok(Some(m)) = c.recv() {
        if c.send(&Some(m)).is_err() {
            break;
        }
    }
}

/// Median seconds of a round trip of an 8-byte value to a child that echoes it, over `n`
/// round trips (after 100 unmeasured ones).
pub fn rtt(n: usize) -> Result<f64> {
    let (mut a, b) = Pipe::<Small>::new(true)?;
    let h = crate::spawn(echo, b)?;
    let mut lat = Vec::with_capacity(n.max(1) + WARM);
    for _ in 0..n.max(1) + WARM {
        let t = Instant::now();
        a.send(&Some(SMALL))?;
        if a.recv()? != Some(SMALL) {
            return Err(Error::state("pipe rtt: the echo differs"));
        }
        lat.push(t.elapsed().as_secs_f64());
    }
    a.send(&None)?;
    h.join()?;
    Ok(median(lat.split_off(WARM)))
}

/// The streaming child: "ready", wait for "go", then `n` messages and an end marker.
fn producer((mut c, n, big): (Connection<Small>, usize, bool)) {
    c.send_bytes(b"ready").expect("ready");
    c.recv_bytes().expect("go");
    if big {
        let payload = vec![b'x'; MIB];
        for _ in 0..n {
            c.send_bytes(&payload).expect("send_bytes");
        }
        c.send_bytes(b"").expect("end");
    } else {
        for _ in 0..n {
            c.send(&Some(SMALL)).expect("send");
        }
        c.send(&None).expect("end");
    }
}

/// Messages per second of a child streaming `n` messages (8-byte values, or 1 MiB buffers when
/// `big`) to this process, from "go" to the end marker.
fn stream(n: usize, big: bool) -> Result<f64> {
    let (mut a, b) = Pipe::<Small>::new(true)?;
    let h = crate::spawn(producer, (b, n, big))?;
    a.recv_bytes()?;
    let t = Instant::now();
    a.send_bytes(b"go")?;
    if big {
        drain(t, n, h, || Ok(!a.recv_bytes()?.is_empty()))
    } else {
        drain(t, n, h, || Ok(a.recv()?.is_some()))
    }
}

/// Receives with `more` until it says the stream ended, joins the producer `h` and checks that
/// `n` messages came: messages per second since `t`.
fn drain(
    t: Instant,
    n: usize,
    h: JoinHandle<()>,
    mut more: impl FnMut() -> Result<bool>,
) -> Result<f64> {
    let mut count = 0;
    while more()? {
        count += 1;
    }
    let dt = t.elapsed().as_secs_f64();
    h.join()?;
    if count != n {
        return Err(Error::state(format!("stream: {count} of {n} messages")));
    }
    Ok(n as f64 / dt)
}

/// Messages per second: a child `send`s `n` 8-byte values, this process `recv`s them.
pub fn small(n: usize) -> Result<f64> {
    stream(n, false)
}

/// Bytes per second: a child `send_bytes` `n` 1 MiB buffers, this process `recv_bytes` them.
pub fn large(n: usize) -> Result<f64> {
    Ok(stream(n, true)? * MIB as f64)
}

fn typed_producer((mut c, n): (Connection<Option<Vec<u8>>>, usize)) {
    let payload = Some(vec![b'x'; MIB]);
    for _ in 0..n {
        c.send(&payload).expect("send");
    }
    c.send(&None).expect("end");
}

/// Bytes per second of `send`/`recv` of a 1 MiB `Vec<u8>` value (serde encodes it item by
/// item, unlike [`large`]), child start included.
pub fn typed_large(n: usize) -> Result<f64> {
    let (mut rx, tx) = Pipe::<Option<Vec<u8>>>::new(false)?;
    let t = Instant::now();
    let h = crate::spawn(typed_producer, (tx, n))?;
    Ok(drain(t, n, h, || Ok(rx.recv()?.is_some()))? * MIB as f64)
}

#[cfg(test)]
mod tests {
    // Functional checks only (no timing asserted): every message arrives, figures are sane.
    use super::*;

    #[test]
    fn pipe_rows_move_every_message() {
        crate::init();
        assert!(rtt(10).unwrap() > 0.0);
        assert!(small(100).unwrap() > 0.0);
        assert!(large(3).unwrap() > 0.0);
        assert!(typed_large(2).unwrap() > 0.0);
    }
}
