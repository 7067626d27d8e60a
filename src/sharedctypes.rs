//! Plain data in shared memory, as in Python's `multiprocessing.sharedctypes`: [`Value`] and
//! [`Array`] (with a [`Lock`]), [`RawValue`] and [`RawArray`] (without).
//!
//! The element type is a [`Pod`]: plain old data that any bit pattern (including all zeros) is
//! a valid value of — the integers, the floats and arrays of them. Each object lives in its own
//! anonymous memfd segment and passes to another process as an argument (its descriptor travels
//! with the message), under every start method; nothing is left in /dev/shm.
//!
//! # Access rules
//! * `Value`/`Array` memory is only touched with the lock held: [`Value::lock`] gives a guard
//!   that derefs to `&mut T`; [`Value::get`]/[`Value::set`] take the lock for one read or
//!   write. As in Python, `v.set(v.get()? + 1)` is two locked steps, not one: concurrent
//!   increments get lost. Hold the guard for a read-modify-write.
//! * `RawValue`/`RawArray` have no lock: reads and writes are single volatile copies of the
//!   element, which another process may change at any time (a read racing a write can see a
//!   torn value for elements wider than the machine word). They never hand out references.
//!
//! ```
//! use multiproc::{Array, Value};
//! let v = Value::new(0i64).unwrap();
//! *v.lock().unwrap() += 5;
//! assert_eq!(v.get().unwrap(), 5);
//!
//! let a = Array::from_slice(&[1.0f64, 2.0, 3.0]).unwrap();
//! a.lock().unwrap()[1] = 20.0;
//! assert_eq!(a.to_vec().unwrap(), vec![1.0, 20.0, 3.0]);
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::heap::{self, Segment, kind};
use crate::synchronize::{Lock, LockGuard, LockResult};

/// Plain old data that can live in shared memory.
///
/// # Safety
/// Implement only for `Copy` types without padding, pointers or references, for which every bit
/// pattern (in particular all zeros) is a valid value, with alignment at most 64. The crate
/// implements it for the integer and float types and arrays of `Pod`.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: a primitive integer or float: no padding, every bit pattern valid.
        unsafe impl Pod for $t {}
    )* };
}
pod!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64
);
// SAFETY: an array of Pod has no padding between elements and every bit pattern is valid.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

fn tag_of<T>() -> u64 {
    heap::type_tag(std::any::type_name::<T>())
}

const fn check_align<T>() {
    assert!(
        std::mem::align_of::<T>() <= 64,
        "a Pod type must have alignment <= 64"
    );
}

// ---------------------------------------------------------------------------------------------
// RawValue
// ---------------------------------------------------------------------------------------------

/// One `T` in shared memory, without a lock (Python's `RawValue`). See the [module
/// docs](self) for what unsynchronized access means.
///
/// ```
/// let v = multiproc::RawValue::new(7u32).unwrap();
/// v.set(v.get() * 6);
/// assert_eq!(v.get(), 42);
/// ```
pub struct RawValue<T: Pod> {
    seg: Arc<Segment>,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for RawValue<T> {
    fn clone(&self) -> Self {
        RawValue {
            seg: self.seg.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawValue").field(&self.get()).finish()
    }
}

impl<T: Pod> RawValue<T> {
    /// A new value in shared memory.
    pub fn new(value: T) -> Result<RawValue<T>> {
        const { check_align::<T>() };
        let seg = Segment::create(kind::VALUE, std::mem::size_of::<T>())?;
        seg.set_type_tag(tag_of::<T>());
        let v = RawValue {
            seg: Arc::new(seg),
            _t: PhantomData,
        };
        v.set(value);
        Ok(v)
    }

    /// Pointer to the value (64-byte aligned, valid while any handle lives).
    pub fn as_ptr(&self) -> *mut T {
        self.seg.payload().cast()
    }

    /// Reads the value (one volatile copy).
    pub fn get(&self) -> T {
        // SAFETY: the payload holds a T (size checked at open, alignment by construction), and
        // every bit pattern is a valid T (Pod).
        unsafe { self.as_ptr().read_volatile() }
    }

    /// Writes the value (one volatile copy).
    pub fn set(&self, value: T) {
        // SAFETY: as in `get`; no reference to the payload exists.
        unsafe { self.as_ptr().write_volatile(value) }
    }
}

impl<T: Pod> Serialize for RawValue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.seg.serialize(s)
    }
}

