//! Pipe and Connection: values, bytes, limits, EOF, descriptor passing, `wait`, and
//! connections handed to children under every start method.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use multiproc::connection::{Waitable, fuzz_frame_decoder, wait};
use multiproc::{Connection, Error, Pipe, Process, StartMethod, get_context};

const T: Duration = Duration::from_secs(10);

fn raw_writer<T>(c: &Connection<T>) -> UnixStream {
    UnixStream::from(c.fileno().unwrap().try_clone_to_owned().unwrap())
}

#[test]
fn values_and_bytes_round_trip() {
    let (mut a, mut b) = Pipe::<(u32, String, Vec<i64>)>::new(true).unwrap();
    for i in 0..100 {
        a.send(&(i, format!("m{i}"), vec![-1; i as usize])).unwrap();
    }
    for i in 0..100 {
        assert_eq!(
            b.recv().unwrap(),
            (i, format!("m{i}"), vec![-1; i as usize])
        );
    }
    b.send(&(1, "back".into(), vec![])).unwrap();
    assert_eq!(a.recv().unwrap().1, "back");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let big2 = big.clone();
    let t = std::thread::spawn(move || {
        a.send_bytes(&big2).unwrap();
        a.send_bytes(b"").unwrap();
        a.send_bytes(b"tail").unwrap();
    });
    assert_eq!(b.recv_bytes().unwrap(), big);
    assert_eq!(b.recv_bytes().unwrap(), b"");
    assert_eq!(b.recv_bytes().unwrap(), b"tail");
    t.join().unwrap();
}

#[test]
fn large_values_cross_threads_without_deadlock() {
    // Messages far above the socket buffer, back and forth.
    let (mut a, mut b) = Pipe::<Vec<u8>>::new(true).unwrap();
    let t = std::thread::spawn(move || {
        for i in 0..2u8 {
            assert_eq!(b.recv().unwrap(), vec![i; 1 << 20]);
            b.send(&vec![i; 3 << 20]).unwrap();
        }
    });
    for i in 0..2u8 {
        a.send(&vec![i; 1 << 20]).unwrap();
        assert_eq!(a.recv().unwrap(), vec![i; 3 << 20]);
    }
    t.join().unwrap();
}

#[test]
fn recv_bytes_into_too_small_keeps_the_message() {
    let (mut a, mut b) = Pipe::<()>::new(true).unwrap();
    a.send_bytes(&[9; 100]).unwrap();
    let mut small = [0u8; 99];
    assert!(matches!(
        b.recv_bytes_into(&mut small),
        Err(Error::InvalidArgument(_))
    ));
    let mut buf = [0u8; 100];
    assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), 100);
    assert_eq!(buf, [9; 100]);
    let big = vec![3u8; 200_000];
    a.send_bytes(&big).unwrap();
    let mut buf = vec![0u8; 300_000];
    assert_eq!(b.recv_bytes_into(&mut buf).unwrap(), 200_000);
    assert_eq!(&buf[..200_000], &big[..]);
}

#[test]
fn simplex_ends_refuse_the_wrong_direction() {
    let (mut r, mut w) = Pipe::<u8>::new(false).unwrap();
    assert!(r.readable() && !r.writable());
    assert!(w.writable() && !w.readable());
    assert!(matches!(r.send(&1), Err(Error::InvalidState(_))));
    assert!(matches!(w.recv(), Err(Error::InvalidState(_))));
    assert!(w.poll(Some(Duration::ZERO)).is_err());
    w.send(&5).unwrap();
    assert_eq!(r.recv().unwrap(), 5);
}

#[test]
fn closed_peer_is_eof_for_recv_and_send() {
    let (mut a, mut b) = Pipe::<u8>::new(true).unwrap();
    a.send(&1).unwrap();
    a.close();
    assert!(a.closed());
    assert!(matches!(a.send(&1), Err(Error::Closed)));
    assert_eq!(b.recv().unwrap(), 1);
    assert!(matches!(b.recv(), Err(Error::Eof)));
    assert!(matches!(b.recv(), Err(Error::Eof)));
    assert!(b.poll(Some(Duration::ZERO)).unwrap(), "EOF is readable");
    assert!(matches!(b.send(&1), Err(Error::Eof)));
}

