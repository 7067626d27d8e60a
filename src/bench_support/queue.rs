//! The `queue_small` and `queue_large` rows: one producer process streams `n` messages through
//! a [`Queue`] to the calling process, as the Python reference script does (the producer waits
//! for a go signal, the clock runs from the signal to the end-of-stream sentinel).

use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;

use crate::error::{Error, Result};
use crate::process::Process;
use crate::queues::Queue;

type Msg = Option<ByteBuf>;

fn producer((q, ready, go, n, size): (Queue<Msg>, Queue<()>, Queue<()>, u64, usize)) {
    let msg = Some(ByteBuf::from(vec![b'x'; size]));
    ready.put(()).expect("ready signal");
    go.get().expect("go signal");
    for _ in 0..n {
        q.put_ref(&msg).expect("put");
    }
    q.put(None).expect("put sentinel");
}

/// Time for one child process to stream `n` messages of `size` payload bytes (serialized as
/// bytes) through a fresh [`Queue`] to this process, from the go signal to the sentinel.
pub fn queue_transfer(n: u64, size: usize) -> Result<Duration> {
    let q: Queue<Msg> = Queue::new()?;
    let ready: Queue<()> = Queue::new()?;
    let go: Queue<()> = Queue::new()?;
    let mut p = Process::new(producer, (q.clone(), ready.clone(), go.clone(), n, size));
    p.start()?;
    ready.get_timeout(Duration::from_secs(60))?;
    let t = Instant::now();
    go.put(())?;
    let mut count = 0u64;
    while let Some(m) = q.get()? {
        debug_assert_eq!(m.len(), size);
        count += 1;
    }
    let dt = t.elapsed();
    p.join()?;
    if count != n {
        return Err(Error::state(format!("received {count} messages of {n}")));
    }
    Ok(dt)
}

/// `queue_small`: messages per second for 8-byte messages (`n` of them, e.g. 200 000).
pub fn queue_small(n: u64) -> Result<f64> {
    Ok(n as f64 / queue_transfer(n, 8)?.as_secs_f64())
}

/// `queue_large`: bytes per second for 1 MiB messages (`n` of them, e.g. 2 000).
pub fn queue_large(n: u64) -> Result<f64> {
    let size = 1usize << 20;
    Ok((n as f64 * size as f64) / queue_transfer(n, size)?.as_secs_f64())
}
