//! Pipe and manager throughput, measured as Python's scripts measure them
//! (`shared/reference/python-bench/c_d_queue_pipe.py`, `g_manager.py`): a child streams messages
//! to the parent, medians of 3 runs. Run: `cargo bench --bench connection`.

use std::time::Instant;

use multiproc::{Connection, Pipe};

const NS: usize = 200_000;
const NB: usize = 2_000;

fn producer((mut c, go, n, size): (Connection<()>, Connection<()>, usize, usize)) {
    let mut go = go;
    let payload = vec![b'x'; size];
    go.recv_bytes().unwrap();
    for _ in 0..n {
        c.send_bytes(&payload).unwrap();
    }
    c.send_bytes(b"").unwrap();
}

fn run(n: usize, size: usize) -> f64 {
    let (mut rx, tx) = Pipe::<()>::new(false).unwrap();
    let (mut go, go_child) = Pipe::<()>::new(true).unwrap();
    let h = multiproc::spawn(producer, (tx, go_child, n, size)).unwrap();
    let t = Instant::now();
    go.send_bytes(b"go").unwrap();
    let mut cnt = 0;
    while !rx.recv_bytes().unwrap().is_empty() {
        cnt += 1;
    }
    let dt = t.elapsed().as_secs_f64();
    h.join().unwrap();
    assert_eq!(cnt, n);
    n as f64 / dt
}

fn echo(mut c: Connection<u64>) {
    while let Ok(v) = c.recv() {
        if c.send(&v).is_err() {
            break;
        }
    }
}

fn rtt() -> f64 {
    let (mut a, b) = Pipe::<u64>::new(true).unwrap();
    let h = multiproc::spawn(echo, b).unwrap();
    let n = 20_000;
    let t = Instant::now();
    for i in 0..n {
        a.send(&i).unwrap();
        assert_eq!(a.recv().unwrap(), i);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(a);
    let _ = h.join();
    us
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    multiproc::init();
    let small = median((0..3).map(|_| run(NS, 8)).collect());
    let large = median((0..3).map(|_| run(NB, 1 << 20)).collect());
    let rt = median((0..3).map(|_| rtt()).collect());
    println!("pipe_small  {small:>12.0} msgs/s   (Python 256 k, target >= 1.28 M)");
    println!(
        "pipe_large  {:>12.2} GB/s     (Python 0.49, target >= 2.45)",
        large * (1u64 << 20) as f64 / 1e9
    );
    println!("pipe_rtt    {rt:>12.1} us");
}
