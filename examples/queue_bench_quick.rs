fn main() {
    multiproc::init();
    let which = std::env::args().nth(1).unwrap_or_default();
    for _ in 0..3 {
        if which != "large" {
            let s = multiproc::bench_support::queue_small(200_000).unwrap();
            println!("small {:.0} msg/s ({:.1}x py 188k)", s, s / 188e3);
        }
        if which != "small" {
            let l = multiproc::bench_support::queue_large(2_000).unwrap();
            let m = multiproc::bench_support::memcpy_bandwidth(1 << 20, 2_000);
            println!("large {:.2} GB/s  memcpy {:.2} GB/s  ratio {:.0}%", l / 1e9, m / 1e9, 100.0 * l / m);
        }
    }
}
