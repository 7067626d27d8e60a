//! Running a function over a list of inputs on a [`multiproc::Pool`], one input per task
//! (chunk size 1, as the seed tutorials' `pool.map(f, blocks, chunksize=1)`), with a progress
//! bar that ticks as each result comes back (in input order, through `imap`).

use indicatif::ProgressBar;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `f` over `inputs` on `pool`; results in input order. `bar` ticks once per finished input.
pub fn map<F, A, R>(
    pool: &multiproc::Pool,
    f: F,
    inputs: Vec<A>,
    bar: &ProgressBar,
) -> multiproc::Result<Vec<R>>
where
    F: Fn(A) -> R + Copy + Send + 'static,
    A: Serialize + DeserializeOwned + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    pool.imap(f, inputs)?.inspect(|_| bar.inc(1)).collect()
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
