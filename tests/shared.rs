//! Shared memory across processes: `Value`, `Array`, their raw forms, named `SharedMemory`,
//! and every handle passed to a child under every start method.

use std::path::Path;
use std::time::{Duration, Instant};

use multiproc::{
    Array, Barrier, BoundedSemaphore, Condition, Context, Event, Lock, Process, RLock, RawArray,
    RawValue, Semaphore, SharedMemory, StartMethod, Value, get_context, spawn_in,
};

const LONG: Duration = Duration::from_secs(10);

fn contexts() -> [Context; 3] {
    StartMethod::ALL.map(get_context)
}

fn shm_exists(name: &str) -> bool {
    Path::new("/dev/shm").join(name).exists()
}

fn shm_names_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn unique(tag: &str) -> String {
    format!("mptest_{tag}_{}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Every handle, every start method
// ---------------------------------------------------------------------------------------------

type Handles = (
    Lock,
    RLock,
    Semaphore,
    BoundedSemaphore,
    Event,
    Condition,
    Barrier,
    Value<u64>,
    Array<i32>,
    RawValue<f64>,
    RawArray<u8>,
    SharedMemory,
);

fn use_every_handle(h: Handles) -> u32 {
    let (lock, rlock, sem, bsem, ev, cond, barrier, value, array, raw_value, raw_array, shm) = h;
    drop(lock.acquire_timeout(LONG).unwrap());
    drop(rlock.acquire_timeout(LONG).unwrap());
    sem.release().unwrap();
    bsem.acquire_timeout(LONG).unwrap().forget();
    *value.lock().unwrap() += 41;
    array.lock().unwrap()[2] = -7;
    raw_value.set(2.5);
    raw_array.set(1, 9);
    shm.write_at(3, b"child").unwrap();
    {
        let _g = cond.acquire().unwrap();
        cond.notify_all();
    }
    ev.set();
    barrier.wait_timeout(LONG).unwrap()
}

#[test]
fn every_handle_passes_to_a_child_under_every_start_method() {
    for ctx in contexts() {
        let shm = SharedMemory::new(64).unwrap();
        let handles: Handles = (
            ctx.lock().unwrap(),
            ctx.rlock().unwrap(),
            ctx.semaphore(0).unwrap(),
            ctx.bounded_semaphore(1).unwrap(),
            ctx.event().unwrap(),
            ctx.condition().unwrap(),
            ctx.barrier(2).unwrap(),
            ctx.value(1u64).unwrap(),
            ctx.array(&[0i32; 4]).unwrap(),
            ctx.raw_value(0.0f64).unwrap(),
            ctx.raw_array(&[0u8; 3]).unwrap(),
            SharedMemory::open(shm.name()).unwrap(),
        );
        let (lock, rlock, sem, bsem, ev, cond, barrier, value, array, rv, ra, attached) = &handles;
        let (lock, rlock, sem, bsem, ev, cond, barrier, value, array, rv, ra) = (
            lock.clone(),
            rlock.clone(),
            sem.clone(),
            bsem.clone(),
            ev.clone(),
            cond.clone(),
            barrier.clone(),
            value.clone(),
            array.clone(),
            rv.clone(),
            ra.clone(),
        );
        assert!(!attached.is_creator());
        // Also through Process (not only spawn).
        let mut p = Process::new(use_every_handle, handles).context(ctx);
        p.start().unwrap();
        let mine = barrier.wait_timeout(LONG).unwrap();
        assert!(mine <= 1);
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(0), "{:?}", ctx.start_method());
        assert!(ev.is_set());
        assert_eq!(sem.get_value(), 1);
        assert_eq!(bsem.get_value(), 0);
        assert_eq!(value.get().unwrap(), 42);
        assert_eq!(array.to_vec().unwrap(), vec![0, 0, -7, 0]);
        assert_eq!(rv.get(), 2.5);
        assert_eq!(ra.to_vec(), vec![0, 9, 0]);
        let mut buf = [0u8; 5];
        shm.read_at(3, &mut buf).unwrap();
        assert_eq!(&buf, b"child");
        drop(lock.try_acquire().unwrap());
        drop(rlock.try_acquire().unwrap());
        drop(cond.acquire().unwrap());
        drop(p);
    }
}

// ---------------------------------------------------------------------------------------------
// Value: the lost-update demonstration, and Array
// ---------------------------------------------------------------------------------------------

fn racy_add((v, n, go): (Value<u64>, u64, Event)) {
    go.wait_timeout(LONG);
    for _ in 0..n {
        // Two separately locked steps: another process can slip in between.
        let x = v.get().unwrap();
        v.set(x + 1).unwrap();
    }
}

fn locked_add((v, n, go): (Value<u64>, u64, Event)) {
    go.wait_timeout(LONG);
    for _ in 0..n {
        *v.lock().unwrap() += 1;
    }
}

fn run_adders<F>(ctx: Context, f: F, n: u64) -> u64
where
    F: Fn((Value<u64>, u64, Event)) + Copy + Send + 'static,
{
    let v = Value::new(0u64).unwrap();
    let go = Event::new().unwrap();
    let hs: Vec<_> = (0..2)
        .map(|_| spawn_in(ctx, f, (v.clone(), n, go.clone())).unwrap())
        .collect();
    go.set();
    for h in hs {
        h.join().unwrap();
    }
    v.get().unwrap()
}

#[test]
fn get_then_set_may_lose_increments_but_the_guard_never_does() {
    let ctx = get_context(StartMethod::Fork);
    let n = 50_000;
    assert_eq!(run_adders(ctx, locked_add, n), 2 * n);
    // Lost updates are likely but not certain on a quiet machine: only the bound is a fact.
    assert!(run_adders(ctx, racy_add, n) <= 2 * n);
}

fn fill_array((a, i): (Array<f64>, usize)) {
    let mut g = a.lock().unwrap();
    g[i] = (i * i) as f64;
}

#[test]
fn array_written_by_several_processes() {
    for ctx in contexts() {
        let a = Array::<f64>::new(6).unwrap();
        let hs: Vec<_> = (0..6)
            .map(|i| spawn_in(ctx, fill_array, (a.clone(), i)).unwrap())
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(a.to_vec().unwrap(), vec![0.0, 1.0, 4.0, 9.0, 16.0, 25.0]);
    }
}

#[test]
fn anonymous_objects_leave_nothing_in_dev_shm() {
    let before = shm_names_with_prefix("");
    let mut keep = Vec::new();
    for i in 0..100u64 {
        keep.push((
            Value::new(i).unwrap(),
            Array::<u8>::new(10).unwrap(),
            Lock::new().unwrap(),
            Event::new().unwrap(),
        ));
    }
    let after: Vec<_> = shm_names_with_prefix("")
        .into_iter()
        .filter(|n| !before.contains(n) && n.contains(&std::process::id().to_string()))
        .collect();
    assert!(after.is_empty(), "{after:?}");
}

// ---------------------------------------------------------------------------------------------
// SharedMemory
// ---------------------------------------------------------------------------------------------

#[test]
fn create_open_unlink() {
    let name = unique("basic");
    let mut a = SharedMemory::create(&name, 4096).unwrap();
    assert_eq!(a.name(), name);
    assert_eq!(a.size(), 4096);
    assert!(a.is_creator());
    assert!(shm_exists(&name));
    // A second create of the same name fails.
    assert!(SharedMemory::create(&name, 10).is_err());
    let b = SharedMemory::open(&format!("/{name}")).unwrap();
    a.write_at(4090, b"abcdef").unwrap();
    assert!(a.write_at(4091, b"abcdef").is_err());
    let mut buf = [0u8; 6];
    b.read_at(4090, &mut buf).unwrap();
    assert_eq!(&buf, b"abcdef");
    // SAFETY: no other process writes the segment during this test.
    assert_eq!(unsafe { &b.as_slice()[4090..] }, b"abcdef");
    a.unlink().unwrap();
    assert!(!shm_exists(&name));
    // The mappings outlive the name.
    b.read_at(4090, &mut buf).unwrap();
    assert_eq!(&buf, b"abcdef");
    assert!(SharedMemory::open(&name).is_err());
    drop(a); // does not unlink again (would fail silently anyway)
    assert!(SharedMemory::create("bad/name", 1).is_err());
    assert!(SharedMemory::create(&unique("zero"), 0).is_err());
}

#[test]
fn thousand_create_drop_cycles_leave_dev_shm_as_it_was() {
    let prefix = unique("cycle");
    assert!(shm_names_with_prefix(&prefix).is_empty());
    for i in 0..1000 {
        let name = format!("{prefix}_{i}");
        let s = SharedMemory::create(&name, 4096).unwrap();
        s.write_at(0, &[1]).unwrap();
        let o = SharedMemory::open(&name).unwrap();
        drop(o);
        drop(s);
    }
    let mut fresh = Vec::new();
    for _ in 0..10 {
        let s = SharedMemory::new(100).unwrap();
        assert!(shm_exists(s.name()));
        fresh.push(s.name().to_string());
    }
    assert!(shm_names_with_prefix(&prefix).is_empty());
    for n in fresh {
        assert!(!shm_exists(&n), "{n} left behind");
    }
}

fn attach_write_exit(shm: SharedMemory) {
    assert!(!shm.is_creator());
    shm.write_at(0, b"was here").unwrap();
}

#[test]
fn an_attached_process_exiting_does_not_unlink_the_segment() {
    // CPython gh-82300: attaching registered the segment with a tracker that unlinked it when
    // the attaching process ended, destroying it for the creator and everybody else.
    for ctx in contexts() {
        let name = unique(&format!("attach_{}", ctx.start_method()));
        let shm = SharedMemory::create(&name, 64).unwrap();
        let h = spawn_in(ctx, attach_write_exit, SharedMemory::open(&name).unwrap()).unwrap();
        h.join().unwrap();
        assert!(shm_exists(&name));
        let again = SharedMemory::open(&name).unwrap();
        let mut buf = [0u8; 8];
        again.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"was here");
        drop(shm);
        assert!(!shm_exists(&name));
    }
}

