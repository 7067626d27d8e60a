//! Process-shared synchronization across real processes, under every start method.
//!
//! No sleeps as synchronization: a child tells the parent where it is through an `Event` (or
//! the parent polls a shared state with a deadline); every wait is bounded.

use std::time::{Duration, Instant};

use multiproc::{
    Barrier, BoundedSemaphore, Condition, Context, Error, Event, Lock, LockError, Process, RLock,
    RawValue, Semaphore, StartMethod, Value, get_context, spawn_in,
};

const LONG: Duration = Duration::from_secs(10);

fn contexts() -> [Context; 3] {
    StartMethod::ALL.map(get_context)
}

// ---------------------------------------------------------------------------------------------
// Lock / Value: exact totals
// ---------------------------------------------------------------------------------------------

fn add_locked((v, n): (Value<u64>, u64)) {
    for _ in 0..n {
        *v.lock().unwrap() += 1;
    }
}

#[test]
fn locked_value_hammered_by_processes_is_exact() {
    for ctx in contexts() {
        let v = Value::new(0u64).unwrap();
        let n = 20_000;
        let hs: Vec<_> = (0..4)
            .map(|_| spawn_in(ctx, add_locked, (v.clone(), n)).unwrap())
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(v.get().unwrap(), 4 * n, "{:?}", ctx.start_method());
    }
}

// ---------------------------------------------------------------------------------------------
// OwnerDied
// ---------------------------------------------------------------------------------------------