#[test]
fn malformed_and_oversized_frames_are_clean_errors() {
    // A 4 GiB length prefix.
    let (a, mut b) = Pipe::<u8>::new(true).unwrap();
    raw_writer(&a)
        .write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
        .unwrap();
    assert!(matches!(b.recv(), Err(Error::FrameTooLarge { .. })));
    // The stream is out of step now: further receives refuse.
    assert!(matches!(b.recv(), Err(Error::MalformedFrame(_))));

    // Above a configured limit.
    let (mut a, mut b) = Pipe::<Vec<u8>>::new(true).unwrap();
    b.set_max_frame(1000);
    a.send(&vec![0; 999]).unwrap();
    assert!(matches!(b.recv(), Err(Error::FrameTooLarge { .. })));

    // Truncated header and truncated payload, then the writer goes away.
    for bytes in [&[5u8, 0, 0][..], &[10, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][..]] {
        let (a, mut b) = Pipe::<u8>::new(true).unwrap();
        raw_writer(&a).write_all(bytes).unwrap();
        drop(a);
        assert!(
            matches!(b.recv(), Err(Error::MalformedFrame(_))),
            "{bytes:?}"
        );
    }

    // Descriptors announced that never came.
    let (a, mut b) = Pipe::<u8>::new(true).unwrap();
    raw_writer(&a)
        .write_all(&[1, 0, 0, 0, 3, 0, 0, 0, 7])
        .unwrap();
    assert!(matches!(b.recv(), Err(Error::MalformedFrame(_))));

    // Garbage that frames fine but does not decode: an error, and the next message is fine.
    let (mut a, mut b) = Pipe::<String>::new(true).unwrap();
    a.send_bytes(&[0xff, 0xff, 0xff]).unwrap();
    a.send(&"ok".to_string()).unwrap();
    assert!(matches!(b.recv(), Err(Error::Decode(_))));
    assert_eq!(b.recv().unwrap(), "ok");
}

#[test]
fn recv_timeout_times_out_and_loses_nothing() {
    let (mut a, mut b) = Pipe::<u64>::new(true).unwrap();
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(20)),
        Err(Error::Timeout)
    ));
    assert!(!b.poll(Some(Duration::from_millis(5))).unwrap());
    // Half a frame, then a timeout, then the rest: the value comes through whole.
    let (mut x, mut y) = Pipe::<u64>::new(true).unwrap();
    x.send(&300).unwrap();
    let payload = y.recv_bytes().unwrap();
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&payload);
    let mut w = raw_writer(&a);
    w.write_all(&frame[..5]).unwrap();
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(20)),
        Err(Error::Timeout)
    ));
    w.write_all(&frame[5..]).unwrap();
    assert_eq!(b.recv_timeout(T).unwrap(), 300);
    a.send(&7).unwrap();
    assert!(b.poll(Some(T)).unwrap());
    assert_eq!(b.recv().unwrap(), 7);
}

#[test]
fn connections_travel_over_connections() {
    let (mut a, mut b) = Pipe::<Connection<String>>::new(true).unwrap();
    let (mut x, y) = Pipe::<String>::new(true).unwrap();
    a.send(&y).unwrap();
    drop(y);
    let mut y2 = b.recv().unwrap();
    x.send(&"through".to_string()).unwrap();
    assert_eq!(y2.recv().unwrap(), "through");
    y2.send(&"back".to_string()).unwrap();
    assert_eq!(x.recv().unwrap(), "back");
    // A connection holding unread buffered data refuses to travel.
    x.send(&"1".to_string()).unwrap();
    x.send(&"2".to_string()).unwrap();
    assert_eq!(y2.recv().unwrap(), "1");
    if y2.poll(Some(Duration::ZERO)).unwrap() {
        assert!(a.send(&y2).is_err());
    }
}

fn echo_child(mut c: Connection<Vec<u32>>) -> usize {
    let mut n = 0;
    // An empty vector means stop (with Fork the child inherits the parent's end too, so it
    // cannot count on EOF: as in Python, close what you do not use or say when to stop).
    while let Ok(v) = c.recv() {
        if v.is_empty() {
            break;
        }
        n += 1;
        c.send(&v.iter().map(|x| x + 1).collect()).unwrap();
    }
    n
}

fn echo_process(c: Connection<Vec<u32>>) {
    echo_child(c);
}

