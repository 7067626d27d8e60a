//! Property: with N producer processes and M consumer processes sharing one queue, and random
//! message sizes (small ones copied under the lock, large ones outside it, a small ring so it
//! wraps and pushes back), the multiset of messages received equals the multiset sent, every
//! payload arrives intact, and each consumer sees each producer's messages in order.

use std::time::Duration;

use multiproc::{Error, Queue, StartMethod, get_context, spawn_in};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

const LONG: Duration = Duration::from_secs(30);

/// (producer, sequence number, payload): the payload is derived from the first two.
type Msg = Option<(u32, u32, ByteBuf)>;

fn payload(producer: u32, seq: u32, len: u32) -> ByteBuf {
    let seed = producer.wrapping_mul(2_654_435_761) ^ seq;
    ByteBuf::from(
        (0..len)
            .map(|i| (seed.wrapping_add(i.wrapping_mul(31)) >> 3) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn producer((q, id, sizes): (Queue<Msg>, u32, Vec<u32>)) -> u32 {
    for (seq, &len) in sizes.iter().enumerate() {
        q.put_timeout(Some((id, seq as u32, payload(id, seq as u32, len))), LONG)
            .unwrap();
    }
    sizes.len() as u32
}

fn consumer(q: Queue<Msg>) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    let mut last: Vec<Option<u32>> = Vec::new();
    loop {
        match q.get_timeout(LONG) {
            Ok(Some((id, seq, data))) => {
                assert_eq!(data, payload(id, seq, data.len() as u32), "payload intact");
                let i = id as usize;
                if last.len() <= i {
                    last.resize(i + 1, None);
                }
                assert!(last[i].is_none_or(|l| l < seq), "per-producer order");
                last[i] = Some(seq);
                got.push((id, seq));
            }
            Ok(None) => return got,
            Err(e) => panic!("consumer: {e}"),
        }
    }
}

fn size_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0u32..64,
        3 => 64u32..4096,
        1 => 16_000u32..200_000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn received_multiset_equals_sent(
        sizes in prop::collection::vec(prop::collection::vec(size_strategy(), 0..60), 1..4),
        consumers in 1usize..4,
        maxsize in prop_oneof![Just(0usize), 1usize..8],
        ring_kib in 512usize..2048,
        fork in any::<bool>(),
    ) {
        let ctx = get_context(if fork { StartMethod::Fork } else { StartMethod::ForkServer });
        let q: Queue<Msg> = Queue::with_limits(maxsize, ring_kib * 1024).unwrap();
        let cs: Vec<_> = (0..consumers)
            .map(|_| spawn_in(ctx, consumer, q.clone()).unwrap())
            .collect();
        let ps: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(id, s)| spawn_in(ctx, producer, (q.clone(), id as u32, s.clone())).unwrap())
            .collect();
        for (p, s) in ps.into_iter().zip(&sizes) {
            prop_assert_eq!(p.join_timeout(LONG).unwrap(), s.len() as u32);
        }
        for _ in 0..consumers {
            q.put_timeout(None, LONG).unwrap();
        }
        let mut got: Vec<(u32, u32)> = Vec::new();
        for c in cs {
            got.extend(c.join_timeout(LONG).unwrap());
        }
        got.sort();
        let mut sent: Vec<(u32, u32)> = sizes
            .iter()
            .enumerate()
            .flat_map(|(id, s)| (0..s.len() as u32).map(move |seq| (id as u32, seq)))
            .collect();
        sent.sort();
        prop_assert_eq!(got, sent);
        prop_assert!(matches!(q.try_get(), Err(Error::Empty)));
        prop_assert_eq!(q.qsize(), 0);
    }
}
