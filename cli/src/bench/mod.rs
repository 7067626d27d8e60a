//! `multiproc bench`: the benchmark suite.
//!
//! Each row is one [`Row`] registration in [`rows::ROWS`]: an id, a unit, whether higher is
//! better, and three measurements taken in the same run: the crate's (`multiproc`), Python's
//! `multiprocessing` (a script from `bench/python/`, run with `python3` when present) and the
//! raw limit (the same operation with bare system calls). The crate's side and the limit are
//! sampled in alternation, a warm-up and three rounds, and each figure is a median of three. A side that does not exist yet
//! returns `Ok(None)` and prints `n/a` (JSON `null`); a side that fails prints a warning on
//! standard error and `n/a`, and the command exits non-zero at the end if a `multiproc` or
//! limit side failed (Python's failures are only warnings: its set-up varies between machines).

mod ceiling;
mod python;
mod rows;

use std::collections::{BTreeMap, HashSet};

use clap::Args;
use serde::Serialize;

pub use python::Python;

/// Arguments of `multiproc bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Shrink every workload so the whole suite runs in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Only these rows (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print one JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
}

/// What every measurement gets.
pub struct Cfg {
    /// `--quick`: small workloads.
    pub quick: bool,
    /// The Python interpreter and the scripts, if Python is available.
    pub python: Option<Python>,
}

impl Cfg {
    /// `full` normally, `quick` with `--quick`.
    pub fn size(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// Runs the Python script `script` with `args`; `Ok(None)` without Python.
    pub fn py(&self, script: &str, args: &[String]) -> Measured {
        match &self.python {
            Some(p) => p.run(script, args).map(Some),
            None => Ok(None),
        }
    }
}

/// One measurement: `Ok(None)` where it does not exist (yet), `Err` when it failed.
pub type Measured = Result<Option<f64>, String>;

/// A measurement function.
pub type Measure = fn(&Cfg) -> Measured;

/// One row of the suite.
pub struct Row {
    /// The row's id (SPEC's names).
    pub id: &'static str,
    /// The unit of all three figures.
    pub unit: &'static str,
    /// Whether a higher figure is better (throughputs) or lower (latencies, times, memory).
    pub higher_is_better: bool,
    /// One sample of the crate's figure (the runner takes the median of three, see [`paired`]).
    pub multiproc: Measure,
    /// Python's `multiprocessing` figure (its script takes its own median of three).
    pub python: Measure,
    /// One sample of the raw limit.
    pub limit: Measure,
    /// Further figures printed beside the row (another Python variant, an in-process
    /// ceiling), each measured once: name and measurement.
    pub beside: &'static [(&'static str, Measure)],
}

/// The crate's side and the limit of `row`: a warm-up round, then three rounds, each taking
/// one sample of the crate's side and then one of the limit, so that both see the same machine
/// (these VMs drift); each figure is the median of its three samples. Also says whether a side
/// failed.
fn paired(cfg: &Cfg, row: &Row) -> (Option<f64>, Option<f64>, bool) {
    let mut sides = [
        ("multiproc", row.multiproc, Some(Vec::new())),
        ("limit", row.limit, Some(Vec::new())),
    ];
    let mut failed = false;
    for round in 0..4 {
        for (name, f, samples) in sides.iter_mut() {
            let Some(v) = samples else { continue };
            match f(cfg) {
                Ok(Some(x)) if x.is_finite() => {
                    if round > 0 {
                        v.push(x);
                    }
                }
                Ok(Some(x)) => {
                    eprintln!("multiproc bench: {} ({name}): not a figure: {x}", row.id);
                    failed = true;
                    *samples = None;
                }
                Ok(None) => *samples = None,
                Err(e) => {
                    eprintln!("multiproc bench: {} ({name}): {e}", row.id);
                    failed = true;
                    *samples = None;
                }
            }
        }
    }
    let [(_, _, m), (_, _, l)] = sides;
    let med = |v: Option<Vec<f64>>| v.map(multiproc::bench_support::median);
    (med(m), med(l), failed)
}

