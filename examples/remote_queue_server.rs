//! Python's remote-manager pattern, server side: serve a queue to other programs that know
//! the address and the key.
//!
//! ```python
//! queue = Queue()
//! QueueManager.register('get_queue', callable=lambda: queue)
//! m = QueueManager(address=('', 50000), authkey=b'abracadabra')
//! m.get_server().serve_forever()
//! ```
//!
//! Run: `cargo run --example remote_queue_server [ADDRESS]` (default `127.0.0.1:50000`), then
//! `cargo run --example remote_queue_client` in another terminal. The server stops when a
//! client asks it to (`remote_queue_client --shutdown`).

use multiproc::connection::Listener;
use multiproc::managers::Manager;

fn main() {
    multiproc::init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50000".into());
    let listener = Listener::bind(addr.as_str(), b"abracadabra").expect("bind");
    println!("serving queue 'get_queue' on {}", listener.address());
    // Objects are shared by name: clients ask for `named("get_queue").queue()` and all get
    // the same queue.
    Manager::serve_listener(listener, |_| {}).expect("serve");
    println!("server stopped");
}
