//! `multiproc::dummy::Pool`: the Pool API on threads, against a sequential oracle.

use std::time::{Duration, Instant};

use multiproc::Error;
use multiproc::dummy::Pool;
use proptest::prelude::*;

fn sq(x: i64) -> i64 {
    x * x
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn every_method_matches_sequential(v in proptest::collection::vec(-1000i64..1000, 0..200),
                                       cs in 1usize..30) {
        let p = Pool::new(3).unwrap();
        let want: Vec<i64> = v.iter().map(|&x| sq(x)).collect();
        prop_assert_eq!(&p.map(sq, v.clone()).unwrap(), &want);
        prop_assert_eq!(&p.map_chunksize(sq, v.clone(), cs).unwrap(), &want);
        prop_assert_eq!(&p.map_async_chunksize(sq, v.clone(), cs).unwrap().get().unwrap(), &want);
        prop_assert_eq!(&p.starmap(|(a, b): (i64, i64)| a * b, v.iter().map(|&x| (x, x))).unwrap(), &want);
        prop_assert_eq!(&p.starmap_async_chunksize(|(a, b): (i64, i64)| a * b, v.iter().map(|&x| (x, x)), cs).unwrap().get().unwrap(), &want);
        let got: Vec<i64> = p.imap_chunksize(sq, v.clone(), cs).unwrap().map(Result::unwrap).collect();
        prop_assert_eq!(&got, &want);
        let mut got: Vec<i64> = p.imap_unordered_chunksize(sq, v.clone(), cs).unwrap().map(Result::unwrap).collect();
        let mut w = want.clone();
        got.sort();
        w.sort();
        prop_assert_eq!(got, w);
        if let Some(&x) = v.first() {
            prop_assert_eq!(p.apply(sq, x).unwrap(), sq(x));
        }
    }
}

#[test]
fn closures_may_capture_and_panics_are_errors() {
    let p = Pool::new(2).unwrap();
    let k = 3;
    assert_eq!(p.map(move |x: i32| x * k, 1..4).unwrap(), vec![3, 6, 9]);
    let r = p.map(|x: i32| if x == 2 { panic!("two") } else { x }, 0..5);
    assert!(matches!(r, Err(Error::Panicked { message, .. }) if message.contains("two")));
    let all: Vec<_> = p
        .imap(|x: i32| if x == 2 { panic!("two") } else { x }, 0..5)
        .unwrap()
        .collect();
    assert_eq!(all.iter().filter(|r| r.is_err()).count(), 1);
}

#[test]
fn imap_is_lazy_on_endless_input() {
    let p = Pool::new(2).unwrap();
    let first: Vec<u64> = p
        .imap(|x: u64| x + 1, 0u64..)
        .unwrap()
        .take(100)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first, (1..=100).collect::<Vec<_>>());
}

#[test]
fn async_result_timeouts_callbacks_and_terminate() {
    let p = Pool::builder().processes(1).build().unwrap();
    let slow = p
        .apply_async(|ms: u64| std::thread::sleep(Duration::from_millis(ms)), 200)
        .unwrap();
    assert!(matches!(
        slow.get_timeout(Duration::from_millis(5)),
        Err(Error::Timeout)
    ));
    let queued = p.apply_async(sq, 4).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let queued = queued.error_callback(move |e| tx.send(e.to_string()).unwrap());
    let t = Instant::now();
    p.terminate();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(matches!(queued.get(), Err(Error::PoolTerminated)));
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
    assert!(p.apply(sq, 1).is_err());
    p.join().unwrap();
}

#[test]
fn failing_initializer_fails_creation() {
    let r = Pool::builder()
        .processes(2)
        .initializer(|_: ()| panic!("nope"), ())
        .build();
    assert!(matches!(r, Err(Error::Panicked { message, .. }) if message.contains("nope")));
}

#[test]
fn close_and_join() {
    let p = Pool::new(2).unwrap();
    let r = p.map_async(sq, 0..10).unwrap();
    assert!(p.join().is_err());
    p.close();
    p.join().unwrap();
    assert_eq!(r.get().unwrap().len(), 10);
}
