//! Running a function over a list of inputs in child processes, `workers` at a time.
//!
//! TODO(pool): once `multiproc::Pool` is merged, `map` becomes
//! `Pool::new(workers)?.map(f, inputs, Some(1))`; until then each input gets its own process
//! from `multiproc::spawn`, and `workers` threads (one per process in flight) keep the machine
//! busy: each thread takes the next input, spawns its process and blocks in `join`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::ProgressBar;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `f` over `inputs` in child processes, at most `workers` at once; results in input order.
/// `bar` ticks once per finished input.
pub fn map<F, A, R>(
    f: F,
    inputs: Vec<A>,
    workers: usize,
    bar: &ProgressBar,
) -> multiproc::Result<Vec<R>>
where
    F: Fn(A) -> R + Copy + Send + Sync + 'static,
    A: Serialize + DeserializeOwned + Clone + Send + Sync,
    R: Serialize + DeserializeOwned + Send,
{
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..inputs.len()).map(|_| None).collect());
    let first_error: Mutex<Option<multiproc::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, inputs.len().max(1)) {
            s.spawn(|| {
                loop {
                    if first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(a) = inputs.get(i) else { return };
                    match multiproc::spawn(f, a.clone()).and_then(|h| h.join()) {
                        Ok(r) => {
                            results.lock().unwrap()[i] = Some(r);
                            bar.inc(1);
                        }
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every input ran"))
        .collect())
}

/// A progress bar on standard error if it is a terminal, else a hidden one.
pub fn bar(len: usize, what: &str) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} blocks",
    ) {
        b.set_style(style);
    }
    b.set_message(what.to_string());
    b
}
