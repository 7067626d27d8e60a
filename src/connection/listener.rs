//! [`Listener`], [`Client`] and [`Address`]: authenticated connections between programs.

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Connection, RawConn, Waitable, auth};
use crate::codec;
use crate::error::{Error, Result};

/// How long a handshake may take by default, on either side.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a [`Listener`] listens and a [`Client`] connects: a TCP address, a Unix socket path,
/// or a name in Linux's abstract Unix socket namespace (no file, nothing to clean up).
///
/// Parsed from text as Python users write it: `"127.0.0.1:6000"` or `"localhost:6000"` (TCP),
/// `"/tmp/app.sock"` or `"unix:app.sock"` (a path), `"@name"` (abstract).
///
/// ```
/// use multiproc::connection::Address;
/// let a: Address = "127.0.0.1:6000".parse().unwrap();
/// assert!(matches!(a, Address::Tcp(_)));
/// assert_eq!("@mp-test".parse::<Address>().unwrap().to_string(), "@mp-test");
/// assert!(matches!("/tmp/x.sock".parse::<Address>().unwrap(), Address::Unix(_)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path (the listener removes the file when it is dropped).
    Unix(PathBuf),
    /// A name in the Linux abstract namespace, written `@name`.
    Abstract(Vec<u8>),
}

impl Address {
    /// A fresh, unpredictable abstract-namespace address (for a manager or a private service).
    pub fn unique_abstract() -> Result<Address> {
        let mut r = [0u8; 12];
        getrandom::fill(&mut r).map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Address::Abstract(
            format!("multiproc-{}-{hex}", std::process::id()).into_bytes(),
        ))
    }

    fn is_unix(&self) -> bool {
        !matches!(self, Address::Tcp(_))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Abstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Address> {
        if let Some(name) = s.strip_prefix('@') {
            return Ok(Address::Abstract(name.as_bytes().to_vec()));
        }
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Address::Unix(PathBuf::from(p)));
        }
        if s.contains('/') {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(Address::Tcp(a));
        }
        s.to_socket_addrs()
            .ok()
            .and_then(|mut i| i.next())
            .map(Address::Tcp)
            .ok_or_else(|| Error::arg(format!("not an address: {s:?}")))
    }
}

/// Anything that names an [`Address`]: an `Address`, a string (see [`Address`]), a
/// `SocketAddr`, a `(host, port)` pair or a path.
pub trait ToAddress {
    /// The address.
    fn to_address(&self) -> Result<Address>;
}

impl ToAddress for Address {
    fn to_address(&self) -> Result<Address> {
        Ok(self.clone())
    }
}
impl ToAddress for &Address {
    fn to_address(&self) -> Result<Address> {
        Ok((*self).clone())
    }
}
impl ToAddress for &str {
    fn to_address(&self) -> Result<Address> {
        self.parse()
    }
}
impl ToAddress for String {
    fn to_address(&self) -> Result<Address> {
        self.parse()
    }
}
impl ToAddress for SocketAddr {
    fn to_address(&self) -> Result<Address> {
        Ok(Address::Tcp(*self))
    }
}
impl ToAddress for (&str, u16) {
    fn to_address(&self) -> Result<Address> {
        self.to_socket_addrs()?
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| Error::arg(format!("no address for {}:{}", self.0, self.1)))
    }
}
impl ToAddress for &Path {
    fn to_address(&self) -> Result<Address> {
        Ok(Address::Unix(self.to_path_buf()))
    }
}

