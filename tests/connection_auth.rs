//! Listener / Client: the mutual HMAC challenge and what a hostile or broken peer can do.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use multiproc::Error;
use multiproc::connection::{Address, Client, Listener};

const KEY: &[u8] = b"the right key";
const T: Duration = Duration::from_secs(10);

fn tcp_listener() -> Listener {
    Listener::bind("127.0.0.1:0", KEY).unwrap()
}

fn tcp_addr(l: &Listener) -> std::net::SocketAddr {
    match l.address() {
        Address::Tcp(a) => *a,
        a => panic!("{a}"),
    }
}

fn echo_once(l: &Listener) -> multiproc::Result<()> {
    let mut c = l.accept::<String>()?;
    let s = c.recv()?;
    c.send(&format!("echo {s}"))
}

#[test]
fn tcp_unix_and_abstract_addresses_work() {
    let dir = std::env::temp_dir().join(format!("mp-conn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("l.sock");
    let addrs = [
        "127.0.0.1:0".parse::<Address>().unwrap(),
        Address::Unix(path.clone()),
        Address::unique_abstract().unwrap(),
    ];
    for a in addrs {
        let l = Listener::bind(&a, KEY).unwrap();
        let addr = l.address().clone();
        let t = std::thread::spawn(move || {
            let mut c = Client::connect::<String>(&addr, KEY).unwrap();
            c.send(&"hi".into()).unwrap();
            c.recv().unwrap()
        });
        echo_once(&l).unwrap();
        assert_eq!(t.join().unwrap(), "echo hi");
    }
    assert!(!path.exists(), "the listener removes its socket file");
    let _ = std::fs::remove_dir(dir);
}

#[test]
fn wrong_key_fails_on_both_sides() {
    let l = tcp_listener();
    let addr = l.address().clone();
    let t = std::thread::spawn(move || Client::connect::<String>(&addr, b"wrong key").map(|_| ()));
    assert!(matches!(
        l.accept::<String>(),
        Err(Error::AuthenticationError(_))
    ));
    assert!(matches!(
        t.join().unwrap(),
        Err(Error::AuthenticationError(_))
    ));
    // The listener still serves a good client.
    let addr = l.address().clone();
    let t = std::thread::spawn(move || {
        let mut c = Client::connect::<String>(&addr, KEY).unwrap();
        c.send(&"x".into()).unwrap();
        c.recv().unwrap()
    });
    echo_once(&l).unwrap();
    assert_eq!(t.join().unwrap(), "echo x");
}

/// Reads the server's challenge frame from a raw socket.
fn read_challenge(s: &mut TcpStream) -> Vec<u8> {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn hostile_clients_are_refused_and_the_server_goes_on() {
    let mut l = tcp_listener();
    l.set_handshake_timeout(Duration::from_millis(300));
    let a = tcp_addr(&l);
    type Attack = fn(&mut TcpStream);
    let attacks: [(&str, Attack); 5] = [
        ("truncated handshake", |s| {
            read_challenge(s);
            s.write_all(&[40, 0, 0, 0, 0, 0, 0, 0, b'{', b's']).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }),
        ("garbage bytes", |s| {
            read_challenge(s);
            s.write_all(&[0x5a; 64]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }),
        ("4 GiB length prefix", |s| {
            read_challenge(s);
            s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).unwrap();
        }),
        ("wrong digest", |s| {
            read_challenge(s);
            let mut m = vec![40, 0, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(b"{sha256}");
            m.extend_from_slice(&[0; 32]);
            s.write_all(&m).unwrap();
        }),
        ("hang up at once", |s| {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }),
    ];
    for (name, attack) in attacks {
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(a).unwrap();
            attack(&mut s);
            // Keep the socket open until the server has judged us.
            let mut sink = Vec::new();
            let _ = s.set_read_timeout(Some(T));
            let _ = s.read_to_end(&mut sink);
        });
        let r = l.accept::<String>();
        assert!(
            matches!(r, Err(Error::AuthenticationError(_))),
            "{name}: {r:?}"
        );
        t.join().unwrap();
    }
}

#[test]
fn stalling_client_times_out_and_others_are_served() {
    let mut l = tcp_listener();
    l.set_handshake_timeout(Duration::from_millis(200));
    let a = tcp_addr(&l);
    // Connects, reads the challenge, then says nothing.
    let staller = std::thread::spawn(move || {
        let mut s = TcpStream::connect(a).unwrap();
        read_challenge(&mut s);
        let mut sink = Vec::new();
        s.set_read_timeout(Some(T)).unwrap();
        let _ = s.read_to_end(&mut sink);
    });
    let t0 = Instant::now();
    assert!(matches!(l.accept::<String>(), Err(Error::Timeout)));
    assert!(t0.elapsed() < T);
    staller.join().unwrap();
    let addr = l.address().clone();
    let good = std::thread::spawn(move || {
        let mut c = Client::connect::<String>(&addr, KEY).unwrap();
        c.send(&"after".into()).unwrap();
        c.recv().unwrap()
    });
    echo_once(&l).unwrap();
    assert_eq!(good.join().unwrap(), "echo after");
}

#[test]
fn client_facing_a_silent_server_times_out() {
    // A plain TCP listener that accepts and never speaks.
    let raw = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = raw.local_addr().unwrap();
    let r = Client::connect_timeout::<u8>(a, KEY, Duration::from_millis(200));
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    drop(raw);
}

#[test]
fn many_simultaneous_connections() {
    let l = tcp_listener();
    let addr = l.address().clone();
    let n = 64;
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect::<u64>(&addr, KEY).unwrap();
                c.send(&i).unwrap();
                c.recv_timeout(T).unwrap()
            })
        })
        .collect();
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(l.accept::<u64>().unwrap());
    }
    for c in &mut conns {
        let v = c.recv_timeout(T).unwrap();
        c.send(&(v * 10)).unwrap();
    }
    let mut got: Vec<u64> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort();
    assert_eq!(got, (0..n).map(|i| i * 10).collect::<Vec<_>>());
}

