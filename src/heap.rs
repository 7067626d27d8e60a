//! Anonymous shared-memory segments for the process-shared objects (`Lock`, `Value`, ...).
//!
//! Python's `multiprocessing.heap` carves every `Value`/`Lock` out of a few big arenas. Here each
//! object gets its own small `memfd` (a page of memory, one descriptor): simpler, and nothing can
//! leak, because a memfd has no name in /dev/shm and the kernel frees it when the last
//! descriptor and the last mapping are gone, even if every process that used it was SIGKILLed.
//!
//! # Layout and invariants
//! * Bytes `0..8` hold a magic number naming the kind of object (`kind`), written by the creator
//!   before the segment is shared; bytes `8..16` hold the payload length; bytes `16..24` a tag
//!   of the element type for `Value`/`Array`. A handle received from another process checks
//!   them, so a descriptor for a `Semaphore` can never be mapped as a `Lock`, nor a
//!   `Value<u32>` as a `Value<f32>` (postcard carries no type tags).
//! * Every segment is one page or more: one object per memfd costs a descriptor and a page per
//!   object (a `Value` is two: the value and its lock). Programs that need millions of shared
//!   values should use one `Array`.
//! * The payload starts at [`HEADER`] (64 bytes, a cache line) and is zero-filled at creation.
//! * A [`Segment`] owns its descriptor and its mapping; handles share one through an `Arc`, and
//!   it serializes as that descriptor ([`crate::codec::serialize_fd`]).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::error::{Error, Result};
use crate::platform::{self, Mapping};

/// Offset of the payload in a segment.
pub(crate) const HEADER: usize = 64;

/// One memfd-backed shared mapping holding one object.
#[derive(Debug)]
pub(crate) struct Segment {
    fd: OwnedFd,
    map: Mapping,
}

impl Segment {
    /// A fresh zero-filled segment of `HEADER + len` bytes tagged `kind`.
    pub(crate) fn create(kind: u64, len: usize) -> Result<Segment> {
        let total = HEADER
            .checked_add(len)
            .ok_or_else(|| Error::arg("shared object too large"))?;
        let fd = platform::memfd(c"multiproc", total)?;
        let map = Mapping::new(fd.as_fd(), total)?;
        let seg = Segment { fd, map };
        seg.word(8).store(len as u64, Ordering::Relaxed);
        seg.word(0).store(kind, Ordering::Release);
        Ok(seg)
    }

    /// Maps a segment received from another process, checking its kind and (when given) its
    /// payload length.
    pub(crate) fn open(fd: OwnedFd, kind: u64, len: Option<usize>) -> Result<Segment> {
        let total = platform::fstat_size(fd.as_fd())?;
        if total < HEADER {
            return Err(Error::Decode("shared object: segment too small".into()));
        }
        let map = Mapping::new(fd.as_fd(), total)?;
        let seg = Segment { fd, map };
        if seg.word(0).load(Ordering::Acquire) != kind {
            return Err(Error::Decode(
                "shared object: the descriptor holds a different kind of object".into(),
            ));
        }
        let have = seg.word(8).load(Ordering::Relaxed);
        if have != (total - HEADER) as u64 || len.is_some_and(|l| l as u64 != have) {
            return Err(Error::Decode(
                "shared object: the segment has a different size than its type needs".into(),
            ));
        }
        Ok(seg)
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off is 0, 8 or 16, inside the header of a page-aligned mapping of >= HEADER bytes;
        // AtomicU64 has the size and alignment of u64 and the header is only accessed atomically.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    /// Records a tag for the payload's type (header bytes `16..24`), checked by
    /// [`Segment::check_type_tag`] in a receiving process.
    pub(crate) fn set_type_tag(&self, tag: u64) {
        self.word(16).store(tag, Ordering::Release);
    }

    /// Fails unless the segment was tagged `tag`.
    pub(crate) fn check_type_tag(&self, tag: u64) -> Result<()> {
        if self.word(16).load(Ordering::Acquire) == tag {
            Ok(())
        } else {
            Err(Error::Decode(
                "shared object: the segment holds a different element type".into(),
            ))
        }
    }

    /// Start of the payload (64-byte aligned).
    pub(crate) fn payload(&self) -> *mut u8 {
        // SAFETY: the mapping has at least HEADER bytes.
        unsafe { self.map.as_ptr().add(HEADER) }
    }

    /// Payload length in bytes.
    pub(crate) fn payload_len(&self) -> usize {
        self.map.len() - HEADER
    }
}

impl Serialize for Segment {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        codec::serialize_fd(self.fd.as_fd(), s)
    }
}

/// Deserializes the descriptor of a segment; the caller maps it with [`Segment::open`].
pub(crate) fn deserialize_segment<'de, D: Deserializer<'de>>(
    d: D,
    kind: u64,
    len: Option<usize>,
) -> std::result::Result<Segment, D::Error> {
    let fd = codec::deserialize_fd(d)?;
    Segment::open(fd, kind, len).map_err(serde::de::Error::custom)
}

/// A `Deserialize` adapter for when the kind is checked later.
pub(crate) struct RawSegmentFd(pub(crate) OwnedFd);

impl<'de> Deserialize<'de> for RawSegmentFd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        codec::deserialize_fd(d).map(RawSegmentFd)
    }
}

/// A stable tag for a type name (FNV-1a), to catch a handle decoded as the wrong element type.
pub(crate) fn type_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Magic numbers of the object kinds (ASCII tags).
pub(crate) mod kind {
    pub(crate) const LOCK: u64 = u64::from_le_bytes(*b"mp-lock\0");
    pub(crate) const RLOCK: u64 = u64::from_le_bytes(*b"mp-rlock");
    pub(crate) const SEMAPHORE: u64 = u64::from_le_bytes(*b"mp-sema\0");
    pub(crate) const EVENT: u64 = u64::from_le_bytes(*b"mp-event");
    pub(crate) const CONDITION: u64 = u64::from_le_bytes(*b"mp-cond\0");
    pub(crate) const BARRIER: u64 = u64::from_le_bytes(*b"mp-barr\0");
    pub(crate) const VALUE: u64 = u64::from_le_bytes(*b"mp-value");
    pub(crate) const ARRAY: u64 = u64::from_le_bytes(*b"mp-array");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_length_are_checked() {
        let s = Segment::create(kind::LOCK, 100).unwrap();
        assert_eq!(s.payload_len(), 100);
        assert_eq!(s.payload() as usize % 64, 0);
        let fd = platform::dup(s.fd.as_fd()).unwrap();
        assert!(Segment::open(fd, kind::EVENT, None).is_err());
        let fd = platform::dup(s.fd.as_fd()).unwrap();
        assert!(Segment::open(fd, kind::LOCK, Some(99)).is_err());
        let fd = platform::dup(s.fd.as_fd()).unwrap();
        let t = Segment::open(fd, kind::LOCK, Some(100)).unwrap();
        // SAFETY: payload has 100 bytes in both mappings of the same memfd.
        unsafe {
            *s.payload() = 42;
            assert_eq!(*t.payload(), 42);
        }
    }
}