enum Sock {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts authenticated connections (Python's `multiprocessing.connection.Listener`).
///
/// Each accepted connection has passed the mutual HMAC-SHA256 challenge with `authkey` (see
/// the `auth` module docs): a client with another key is refused with
/// [`Error::AuthenticationError`] on both sides. The handshake is bounded in time
/// ([`set_handshake_timeout`](Self::set_handshake_timeout), default 10 s) and in memory (its
/// messages are at most 256 bytes), so a client that stalls or sends garbage makes
/// [`accept`](Self::accept) fail after the timeout, and the next `accept` serves the next client.
///
/// ```
/// use multiproc::connection::{Client, Listener};
/// let l = Listener::bind("127.0.0.1:0", b"secret").unwrap();
/// let addr = l.address().clone();
/// let t = std::thread::spawn(move || {
///     let mut c = Client::connect::<String>(&addr, b"secret").unwrap();
///     c.send(&"hi".to_string()).unwrap();
/// });
/// let mut conn = l.accept::<String>().unwrap();
/// assert_eq!(conn.recv().unwrap(), "hi");
/// t.join().unwrap();
/// ```
pub struct Listener {
    sock: Sock,
    address: Address,
    authkey: Vec<u8>,
    handshake_timeout: Duration,
    /// The socket file to remove on drop (only in the process that created it).
    unlink: Option<PathBuf>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Listens on `addr` (TCP port 0 picks a free port: see [`address`](Self::address)).
    pub fn bind(addr: impl ToAddress, authkey: &[u8]) -> Result<Listener> {
        let addr = addr.to_address()?;
        let (sock, address, unlink) = match &addr {
            Address::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let real = l.local_addr()?;
                (Sock::Tcp(l), Address::Tcp(real), None)
            }
            Address::Unix(p) => (
                Sock::Unix(UnixListener::bind(p)?),
                addr.clone(),
                Some(p.clone()),
            ),
            Address::Abstract(n) => {
                let ua = UnixAddr::from_abstract_name(n)?;
                (
                    Sock::Unix(UnixListener::bind_addr(&ua)?),
                    addr.clone(),
                    None,
                )
            }
        };
        Ok(Listener {
            sock,
            address,
            authkey: authkey.to_vec(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            unlink,
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Bounds each handshake in [`accept`](Self::accept).
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// Waits for a client, authenticates it and returns the connection.
    ///
    /// Errors: [`Error::AuthenticationError`] for a client with another key or one that breaks
    /// the protocol, [`Error::Timeout`] for one that stalls past the handshake timeout. Either
    /// way the listener stays usable.
    pub fn accept<T>(&self) -> Result<Connection<T>> {
        let mut raw = self.accept_unauthenticated()?;
        auth::server_handshake(
            &mut raw,
            &self.authkey,
            Instant::now() + self.handshake_timeout,
        )?;
        Ok(Connection::from_raw(raw))
    }

    /// Accepts a client without the handshake (the caller runs it, e.g. on another thread).
    pub(crate) fn accept_unauthenticated(&self) -> Result<RawConn> {
        Ok(match &self.sock {
            Sock::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                RawConn::new(OwnedFd::from(s), true, true, false)
            }
            Sock::Unix(l) => {
                let (s, _) = l.accept()?;
                RawConn::new(OwnedFd::from(s), true, true, true)
            }
        })
    }

    pub(crate) fn authkey(&self) -> &[u8] {
        &self.authkey
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.sock {
            Sock::Tcp(l) => l.as_fd(),
            Sock::Unix(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.unlink {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Waitable for Listener {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.fd())
    }
}

#[derive(Serialize)]
struct ListenerOut<'a> {
    address: &'a Address,
    authkey: &'a [u8],
    timeout: Duration,
    #[serde(serialize_with = "super::ser_fd")]
    fd: BorrowedFd<'a>,
}

#[derive(Deserialize)]
struct ListenerIn {
    address: Address,
    authkey: Vec<u8>,
    timeout: Duration,
    #[serde(deserialize_with = "codec::deserialize_fd")]
    fd: OwnedFd,
}

/// A `Listener` is a handle: it can be passed to another process (which then accepts on the
/// same socket). Only the creating process removes a Unix socket file.
impl Serialize for Listener {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ListenerOut {
            address: &self.address,
            authkey: &self.authkey,
            timeout: self.handshake_timeout,
            fd: self.fd(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ListenerIn::deserialize(d)?;
        let sock = if w.address.is_unix() {
            Sock::Unix(UnixListener::from(w.fd))
        } else {
            Sock::Tcp(TcpListener::from(w.fd))
        };
        Ok(Listener {
            sock,
            address: w.address,
            authkey: w.authkey,
            handshake_timeout: w.timeout,
            unlink: None,
        })
    }
}

/// Connects to a [`Listener`] (Python's `multiprocessing.connection.Client`).
///
/// See [`Listener`] for an example.
#[derive(Debug)]
pub struct Client;

impl Client {
    /// Connects to `addr` and runs the handshake with `authkey`.
    ///
    /// Errors: [`Error::AuthenticationError`] if the listener has another key,
    /// [`Error::Timeout`] if connecting or the handshake takes longer than 10 s, [`Error::Io`]
    /// if nothing listens there.
    pub fn connect<T>(addr: impl ToAddress, authkey: &[u8]) -> Result<Connection<T>> {
        Self::connect_timeout(addr, authkey, DEFAULT_HANDSHAKE_TIMEOUT)
    }

    /// [`connect`](Self::connect) with a bound on connecting plus the handshake.
    pub fn connect_timeout<T>(
        addr: impl ToAddress,
        authkey: &[u8],
        timeout: Duration,
    ) -> Result<Connection<T>> {
        let deadline = Instant::now() + timeout;
        let mut raw = connect_raw(&addr.to_address()?, timeout)?;
        auth::client_handshake(&mut raw, authkey, deadline)?;
        Ok(Connection::from_raw(raw))
    }
}

pub(crate) fn connect_raw(addr: &Address, timeout: Duration) -> Result<RawConn> {
    Ok(match addr {
        Address::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, timeout).map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    Error::Timeout
                } else {
                    Error::Io(e)
                }
            })?;
            s.set_nodelay(true)?;
            RawConn::new(OwnedFd::from(s), true, true, false)
        }
        Address::Unix(p) => RawConn::new(OwnedFd::from(UnixStream::connect(p)?), true, true, true),
        Address::Abstract(n) => {
            let ua = UnixAddr::from_abstract_name(n)?;
            RawConn::new(
                OwnedFd::from(UnixStream::connect_addr(&ua)?),
                true,
                true,
                true,
            )
        }
    })
}
