//! Proxies: typed handles on objects held by a manager. Each is plain data (the manager's
//! address and key, the object's id), so it clones cheaply and travels to other processes as an
//! argument; calls go through the calling process's pool of connections to that manager.

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Conn, Endpoint, ObjectId, args, call, reply};
use crate::error::{Error, Result};

/// An untyped proxy: calls any method of a manager object by name. The typed proxies wrap one;
/// use it directly for [registered user types](super::SharedObject).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxy {
    ep: Endpoint,
    id: ObjectId,
}

impl Proxy {
    pub(crate) fn new(ep: Endpoint, id: ObjectId) -> Proxy {
        Proxy { ep, id }
    }

    /// The object's id in its manager.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Calls `method` with `args` and decodes its result as `R`.
    pub fn call<A: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: &str,
        args: &A,
    ) -> Result<R> {
        call(&self.ep, self.id, method, args)
    }
}

macro_rules! typed_proxy {
    ($(#[$doc:meta])* $name:ident < $($g:ident),* >) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize)]
        #[serde(bound = "")]
        pub struct $name<$($g),*> {
            p: Proxy,
            #[serde(skip)]
            _t: PhantomData<fn() -> ($($g,)*)>,
        }

        impl<$($g),*> Clone for $name<$($g),*> {
            fn clone(&self) -> Self {
                Self::from_proxy(self.p.clone())
            }
        }

        impl<$($g),*> std::fmt::Debug for $name<$($g),*> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.p.id).finish()
            }
        }

        impl<$($g),*> $name<$($g),*> {
            pub(crate) fn from_proxy(p: Proxy) -> Self {
                Self { p, _t: PhantomData }
            }

            /// The untyped proxy underneath.
            pub fn proxy(&self) -> &Proxy {
                &self.p
            }
        }
    };
}

fn enc<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    reply(v)
}

typed_proxy!(
    /// A dictionary in a manager (Python's `Manager().dict()`). Keys compare by their
    /// serialized form.
    ///
    /// ```
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let d = m.dict::<String, i32>().unwrap();
    /// d.set(&"a".into(), &1).unwrap();
    /// assert_eq!(d.get(&"a".into()).unwrap(), Some(1));
    /// assert_eq!(d.get(&"b".into()).unwrap(), None);
    /// ```
    DictProxy<K, V>
);

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> DictProxy<K, V> {
    /// `d[k] = v`.
    pub fn set(&self, k: &K, v: &V) -> Result<()> {
        self.p.call("set", &(enc(k)?, enc(v)?))
    }

    /// `d.get(k)`.
    pub fn get(&self, k: &K) -> Result<Option<V>> {
        let v: Option<Vec<u8>> = self.p.call("get", &enc(k)?)?;
        v.map(|b| args(&b)).transpose()
    }

    /// `d.pop(k, None)`: removes and returns the value.
    pub fn pop(&self, k: &K) -> Result<Option<V>> {
        let v: Option<Vec<u8>> = self.p.call("pop", &enc(k)?)?;
        v.map(|b| args(&b)).transpose()
    }

    /// `k in d`.
    pub fn contains(&self, k: &K) -> Result<bool> {
        self.p.call("contains", &enc(k)?)
    }

    /// `d.setdefault(k, v)`: the value at `k`, inserting `v` first if there is none.
    pub fn setdefault(&self, k: &K, v: &V) -> Result<V> {
        let b: Vec<u8> = self.p.call("setdefault", &(enc(k)?, enc(v)?))?;
        args(&b)
    }

    /// `len(d)`.
    pub fn len(&self) -> Result<usize> {
        self.p.call("len", &())
    }

    /// `len(d) == 0`.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// `list(d.keys())`.
    pub fn keys(&self) -> Result<Vec<K>> {
        let v: Vec<Vec<u8>> = self.p.call("keys", &())?;
        v.iter().map(|b| args(b)).collect()
    }

    /// `list(d.values())`.
    pub fn values(&self) -> Result<Vec<V>> {
        let v: Vec<Vec<u8>> = self.p.call("values", &())?;
        v.iter().map(|b| args(b)).collect()
    }

    /// `list(d.items())`.
    pub fn items(&self) -> Result<Vec<(K, V)>> {
        let v: Vec<(Vec<u8>, Vec<u8>)> = self.p.call("items", &())?;
        v.iter().map(|(k, v)| Ok((args(k)?, args(v)?))).collect()
    }

    /// `d.update(items)`, in one call.
    pub fn update(&self, items: &[(K, V)]) -> Result<()> {
        let kv = items
            .iter()
            .map(|(k, v)| Ok((enc(k)?, enc(v)?)))
            .collect::<Result<Vec<_>>>()?;
        self.p.call("update", &kv)
    }

    /// `d.clear()`.
    pub fn clear(&self) -> Result<()> {
        self.p.call("clear", &())
    }
}