fn accept_in_child(l: Listener) -> String {
    let mut c = l.accept::<String>().unwrap();
    let s = c.recv().unwrap();
    c.send(&format!("child got {s}")).unwrap();
    s
}

#[test]
fn a_listener_can_be_handed_to_a_child() {
    let l = Listener::bind(Address::unique_abstract().unwrap(), KEY).unwrap();
    let addr = l.address().clone();
    let h = multiproc::spawn(accept_in_child, l).unwrap();
    let mut c = Client::connect::<String>(&addr, KEY).unwrap();
    c.send(&"x".into()).unwrap();
    assert_eq!(c.recv_timeout(T).unwrap(), "child got x");
    assert_eq!(h.join().unwrap(), "x");
}

#[test]
fn handles_cannot_travel_over_tcp() {
    let l = tcp_listener();
    let addr = l.address().clone();
    let t = std::thread::spawn(move || {
        let mut c = Client::connect::<multiproc::Connection<u8>>(&addr, KEY).unwrap();
        let (a, _b) = multiproc::Pipe::<u8>::new(true).unwrap();
        c.send(&a)
    });
    let _conn = l.accept::<u8>().unwrap();
    assert!(matches!(t.join().unwrap(), Err(Error::Encode(_))));
}

#[test]
fn wait_sees_a_pending_client() {
    use multiproc::connection::{Waitable, wait};
    let l = tcp_listener();
    assert!(
        wait(&[&l as &dyn Waitable], Some(Duration::from_millis(10)))
            .unwrap()
            .is_empty()
    );
    let addr = l.address().clone();
    let t = std::thread::spawn(move || Client::connect::<u8>(&addr, KEY).map(|_| ()));
    assert_eq!(wait(&[&l as &dyn Waitable], Some(T)).unwrap(), vec![0]);
    l.accept::<u8>().unwrap();
    t.join().unwrap().unwrap();
}
