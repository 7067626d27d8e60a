//! Pool smoke test: every start method maps, applies and streams.

use multiproc::{Pool, StartMethod, get_context};

fn sq(x: u64) -> u64 {
    x * x
}

#[test]
fn smoke_each_method() {
    for m in StartMethod::ALL {
        let pool = get_context(m).pool(2).unwrap();
        assert_eq!(
            pool.map(sq, 0..10u64).unwrap(),
            (0..10).map(|x| x * x).collect::<Vec<_>>(),
            "{m}"
        );
        assert_eq!(pool.apply(sq, 9).unwrap(), 81);
        let v: Vec<u64> = pool
            .imap(sq, 0..100u64)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(v, (0..100).map(|x| x * x).collect::<Vec<_>>());
        pool.close();
        pool.join().unwrap();
    }
    let _ = Pool::new(1).unwrap();
}