impl<'de, T: Pod> Deserialize<'de> for RawValue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::VALUE, Some(std::mem::size_of::<T>()))?;
        seg.check_type_tag(tag_of::<T>())
            .map_err(serde::de::Error::custom)?;
        Ok(RawValue {
            seg: Arc::new(seg),
            _t: PhantomData,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RawArray
// ---------------------------------------------------------------------------------------------

/// Offset of the elements in an array's payload (the length is at 0).
const ARRAY_DATA: usize = 64;

/// A fixed-length array of `T` in shared memory, without a lock (Python's `RawArray`).
///
/// ```
/// let a = multiproc::RawArray::<i32>::new(3).unwrap();
/// a.set(2, -1);
/// assert_eq!(a.to_vec(), vec![0, 0, -1]);
/// ```
pub struct RawArray<T: Pod> {
    seg: Arc<Segment>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for RawArray<T> {
    fn clone(&self) -> Self {
        RawArray {
            seg: self.seg.clone(),
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawArray").field(&self.to_vec()).finish()
    }
}

fn array_bytes<T>(len: usize) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .and_then(|b| b.checked_add(ARRAY_DATA))
        .ok_or_else(|| Error::arg("array too large"))
}

impl<T: Pod> RawArray<T> {
    /// `len` elements, all zero (Python's `RawArray('i', 10)`).
    pub fn new(len: usize) -> Result<RawArray<T>> {
        const { check_align::<T>() };
        let seg = Segment::create(kind::ARRAY, array_bytes::<T>(len)?)?;
        seg.set_type_tag(tag_of::<T>());
        // SAFETY: the payload is 64-aligned and at least 8 bytes; nobody else has it yet.
        unsafe { seg.payload().cast::<u64>().write(len as u64) };
        Ok(RawArray {
            seg: Arc::new(seg),
            len,
            _t: PhantomData,
        })
    }

    /// An array holding a copy of `items` (Python's `RawArray('d', [..])`).
    pub fn from_slice(items: &[T]) -> Result<RawArray<T>> {
        let a = RawArray::new(items.len())?;
        a.copy_from_slice(items);
        Ok(a)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to the first element (valid for `len()` elements while any handle lives).
    pub fn as_ptr(&self) -> *mut T {
        // SAFETY: ARRAY_DATA is inside the payload.
        unsafe { self.seg.payload().add(ARRAY_DATA).cast() }
    }

    fn at(&self, i: usize) -> *mut T {
        assert!(
            i < self.len,
            "index {i} out of range for array of length {}",
            self.len
        );
        // SAFETY: i < len and the payload holds len elements.
        unsafe { self.as_ptr().add(i) }
    }

    /// Reads element `i` (panics if out of range, as slice indexing does).
    pub fn get(&self, i: usize) -> T {
        // SAFETY: in bounds, aligned, every bit pattern valid (Pod).
        unsafe { self.at(i).read_volatile() }
    }

    /// Writes element `i` (panics if out of range).
    pub fn set(&self, i: usize, value: T) {
        // SAFETY: in bounds and aligned; no reference to the payload exists.
        unsafe { self.at(i).write_volatile(value) }
    }

    /// Copies every element out.
    pub fn to_vec(&self) -> Vec<T> {
        (0..self.len).map(|i| self.get(i)).collect()
    }

    /// Overwrites every element; panics if `items.len() != self.len()`.
    pub fn copy_from_slice(&self, items: &[T]) {
        assert_eq!(items.len(), self.len, "length mismatch");
        for (i, v) in items.iter().enumerate() {
            self.set(i, *v);
        }
    }
}

impl<T: Pod> Serialize for RawArray<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.seg.serialize(s)
    }
}

impl<'de, T: Pod> Deserialize<'de> for RawArray<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let seg = heap::deserialize_segment(d, kind::ARRAY, None)?;
        seg.check_type_tag(tag_of::<T>())
            .map_err(serde::de::Error::custom)?;
        // SAFETY: an ARRAY segment's payload starts with its length, written by the creator.
        let len = unsafe { seg.payload().cast::<u64>().read() } as usize;
        if array_bytes::<T>(len).ok() != Some(seg.payload_len()) {
            return Err(serde::de::Error::custom(
                "shared array: length does not match the segment size",
            ));
        }
        Ok(RawArray {
            seg: Arc::new(seg),
            len,
            _t: PhantomData,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Value
// ---------------------------------------------------------------------------------------------

/// One `T` in shared memory with a process-shared [`Lock`] (Python's `Value`).
///
/// ```
/// let v = multiproc::Value::new(1.5f64).unwrap();
/// {
///     let mut g = v.lock().unwrap();
///     *g *= 2.0; // a read-modify-write under one lock
/// }
/// assert_eq!(v.get().unwrap(), 3.0);
/// ```
pub struct Value<T: Pod> {
    raw: RawValue<T>,
    lock: Lock,
}

impl<T: Pod> Clone for Value<T> {
    fn clone(&self) -> Self {
        Value {
            raw: self.raw.clone(),
            lock: self.lock.clone(),
        }
    }
}

impl<T: Pod> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("type", &std::any::type_name::<T>())
            .field("lock", &self.lock)
            .finish()
    }
}

impl<T: Pod> Value<T> {
    /// A new value with a new lock (Python's `Value('i', 0)`).
    pub fn new(value: T) -> Result<Value<T>> {
        Value::with_lock(value, Lock::new()?)
    }

    /// A new value guarded by an existing lock (Python's `Value('i', 0, lock=l)`).
    pub fn with_lock(value: T, lock: Lock) -> Result<Value<T>> {
        Ok(Value {
            raw: RawValue::new(value)?,
            lock,
        })
    }

    /// The lock (Python's `get_lock()`).
    pub fn get_lock(&self) -> &Lock {
        &self.lock
    }

    /// Locks and gives access to the value. A dead holder is reported as
    /// [`LockError::OwnerDied`](crate::LockError::OwnerDied) with the guard (repair, then `mark_consistent`).
    pub fn lock(&self) -> LockResult<ValueGuard<'_, T>> {
        self.wrap(self.lock.acquire())
    }

    /// As [`lock`](Value::lock), waiting at most `timeout`.
    pub fn lock_timeout(&self, timeout: Duration) -> LockResult<ValueGuard<'_, T>> {
        self.wrap(self.lock.acquire_timeout(timeout))
    }

    fn wrap<'a>(&'a self, r: LockResult<LockGuard<'a>>) -> LockResult<ValueGuard<'a, T>> {
        let ptr = self.raw.as_ptr();
        match r {
            Ok(guard) => Ok(ValueGuard { guard, ptr }),
            Err(e) => Err(e.map(|guard| ValueGuard { guard, ptr })),
        }
    }

    /// Reads the value under the lock (Python's `v.value`). `Err(Error::OwnerDied)` while a
    /// holder's death is unrepaired.
    pub fn get(&self) -> Result<T> {
        Ok(*self.lock()?)
    }

    /// Writes the value under the lock (Python's `v.value = x`).
    pub fn set(&self, value: T) -> Result<()> {
        *self.lock()? = value;
        Ok(())
    }
}