fn create_and_hang((name, created): (String, Event)) {
    let shm = SharedMemory::create(&name, 4096).unwrap();
    created.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        shm.write_at(0, &[1]).unwrap();
    }
}

#[test]
fn a_sigkilled_creator_leaves_nothing_behind() {
    // Fork children inherit their parent's tracker pipe (they are its clients, so their names
    // live until the parent too is gone); the other methods start with a fresh process.
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let name = unique(&format!("killed_{m}"));
        let created = Event::new().unwrap();
        let mut p =
            Process::new(create_and_hang, (name.clone(), created.clone())).context(get_context(m));
        p.start().unwrap();
        assert!(
            created.wait_timeout(LONG),
            "child never created the segment"
        );
        assert!(shm_exists(&name));
        p.kill().unwrap();
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(-libc::SIGKILL));
        // The tracker notices the end of its client asynchronously: poll with a deadline.
        let deadline = Instant::now() + LONG;
        while shm_exists(&name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!shm_exists(&name), "{m}: {name} leaked in /dev/shm");
    }
}

static HALFWAY: std::sync::OnceLock<Event> = std::sync::OnceLock::new();

/// In the victim: the segment exists under its private name; tell the test, hang until killed.
fn hang_halfway() {
    HALFWAY.get().expect("set before create").set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn create_and_hang_halfway((name, halfway): (String, Event)) {
    let _ = HALFWAY.set(halfway);
    multiproc::shared_memory::set_test_hook(Some(hang_halfway));
    let _ = SharedMemory::create(&name, 4096);
    unreachable!("killed inside create");
}

#[test]
fn a_creator_killed_inside_create_leaves_nothing_behind() {
    // Killed with the segment made but not yet under its name: before the tracker learnt of
    // names first, this leaked a name in /dev/shm.
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let name = unique(&format!("halfway_{m}"));
        let halfway = Event::new().unwrap();
        let mut p = Process::new(create_and_hang_halfway, (name.clone(), halfway.clone()))
            .context(get_context(m));
        p.start().unwrap();
        assert!(halfway.wait_timeout(LONG), "child never got halfway");
        let pid = p.pid().unwrap();
        let private = shm_names_with_prefix(&format!("psm_new_{pid:08x}_"));
        assert_eq!(private.len(), 1, "the segment exists under a private name");
        assert!(!shm_exists(&name), "not yet under its own");
        p.kill().unwrap();
        p.join().unwrap();
        // The tracker notices the end of its client asynchronously: poll with a deadline.
        let deadline = Instant::now() + LONG;
        while shm_exists(&private[0]) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!shm_exists(&private[0]), "{m}: {} leaked", private[0]);
        assert!(!shm_exists(&name), "{m}: {name} appeared");
    }
}

