//! Function identity across processes. See `src/function.md` for the invariants.
//!
//! A function sent to another process travels as a [`FnId`]: its address minus the address of
//! an anchor function in the same executable. Address-space layout randomisation moves the
//! executable as a whole, so the difference is the same in every process running the same
//! binary, whatever its start method. The child checks the parent's [`build_id`] first: a child
//! of a different binary refuses the task with [`Error::BuildIdMismatch`].
//!
//! Only zero-sized function types travel: `fn` items and closures that capture nothing. The
//! receiving side needs no value at all, it *conjures* the function from its type
//! ([`conjure`]). A capturing closure fails to compile, with the message in [`conjure`].

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};

/// Where a function lives, relative to [`anchor`]: valid in every process of the same build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FnId(i64);

/// The reference point. Never inlined, so it has one address in the executable's text.
#[inline(never)]
fn anchor() {
    std::hint::black_box(());
}

fn anchor_addr() -> usize {
    let f: fn() = anchor;
    f as usize
}

impl FnId {
    /// The identity of the function at `addr` (a function pointer cast to `usize`).
    pub(crate) fn from_addr(addr: usize) -> FnId {
        FnId(addr as i64 - anchor_addr() as i64)
    }

    /// The address of the function in this process.
    pub(crate) fn addr(self) -> usize {
        (anchor_addr() as i64 + self.0) as usize
    }
}

/// The signature every shipped entry point has after type erasure: decode the arguments from
/// `payload` (and `fds`), run, encode the result.
pub(crate) type Entry = fn(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>>;

/// Turns an [`Entry`] into its identity.
pub(crate) fn entry_id(e: Entry) -> FnId {
    FnId::from_addr(e as usize)
}

/// Turns an identity back into an [`Entry`].
///
/// # Safety
/// `id` must have been made by [`entry_id`] in a process running the same build (checked by the
/// caller through [`build_id`]).
pub(crate) unsafe fn entry_from_id(id: FnId) -> Entry {
    // SAFETY: by the caller's contract, id.addr() is the address of an `Entry` function in this
    // executable; fn pointers and usize have the same size on supported targets.
    unsafe { std::mem::transmute::<usize, Entry>(id.addr()) }
}

/// Produces the one value of a zero-sized function type.
///
/// This is what lets a child call a function it was never sent: the type says everything.
/// Compiling it for a type with captured state fails with the message below.
pub(crate) fn conjure<F: Copy + 'static>() -> F {
    const {
        assert!(
            std::mem::size_of::<F>() == 0,
            "multiproc: functions sent to other processes must be `fn` items or closures that \
             capture nothing (pass state as arguments; with StartMethod::Fork, \
             Process::from_closure runs a capturing closure)"
        )
    };
    // SAFETY: F is a zero-sized `Copy` type, so it has a single value with no bytes, and reading
    // it through a dangling, well-aligned pointer reads no memory. The type is inhabited: the
    // caller could only name it by having a value of it at compile time in this same build.
    unsafe { std::ptr::NonNull::<F>::dangling().as_ptr().read() }
}

/// The [`Entry`] for a function `F(A) -> R`.
pub(crate) fn entry_of<F, A, R>(_f: F) -> Entry
where
    F: Fn(A) -> R + Copy + 'static,
    A: DeserializeOwned,
    R: Serialize,
{
    fn run<F, A, R>(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: DeserializeOwned,
        R: Serialize,
    {
        let f: F = conjure::<F>();
        let a: A = codec::decode(payload, fds)?;
        let r = f(a);
        let mut out = Vec::new();
        codec::encode_plain(&r, &mut out)?;
        Ok(out)
    }
    // Force the compile-time check at the call site of the generic API.
    let _ = conjure::<F> as fn() -> F;
    run::<F, A, R>
}

/// This executable's build id: the GNU build-id note when the linker wrote one, else a hash of
/// the executable file. Computed once.
pub fn build_id() -> &'static [u8] {
    static ID: OnceLock<Vec<u8>> = OnceLock::new();
    ID.get_or_init(|| {
        read_gnu_build_id().unwrap_or_else(|| {
            let bytes = std::fs::read("/proc/self/exe").unwrap_or_default();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&bytes, &mut h);
            std::hash::Hasher::finish(&h).to_le_bytes().to_vec()
        })
    })
}

