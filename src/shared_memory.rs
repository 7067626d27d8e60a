//! Named shared memory, as in Python's `multiprocessing.shared_memory`: [`SharedMemory`].
//!
//! A segment is a POSIX shared-memory object, a file in /dev/shm that any process can open by
//! name. Its *creator* owns the name: dropping the creator's handle (or calling
//! [`SharedMemory::unlink`]) removes it; processes that opened it keep their mapping until they
//! drop it.
//!
//! # Cleanup after a crash: the tracker
//! A creator killed by `SIGKILL` runs no destructor, so each process that creates a segment
//! also starts, once, a small *tracker* process (this executable again, entering before `main`
//! from `.init_array`, detached from the creator by a double fork and in its own session,
//! ignoring `SIGINT`/`SIGTERM`/`SIGHUP`). The creator keeps the write end of a pipe whose read end
//! the tracker holds, and writes `R name` when it creates a segment and `U name` when it unlinks
//! it. When every write end is closed — the creator and the children it forked (which inherit
//! the pipe and count as its clients) are all gone, however they ended — the tracker unlinks
//! the names still registered and exits.
//!
//! No moment of a creator's life leaves a name unknown to its tracker. `create` first registers
//! a private name (`psm_new_…`), makes and sizes the segment under it, registers the final
//! name *bound to the segment's inode*, then renames it into place
//! (`renameat2(RENAME_NOREPLACE)`, which fails if the name exists). Killed before the rename,
//! the creator leaves only the private name, which its tracker removes. Killed after it, the
//! final name is still that inode and is removed too. The inode binding also protects a
//! name the creator had already unlinked and that someone else made again: the tracker leaves
//! that one alone. (On a file system that cannot rename without replacing, `create` makes
//! the name directly and registers it just after, which leaves a window of two system calls.)
//!
//! Only the creator registers a name. Opening a segment ([`SharedMemory::open`], or receiving a
//! handle as an argument) never does, so a process that merely attached can neither unlink the
//! segment at its exit nor make anybody else's tracker do so: that is CPython's gh-82300 (every
//! attaching process registered the segment, and the first to exit destroyed it for all).
//! The price: a name outlives a SIGKILLed creator only as long as the creator's forked children,
//! not until the whole program ends; processes that already mapped it are unaffected.
//!
//! Anonymous shared objects (`Value`, `Array`, `Lock`...) do not use names at all (memfd).

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::platform::{self, Mapping};

/// A named block of shared memory (Python's `SharedMemory`).
///
/// ```
/// use multiproc::SharedMemory;
/// let a = SharedMemory::new(1024).unwrap(); // a fresh unique name
/// a.write_at(0, b"hello").unwrap();
/// let b = SharedMemory::open(a.name()).unwrap(); // e.g. in another process
/// let mut buf = [0u8; 5];
/// b.read_at(0, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// assert_eq!(b.size(), 1024);
/// drop(b);
/// drop(a); // the creator unlinks the name
/// assert!(SharedMemory::open("no-such-segment-here").is_err());
/// ```
pub struct SharedMemory {
    name: String,
    map: Mapping,
    size: usize,
    owner: bool,
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("creator", &self.owner)
            .finish()
    }
}

/// `/name` for the system calls. A name is 1 to 250 bytes, with no `/` (except a leading one),
/// NUL, or newline (the tracker's protocol is one name per line).
fn c_name(name: &str) -> Result<CString> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() || bare.len() > 250 || bare.contains(['/', '\0', '\n']) {
        return Err(Error::arg(format!(
            "invalid shared memory name {name:?}: 1 to 250 bytes, no '/' except a leading one, \
             no NUL or newline"
        )));
    }
    Ok(CString::new(format!("/{bare}")).expect("no NUL"))
}

fn unique_name() -> String {
    fresh_name("psm")
}

