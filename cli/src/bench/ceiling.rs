//! In-process ceilings for the queue rows: the same stream between two threads of one process
//! over a crossbeam channel, so no process boundary and no serialization.

use std::time::Instant;

use multiproc::serde_bytes::ByteBuf;

/// Messages per second of one thread sending `n` messages of `size` payload bytes (the
/// queue rows' payload type) to another over an unbounded crossbeam channel, from the first
/// send to the end-of-stream marker.
pub fn channel(n: u64, size: usize) -> f64 {
    let (tx, rx) = crossbeam_channel::unbounded::<Option<ByteBuf>>();
    let payload = ByteBuf::from(vec![b'x'; size]);
    let t = Instant::now();
    let producer = std::thread::spawn(move || {
        for _ in 0..n {
            tx.send(Some(payload.clone())).expect("receiver alive");
        }
        tx.send(None).expect("receiver alive");
    });
    let mut got = 0u64;
    while let Ok(Some(m)) = rx.recv() {
        std::hint::black_box(m);
        got += 1;
    }
    let dt = t.elapsed().as_secs_f64();
    producer.join().expect("producer thread");
    assert_eq!(got, n, "the channel delivered every message");
    n as f64 / dt
}
