use std::time::Instant;
fn cpu() -> f64 { let mut ts = libc::timespec{tv_sec:0,tv_nsec:0}; unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }; ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9 }
fn main() {
    multiproc::init();
    let n = 2_000_000u64;
    let mode = std::env::args().nth(1).unwrap_or_default();
    for _ in 0..3 {
        let q: multiproc::Queue<Option<u64>> = multiproc::Queue::new().unwrap();
        if mode != "same" {
        let q2 = q.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || { let c0 = cpu(); for i in 0..n { q2.put(Some(i)).unwrap(); } q2.put(None).unwrap(); cpu() - c0 });
        let c0 = cpu();
        let mut c = 0; while let Some(_) = q.get().unwrap() { c += 1; }
        let cc = cpu() - c0;
        let pc = h.join().unwrap();
        assert_eq!(c, n);
        let dt = t.elapsed().as_secs_f64();
        println!("threads {:.2} M msg/s wall; cpu/msg producer {:.0} ns consumer {:.0} ns", n as f64 / dt / 1e6, pc*1e9/n as f64, cc*1e9/n as f64);
        }
        let c0 = cpu();
        for i in 0..n { q.put(Some(i)).unwrap(); q.get().unwrap(); }
        println!("same-thread put+get {:.0} ns cpu/pair", (cpu()-c0) * 1e9 / n as f64);
    }
}