/// `{prefix}_{pid}_{bits}`: unique to this process and call, and hard to guess.
fn fresh_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mix =
        (t ^ (platform::getpid() as u64).rotate_left(32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    format!("{prefix}_{:08x}_{:x}", platform::getpid(), mix)
}

static TEST_HOOK: Mutex<Option<fn()>> = Mutex::new(None);

/// Installs (or removes) a function [`SharedMemory::create`] calls once the segment exists
/// under its private name, before it is renamed. For tests (to kill a creator there).
#[doc(hidden)]
pub fn set_test_hook(hook: Option<fn()>) {
    *TEST_HOOK.lock().unwrap_or_else(|p| p.into_inner()) = hook;
}

fn test_point() {
    let hook = *TEST_HOOK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = hook {
        h();
    }
}

impl SharedMemory {
    /// Creates a segment named `name` (a leading `/` is optional) of `size` bytes, zero-filled.
    /// Fails if the name exists ([`Error::Io`] with kind `AlreadyExists`), or is not 1 to 250
    /// bytes free of `/`, NUL and newline ([`Error::InvalidArgument`]). This handle is the
    /// creator: dropping it unlinks the name. The segment appears under its name complete
    /// (made under a private name, then renamed).
    pub fn create(name: &str, size: usize) -> Result<SharedMemory> {
        if size == 0 {
            return Err(Error::arg("a shared memory segment needs a positive size"));
        }
        let cname = c_name(name)?;
        let bare = cname.to_str().expect("ascii")[1..].to_string();
        // Made under a private name the tracker knows before it exists, then renamed: killed
        // at any point, the creator leaves neither name behind (see "Cleanup after a crash").
        let temp_bare = fresh_name("psm_new");
        let temp = c_name(&temp_bare)?;
        tracker::register(&temp_bare);
        let made = (|| {
            let fd = platform::shm_open(&temp, true, true)?;
            platform::ftruncate(fd.as_fd(), size)?;
            let map = Mapping::new(fd.as_fd(), size)?;
            Ok((map, platform::fstat_inode(fd.as_fd())?))
        })();
        let (map, inode) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = platform::shm_unlink(&temp);
                tracker::unregister(&temp_bare);
                return Err(e);
            }
        };
        tracker::register_inode(&bare, inode);
        test_point();
        let renamed = platform::shm_rename_noreplace(&temp, &cname);
        if !matches!(renamed, Ok(true)) {
            let _ = platform::shm_unlink(&temp);
        }
        tracker::unregister(&temp_bare);
        match renamed {
            Ok(true) => {}
            Ok(false) => {
                // No atomic rename here: create the name itself (a creator killed between
                // `shm_open` and its registration may then leave it behind).
                tracker::unregister_inode(&bare, inode);
                return SharedMemory::create_in_place(&cname, bare, size);
            }
            Err(e) => {
                tracker::unregister_inode(&bare, inode);
                return Err(e);
            }
        }
        Ok(SharedMemory {
            name: bare,
            map,
            size,
            owner: true,
        })
    }

    /// [`SharedMemory::create`] without the rename, for file systems that cannot do it.
    fn create_in_place(cname: &CStr, bare: String, size: usize) -> Result<SharedMemory> {
        let fd = platform::shm_open(cname, true, true)?;
        let made = (|| {
            platform::ftruncate(fd.as_fd(), size)?;
            Mapping::new(fd.as_fd(), size)
        })();
        let map = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = platform::shm_unlink(cname);
                return Err(e);
            }
        };
        tracker::register(&bare);
        Ok(SharedMemory {
            name: bare,
            map,
            size,
            owner: true,
        })
    }

    /// Creates a segment with a fresh unique name (Python's `SharedMemory(create=True,
    /// size=n)`).
    pub fn new(size: usize) -> Result<SharedMemory> {
        loop {
            match SharedMemory::create(&unique_name(), size) {
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                r => return r,
            }
        }
    }

    /// Opens an existing segment by name. The handle is not the creator: dropping it only
    /// unmaps.
    pub fn open(name: &str) -> Result<SharedMemory> {
        let cname = c_name(name)?;
        let bare = cname.to_str().expect("ascii")[1..].to_string();
        let fd = platform::shm_open(&cname, false, false)?;
        let size = platform::fstat_size(fd.as_fd())?;
        let map = Mapping::new(fd.as_fd(), size)?;
        Ok(SharedMemory {
            name: bare,
            map,
            size,
            owner: false,
        })
    }

    /// The name, without the leading `/` (as Python's `name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this handle created the segment (and unlinks it when dropped).
    pub fn is_creator(&self) -> bool {
        self.owner
    }

    /// Removes the name now (Python's `unlink()`); mappings stay valid. Any handle may call it;
    /// afterwards the creator's drop does not unlink again.
    pub fn unlink(&mut self) -> Result<()> {
        let r = platform::shm_unlink(&c_name(&self.name)?);
        if self.owner {
            tracker::unregister(&self.name);
            self.owner = false;
        }
        r
    }

    /// Pointer to the first byte (valid for `size()` bytes while this handle lives).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the segment.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: in bounds (checked); the source is shared memory other processes may write
        // concurrently, copied byte-wise into our own buffer (no reference to it is created).
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` into the segment starting at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked); no reference to the destination exists.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::arg(format!(
                "range {offset}..{offset}+{len} outside a segment of {} bytes",
                self.size
            ))),
        }
    }

    /// The bytes as a slice (Python's `buf`).
    ///
    /// # Safety
    /// No process may write the segment while the slice lives (otherwise use
    /// [`read_at`](SharedMemory::read_at), or synchronize with a [`Lock`](crate::Lock)).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `size` bytes; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.size) }
    }

    /// The bytes as a mutable slice.
    ///
    /// # Safety
    /// No other process (or other handle in this one) may read or write the segment while the
    /// slice lives.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for `size` bytes; the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.size) }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if self.owner {
            if let Ok(c) = c_name(&self.name) {
                let _ = platform::shm_unlink(&c);
            }
            tracker::unregister(&self.name);
        }
    }
}

/// A `SharedMemory` travels by name, as in Python: the receiver opens it (and is not the
/// creator).
impl Serialize for SharedMemory {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.name.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        SharedMemory::open(&name).map_err(serde::de::Error::custom)
    }
}

/// The tracker pipe's lock, held across a `fork` (after the process registry's), so that a
/// forked child finds it consistent; the child then shares the parent's pipe, as designed.
pub(crate) struct ForkLock(
    #[allow(dead_code)] std::sync::MutexGuard<'static, Option<Option<OwnedFd>>>,
);

pub(crate) fn lock_for_fork() -> ForkLock {
    ForkLock(tracker::PIPE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The per-creator tracker process (see the module docs).
mod tracker {
    use super::*;

    /// Names the tracker's pipe in its environment.
    const ENV: &str = "__MULTIPROC_SHM_TRACKER_FD";

    /// The write end of this process's tracker pipe, once started (`None` if it failed).
    /// Held across a `fork` (see [`super::ForkLock`]): a thread may hold it for the whole start
    /// of the tracker, and a child forked meanwhile would otherwise find it locked forever.
    pub(super) static PIPE: Mutex<Option<Option<OwnedFd>>> = Mutex::new(None);

    fn send(line: &str) {
        let mut g = PIPE.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(match start() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(
                        "multiproc: no shared-memory tracker ({e}); a killed creator may leak /dev/shm names"
                    );
                    None
                }
            });
        }
        if let Some(Some(fd)) = g.as_ref() {
            // One write of at most ~260 bytes: atomic on a pipe, even with forked children
            // writing to the same pipe.
            let _ = platform::write_all(fd.as_fd(), line.as_bytes());
        }
    }

    pub(super) fn register(name: &str) {
        send(&format!("R{name}\n"));
    }

    /// Registers `name` only while it is the object with inode `inode`: if it was unlinked and
    /// made again by someone else, the tracker leaves it alone.
    pub(super) fn register_inode(name: &str, inode: u64) {
        send(&format!("I{inode}:{name}\n"));
    }

    /// Withdraws a [`register_inode`] (and nothing else registered under that name).
    pub(super) fn unregister_inode(name: &str, inode: u64) {
        send(&format!("X{inode}:{name}\n"));
    }

    pub(super) fn unregister(name: &str) {
        // Never start a tracker just to unregister.
        let started = matches!(
            PIPE.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
            Some(Some(_))
        );
        if started {
            send(&format!("U{name}\n"));
        }
    }

    fn start() -> Result<OwnedFd> {
        // The helper is this executable entering through ON_LOAD: keep a reference to it so
        // that no linker drops the `.init_array` entry of an otherwise unreferenced object.
        std::hint::black_box(&ON_LOAD);
        let (read, write) = platform::pipe()?;
        platform::spawn_detached_self(ENV, read.as_fd(), |k| {
            !k.as_encoded_bytes().starts_with(b"__MULTIPROC_")
        })?;
        drop(read);
        Ok(write)
    }

    /// The tracker's life: collect names until every client is gone, then unlink the rest.
    fn run(fd: OwnedFd) -> ! {
        platform::ignore_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE]);
        // Hold no terminal or capture pipe open (a test harness waits for EOF on those).
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for target in 0..3 {
                let _ = platform::dup2(null.as_raw_fd(), target);
            }
        }
        let mut names = Names::default();
        let mut pending = Vec::new();
        let mut file = std::fs::File::from(fd);
        let mut buf = [0u8; 4096];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    apply_lines(&mut pending, &mut names);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        for n in names.to_unlink(|n| c_name(n).ok().and_then(|c| platform::shm_inode(&c))) {
            if let Ok(c) = c_name(&n) {
                let _ = platform::shm_unlink(&c);
            }
        }
        platform::exit_now(0)
    }

    /// What the tracker holds: names to unlink at the end, unconditionally or only while they
    /// are still a given inode.
    #[derive(Default, Debug, PartialEq)]
    pub(super) struct Names {
        pub(super) plain: HashSet<String>,
        pub(super) by_inode: HashSet<(String, u64)>,
    }

    impl Names {
        /// The names to unlink, given how to look up a name's current inode.
        pub(super) fn to_unlink(&self, inode_of: impl Fn(&str) -> Option<u64>) -> Vec<String> {
            let mut out: Vec<String> = self.plain.iter().cloned().collect();
            for (n, ino) in &self.by_inode {
                if !self.plain.contains(n) && inode_of(n) == Some(*ino) {
                    out.push(n.clone());
                }
            }
            out
        }
    }

    /// Applies every complete line of `pending` to `names` (pure: the protocol, tested alone).
    /// `R name` / `U name` register and withdraw a name (`U` also withdraws its inode-bound
    /// entries: its creator unlinked it); `I ino:name` / `X ino:name` do so for a name bound to
    /// an inode.
    pub(super) fn apply_lines(pending: &mut Vec<u8>, names: &mut Names) {
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let bound = |rest: &str| {
                let (ino, n) = rest.split_once(':')?;
                Some((n.to_string(), ino.parse::<u64>().ok()?))
            };
            match line.split_at_checked(1) {
                Some(("R", n)) => {
                    names.plain.insert(n.to_string());
                }
                Some(("U", n)) => {
                    names.plain.remove(n);
                    names.by_inode.retain(|(m, _)| m != n);
                }
                Some(("I", rest)) => {
                    if let Some(e) = bound(rest) {
                        names.by_inode.insert(e);
                    }
                }
                Some(("X", rest)) => {
                    if let Some(e) = bound(rest) {
                        names.by_inode.remove(&e);
                    }
                }
                _ => {}
            }
        }
    }

    /// Before `main` in every program linking multiproc: becomes the tracker if this process
    /// was started as one. A no-op otherwise (one environment lookup).
    extern "C" fn on_load() {
        if let Some(v) = std::env::var_os(ENV) {
            // SAFETY: before main, single-threaded: nobody reads the environment concurrently.
            unsafe { std::env::remove_var(ENV) };
            let Some(raw) = v.to_str().and_then(|s| s.parse::<i32>().ok()) else {
                platform::exit_now(2)
            };
            let fd = match platform::fd_from_env(raw) {
                Some(fd) => fd,
                None => platform::exit_now(2),
            };
            run(fd);
        }
    }

    // SAFETY: `.init_array` holds `extern "C" fn()` pointers that the loader calls once, before
    // `main`, with no arguments; `on_load` has that type.
    #[used]
    #[unsafe(link_section = ".init_array")]
    static ON_LOAD: extern "C" fn() = on_load;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines() {
        let mut names = tracker::Names::default();
        let mut p = b"Ra\nRb\nUa\nRc".to_vec();
        tracker::apply_lines(&mut p, &mut names);
        assert_eq!(names.plain, HashSet::from(["b".to_string()]));
        assert_eq!(p, b"Rc");
        p.extend_from_slice(b"\nUb\n\nX\nI7\nIx:y\n");
        tracker::apply_lines(&mut p, &mut names);
        assert_eq!(names.plain, HashSet::from(["c".to_string()]));
        assert!(names.by_inode.is_empty(), "malformed lines are ignored");
        assert!(p.is_empty());
    }

    #[test]
    fn inode_bound_names_are_unlinked_only_while_they_are_that_inode() {
        let mut names = tracker::Names::default();
        let mut p = b"Rtmp\nI7:a\nI8:b\nI9:c\nUtmp\nX9:c\nI5:d\nUd\n".to_vec();
        tracker::apply_lines(&mut p, &mut names);
        assert!(names.plain.is_empty());
        // `a` is still inode 7: unlinked. `b` was made again by someone else (inode 80): kept.
        // `c` was withdrawn (its rename failed), `d` unlinked by its creator.
        let mut gone = names.to_unlink(|n| match n {
            "a" => Some(7),
            "b" => Some(80),
            "c" => Some(9),
            "d" => Some(5),
            _ => None,
        });
        gone.sort();
        assert_eq!(gone, ["a"]);
        // A name gone already is not unlinked again.
        assert!(names.to_unlink(|_| None).is_empty());
    }

    #[test]
    fn names_are_validated() {
        assert!(c_name("a/b").is_err());
        assert!(c_name("").is_err());
        assert!(c_name("/").is_err());
        assert_eq!(c_name("/x").unwrap().to_str().unwrap(), "/x");
        assert_eq!(c_name("x").unwrap().to_str().unwrap(), "/x");
        assert!(
            c_name("a\nb").is_err(),
            "newlines would break the tracker's protocol"
        );
    }
}