typed_proxy!(
    /// A list in a manager (Python's `Manager().list()`). Indices may be negative, counting
    /// from the end; out of range is [`Error::InvalidArgument`] (Python's `IndexError`).
    ///
    /// ```
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let l = m.list::<u8>().unwrap();
    /// l.extend(&[1, 2, 3]).unwrap();
    /// assert_eq!(l.get(-1).unwrap(), 3);
    /// assert_eq!(l.to_vec().unwrap(), vec![1, 2, 3]);
    /// ```
    ListProxy<T>
);

impl<T: Serialize + DeserializeOwned> ListProxy<T> {
    /// `l.append(v)`.
    pub fn append(&self, v: &T) -> Result<()> {
        self.p.call("append", &enc(v)?)
    }

    /// `l.extend(vs)`, in one call.
    pub fn extend(&self, vs: &[T]) -> Result<()> {
        let b = vs.iter().map(enc).collect::<Result<Vec<_>>>()?;
        self.p.call("extend", &b)
    }

    /// `l[i]`.
    pub fn get(&self, i: i64) -> Result<T> {
        let b: Vec<u8> = self.p.call("get", &i)?;
        args(&b)
    }

    /// `l[i] = v`.
    pub fn set(&self, i: i64, v: &T) -> Result<()> {
        self.p.call("set", &(i, enc(v)?))
    }

    /// `l.insert(i, v)`.
    pub fn insert(&self, i: i64, v: &T) -> Result<()> {
        self.p.call("insert", &(i, enc(v)?))
    }

    /// `l.pop()`: removes and returns the last item.
    pub fn pop(&self) -> Result<T> {
        let b: Vec<u8> = self.p.call("pop", &None::<i64>)?;
        args(&b)
    }

    /// `l.pop(i)`.
    pub fn pop_at(&self, i: i64) -> Result<T> {
        let b: Vec<u8> = self.p.call("pop", &Some(i))?;
        args(&b)
    }

    /// `l.remove(v)`: removes the first equal item (an error if none).
    pub fn remove(&self, v: &T) -> Result<()> {
        self.p.call("remove", &enc(v)?)
    }

    /// `l.index(v)`, or `None`.
    pub fn index(&self, v: &T) -> Result<Option<usize>> {
        self.p.call("index", &enc(v)?)
    }

    /// `l.count(v)`.
    pub fn count(&self, v: &T) -> Result<usize> {
        self.p.call("count", &enc(v)?)
    }

    /// `len(l)`.
    pub fn len(&self) -> Result<usize> {
        self.p.call("len", &())
    }

    /// `len(l) == 0`.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// `list(l)`: a copy of the whole list.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let v: Vec<Vec<u8>> = self.p.call("all", &())?;
        v.iter().map(|b| args(b)).collect()
    }

    /// `l.clear()`.
    pub fn clear(&self) -> Result<()> {
        self.p.call("clear", &())
    }
}

typed_proxy!(
    /// A namespace in a manager (Python's `Manager().Namespace()`): named attributes of any
    /// `serde` type.
    ///
    /// ```
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let ns = m.namespace().unwrap();
    /// ns.set("x", &42u32).unwrap();
    /// assert_eq!(ns.get::<u32>("x").unwrap(), Some(42));
    /// ```
    NamespaceProxy<>
);

impl NamespaceProxy {
    /// `ns.name`, or `None` if unset.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let v: Option<Vec<u8>> = self.p.call("get", name)?;
        v.map(|b| args(&b)).transpose()
    }

    /// `ns.name = v`.
    pub fn set<T: Serialize + ?Sized>(&self, name: &str, v: &T) -> Result<()> {
        self.p.call("set", &(name, enc(v)?))
    }

    /// `del ns.name`; true if it was set.
    pub fn del(&self, name: &str) -> Result<bool> {
        self.p.call("del", name)
    }

    /// The names set, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        self.p.call("names", &())
    }
}

