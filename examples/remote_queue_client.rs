//! Python's remote-manager pattern, client side: connect with the address and the key, put
//! on the served queue, and get from it.
//!
//! ```python
//! QueueManager.register('get_queue')
//! m = QueueManager(address=('127.0.0.1', 50000), authkey=b'abracadabra')
//! m.connect()
//! queue = m.get_queue()
//! queue.put('hello')
//! queue.get()
//! ```
//!
//! Run: `cargo run --example remote_queue_client [ADDRESS] [--shutdown]` while
//! `remote_queue_server` runs.

use std::time::{Duration, Instant};

use multiproc::managers::Manager;

fn main() {
    multiproc::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shutdown = args.iter().any(|a| a == "--shutdown");
    let addr = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:50000".into());

    // The server may still be starting: retry for a few seconds.
    let t0 = Instant::now();
    let mut m = loop {
        match Manager::connect(addr.as_str(), b"abracadabra") {
            Ok(m) => break m,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                eprintln!("waiting for the server at {addr}: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot reach the server at {addr}: {e}"),
        }
    };
    let queue = m.named("get_queue").queue::<String>(0).unwrap();
    queue.put(&"hello".to_string()).unwrap();
    println!("put 'hello'");
    let got = queue.get_timeout(Duration::from_secs(10)).unwrap();
    println!("got {got:?}");
    if shutdown {
        m.shutdown().unwrap();
        println!("asked the server to stop");
    }
}
