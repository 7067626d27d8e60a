//! Profiling helper: apply_async().get() round trips, with context switches per thread.
fn sq(x: u64) -> u64 {
    x.wrapping_mul(x)
}
fn switches(pid: u32) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let name = st.lines().next().unwrap_or("").to_string();
            let n: u64 = st
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            v.push((name, n));
        }
    }
    v
}
fn main() {
    multiproc::init();
    let pool = multiproc::Pool::new(2).unwrap();
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20000);
    pool.apply(sq, 1).unwrap();
    let me = std::process::id();
    let w = pool.worker_pids();
    let b0: Vec<_> = [me, w[0], w[1]].iter().map(|&p| switches(p)).collect();
    let t = std::time::Instant::now();
    for i in 0..n {
        pool.apply_async(sq, i).unwrap().get().unwrap();
    }
    eprintln!("{:.1} us/rtt", t.elapsed().as_secs_f64() / n as f64 * 1e6);
    let b1: Vec<_> = [me, w[0], w[1]].iter().map(|&p| switches(p)).collect();
    eprintln!("before {b0:?}\nafter  {b1:?}");
}