typed_proxy!(
    /// A queue in a manager (Python's `Manager().Queue()`, a joinable queue).
    ///
    /// ```
    /// use std::time::Duration;
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let q = m.queue::<String>(1).unwrap();
    /// q.put(&"a".into()).unwrap();
    /// assert!(matches!(q.try_put(&"b".into()), Err(multiproc::Error::Full)));
    /// assert_eq!(q.get().unwrap(), "a");
    /// assert!(matches!(q.get_timeout(Duration::from_millis(10)), Err(multiproc::Error::Empty)));
    /// ```
    QueueProxy<T>
);

impl<T: Serialize + DeserializeOwned> QueueProxy<T> {
    fn put_(&self, v: &T, block: bool, t: Option<Duration>) -> Result<()> {
        self.p.call("put", &(enc(v)?, block, t))
    }

    fn get_(&self, block: bool, t: Option<Duration>) -> Result<T> {
        let b: Vec<u8> = self.p.call("get", &(block, t))?;
        args(&b)
    }

    /// Puts `v`, waiting while the queue is full.
    pub fn put(&self, v: &T) -> Result<()> {
        self.put_(v, true, None)
    }

    /// Puts `v`, waiting at most `timeout`: [`Error::Full`] then.
    pub fn put_timeout(&self, v: &T, timeout: Duration) -> Result<()> {
        self.put_(v, true, Some(timeout))
    }

    /// Puts `v` if there is room now, else [`Error::Full`].
    pub fn try_put(&self, v: &T) -> Result<()> {
        self.put_(v, false, None)
    }

    /// Takes the next item, waiting for one.
    pub fn get(&self) -> Result<T> {
        self.get_(true, None)
    }

    /// Takes the next item, waiting at most `timeout`: [`Error::Empty`] then.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        self.get_(true, Some(timeout))
    }

    /// Takes the next item if there is one now, else [`Error::Empty`].
    pub fn try_get(&self) -> Result<T> {
        self.get_(false, None)
    }

    /// Items in the queue now.
    pub fn qsize(&self) -> Result<usize> {
        self.p.call("qsize", &())
    }

    /// `qsize() == 0`.
    pub fn empty(&self) -> Result<bool> {
        Ok(self.qsize()? == 0)
    }

    /// Whether a bounded queue is at its bound.
    pub fn full(&self) -> Result<bool> {
        let max: usize = self.p.call("maxsize", &())?;
        Ok(max > 0 && self.qsize()? >= max)
    }

    /// Marks one item taken with `get` as processed (for [`join`](Self::join)).
    pub fn task_done(&self) -> Result<()> {
        self.p.call("task_done", &())
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<()> {
        self.p.call("join", &None::<Duration>)
    }

    /// [`join`](Self::join) giving up with [`Error::Timeout`].
    pub fn join_timeout(&self, timeout: Duration) -> Result<()> {
        self.p.call("join", &Some(timeout))
    }
}

typed_proxy!(
    /// A lock in a manager (Python's `Manager().Lock()`), with an RAII guard. The guard keeps
    /// the connection it acquired on; if the holder's process dies, its connection closes and
    /// the server releases the lock, so the others do not deadlock.
    ///
    /// ```
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let l = m.lock().unwrap();
    /// let g = l.acquire().unwrap();
    /// assert!(l.try_acquire().unwrap().is_none());
    /// drop(g);
    /// assert!(l.try_acquire().unwrap().is_some());
    /// ```
    LockProxy<>
);

/// Holds a [`LockProxy`]'s lock; releases it when dropped.
pub struct LockGuard<'a> {
    lock: &'a LockProxy,
    conn: Option<Conn>,
}

impl std::fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.lock.p.id)
            .finish()
    }
}

fn call_on<A: Serialize, R: DeserializeOwned>(
    c: &mut Conn,
    obj: ObjectId,
    method: &str,
    a: &A,
) -> Result<R> {
    let bytes = reply(a)?;
    args(&c.call(obj, method, &bytes)?.map_err(Error::from)?)
}

