//! How values become bytes between processes: `serde` with the `postcard` format, plus a side
//! channel for file descriptors.
//!
//! The format is chosen for being maintained, compact (varints) and fast on the small messages
//! that dominate IPC: `cargo bench --bench codec` puts it beside bitcode's serde mode, and on
//! this project's machines postcard encodes+decodes a `u64` in ~25 ns against ~300 ns, a small
//! struct in ~0.3 us against ~5 us; bitcode wins only on large numeric vectors (1.6x). Everything
//! goes through [`encode_into`] and [`decode`] (and their `_plain` forms), so the format can
//! change in this one file.
//!
//! # Bytes
//! serde sees a `Vec<u8>` as a sequence of integers, element by element (~4 ms per MiB). For
//! byte payloads use [`serde_bytes::ByteBuf`] (re-exported as
//! `multiproc::serde_bytes`), which travels as one block (~0.25 ms per MiB, a copy).
//!
//! # Handles inside values
//! Some values are *handles* to kernel objects: a [`Connection`](crate::Connection), a lock or a
//! queue in shared memory. They serialize by pushing their descriptor into the current
//! list of descriptors that [`encode_into`] returns (see [`serialize_fd`]) and writing its index; the transport sends the
//! descriptors along (`SCM_RIGHTS` on a Unix socket) and the receiver's [`decode`] hands them back
//! to [`deserialize_fd`] by index. Serializing a handle outside [`encode_into`] is an error, not a
//! dangling number.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

thread_local! {
    static OUT_FDS: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
    static IN_FDS: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// Serializes `v`, appending to `out` (which may already hold a header). Returns the
/// descriptors of the handles inside it.
pub(crate) fn encode_into<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> Result<Vec<RawFd>> {
    let saved = OUT_FDS.with(|c| c.replace(Some(Vec::new())));
    let r = postcard::to_extend(v, std::mem::take(out));
    let fds = OUT_FDS.with(|c| c.replace(saved)).unwrap_or_default();
    *out = r.map_err(|e| Error::Encode(e.to_string()))?;
    Ok(fds)
}

/// Serializes `v`, which must contain no handle (the cheap path for plain data).
pub(crate) fn encode_plain<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> Result<()> {
    let fds = encode_into(v, out)?;
    if !fds.is_empty() {
        return Err(Error::Encode(
            "this channel cannot carry handles (file descriptors)".into(),
        ));
    }
    Ok(())
}

/// Deserializes a `T` from `bytes`, giving the handles inside it the descriptors `fds` that
/// arrived with them. Descriptors nobody claimed are closed.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<T> {
    let saved = IN_FDS.with(|c| c.replace(Some(fds.into_iter().map(Some).collect())));
    let r = postcard::from_bytes::<T>(bytes);
    IN_FDS.with(|c| c.replace(saved));
    r.map_err(|e| Error::Decode(e.to_string()))
}

/// Deserializes plain data (no handles).
pub(crate) fn decode_plain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode(bytes, Vec::new())
}

/// Size of `v` encoded as plain data, without encoding it: for writers that reserve room first
/// and then encode in place (the queue ring). Fails for values holding handles.
pub(crate) fn encoded_size_plain<T: Serialize + ?Sized>(v: &T) -> Result<usize> {
    postcard::serialize_with_flavor(v, postcard::ser_flavors::Size::default())
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Encodes plain data straight into `buf`; returns how many bytes it used. Fails if `buf` is
/// too small or `v` holds a handle.
pub(crate) fn encode_plain_to_slice<T: Serialize + ?Sized>(v: &T, buf: &mut [u8]) -> Result<usize> {
    postcard::to_slice(v, buf)
        .map(|used| used.len())
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Deserializes plain data straight from `bytes`, without the handle side channel (a handle
/// inside fails): the fast path for data that cannot carry handles (queue messages).
pub(crate) fn decode_plain_only<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Decode(e.to_string()))
}

/// For a handle's `Serialize`: records `fd` to travel with the message and writes its index.
pub(crate) fn serialize_fd<S: Serializer>(fd: BorrowedFd<'_>, s: S) -> Result<S::Ok, S::Error> {
    let idx = OUT_FDS.with(|c| {
        c.borrow_mut().as_mut().map(|v| {
            v.push(fd.as_raw_fd());
            (v.len() - 1) as u32
        })
    });
    match idx {
        Some(i) => i.serialize(s),
        None => Err(serde::ser::Error::custom(
            "a multiproc handle (connection, lock, queue, shared memory) can only be serialized \
             by multiproc when it is sent to another process",
        )),
    }
}

/// For a handle's `Deserialize`: takes the descriptor that travelled with the message.
pub(crate) fn deserialize_fd<'de, D: Deserializer<'de>>(d: D) -> Result<OwnedFd, D::Error> {
    let idx = u32::deserialize(d)? as usize;
    IN_FDS
        .with(|c| {
            c.borrow_mut()
                .as_mut()
                .and_then(|v| v.get_mut(idx).and_then(Option::take))
        })
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "handle refers to file descriptor #{idx}, which did not arrive with the message"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Plain {
        a: u32,
        b: String,
        c: Vec<i64>,
    }

    #[test]
    fn round_trip_plain() {
        let v = Plain {
            a: 7,
            b: "x".into(),
            c: vec![-1, 2, 3],
        };
        let mut bytes = Vec::new();
        assert!(encode_into(&v, &mut bytes).unwrap().is_empty());
        let back: Plain = decode_plain(&bytes).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut bytes = Vec::new();
        let plain = Plain {
            a: 1,
            b: "hello".into(),
            c: vec![1, 2],
        };
        encode_into(&plain, &mut bytes).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode_plain::<Plain>(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn fd_outside_encode_is_an_error() {
        struct H;
        impl Serialize for H {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                // SAFETY: the borrow lasts only this call, nothing closes fd 0, and `serialize_fd`
                // only records the number (the test never sends or reads through it).
                let fd = unsafe { BorrowedFd::borrow_raw(0) };
                serialize_fd(fd, s)
            }
        }
        assert!(postcard::to_stdvec(&H).is_err());
        let mut bytes = Vec::new();
        assert_eq!(encode_into(&H, &mut bytes).unwrap(), vec![0]);
    }
}