fn hold_forever((lock, holding): (Lock, Event)) {
    let _g = lock.acquire().unwrap();
    holding.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn die_mid_update((v, holding): (Value<[u64; 2]>, Event)) {
    let mut g = v.lock().unwrap();
    g[0] = 1; // half of an update that should keep g[0] == g[1]
    holding.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn killed_holder_gives_owner_died_to_next_acquirer_within_a_second() {
    for ctx in contexts() {
        let lock = Lock::new().unwrap();
        let holding = Event::new().unwrap();
        let mut p = Process::new(hold_forever, (lock.clone(), holding.clone())).context(ctx);
        p.start().unwrap();
        assert!(holding.wait_timeout(LONG), "child never took the lock");
        assert!(matches!(
            lock.try_acquire(),
            Err(LockError::Failed(Error::Timeout))
        ));
        p.kill().unwrap();
        let t = Instant::now();
        let r = lock.acquire_timeout(Duration::from_secs(1));
        let mut g = match r {
            Err(LockError::OwnerDied(g)) => g,
            other => panic!("expected OwnerDied, got {other:?}"),
        };
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(g.owner_died());
        drop(g);
        // Sticky until repaired: the next acquirer learns it too.
        g = lock
            .acquire_timeout(LONG)
            .unwrap_err()
            .into_guard()
            .unwrap();
        g.mark_consistent();
        drop(g);
        let g = lock.acquire_timeout(LONG).unwrap();
        assert!(!g.owner_died());
        assert!(!lock.owner_died());
        drop(g);
        p.join().unwrap();
        assert_eq!(p.exitcode(), Some(-libc::SIGKILL));
    }
}

#[test]
fn value_with_dead_holder_reports_owner_died_and_can_be_repaired() {
    let v = Value::new([0u64; 2]).unwrap();
    let holding = Event::new().unwrap();
    let mut p = Process::new(die_mid_update, (v.clone(), holding.clone()))
        .context(get_context(StartMethod::ForkServer));
    p.start().unwrap();
    assert!(holding.wait_timeout(LONG));
    p.kill().unwrap();
    p.join().unwrap();
    // `get` reports it as a plain error...
    assert!(matches!(v.get(), Err(Error::OwnerDied)));
    // ... `?` turns the LockError into Error::OwnerDied as well ...
    let via_question_mark = || -> multiproc::Result<u64> { Ok(v.lock()?[0]) };
    assert!(matches!(via_question_mark(), Err(Error::OwnerDied)));
    // ... and `lock` hands out the guard to repair with.
    match v.lock_timeout(LONG) {
        Err(LockError::OwnerDied(mut g)) => {
            assert_eq!(*g, [1, 0]);
            g[1] = g[0];
            g.mark_consistent();
        }
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    assert_eq!(v.get().unwrap(), [1, 1]);
}

#[test]
fn relocking_a_lock_in_the_same_thread_is_an_error_not_a_deadlock() {
    let lock = Lock::new().unwrap();
    let _g = lock.acquire().unwrap();
    assert!(matches!(
        lock.acquire_timeout(LONG),
        Err(LockError::Failed(Error::InvalidState(_)))
    ));
    let r = RLock::new().unwrap();
    let a = r.acquire().unwrap();
    let b = r.acquire_timeout(LONG).unwrap();
    drop((b, a));
}

fn rlock_try((r, out): (RLock, RawValue<u32>)) {
    // 1 if the child could take the RLock, 0 if not.
    out.set(r.try_acquire().is_ok() as u32);
}

#[test]
fn rlock_excludes_other_processes_until_fully_released() {
    let r = RLock::new().unwrap();
    let out = RawValue::new(7u32).unwrap();
    let a = r.acquire().unwrap();
    let b = r.acquire().unwrap();
    drop(b);
    let ctx = get_context(StartMethod::ForkServer);
    spawn_in(ctx, rlock_try, (r.clone(), out.clone()))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(out.get(), 0, "held once more: the child must not get it");
    drop(a);
    spawn_in(ctx, rlock_try, (r.clone(), out.clone()))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(out.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// Semaphore
// ---------------------------------------------------------------------------------------------

/// Takes the semaphore `rounds` times; inside, records the concurrency in `stats` =
/// [current, max].
fn sem_worker((sem, stats, rounds): (Semaphore, Value<[u32; 2]>, u32)) {
    for _ in 0..rounds {
        let _permit = sem.acquire_timeout(LONG).unwrap();
        {
            let mut s = stats.lock().unwrap();
            s[0] += 1;
            s[1] = s[1].max(s[0]);
        }
        for _ in 0..200 {
            std::hint::spin_loop();
        }
        std::thread::yield_now();
        stats.lock().unwrap()[0] -= 1;
    }
}

#[test]
fn semaphore_never_admits_more_than_its_count() {
    for ctx in contexts() {
        let sem = Semaphore::new(2).unwrap();
        let stats = Value::new([0u32; 2]).unwrap();
        let hs: Vec<_> = (0..5)
            .map(|_| spawn_in(ctx, sem_worker, (sem.clone(), stats.clone(), 300)).unwrap())
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let [cur, max] = stats.get().unwrap();
        assert_eq!(cur, 0);
        assert!((1..=2).contains(&max), "max concurrency {max}");
        assert_eq!(sem.get_value(), 2);
    }
}

#[test]
fn bounded_semaphore_refuses_extra_release() {
    let s = BoundedSemaphore::new(2).unwrap();
    assert!(matches!(s.release(), Err(Error::InvalidState(_))));
    let p = s.acquire();
    p.forget();
    assert_eq!(s.get_value(), 1);
    s.release().unwrap();
    assert!(s.release().is_err());
    let unbounded = Semaphore::new(0).unwrap();
    unbounded.release().unwrap();
    unbounded.release().unwrap();
    assert_eq!(unbounded.get_value(), 2);
}

fn sem_release(sem: Semaphore) {
    sem.release().unwrap();
}

#[test]
fn semaphore_released_by_another_process_wakes_the_waiter() {
    for ctx in contexts() {
        let sem = Semaphore::new(0).unwrap();
        let h = spawn_in(ctx, sem_release, sem.clone()).unwrap();
        let p = sem.acquire_timeout(LONG).unwrap();
        p.forget();
        h.join().unwrap();
        assert_eq!(sem.get_value(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Event and Condition
// ---------------------------------------------------------------------------------------------

fn ping_pong((go, done, rounds): (Event, Event, u32)) -> bool {
    for _ in 0..rounds {
        if !go.wait_timeout(LONG) {
            return false;
        }
        go.clear();
        done.set();
    }
    true
}

#[test]
fn event_across_processes() {
    for ctx in contexts() {
        let go = Event::new().unwrap();
        let done = Event::new().unwrap();
        let h = spawn_in(ctx, ping_pong, (go.clone(), done.clone(), 100)).unwrap();
        for _ in 0..100 {
            go.set();
            assert!(done.wait_timeout(LONG));
            done.clear();
        }
        assert!(h.join().unwrap());
    }
}

/// Waits for `flag == 1` under the condition, then sets it to 2 and notifies.
fn cond_child((cond, flag): (Condition, RawValue<u32>)) -> bool {
    let mut g = cond.acquire().unwrap();
    let ok = cond
        .wait_for(&mut g, Some(LONG), || flag.get() == 1)
        .unwrap();
    flag.set(2);
    cond.notify_all();
    ok
}

#[test]
fn condition_wait_notify_across_processes() {
    for ctx in contexts() {
        let cond = Condition::new().unwrap();
        let flag = RawValue::new(0u32).unwrap();
        let h = spawn_in(ctx, cond_child, (cond.clone(), flag.clone())).unwrap();
        {
            let mut g = cond.acquire().unwrap();
            flag.set(1);
            cond.notify_all();
            assert!(
                cond.wait_for(&mut g, Some(LONG), || flag.get() == 2)
                    .unwrap()
            );
        }
        assert!(h.join().unwrap());
    }
}

#[test]
fn condition_rejects_a_guard_of_another_lock() {
    let cond = Condition::new().unwrap();
    let other = Lock::new().unwrap();
    let mut g = other.acquire().unwrap();
    assert!(matches!(
        cond.wait_timeout(&mut g, Duration::from_millis(1)),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Barrier
// ---------------------------------------------------------------------------------------------

fn barrier_party(b: Barrier) -> Result<u32, String> {
    b.wait_timeout(LONG).map_err(|e| e.to_string())
}

#[test]
fn barrier_of_n_processes_gives_distinct_indices() {
    for ctx in contexts() {
        let b = Barrier::new(4).unwrap();
        let hs: Vec<_> = (0..3)
            .map(|_| spawn_in(ctx, barrier_party, b.clone()).unwrap())
            .collect();
        let mut idx = vec![b.wait_timeout(LONG).unwrap()];
        for h in hs {
            idx.push(h.join().unwrap().unwrap());
        }
        idx.sort();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert!(!b.broken());
        assert_eq!(b.n_waiting(), 0);
    }
}

fn barrier_expect_broken(b: Barrier) -> bool {
    matches!(b.wait_timeout(LONG), Err(Error::BrokenBarrier))
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

#[test]
fn barrier_abort_releases_waiting_processes() {
    for ctx in contexts() {
        let b = Barrier::new(3).unwrap();
        let hs: Vec<_> = (0..2)
            .map(|_| spawn_in(ctx, barrier_expect_broken, b.clone()).unwrap())
            .collect();
        assert!(wait_until(|| b.n_waiting() == 2), "children never arrived");
        b.abort();
        for h in hs {
            assert!(h.join().unwrap());
        }
        assert!(b.broken());
        assert!(matches!(b.wait_timeout(LONG), Err(Error::BrokenBarrier)));
        b.reset();
        assert!(!b.broken());
    }
}

#[test]
fn barrier_reset_breaks_waiters_and_is_reusable() {
    let ctx = get_context(StartMethod::ForkServer);
    let b = Barrier::new(2).unwrap();
    let h = spawn_in(ctx, barrier_expect_broken, b.clone()).unwrap();
    assert!(wait_until(|| b.n_waiting() == 1));
    b.reset();
    assert!(h.join().unwrap());
    // Usable again.
    let h = spawn_in(ctx, barrier_party, b.clone()).unwrap();
    let mine = b.wait_timeout(LONG).unwrap();
    assert_eq!(mine + h.join().unwrap().unwrap(), 1);
}

fn barrier_then_die(b: Barrier) {
    let _ = b.wait_timeout(LONG);
}

#[test]
fn barrier_with_a_dead_participant_times_out_and_breaks() {
    let ctx = get_context(StartMethod::ForkServer);
    let b = Barrier::with_timeout(3, Duration::from_millis(300)).unwrap();
    let mut p = Process::new(barrier_then_die, b.clone()).context(ctx);
    p.start().unwrap();
    assert!(wait_until(|| b.n_waiting() == 1));
    p.kill().unwrap();
    p.join().unwrap();
    // The third party never comes: the default timeout breaks the barrier instead of hanging.
    let t = Instant::now();
    assert!(matches!(b.wait(), Err(Error::BrokenBarrier)));
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(b.broken());
}

// ---------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------

#[test]
fn every_wait_times_out() {
    let d = Duration::from_millis(30);
    let lock = Lock::new().unwrap();
    let holding = Event::new().unwrap();
    let mut p = Process::new(hold_forever, (lock.clone(), holding.clone()))
        .context(get_context(StartMethod::Fork));
    p.start().unwrap();
    assert!(holding.wait_timeout(LONG));

    let t = Instant::now();
    assert!(matches!(
        lock.acquire_timeout(d),
        Err(LockError::Failed(Error::Timeout))
    ));
    assert!(t.elapsed() >= d);

    let sem = Semaphore::new(0).unwrap();
    let t = Instant::now();
    assert!(matches!(sem.acquire_timeout(d), Err(Error::Timeout)));
    assert!(t.elapsed() >= d);
    assert!(sem.try_acquire().is_none());

    let ev = Event::new().unwrap();
    let t = Instant::now();
    assert!(!ev.wait_timeout(d));
    assert!(t.elapsed() >= d);

    let cond = Condition::new().unwrap();
    let mut g = cond.acquire().unwrap();
    let t = Instant::now();
    assert!(!cond.wait_timeout(&mut g, d).unwrap());
    assert!(t.elapsed() >= d);
    assert!(!cond.wait_for(&mut g, Some(d), || false).unwrap());
    drop(g);

    let b = Barrier::new(2).unwrap();
    let t = Instant::now();
    assert!(matches!(b.wait_timeout(d), Err(Error::BrokenBarrier)));
    assert!(t.elapsed() >= d);

    p.kill().unwrap();
    p.join().unwrap();
}

fn notify_then_die_holding((cond, holding): (Condition, Event)) {
    let _g = cond.acquire().unwrap();
    cond.notify_all();
    holding.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn condition_wait_learns_that_the_lock_holder_died() {
    let cond = Condition::new().unwrap();
    let holding = Event::new().unwrap();
    let mut g = cond.acquire().unwrap();
    let mut p = Process::new(notify_then_die_holding, (cond.clone(), holding.clone()))
        .context(get_context(StartMethod::ForkServer));
    p.start().unwrap();
    let pid = p.pid().unwrap();
    // The child can only take the lock once our wait releases it; then it notifies (so our
    // wait ends and we block re-taking the lock) and dies holding it.
    let killer = std::thread::spawn(move || {
        let ok = holding.wait_timeout(LONG);
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        ok
    });
    let r = cond.wait_timeout(&mut g, LONG);
    assert!(killer.join().unwrap(), "child never held the lock");
    assert!(matches!(r, Err(Error::OwnerDied)), "{r:?}");
    assert!(g.owner_died(), "the guard is held and marked");
    g.mark_consistent();
    drop(g);
    assert!(cond.acquire().is_ok());
    p.join().unwrap();
}

fn hold_rlock_forever((lock, holding): (RLock, Event)) {
    let _a = lock.acquire().unwrap();
    let _b = lock.acquire().unwrap();
    holding.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn rlock_with_a_killed_holder_reports_owner_died() {
    let lock = RLock::new().unwrap();
    let holding = Event::new().unwrap();
    let mut p = Process::new(hold_rlock_forever, (lock.clone(), holding.clone()))
        .context(get_context(StartMethod::Spawn));
    p.start().unwrap();
    assert!(holding.wait_timeout(LONG));
    p.kill().unwrap();
    match lock.acquire_timeout(Duration::from_secs(1)) {
        Err(LockError::OwnerDied(mut g)) => g.mark_consistent(),
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    assert!(lock.acquire_timeout(LONG).is_ok());
    p.join().unwrap();
}

#[test]
fn a_thread_that_exits_holding_a_lock_is_a_dead_owner_too() {
    let lock = Lock::new().unwrap();
    let l2 = lock.clone();
    std::thread::spawn(move || std::mem::forget(l2.acquire().unwrap()))
        .join()
        .unwrap();
    assert!(matches!(
        lock.acquire_timeout(Duration::from_secs(1)),
        Err(LockError::OwnerDied(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Stress: many generations / rounds, where a lost wake-up would show as a timeout
// ---------------------------------------------------------------------------------------------

fn barrier_rounds((b, rounds): (Barrier, u32)) -> u64 {
    (0..rounds)
        .map(|_| b.wait_timeout(LONG).unwrap() as u64)
        .sum()
}

#[test]
fn barrier_many_generations_across_processes() {
    let ctx = get_context(StartMethod::ForkServer);
    let rounds = 300;
    let b = Barrier::new(4).unwrap();
    let hs: Vec<_> = (0..3)
        .map(|_| spawn_in(ctx, barrier_rounds, (b.clone(), rounds)).unwrap())
        .collect();
    let mut total = barrier_rounds((b.clone(), rounds));
    for h in hs {
        total += h.join().unwrap();
    }
    // Each generation hands out 0 + 1 + 2 + 3.
    assert_eq!(total, 6 * rounds as u64);
    assert!(!b.broken());
}

/// Takes turns with the parent: waits for `turn == me`, passes it to the other side.
fn cond_turns((cond, turn, me, rounds): (Condition, RawValue<u32>, u32, u32)) -> bool {
    for _ in 0..rounds {
        let mut g = cond.acquire().unwrap();
        if !cond
            .wait_for(&mut g, Some(LONG), || turn.get() == me)
            .unwrap()
        {
            return false;
        }
        turn.set(1 - me);
        cond.notify_all();
    }
    true
}

#[test]
fn condition_ping_pong_never_loses_a_notify() {
    let ctx = get_context(StartMethod::Fork);
    let cond = Condition::new().unwrap();
    let turn = RawValue::new(0u32).unwrap();
    let rounds = 500;
    let h = spawn_in(ctx, cond_turns, (cond.clone(), turn.clone(), 1, rounds)).unwrap();
    assert!(cond_turns((cond, turn, 0, rounds)));
    assert!(h.join().unwrap());
}