impl LockProxy {
    fn acquire_(&self, block: bool, t: Option<Duration>) -> Result<Option<LockGuard<'_>>> {
        let mut c = super::take_conn(&self.p.ep)?;
        let ok: bool = call_on(&mut c, self.p.id, "acquire", &(block, t))?;
        if ok {
            Ok(Some(LockGuard {
                lock: self,
                conn: Some(c),
            }))
        } else {
            super::give_back(&self.p.ep, c);
            Ok(None)
        }
    }

    /// Waits for the lock.
    pub fn acquire(&self) -> Result<LockGuard<'_>> {
        Ok(self
            .acquire_(true, None)?
            .expect("a blocking acquire succeeds"))
    }

    /// Takes the lock if it is free now.
    pub fn try_acquire(&self) -> Result<Option<LockGuard<'_>>> {
        self.acquire_(false, None)
    }

    /// Waits at most `timeout` for the lock.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>> {
        self.acquire_(true, Some(timeout))
    }

    /// Whether someone holds the lock now.
    pub fn locked(&self) -> Result<bool> {
        self.p.call("locked", &())
    }
}

impl LockGuard<'_> {
    /// Releases the lock now, reporting a failure (dropping the guard ignores it).
    pub fn release(mut self) -> Result<()> {
        self.release_()
    }

    fn release_(&mut self) -> Result<()> {
        if let Some(mut c) = self.conn.take() {
            call_on::<_, ()>(&mut c, self.lock.p.id, "release", &())?;
            super::give_back(&self.lock.p.ep, c);
        }
        Ok(())
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.release_();
    }
}

typed_proxy!(
    /// A value in a manager (Python's `Manager().Value()`).
    ///
    /// ```
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let v = m.value(&1.5f64).unwrap();
    /// v.set(&2.5).unwrap();
    /// assert_eq!(v.get().unwrap(), 2.5);
    /// ```
    ValueProxy<T>
);

impl<T: Serialize + DeserializeOwned> ValueProxy<T> {
    /// `v.value`.
    pub fn get(&self) -> Result<T> {
        let b: Vec<u8> = self.p.call("get", &())?;
        args(&b)
    }

    /// `v.value = x`.
    pub fn set(&self, x: &T) -> Result<()> {
        self.p.call("set", &enc(x)?)
    }
}

typed_proxy!(
    /// An event in a manager (Python's `Manager().Event()`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let m = multiproc::managers::Manager::start().unwrap();
    /// let e = m.event().unwrap();
    /// assert!(!e.wait_timeout(Duration::from_millis(10)).unwrap());
    /// e.set().unwrap();
    /// assert!(e.wait_timeout(Duration::from_millis(10)).unwrap());
    /// ```
    EventProxy<>
);

impl EventProxy {
    /// Sets the flag, waking every waiter.
    pub fn set(&self) -> Result<()> {
        self.p.call("set", &())
    }

    /// Clears the flag.
    pub fn clear(&self) -> Result<()> {
        self.p.call("clear", &())
    }

    /// The flag.
    pub fn is_set(&self) -> Result<bool> {
        self.p.call("is_set", &())
    }

    /// Waits until the flag is set.
    pub fn wait(&self) -> Result<()> {
        let _: bool = self.p.call("wait", &None::<Duration>)?;
        Ok(())
    }

    /// Waits at most `timeout`; returns the flag.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool> {
        self.p.call("wait", &Some(timeout))
    }
}

typed_proxy!(
    /// A barrier in a manager (Python's `Manager().Barrier()`). A wait that times out breaks
    /// the barrier ([`Error::BrokenBarrier`] for every waiter), as in Python; so does a waiter
    /// whose process dies.
    BarrierProxy<>
);

impl BarrierProxy {
    /// Waits for all parties; returns this party's arrival index (0 to `parties - 1`).
    pub fn wait(&self) -> Result<usize> {
        self.p.call("wait", &None::<Duration>)
    }

    /// [`wait`](Self::wait) breaking the barrier after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<usize> {
        self.p.call("wait", &Some(timeout))
    }

    /// Breaks the barrier: current and future waiters get [`Error::BrokenBarrier`].
    pub fn abort(&self) -> Result<()> {
        self.p.call("abort", &())
    }

    /// Back to the initial state (current waiters get [`Error::BrokenBarrier`]).
    pub fn reset(&self) -> Result<()> {
        self.p.call("reset", &())
    }

    /// The number of parties.
    pub fn parties(&self) -> Result<usize> {
        self.p.call("parties", &())
    }

    /// Parties waiting now.
    pub fn n_waiting(&self) -> Result<usize> {
        self.p.call("n_waiting", &())
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> Result<bool> {
        self.p.call("broken", &())
    }
}
