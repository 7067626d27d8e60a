//! The Python side of the suite: scripts embedded in the binary, written to a private
//! temporary directory and run with `python3` (or `$MULTIPROC_BENCH_PYTHON`; `none` turns the
//! Python column off). Each script prints one JSON line `{"value": X}` in its row's unit.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The scripts, by file name (`mp_common.py` is imported by the others; the
/// `mp_` prefix keeps them from shadowing standard modules such as `queue`).
const SCRIPTS: &[(&str, &str)] = &[
    (
        "mp_common.py",
        include_str!("../../../bench/python/mp_common.py"),
    ),
    (
        "mp_start.py",
        include_str!("../../../bench/python/mp_start.py"),
    ),
    (
        "mp_pipe.py",
        include_str!("../../../bench/python/mp_pipe.py"),
    ),
    (
        "mp_primes.py",
        include_str!("../../../bench/python/mp_primes.py"),
    ),
    (
        "mp_pool.py",
        include_str!("../../../bench/python/mp_pool.py"),
    ),
    (
        "mp_queue.py",
        include_str!("../../../bench/python/mp_queue.py"),
    ),
    (
        "mp_value.py",
        include_str!("../../../bench/python/mp_value.py"),
    ),
    (
        "mp_manager.py",
        include_str!("../../../bench/python/mp_manager.py"),
    ),
];

/// A script that runs longer than this is killed and its figure is `n/a`.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// A Python interpreter with the scripts written out.
pub struct Python {
    interpreter: String,
    dir: PathBuf,
}

impl Python {
    /// The interpreter if it is there and has `multiprocessing`, with the scripts written to a
    /// fresh temporary directory.
    pub fn find() -> Option<Python> {
        if Python::disabled() {
            return None;
        }
        let interpreter =
            std::env::var("MULTIPROC_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let ok = Command::new(&interpreter)
            .args(["-c", "import multiprocessing, json, statistics"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("multiproc-bench-{}", std::process::id()));
        let written = std::fs::create_dir_all(&dir).is_ok()
            && SCRIPTS
                .iter()
                .all(|(name, text)| std::fs::write(dir.join(name), text).is_ok());
        let p = Python { interpreter, dir };
        written.then_some(p)
    }

    /// Whether `MULTIPROC_BENCH_PYTHON` turns the Python side off (`none` or empty).
    pub fn disabled() -> bool {
        std::env::var("MULTIPROC_BENCH_PYTHON").is_ok_and(|v| v.is_empty() || v == "none")
    }

    /// Runs `script args...` and parses its figure.
    pub fn run(&self, script: &str, args: &[String]) -> Result<f64, String> {
        let mut child = Command::new(&self.interpreter)
            .arg(self.dir.join(script))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.interpreter))?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if t0.elapsed() > SCRIPT_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{script} {args:?} timed out"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e.to_string()),
            }
        };
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(format!(
                "{script} {args:?} failed ({status}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        parse_value(&stdout).ok_or_else(|| format!("{script} printed no figure: {stdout:?}"))
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `value` of the last JSON line of `stdout`.
fn parse_value(stdout: &str) -> Option<f64> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("value")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::parse_value;

    #[test]
    fn the_last_json_line_carries_the_figure() {
        assert_eq!(parse_value("noise\n{\"value\": 2.5}\n\n"), Some(2.5));
        assert_eq!(parse_value("{\"value\": null}"), None);
        assert_eq!(parse_value(""), None);
    }
}