/// The not-yet side of a row.
pub fn none(_: &Cfg) -> Measured {
    Ok(None)
}

/// One line of output.
#[derive(Serialize)]
struct Line {
    id: &'static str,
    unit: &'static str,
    multiproc: Option<f64>,
    python: Option<f64>,
    limit: Option<f64>,
    higher_is_better: bool,
    /// The row's further figures (same unit), by name; absent when the row has none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    beside: BTreeMap<&'static str, Option<f64>>,
}

/// `multiproc bench`.
pub fn run(a: &BenchArgs) -> Result<(), String> {
    let known: HashSet<&str> = rows::ROWS.iter().map(|r| r.id).collect();
    let unknown: Vec<&String> = a
        .only
        .iter()
        .filter(|id| !known.contains(id.as_str()))
        .collect();
    if !unknown.is_empty() {
        let ids: Vec<&str> = rows::ROWS.iter().map(|r| r.id).collect();
        return Err(format!(
            "unknown row(s) {unknown:?}; rows are {}",
            ids.join(", ")
        ));
    }
    let selected: Vec<&Row> = rows::ROWS
        .iter()
        .filter(|r| a.only.is_empty() || a.only.iter().any(|id| id == r.id))
        .collect();
    let cfg = Cfg {
        quick: a.quick,
        python: Python::find(),
    };
    if cfg.python.is_none() && !Python::disabled() {
        eprintln!(
            "multiproc bench: no usable python3 (MULTIPROC_BENCH_PYTHON names another \
             interpreter, `none` turns this off): the Python column is n/a"
        );
    }
    if !a.json {
        print_header();
    }
    let mut failed = false;
    for row in selected {
        let (multiproc, limit, bad) = paired(&cfg, row);
        failed |= bad;
        let python = match (row.python)(&cfg) {
            Ok(v) => v.filter(|x| x.is_finite()),
            Err(e) => {
                // Python's set-up varies between machines: a warning, not a failure.
                eprintln!("multiproc bench: {} (python): {e}", row.id);
                None
            }
        };
        let beside = row
            .beside
            .iter()
            .map(|(name, f)| {
                let v = match f(&cfg) {
                    Ok(v) => v.filter(|x| x.is_finite()),
                    Err(e) => {
                        eprintln!("multiproc bench: {} ({name}): {e}", row.id);
                        None
                    }
                };
                (*name, v)
            })
            .collect();
        let line = Line {
            id: row.id,
            unit: row.unit,
            multiproc,
            python,
            limit,
            higher_is_better: row.higher_is_better,
            beside,
        };
        if a.json {
            println!(
                "{}",
                serde_json::to_string(&line).map_err(|e| e.to_string())?
            );
        } else {
            print_row(&line);
        }
    }
    if failed {
        return Err("some measurements failed (see above)".into());
    }
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(x) if x != 0.0 && (x.abs() >= 1e6 || x.abs() < 1e-3) => format!("{x:.3e}"),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.4}"),
    }
}

fn print_header() {
    println!(
        "{:<17} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "id", "unit", "multiproc", "python", "limit", "x python", "/ limit"
    );
}

fn print_row(l: &Line) {
    // How many times better than Python, and the crate's figure over the limit.
    let vs_py = match (l.multiproc, l.python) {
        (Some(m), Some(p)) if m > 0.0 && p > 0.0 => {
            Some(if l.higher_is_better { m / p } else { p / m })
        }
        _ => None,
    };
    let vs_limit = match (l.multiproc, l.limit) {
        (Some(m), Some(x)) if x > 0.0 => Some(m / x),
        _ => None,
    };
    println!(
        "{:<17} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10}",
        l.id,
        l.unit,
        fmt(l.multiproc),
        fmt(l.python),
        fmt(l.limit),
        vs_py.map_or("".into(), |v| format!("{v:.2}x")),
        vs_limit.map_or("".into(), |v| format!("{v:.2}")),
    );
    for (name, v) in &l.beside {
        println!("{:<17} {:>6} {name}: {}", "", "", fmt(*v));
    }
}
