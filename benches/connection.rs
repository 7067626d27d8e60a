//! Pipe and manager throughput, measured as Python's scripts measure them
//! (`shared/reference/python-bench/c_d_queue_pipe.py`, `g_manager.py`): a child streams messages
//! to the parent, medians of 3 runs. Run: `cargo bench --bench connection`.

use std::time::Instant;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use multiproc::managers::{DictProxy, Manager};
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
    if let Some(us) = std::env::var("MP_SPIN_US")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        rx.set_spin(std::time::Duration::from_micros(us));
    }
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

fn typed_producer((mut c, n): (Connection<Option<Vec<u8>>>, usize)) {
    let payload = Some(vec![b'x'; 1 << 20]);
    for _ in 0..n {
        c.send(&payload).unwrap();
    }
    c.send(&None).unwrap();
}

/// `send`/`recv` of a 1 MiB `Vec<u8>` value (serde encodes it item by item, unlike
/// `send_bytes`).
fn typed_large(n: usize) -> f64 {
    let (mut rx, tx) = Pipe::<Option<Vec<u8>>>::new(false).unwrap();
    let t = Instant::now();
    let h = multiproc::spawn(typed_producer, (tx, n)).unwrap();
    let mut cnt = 0;
    while rx.recv().unwrap().is_some() {
        cnt += 1;
    }
    let dt = t.elapsed().as_secs_f64();
    h.join().unwrap();
    assert_eq!(cnt, n);
    n as f64 * (1u64 << 20) as f64 / 1e9 / dt
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

/// The raw limit: the same stream with bare `write`/`read` on a socket pair between two
/// processes, fixed-size messages, no framing.
fn raw_producer((c, n, size): (Connection<()>, usize, usize)) {
    let mut s = UnixStream::from(c.fileno().unwrap().try_clone_to_owned().unwrap());
    let payload = vec![b'x'; size];
    for _ in 0..n {
        s.write_all(&payload).unwrap();
    }
}

fn raw(n: usize, size: usize) -> f64 {
    let (rx, tx) = Pipe::<()>::new(false).unwrap();
    let mut s = UnixStream::from(rx.fileno().unwrap().try_clone_to_owned().unwrap());
    drop(rx);
    let t = Instant::now();
    let h = multiproc::spawn(raw_producer, (tx, n, size)).unwrap();
    let mut buf = vec![0u8; size];
    for _ in 0..n {
        s.read_exact(&mut buf).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    h.join().unwrap();
    n as f64 / dt
}

const ND: u64 = 20_000;

fn dict_child(d: DictProxy<u64, u64>) -> (f64, f64) {
    let t = Instant::now();
    for i in 0..ND {
        d.set(&i, &i).unwrap();
    }
    let t1 = Instant::now();
    let mut s = 0;
    for i in 0..ND {
        s += d.get(&i).unwrap().unwrap();
    }
    let t2 = Instant::now();
    assert_eq!(s, ND * (ND - 1) / 2);
    (
        ND as f64 / (t1 - t).as_secs_f64(),
        ND as f64 / (t2 - t1).as_secs_f64(),
    )
}

fn raw_echo(c: Connection<u64>) {
    let mut s = UnixStream::from(c.fileno().unwrap().try_clone_to_owned().unwrap());
    drop(c);
    let mut b = [0u8; 8];
    while s.read_exact(&mut b).is_ok() {
        if s.write_all(&b).is_err() {
            break;
        }
    }
}

/// Bare ping-pong: 8 bytes each way with `write`/`read`.
fn raw_rtt() -> f64 {
    let (a, b) = Pipe::<u64>::new(true).unwrap();
    let mut s = UnixStream::from(a.fileno().unwrap().try_clone_to_owned().unwrap());
    drop(a);
    let h = multiproc::spawn(raw_echo, b).unwrap();
    let n = 20_000u64;
    let t = Instant::now();
    let mut buf = [0u8; 8];
    for i in 0..n {
        s.write_all(&i.to_le_bytes()).unwrap();
        s.read_exact(&mut buf).unwrap();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(s);
    let _ = h.join();
    us
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    multiproc::init();
    let only = std::env::var("MP_ONLY").unwrap_or_default();
    if only.is_empty() || only == "pipe" {
        pipe_rows();
    }
    if only == "rtt" {
        for _ in 0..3 {
            println!("pipe_rtt {:.1} us, raw {:.1} us", rtt(), raw_rtt());
        }
    }
    if only == "codec" {
        let v = vec![b'x'; 1 << 20];
        let n = 200;
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            out.clear();
            postcard::to_io(&v, &mut out).unwrap();
        }
        let io = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            out.clear();
            out = postcard::to_extend(&v, out).unwrap();
        }
        let ext = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            let back: Vec<u8> = postcard::from_bytes(&out).unwrap();
            assert_eq!(back.len(), v.len());
        }
        let de = t.elapsed().as_secs_f64();
        let gb = |s: f64| n as f64 * (1u64 << 20) as f64 / 1e9 / s;
        println!(
            "postcard Vec<u8> 1 MiB: to_io {:.2} GB/s, to_extend {:.2} GB/s, from_bytes {:.2} GB/s",
            gb(io),
            gb(ext),
            gb(de)
        );
    }
    if only == "typed" {
        println!("pipe typed 1 MiB Vec<u8>: {:.2} GB/s", typed_large(500));
    }
    if only == "small" {
        let small = median((0..3).map(|_| run(NS, 8)).collect());
        let raw_small = median((0..3).map(|_| raw(NS, 8)).collect());
        println!("pipe_small {small:.0} msgs/s, raw {raw_small:.0} msgs/s");
    }
    if only.is_empty() || only == "manager" {
        manager_row();
    }
}

fn pipe_rows() {
    let small = median((0..3).map(|_| run(NS, 8)).collect());
    let large = median((0..3).map(|_| run(NB, 1 << 20)).collect());
    let rt = median((0..3).map(|_| rtt()).collect());
    let raw_rt = median((0..3).map(|_| raw_rtt()).collect());
    let raw_small = median((0..3).map(|_| raw(NS, 8)).collect());
    let raw_large = median((0..3).map(|_| raw(NB, 1 << 20)).collect());
    println!("pipe_small  {small:>12.0} msgs/s   (Python 256 k, target >= 1.28 M)");
    println!(
        "pipe_large  {:>12.2} GB/s     (Python 0.49, target >= 2.45)",
        large * (1u64 << 20) as f64 / 1e9
    );
    println!("pipe_rtt    {rt:>12.1} us       (raw ping-pong, same run: {raw_rt:.1} us)");
    println!(
        "raw socket pair, same run: 8 B {raw_small:.0} msgs/s, 1 MiB {:.2} GB/s",
        raw_large * (1u64 << 20) as f64 / 1e9
    );
}

fn manager_row() {
    let m = Manager::start().unwrap();
    let (mut sets, mut gets) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let d = m.dict::<u64, u64>().unwrap();
        let (s, g) = multiproc::spawn(dict_child, d).unwrap().join().unwrap();
        sets.push(s);
        gets.push(g);
    }
    let (sets, gets) = (median(sets), median(gets));
    println!(
        "manager_dict from a child: set {sets:.0} ops/s, get {gets:.0} ops/s \
         (Python 11.6 k / 12.5 k, target >= 116 k / 125 k)"
    );
}