#[test]
fn connection_as_argument_under_every_start_method() {
    for m in StartMethod::ALL {
        let ctx = get_context(m);
        let (mut here, there) = Pipe::<Vec<u32>>::new(true).unwrap();
        let h = multiproc::spawn_in(ctx, echo_child, there).unwrap();
        for i in 1..50u32 {
            here.send(&vec![i; i as usize]).unwrap();
            assert_eq!(here.recv().unwrap(), vec![i + 1; i as usize], "{m}");
        }
        here.send(&vec![0; 1 << 20]).unwrap();
        assert_eq!(here.recv().unwrap(), vec![1; 1 << 20], "{m}");
        here.send(&vec![]).unwrap();
        assert_eq!(h.join().unwrap(), 50, "{m}");

        let (mut here, there) = Pipe::<Vec<u32>>::new(true).unwrap();
        let mut p = Process::new(echo_process, there).context(ctx);
        p.start().unwrap();
        here.send(&vec![1, 2]).unwrap();
        assert_eq!(here.recv().unwrap(), vec![2, 3], "{m}");
        p.terminate().unwrap();
        p.join_timeout(T).unwrap().expect("child ended");
    }
}

fn die_holding(c: Connection<u32>) {
    let _keep = c;
    std::process::abort();
}

#[test]
fn peer_death_is_eof_not_a_hang() {
    for m in StartMethod::ALL {
        let (mut here, there) = Pipe::<u32>::new(true).unwrap();
        let h = multiproc::spawn_in(get_context(m), die_holding, there).unwrap();
        assert!(matches!(here.recv_timeout(T), Err(Error::Eof)), "{m}");
        assert!(h.join().is_err());
    }
}

fn stream_numbers((mut c, n): (Connection<u64>, u64)) {
    for i in 0..n {
        c.send(&i).unwrap();
    }
}

#[test]
fn many_small_messages_from_a_child_arrive_in_order() {
    let (mut rx, tx) = Pipe::<u64>::new(false).unwrap();
    let h = multiproc::spawn(stream_numbers, (tx, 100_000)).unwrap();
    for i in 0..100_000 {
        assert_eq!(rx.recv_timeout(T).unwrap(), i);
    }
    h.join().unwrap();
    assert!(matches!(rx.recv_timeout(T), Err(Error::Eof)));
}

fn wait_then_exit(mut c: Connection<u8>) {
    let _ = c.recv();
}

#[test]
fn wait_over_connections_and_sentinels() {
    let (mut a, b) = Pipe::<u8>::new(true).unwrap();
    let (mut go, child_end) = Pipe::<u8>::new(true).unwrap();
    let mut p = Process::new(wait_then_exit, child_end);
    p.start().unwrap();
    let objs: [&dyn Waitable; 2] = [&b, &p];
    assert!(
        wait(&objs, Some(Duration::from_millis(20)))
            .unwrap()
            .is_empty()
    );
    a.send(&1).unwrap();
    assert_eq!(wait(&objs, Some(T)).unwrap(), vec![0]);
    go.send(&1).unwrap();
    p.join_timeout(T).unwrap().expect("ended");
    let ready = wait(&objs, Some(T)).unwrap();
    assert_eq!(ready, vec![0, 1]);
    let fd = b.fileno().unwrap();
    let fd = fd.as_fd();
    assert_eq!(wait(&[&fd as &dyn Waitable], Some(T)).unwrap(), vec![0]);
}

#[test]
fn decoder_survives_arbitrary_input() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 2000,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..300),
                1usize..40,
                0u64..1000,
            ),
            |(data, chunk, max)| {
                let _ = fuzz_frame_decoder(&data, chunk, max);
                Ok(())
            },
        )
        .unwrap();
    // Well-formed sequences decode to what was framed, whatever the read sizes.
    runner
        .run(
            &(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
                1usize..64,
            ),
            |(payloads, chunk)| {
                let mut data = Vec::new();
                for p in &payloads {
                    data.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    data.extend_from_slice(&0u32.to_le_bytes());
                    data.extend_from_slice(p);
                }
                prop_assert_eq!(fuzz_frame_decoder(&data, chunk, 1 << 20), payloads);
                Ok(())
            },
        )
        .unwrap();
}
