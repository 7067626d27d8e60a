use multiproc::{Process, StartMethod, get_context};

fn add((a, b): (i32, i32)) -> i32 {
    a + b
}
fn exit3(_: ()) {
    std::process::exit(3)
}

#[test]
fn each_method_runs_and_returns() {
    for m in StartMethod::ALL {
        let ctx = get_context(m);
        let h = multiproc::spawn_in(ctx, add, (2, 40)).unwrap();
        assert_eq!(h.join().unwrap(), 42, "{m}");
        let mut p = Process::new(exit3, ()).context(ctx);
        p.start().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(3), "{m}");
    }
}