/// The value of a [`Value`], locked. Derefs to `T`; releases the lock when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ValueGuard<'a, T: Pod> {
    guard: LockGuard<'a>,
    ptr: *mut T,
}

impl<T: Pod> ValueGuard<'_, T> {
    /// True if a previous holder died and the value has not been declared repaired.
    pub fn owner_died(&self) -> bool {
        self.guard.owner_died()
    }

    /// Declares the value repaired (see [`LockError`](crate::LockError)).
    pub fn mark_consistent(&mut self) {
        self.guard.mark_consistent()
    }
}

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock is held, and every process touches a Value's memory only with it held.
        unsafe { &*self.ptr }
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; the guard is borrowed mutably, so this is the only reference.
        unsafe { &mut *self.ptr }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValueGuard").field(&**self).finish()
    }
}

impl<T: Pod> Serialize for Value<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (&self.raw, &self.lock).serialize(s)
    }
}

impl<'de, T: Pod> Deserialize<'de> for Value<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (raw, lock) = <(RawValue<T>, Lock)>::deserialize(d)?;
        Ok(Value { raw, lock })
    }
}

// ---------------------------------------------------------------------------------------------
// Array
// ---------------------------------------------------------------------------------------------

/// A fixed-length array of `T` in shared memory with a process-shared [`Lock`] (Python's
/// `Array`).
///
/// ```
/// let a = multiproc::Array::<u8>::new(4).unwrap();
/// a.lock().unwrap().copy_from_slice(b"abcd");
/// assert_eq!(a.get(3).unwrap(), b'd');
/// ```
pub struct Array<T: Pod> {
    raw: RawArray<T>,
    lock: Lock,
}