/// Hex form of a build id, for messages.
pub(crate) fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a parent's build id against ours.
pub(crate) fn check_build_id(parent: &[u8]) -> Result<()> {
    let mine = build_id();
    if mine == parent {
        Ok(())
    } else {
        Err(Error::BuildIdMismatch {
            parent: hex(parent),
            child: hex(mine),
        })
    }
}

/// Finds `NT_GNU_BUILD_ID` in the main program's loaded `PT_NOTE` segments.
fn read_gnu_build_id() -> Option<Vec<u8>> {
    let mut found: Option<Vec<u8>> = None;
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of the callback, and data
        // is the &mut Option<Vec<u8>> we passed in. The first object reported is the main
        // program; its PT_NOTE segments are mapped at dlpi_addr + p_vaddr for p_memsz bytes.
        unsafe {
            let found = &mut *(data as *mut Option<Vec<u8>>);
            let info = &*info;
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            for ph in phdrs {
                if ph.p_type != libc::PT_NOTE {
                    continue;
                }
                let start = (info.dlpi_addr as usize + ph.p_vaddr as usize) as *const u8;
                let seg = std::slice::from_raw_parts(start, ph.p_memsz as usize);
                if let Some(id) = parse_build_id_note(seg, ph.p_align as usize) {
                    *found = Some(id);
                    return 1;
                }
            }
            1 // stop after the main program either way
        }
    }
    // SAFETY: cb matches the callback signature and only uses `found` through `data`.
    unsafe {
        libc::dl_iterate_phdr(Some(cb), (&mut found as *mut Option<Vec<u8>>).cast());
    }
    found
}

/// Parses ELF notes, returning the GNU build-id descriptor if present. Pure: tested below.
pub(crate) fn parse_build_id_note(seg: &[u8], align: usize) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align = align.max(4);
    let rd = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(seg.get(at..at + 4)?.try_into().ok()?))
    };
    let mut off = 0;
    while off + 12 <= seg.len() {
        let namesz = rd(off)? as usize;
        let descsz = rd(off + 4)? as usize;
        let ty = rd(off + 8)?;
        let name_at = off + 12;
        let desc_at = name_at + namesz.div_ceil(align) * align;
        let next = desc_at + descsz.div_ceil(align) * align;
        if ty == NT_GNU_BUILD_ID && seg.get(name_at..name_at + namesz)? == b"GNU\0" {
            return seg.get(desc_at..desc_at + descsz).map(<[u8]>::to_vec);
        }
        if next <= off {
            return None;
        }
        off = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u32) -> u32 {
        x * 2
    }

    #[test]
    fn fn_id_round_trips() {
        let e = entry_of::<_, u32, u32>(double);
        let id = entry_id(e);
        // SAFETY: made by entry_id in this very process.
        let back = unsafe { entry_from_id(id) };
        let out = back(&postcard::to_stdvec(&21u32).unwrap(), Vec::new()).unwrap();
        assert_eq!(postcard::from_bytes::<u32>(&out).unwrap(), 42);
    }

    #[test]
    fn build_id_is_stable_and_nonempty() {
        assert!(!build_id().is_empty());
        assert_eq!(build_id(), build_id());
        assert!(check_build_id(build_id()).is_ok());
        let mut other = build_id().to_vec();
        other[0] ^= 0xff;
        assert!(matches!(
            check_build_id(&other),
            Err(Error::BuildIdMismatch { .. })
        ));
    }

    #[test]
    fn parses_a_note() {
        let mut seg = Vec::new();
        seg.extend_from_slice(&4u32.to_ne_bytes());
        seg.extend_from_slice(&3u32.to_ne_bytes());
        seg.extend_from_slice(&3u32.to_ne_bytes());
        seg.extend_from_slice(b"GNU\0");
        seg.extend_from_slice(&[1, 2, 3, 0]);
        assert_eq!(parse_build_id_note(&seg, 4), Some(vec![1, 2, 3]));
        assert_eq!(parse_build_id_note(&seg[..10], 4), None);
    }
}
