//! The NVLink path between processes of one host.
//!
//! Data: the writer maps the receiver's GPU allocation through CUDA IPC (peer access enabled
//! lazily by the driver) and copies into it on its own stream, so the bytes cross NVLink without
//! any CPU involvement and without special process capabilities.
//!
//! Immediates: once the copy's event has completed (the bytes are in the receiver's GPU memory),
//! the writer pushes the immediate into the receiver's *mailbox*, a bounded multi-producer queue
//! in POSIX shared memory that the receiver's worker polls like a completion queue. Nothing
//! depends on the order of copies or of mailbox entries.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::desc::{GpuDesc, NvlinkAddr};
use crate::domain_types::{Path, RegionMem};
use crate::error::{Error, Result};

/// How an NVLink writer maps the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvlinkMap {
    /// `cuMemAlloc` memory: the descriptor's CUDA IPC handle.
    Ipc,
    /// VMM memory (`expandable_segments`): allocations fetched as file descriptors from the
    /// owner's socket ([`crate::vmm_share`]).
    Vmm,
}

/// The path chosen for a transfer, how NVLink maps the destination, and why NVLink was not
/// chosen (None when it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: Path,
    pub map: Option<NvlinkMap>,
    pub why_not_nvlink: Option<&'static str>,
}

/// Picks the path from a local source of kind `src` to a destination described by `dst` (its
/// GPU part), between this engine's NVLink address `mine` and the owner's `theirs`. NVLink when
/// both sides are GPU memory of different processes of one host and the owner shared the
/// memory (a CUDA IPC handle, or a VMM region served over its socket); otherwise staging
/// (GPU memory over a provider without GPU support) or plain fabric writes, with the reason.
pub fn select_path(
    src: RegionMem,
    dst: Option<&GpuDesc>,
    mine: Option<&NvlinkAddr>,
    theirs: Option<&NvlinkAddr>,
) -> Route {
    let fallback = |why: &'static str| {
        let dst_staged = dst.is_some_and(|g| !g.direct);
        let path = if dst_staged || matches!(src, RegionMem::Gpu(_)) {
            Path::Staged
        } else {
            Path::Fabric
        };
        Route {
            path,
            map: None,
            why_not_nvlink: Some(why),
        }
    };
    if !matches!(src, RegionMem::Gpu(_) | RegionMem::GpuDirect(_)) {
        return fallback("the source is not GPU memory");
    }
    let Some(g) = dst else {
        return fallback("the destination is not GPU memory");
    };
    let Some(mine) = mine else {
        return fallback("this engine has NVLink off (no cuda_device, or nvlink disabled)");
    };
    let Some(theirs) = theirs else {
        return fallback("the owner accepts no NVLink writes");
    };
    if mine.host_id != theirs.host_id {
        return fallback("the owner is on another host");
    }
    if mine.pid == theirs.pid {
        return fallback("the owner is this process (NVLink sharing needs two processes)");
    }
    let nvlink = |map| Route {
        path: Path::Nvlink,
        map: Some(map),
        why_not_nvlink: None,
    };
    if !g.ipc_handle.is_empty() {
        return nvlink(NvlinkMap::Ipc);
    }
    if g.vmm.is_some() {
        if theirs.vmm_socket.is_empty() {
            return fallback("the owner serves no VMM socket");
        }
        return nvlink(NvlinkMap::Vmm);
    }
    fallback(
        "the owner could not share the memory (no CUDA IPC handle, and not VMM memory \
         exportable as a file descriptor; see the owner's region nvlink_note)",
    )
}

const MAGIC: u64 = 0x5354_4f4c_4d42_5831; // "STOLMBX1"

/// Identity of this host: the kernel's boot id (NVLink is only tried between equal ids).
pub fn host_id() -> Vec<u8> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().as_bytes().to_vec())
        .unwrap_or_default()
}

#[repr(C)]
struct Head {
    magic: u64,
    capacity: u64,
    tail: AtomicU64,
    _pad: [u64; 5],
}

#[repr(C)]
struct Slot {
    seq: AtomicU64,
    imm: AtomicU64,
}

/// A mailbox mapped into this process: the owner consumes, peers produce.
pub struct Mailbox {
    name: String,
    base: *mut u8,
    len: usize,
    owner: bool,
    /// Next position to consume (owner only).
    head: u64,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the raw pointer is owned
// by this value and unmapped on drop.
unsafe impl Send for Mailbox {}

fn os_err(call: &str, name: &str) -> Error {
    Error::Config(format!(
        "{call}({name}): {}",
        std::io::Error::last_os_error()
    ))
}

impl Mailbox {
    fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping holds a Head followed by `capacity` slots (checked at open).
        unsafe {
            let head = &*(self.base as *const Head);
            std::slice::from_raw_parts(
                self.base.add(std::mem::size_of::<Head>()) as *const Slot,
                head.capacity as usize,
            )
        }
    }

    fn head(&self) -> &Head {
        // SAFETY: the mapping starts with a Head.
        unsafe { &*(self.base as *const Head) }
    }