impl<T: Pod> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            raw: self.raw.clone(),
            lock: self.lock.clone(),
        }
    }
}

impl<T: Pod> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.len())
            .field("lock", &self.lock)
            .finish()
    }
}

impl<T: Pod> Array<T> {
    /// `len` zeroed elements with a new lock (Python's `Array('i', 10)`).
    pub fn new(len: usize) -> Result<Array<T>> {
        Ok(Array {
            raw: RawArray::new(len)?,
            lock: Lock::new()?,
        })
    }

    /// A copy of `items` with a new lock (Python's `Array('d', [..])`).
    pub fn from_slice(items: &[T]) -> Result<Array<T>> {
        Ok(Array {
            raw: RawArray::from_slice(items)?,
            lock: Lock::new()?,
        })
    }

    /// A copy of `items` guarded by an existing lock.
    pub fn with_lock(items: &[T], lock: Lock) -> Result<Array<T>> {
        Ok(Array {
            raw: RawArray::from_slice(items)?,
            lock,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The lock (Python's `get_lock()`).
    pub fn get_lock(&self) -> &Lock {
        &self.lock
    }

    /// Locks and gives access to the elements as a slice.
    pub fn lock(&self) -> LockResult<ArrayGuard<'_, T>> {
        self.wrap(self.lock.acquire())
    }

    /// As [`lock`](Array::lock), waiting at most `timeout`.
    pub fn lock_timeout(&self, timeout: Duration) -> LockResult<ArrayGuard<'_, T>> {
        self.wrap(self.lock.acquire_timeout(timeout))
    }

    fn wrap<'a>(&'a self, r: LockResult<LockGuard<'a>>) -> LockResult<ArrayGuard<'a, T>> {
        let (ptr, len) = (self.raw.as_ptr(), self.raw.len());
        match r {
            Ok(guard) => Ok(ArrayGuard { guard, ptr, len }),
            Err(e) => Err(e.map(|guard| ArrayGuard { guard, ptr, len })),
        }
    }

    /// Reads element `i` under the lock (panics if out of range).
    pub fn get(&self, i: usize) -> Result<T> {
        Ok(self.lock()?[i])
    }

    /// Writes element `i` under the lock (panics if out of range).
    pub fn set(&self, i: usize, value: T) -> Result<()> {
        self.lock()?[i] = value;
        Ok(())
    }

    /// Copies the elements out under the lock.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        Ok(self.lock()?.to_vec())
    }
}

/// The elements of an [`Array`], locked. Derefs to `[T]`; releases the lock when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T: Pod> {
    guard: LockGuard<'a>,
    ptr: *mut T,
    len: usize,
}

