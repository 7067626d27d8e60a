//! The `multiproc` program end to end: results checked against independent oracles, JSON
//! shapes checked field by field. No timing is asserted (figures live in `multiproc bench`).

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `multiproc ARGS` with extra environment, killing it past `limit`.
fn run(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_multiproc"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("multiproc runs");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).map(|_| v)
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("multiproc {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap().unwrap(),
        stderr: err_t.join().unwrap().unwrap(),
    }
}

fn ok_json(args: &[&str], env: &[(&str, &str)]) -> Vec<Value> {
    let o = run(args, env, Duration::from_secs(100));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "multiproc {args:?} failed: {stderr}");
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Primes below `hi` from `lo` by a sieve: an oracle independent of trial division.
fn sieve_count(lo: usize, hi: usize) -> u64 {
    let mut composite = vec![false; hi];
    let mut count = 0;
    for n in 2..hi {
        if !composite[n] {
            count += u64::from(n >= lo);
            (n * n..hi).step_by(n).for_each(|m| composite[m] = true);
        }
    }
    count
}

#[test]
fn primes_json_counts_right_in_parallel() {
    let v = ok_json(
        &[
            "primes",
            "--from",
            "1000",
            "--to",
            "20000",
            "--workers",
            "2",
            "--json",
        ],
        &[],
    );
    assert_eq!(v.len(), 1, "one JSON object: {v:?}");
    let o = &v[0];
    assert_eq!(o["command"], "primes");
    assert_eq!(o["count"].as_u64(), Some(sieve_count(1000, 20000)));
    assert_eq!(o["workers"].as_u64(), Some(2));
    assert!(o["blocks"].as_u64().unwrap() >= 2);
    for k in ["sequential_s", "parallel_s", "speedup", "efficiency"] {
        assert!(o[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {o}");
    }
}

#[test]
fn primes_text_names_count_and_times() {
    let o = run(
        &["primes", "--from", "0", "--to", "1000", "--workers", "3"],
        &[],
        Duration::from_secs(60),
    );
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("primes in [0, 1000): 168"), "{text}");
    for word in ["sequential", "parallel", "speedup", "efficiency"] {
        assert!(text.contains(word), "{word} missing in {text}");
    }
}

#[test]
fn pi_json_is_close_to_pi() {
    let v = ok_json(&["pi", "--samples", "100000", "--json"], &[]);
    assert_eq!(v.len(), 1);
    let o = &v[0];
    assert_eq!(o["samples"].as_u64(), Some(100_000));
    let pi = o["pi"].as_f64().unwrap();
    // The standard error of 100k samples is about 0.005: 0.05 is ten of them.
    assert!((pi - std::f64::consts::PI).abs() < 0.05, "pi = {pi}");
    assert_eq!(4.0 * o["hits"].as_f64().unwrap() / 100_000.0, pi);
}

#[test]
fn pi_does_not_depend_on_the_worker_count() {
    // Each block draws from its own generator seeded by the block's index (seed 002's pitfall
    // is workers sharing one state), so who draws a block does not change what it draws.
    let one = ok_json(
        &["pi", "--samples", "50000", "--workers", "1", "--json"],
        &[],
    );
    let three = ok_json(
        &["pi", "--samples", "50000", "--workers", "3", "--json"],
        &[],
    );
    assert_eq!(one[0]["hits"], three[0]["hits"]);
    assert_eq!(three[0]["workers"].as_u64(), Some(3));
}

fn check_rows(v: &[Value], ids: &[&str]) {
    let got: Vec<&str> = v.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(got, ids);
    for o in v {
        let keys: Vec<&String> = o.as_object().unwrap().keys().collect();
        let mut keys: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        // Figures printed beside a row (another Python variant, a ceiling, private memory):
        // only some rows have them, each null or a positive number.
        if let Some(beside) = o.get("beside") {
            let beside = beside.as_object().expect("`beside` is an object");
            assert!(!beside.is_empty(), "an empty `beside`: {o}");
            for (name, x) in beside {
                assert!(
                    x.is_null() || x.as_f64().is_some_and(|x| x > 0.0),
                    "beside {name} must be null or a positive number: {o}"
                );
            }
            keys.retain(|&k| k != "beside");
        }
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "higher_is_better",
                "id",
                "limit",
                "multiproc",
                "python",
                "unit"
            ],
            "{o}"
        );
        assert!(o["unit"].is_string());
        assert!(o["higher_is_better"].is_boolean());
        for k in ["multiproc", "python", "limit"] {
            assert!(
                o[k].is_null() || o[k].as_f64().is_some_and(|x| x > 0.0),
                "{k} must be null or a positive number: {o}"
            );
        }
    }
}

#[test]
fn bench_quick_json_rows() {
    let v = ok_json(
        &[
            "bench",
            "--quick",
            "--only",
            "start_fork,pipe_rtt",
            "--json",
        ],
        &[],
    );
    check_rows(&v, &["pipe_rtt", "start_fork"]);
    let start = &v[1];
    assert_eq!(start["unit"], "ms");
    assert_eq!(start["higher_is_better"], false);
    assert!(start["multiproc"].as_f64().is_some(), "{start}");
    assert!(start["limit"].as_f64().is_some(), "{start}");
    let rtt = &v[0];
    assert_eq!(rtt["unit"], "us");
    assert!(rtt["multiproc"].as_f64().is_some(), "{rtt}");
    assert!(rtt["limit"].as_f64().is_some(), "{rtt}");
}

#[test]
fn bench_measures_the_pool_pipe_and_manager_rows() {
    let ids = [
        "map_default",
        "map_chunk1",
        "apply_rtt",
        "pipe_small",
        "pipe_large",
        "manager_dict",
        "worker_rss",
    ];
    let v = ok_json(
        &["bench", "--quick", "--only", &ids.join(","), "--json"],
        &[("MULTIPROC_BENCH_PYTHON", "none")],
    );
    check_rows(&v, &ids);
    for o in &v {
        assert!(
            o["multiproc"].as_f64().is_some(),
            "no multiproc figure: {o}"
        );
    }
    // The worker's private memory is part of its resident memory.
    let rss = &v[6];
    let uss = rss["beside"]["multiproc private (USS)"].as_f64();
    assert!(
        uss.is_some_and(|u| u < rss["multiproc"].as_f64().unwrap()),
        "{rss}"
    );
}

#[test]
fn bench_without_python_gives_null_and_succeeds() {
    let v = ok_json(
        &[
            "bench",
            "--quick",
            "--only",
            "start_spawn,value_lock",
            "--json",
        ],
        &[("MULTIPROC_BENCH_PYTHON", "none")],
    );
    check_rows(&v, &["start_spawn", "value_lock"]);
    assert!(v.iter().all(|o| o["python"].is_null()));
    // start_spawn's limit is fork+exec of this same binary, which must exit at once and cleanly.
    assert!(v[0]["multiproc"].as_f64().is_some() && v[0]["limit"].as_f64().is_some());
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["bench", "--only", "no_such_row"][..],
        &["primes", "--workers", "0"],
        &["primes", "--from", "10", "--to", "5"],
        &["pi", "--samples", "0"],
    ] {
        let o = run(args, &[], Duration::from_secs(30));
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!o.stderr.is_empty(), "{args:?} should say why");
    }
}
