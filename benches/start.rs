//! Start + join of one no-op process under each start method, beside the raw limits: bare
//! `fork` + `waitpid`, and `fork` + `exec` of this same binary (which exits at once) +
//! `waitpid`. The same measurements back the `start_*` rows of `multiproc bench`.

use criterion::{Criterion, criterion_group};
use multiproc::StartMethod;
use multiproc::bench_support::{process, raw};

fn start_join(c: &mut Criterion) {
    let mut g = c.benchmark_group("start_join");
    g.sample_size(30);
    for method in StartMethod::ALL {
        g.bench_function(method.name(), |b| {
            b.iter(|| process::start_join(method, 1).expect("start+join"))
        });
    }
    g.bench_function("raw_fork_waitpid", |b| {
        b.iter(|| raw::fork_wait(1).expect("fork+waitpid"))
    });
    g.bench_function("raw_fork_exec_waitpid", |b| {
        b.iter(|| raw::fork_exec_wait(1).expect("fork+exec+waitpid"))
    });
    g.finish();
}

criterion_group!(benches, start_join);

fn main() {
    // The fork server starts now, while this program has one thread.
    multiproc::init();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