impl<T: Pod> ArrayGuard<'_, T> {
    /// True if a previous holder died and the array has not been declared repaired.
    pub fn owner_died(&self) -> bool {
        self.guard.owner_died()
    }

    /// Declares the array repaired (see [`LockError`](crate::LockError)).
    pub fn mark_consistent(&mut self) {
        self.guard.mark_consistent()
    }
}

impl<T: Pod> Deref for ArrayGuard<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lock is held and every process touches an Array's memory only with it
        // held; ptr/len describe the array's elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Pod> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; the guard is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ArrayGuard").field(&&**self).finish()
    }
}

impl<T: Pod> Serialize for Array<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (&self.raw, &self.lock).serialize(s)
    }
}

impl<'de, T: Pod> Deserialize<'de> for Array<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (raw, lock) = <(RawArray<T>, Lock)>::deserialize(d)?;
        Ok(Array { raw, lock })
    }
}

// ---------------------------------------------------------------------------------------------
// Context constructors
// ---------------------------------------------------------------------------------------------

/// Constructors, as Python's `ctx.Value(..)`, `ctx.Array(..)`, ...
impl Context {
    /// A new [`Value`] with its own lock.
    pub fn value<T: Pod>(&self, value: T) -> Result<Value<T>> {
        Value::new(value)
    }
    /// A new [`Array`] holding a copy of `items`, with its own lock.
    pub fn array<T: Pod>(&self, items: &[T]) -> Result<Array<T>> {
        Array::from_slice(items)
    }
    /// A new [`RawValue`].
    pub fn raw_value<T: Pod>(&self, value: T) -> Result<RawValue<T>> {
        RawValue::new(value)
    }
    /// A new [`RawArray`] holding a copy of `items`.
    pub fn raw_array<T: Pod>(&self, items: &[T]) -> Result<RawArray<T>> {
        RawArray::from_slice(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_tags_differ() {
        assert_ne!(tag_of::<u32>(), tag_of::<f32>());
        assert_ne!(tag_of::<[u8; 4]>(), tag_of::<u32>());
    }

    /// Sends `v` through the codec as another process would receive it, decoding it as `U`.
    fn round_trip<V: Serialize, U: serde::de::DeserializeOwned>(v: &V) -> Result<U> {
        let mut bytes = Vec::new();
        let fds = crate::codec::encode_into(v, &mut bytes)?;
        let owned = fds
            .into_iter()
            .map(crate::platform::dup_raw)
            .collect::<Result<Vec<_>>>()?;
        crate::codec::decode(&bytes, owned)
    }

    #[test]
    fn handles_decode_only_as_their_own_type() {
        let v = RawValue::new(7u32).unwrap();
        let same: RawValue<u32> = round_trip(&v).unwrap();
        same.set(8);
        assert_eq!(v.get(), 8);
        assert!(round_trip::<_, RawValue<f32>>(&v).is_err());
        assert!(round_trip::<_, RawValue<u64>>(&v).is_err());
        assert!(round_trip::<_, RawArray<u32>>(&v).is_err());
        let a = Array::from_slice(&[1u16, 2, 3]).unwrap();
        let b: Array<u16> = round_trip(&a).unwrap();
        assert_eq!(b.to_vec().unwrap(), vec![1, 2, 3]);
        assert!(round_trip::<_, Array<i16>>(&a).is_err());
        assert!(round_trip::<_, Value<u16>>(&a).is_err());
    }

    #[test]
    fn zero_length_array() {
        let a = RawArray::<u64>::new(0).unwrap();
        assert!(a.is_empty());
        assert_eq!(a.to_vec(), Vec::<u64>::new());
    }
}