    /// Creates the mailbox `name` (a POSIX shm name such as `/stolon-...`) with `capacity`
    /// slots.
    pub fn create(name: &str, capacity: usize) -> Result<Self> {
        let cap = capacity.next_power_of_two().max(2);
        let len = std::mem::size_of::<Head>() + cap * std::mem::size_of::<Slot>();
        let c = CString::new(name).map_err(|_| Error::Config("NUL in mailbox name".into()))?;
        // SAFETY: plain POSIX calls on a fresh name; the fd is closed after mapping.
        let base = unsafe {
            let fd = libc::shm_open(
                c.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o600,
            );
            if fd < 0 {
                return Err(os_err("shm_open", name));
            }
            if libc::ftruncate(fd, len as libc::off_t) != 0 {
                libc::close(fd);
                libc::shm_unlink(c.as_ptr());
                return Err(os_err("ftruncate", name));
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            if p == libc::MAP_FAILED {
                libc::shm_unlink(c.as_ptr());
                return Err(os_err("mmap", name));
            }
            p as *mut u8
        };
        let mb = Mailbox {
            name: name.to_string(),
            base,
            len,
            owner: true,
            head: 0,
        };
        for (i, s) in mb.slots_init(cap).iter().enumerate() {
            s.seq.store(i as u64, Ordering::Relaxed);
        }
        let h = mb.base as *mut Head;
        // SAFETY: the mapping is ours and large enough; peers check the magic, which is written
        // last with release ordering.
        unsafe {
            (*h).capacity = cap as u64;
            (*h).tail.store(0, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Release);
            std::ptr::write_volatile(&mut (*h).magic, MAGIC);
        }
        Ok(mb)
    }

    fn slots_init(&self, cap: usize) -> &[Slot] {
        // SAFETY: the mapping was sized for `cap` slots after the head.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(std::mem::size_of::<Head>()) as *const Slot,
                cap,
            )
        }
    }

    /// Opens a peer's mailbox for producing.
    pub fn open(name: &str) -> Result<Self> {
        let c = CString::new(name).map_err(|_| Error::Config("NUL in mailbox name".into()))?;
        // SAFETY: plain POSIX calls; the size is read from the file and checked before use.
        unsafe {
            let fd = libc::shm_open(c.as_ptr(), libc::O_RDWR, 0);
            if fd < 0 {
                return Err(os_err("shm_open", name));
            }
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || (st.st_size as usize) < std::mem::size_of::<Head>()
            {
                libc::close(fd);
                return Err(Error::Config(format!("mailbox {name} is not initialised")));
            }
            let len = st.st_size as usize;
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            if p == libc::MAP_FAILED {
                return Err(os_err("mmap", name));
            }
            let mb = Mailbox {
                name: name.to_string(),
                base: p as *mut u8,
                len,
                owner: false,
                head: 0,
            };
            let h = mb.head();
            let need =
                std::mem::size_of::<Head>() + h.capacity as usize * std::mem::size_of::<Slot>();
            if std::ptr::read_volatile(&h.magic) != MAGIC || need > len || h.capacity == 0 {
                return Err(Error::Config(format!("{name} is not a stolon mailbox")));
            }
            Ok(mb)
        }
    }

    /// Pushes one immediate; false when the mailbox is full (retry later).
    pub fn push(&self, imm: u32) -> bool {
        let slots = self.slots();
        let cap = slots.len() as u64;
        let tail = &self.head().tail;
        let mut pos = tail.load(Ordering::Relaxed);
        loop {
            let slot = &slots[(pos & (cap - 1)) as usize];
            let seq = slot.seq.load(Ordering::Acquire);
            let dif = seq as i64 - pos as i64;
            if dif == 0 {
                match tail.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => {
                        slot.imm.store(imm as u64, Ordering::Relaxed);
                        slot.seq.store(pos + 1, Ordering::Release);
                        return true;
                    }
                    Err(p) => pos = p,
                }
            } else if dif < 0 {
                return false;
            } else {
                pos = tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes the next immediate, if one is ready (owner only).
    pub fn pop(&mut self) -> Option<u32> {
        let slots = self.slots();
        let cap = slots.len() as u64;
        let slot = &slots[(self.head & (cap - 1)) as usize];
        if slot.seq.load(Ordering::Acquire) != self.head + 1 {
            return None;
        }
        let imm = slot.imm.load(Ordering::Relaxed) as u32;
        slot.seq.store(self.head + cap, Ordering::Release);
        self.head += 1;
        Some(imm)
    }

    /// The shm name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // SAFETY: base/len describe our mapping; the owner removes the name.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
            if self.owner {
                if let Ok(c) = CString::new(self.name.as_str()) {
                    libc::shm_unlink(c.as_ptr());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &[u8], pid: u32, sock: &str) -> NvlinkAddr {
        NvlinkAddr {
            host_id: host.to_vec(),
            mailbox: "/mb".into(),
            pid,
            vmm_socket: sock.into(),
        }
    }

    fn gpu(ipc: bool, vmm: bool, direct: bool) -> GpuDesc {
        GpuDesc {
            device: 1,
            ipc_handle: if ipc { vec![1; 64] } else { Vec::new() },
            ipc_offset: 0,
            direct,
            vmm: vmm.then_some(crate::desc::VmmShare {
                token: [1; 16],
                chunks: 1,
                offset: 0,
                span: 2 << 20,
            }),
        }
    }

    #[test]
    fn vmm_memory_on_the_same_host_goes_over_nvlink_else_staging_with_a_reason() {
        let me = addr(b"boot", 1, "@me");
        let peer = addr(b"boot", 2, "@peer");
        let gpu_src = RegionMem::Gpu(0);
        let vmm = gpu(false, true, false);
        // VMM + same host + shareable: NVLink through the fd socket.
        let r = select_path(gpu_src, Some(&vmm), Some(&me), Some(&peer));
        assert_eq!(
            (r.path, r.map, r.why_not_nvlink),
            (Path::Nvlink, Some(NvlinkMap::Vmm), None)
        );
        // The same from an FI_HMEM source region.
        let r = select_path(RegionMem::GpuDirect(0), Some(&vmm), Some(&me), Some(&peer));
        assert_eq!(r.map, Some(NvlinkMap::Vmm));
        // cuMemAlloc memory keeps CUDA IPC.
        let r = select_path(
            gpu_src,
            Some(&gpu(true, false, false)),
            Some(&me),
            Some(&peer),
        );
        assert_eq!((r.path, r.map), (Path::Nvlink, Some(NvlinkMap::Ipc)));

        let staged = |r: Route, why: &str| {
            assert_eq!((r.path, r.map), (Path::Staged, None), "{r:?}");
            let got = r.why_not_nvlink.unwrap();
            assert!(got.contains(why), "{got:?} lacks {why:?}");
        };
        // VMM memory that was not created shareable: no share in the descriptor.
        staged(
            select_path(
                gpu_src,
                Some(&gpu(false, false, false)),
                Some(&me),
                Some(&peer),
            ),
            "could not share",
        );
        staged(
            select_path(gpu_src, Some(&vmm), Some(&me), Some(&addr(b"boot", 2, ""))),
            "no VMM socket",
        );
        staged(
            select_path(
                gpu_src,
                Some(&vmm),
                Some(&me),
                Some(&addr(b"other", 2, "@p")),
            ),
            "another host",
        );
        staged(
            select_path(
                gpu_src,
                Some(&vmm),
                Some(&me),
                Some(&addr(b"boot", 1, "@p")),
            ),
            "this process",
        );
        staged(
            select_path(gpu_src, Some(&vmm), None, Some(&peer)),
            "NVLink off",
        );
        staged(
            select_path(gpu_src, Some(&vmm), Some(&me), None),
            "no NVLink writes",
        );
        staged(
            select_path(gpu_src, None, Some(&me), Some(&peer)),
            "not GPU memory",
        );
        staged(
            select_path(RegionMem::Host, Some(&vmm), Some(&me), Some(&peer)),
            "source is not GPU",
        );
        staged(
            select_path(RegionMem::StagedHost, Some(&vmm), Some(&me), Some(&peer)),
            "source is not GPU",
        );
        // Fabric where neither side needs staging.
        let r = select_path(RegionMem::Host, None, Some(&me), Some(&peer));
        assert_eq!(r.path, Path::Fabric);
        let r = select_path(
            RegionMem::GpuDirect(0),
            Some(&gpu(false, false, true)),
            Some(&me),
            Some(&addr(b"other", 2, "@p")),
        );
        assert_eq!((r.path, r.map), (Path::Fabric, None));
    }

    #[test]
    fn many_producers_one_consumer_exact_counts() {
        let name = format!("/stolon-test-{}", std::process::id());
        let mut owner = Mailbox::create(&name, 64).unwrap();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let name = name.clone();
                std::thread::spawn(move || {
                    let mb = Mailbox::open(&name).unwrap();
                    for i in 0..1000u32 {
                        while !mb.push(t * 10_000 + i) {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut seen = [0u32; 4];
        let mut n = 0;
        while n < 4000 {
            if let Some(v) = owner.pop() {
                let (t, i) = (v / 10_000, v % 10_000);
                assert_eq!(i, seen[t as usize], "per-producer FIFO");
                seen[t as usize] += 1;
                n += 1;
            }
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(owner.pop(), None);
        assert!(Mailbox::open("/stolon-does-not-exist").is_err());
    }

    #[test]
    fn a_full_mailbox_refuses_and_the_name_goes_with_its_owner() {
        let name = format!("/stolon-test-full-{}", std::process::id());
        let mut owner = Mailbox::create(&name, 2).unwrap();
        let p = Mailbox::open(&name).unwrap();
        assert!(p.push(1) && p.push(2));
        assert!(!p.push(3));
        assert_eq!(owner.pop(), Some(1));
        assert!(p.push(3));
        drop(owner);
        drop(p);
        assert!(Mailbox::open(&name).is_err());
    }
}