fn create_and_forget((name, created): (String, Event)) {
    let shm = SharedMemory::create(&name, 64).unwrap();
    std::mem::forget(shm); // as if killed: no destructor
    created.set();
}

#[test]
fn a_creator_that_skips_its_destructor_is_cleaned_up_at_exit() {
    for m in [StartMethod::ForkServer, StartMethod::Spawn] {
        let name = unique(&format!("forgot_{m}"));
        let created = Event::new().unwrap();
        let h = spawn_in(
            get_context(m),
            create_and_forget,
            (name.clone(), created.clone()),
        )
        .unwrap();
        h.join().unwrap();
        let deadline = Instant::now() + LONG;
        while shm_exists(&name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!shm_exists(&name), "{m}: {name} leaked");
    }
}

fn create_and_unlink(name: String) -> u32 {
    let mut s = SharedMemory::create(&name, 64).unwrap();
    s.unlink().unwrap();
    0
}

/// In a fresh process: one thread starts the shared-memory tracker (holding its lock for the
/// whole start) while this one forks children that create segments themselves.
fn fork_while_the_tracker_starts(round: u32) -> u32 {
    let me = std::process::id();
    let starter = std::thread::spawn(move || create_and_unlink(format!("mptest_trk_{me}_{round}")));
    let fork = get_context(StartMethod::Fork);
    let kids: Vec<_> = (0..16)
        .map(|i| {
            spawn_in(
                fork,
                create_and_unlink,
                format!("mptest_trk_{me}_{round}_{i}"),
            )
            .unwrap()
        })
        .collect();
    starter.join().unwrap();
    for k in kids {
        // A child forked while the tracker's lock was held would wait for it forever.
        k.join_timeout(LONG).unwrap();
    }
    0
}

#[test]
fn children_forked_while_the_tracker_starts_never_hang() {
    for round in 0..4 {
        // A fresh process each round: the tracker starts once per process.
        let h = spawn_in(
            get_context(StartMethod::Spawn),
            fork_while_the_tracker_starts,
            round,
        )
        .unwrap();
        h.join_timeout(3 * LONG).unwrap();
    }
}
