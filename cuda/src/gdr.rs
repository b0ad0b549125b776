//! GDRCopy (`libgdrapi`), loaded at run time: the CPU stores into device memory through a BAR
//! mapping of it, so a GPU kernel waiting for a flag polls its own memory instead of reading
//! host memory across PCIe on every poll.
//!
//! Needs the `gdrdrv` kernel module (`/dev/gdrdrv`) and `libgdrapi.so.2`; without either,
//! [`Gdr::get`] says why ([`Error::Unsupported`]) and callers keep a flag in host-mapped memory
//! ([`crate::HostCounter`]). `$STOLON_LIBGDRAPI` names the library to try first.
//!
//! A [`GpuFlag`] is one 64-bit word at the start of a 64 KiB GPU page (GDRCopy pins and maps whole
//! GPU pages), set from the CPU with [`GpuFlag::store`]. The mapping is write-combining, so a
//! store is followed by a full fence, which drains the combining buffers: once `store` returns,
//! the value is on its way to the GPU, behind every earlier store of this thread. CPU reads go
//! through the same mapping (uncached, about a microsecond each): fine for checks, not for
//! polling. There is no CPU read-modify-write: locked operations on such a mapping are not
//! atomic with respect to the GPU.

use std::ffi::{c_int, c_uint, c_ulong, c_void};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, OnceLock};

use crate::device::Context;
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::result;
use crate::sys::CUdeviceptr;

/// The environment variable naming the GDRCopy library to try first.
pub const ENV_LIBGDRAPI: &str = "STOLON_LIBGDRAPI";

/// GDRCopy pins and maps device memory in GPU pages of this size.
pub const GPU_PAGE: usize = 64 << 10;

/// `gdr_mh_t`: a memory handle, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GdrMh {
    h: c_ulong,
}

type GdrOpen = unsafe extern "C" fn() -> *mut c_void;
type GdrClose = unsafe extern "C" fn(*mut c_void) -> c_int;
type GdrPin = unsafe extern "C" fn(*mut c_void, c_ulong, usize, u64, c_uint, *mut GdrMh) -> c_int;
type GdrUnpin = unsafe extern "C" fn(*mut c_void, GdrMh) -> c_int;
type GdrMap = unsafe extern "C" fn(*mut c_void, GdrMh, *mut *mut c_void, usize) -> c_int;
type GdrUnmap = unsafe extern "C" fn(*mut c_void, GdrMh, *mut c_void, usize) -> c_int;

/// An open GDRCopy library and its `gdr_t` (one per process, see [`Gdr::get`]).
pub struct Gdr {
    _lib: libloading::Library,
    /// Where the library was found.
    pub path: String,
    g: *mut c_void,
    close: GdrClose,
    pin: GdrPin,
    unpin: GdrUnpin,
    map: GdrMap,
    unmap: GdrUnmap,
}

// SAFETY: a gdr_t may be used from any thread (libgdrapi locks internally); the function
// pointers are plain code addresses.
unsafe impl Send for Gdr {}
// SAFETY: as above.
unsafe impl Sync for Gdr {}

impl std::fmt::Debug for Gdr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gdr")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Libraries tried by [`Gdr::get`]: `$STOLON_LIBGDRAPI`, then the loader's search path.
pub fn candidate_paths() -> Vec<String> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os(ENV_LIBGDRAPI) {
        v.push(p.to_string_lossy().into_owned());
    }
    v.push("libgdrapi.so.2".into());
    v.push("libgdrapi.so".into());
    v
}

fn unsupported(why: String) -> Error {
    Error::Unsupported {
        what: "GDRCopy",
        why,
    }
}

impl Gdr {
    /// The process's GDRCopy, opened on first use from [`candidate_paths`] and kept.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming every library tried, or saying that `gdr_open` failed
    /// (no `gdrdrv` module: `/dev/gdrdrv` missing or not accessible).
    pub fn get() -> Result<Arc<Gdr>> {
        static GDR: OnceLock<std::result::Result<Arc<Gdr>, String>> = OnceLock::new();
        GDR.get_or_init(|| {
            Gdr::load(&candidate_paths())
                .map(Arc::new)
                .map_err(|e| match e {
                    Error::Unsupported { why, .. } => why,
                    e => e.to_string(),
                })
        })
        .clone()
        .map_err(unsupported)
    }

    /// Opens GDRCopy from the first of `paths` that loads and has its symbols, and opens a
    /// `gdr_t`.
    ///
    /// # Errors
    /// As [`Gdr::get`].
    pub fn load(paths: &[String]) -> Result<Gdr> {
        let mut tried = Vec::new();
        for path in paths {
            // SAFETY: loading runs the library's initialisers; libgdrapi has none that matter.
            let lib = match unsafe { libloading::Library::new(path) } {
                Ok(l) => l,
                Err(e) => {
                    tried.push(e.to_string());
                    continue;
                }
            };
            // SAFETY: the types are those of gdrapi.h (GDRCopy 2.x).
            let syms = unsafe {
                (|| -> std::result::Result<_, libloading::Error> {
                    Ok((
                        *lib.get::<GdrOpen>(b"gdr_open\0")?,
                        *lib.get::<GdrClose>(b"gdr_close\0")?,
                        *lib.get::<GdrPin>(b"gdr_pin_buffer\0")?,
                        *lib.get::<GdrUnpin>(b"gdr_unpin_buffer\0")?,
                        *lib.get::<GdrMap>(b"gdr_map\0")?,
                        *lib.get::<GdrUnmap>(b"gdr_unmap\0")?,
                    ))
                })()
            };
            let (open, close, pin, unpin, map, unmap) = match syms {
                Ok(s) => s,
                Err(e) => {
                    tried.push(format!("{path}: {e}"));
                    continue;
                }
            };
            // SAFETY: gdr_open takes nothing and returns a handle or null.
            let g = unsafe { open() };
            if g.is_null() {
                return Err(unsupported(format!(
                    "{path} loaded but gdr_open failed (is the gdrdrv module loaded and \
                     /dev/gdrdrv accessible?)"
                )));
            }
            return Ok(Gdr {
                _lib: lib,
                path: path.clone(),
                g,
                close,
                pin,
                unpin,
                map,
                unmap,
            });
        }
        Err(unsupported(format!(
            "no GDRCopy library: {}",
            tried.join("; ")
        )))
    }
}

impl Drop for Gdr {
    fn drop(&mut self) {
        // SAFETY: g came from gdr_open and every pin of it was undone (GpuFlag holds an Arc).
        unsafe { (self.close)(self.g) };
    }
}

/// The first GPU-page boundary at or after `ptr`.
pub fn gpu_page_align(ptr: CUdeviceptr) -> CUdeviceptr {
    let mask = GPU_PAGE as u64 - 1;
    (ptr + mask) & !mask
}

/// A 64-bit flag in device memory that the CPU sets through GDRCopy and GPU code polls at
/// [`GpuFlag::device_ptr`]. Starts at 0.
#[derive(Debug)]
pub struct GpuFlag {
    gdr: Arc<Gdr>,
    mh: GdrMh,
    va: *mut c_void,
    dptr: CUdeviceptr,
    _buf: DeviceBuffer,
}

// SAFETY: the mapping is plain memory valid until drop; stores and loads are volatile.
unsafe impl Send for GpuFlag {}
// SAFETY: as above.
unsafe impl Sync for GpuFlag {}

impl GpuFlag {
    /// A new flag (0) on `ctx`'s device, pinned and mapped through GDRCopy.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without GDRCopy (see [`Gdr::get`]) or when `gdr_pin_buffer` /
    /// `gdr_map` refuse the page; driver errors allocating.
    pub fn new(ctx: &Arc<Context>) -> Result<GpuFlag> {
        let gdr = Gdr::get()?;
        // Two GPU pages, so one whole page starts inside the allocation however it is aligned.
        let buf = DeviceBuffer::alloc_zeroed(ctx, 2 * GPU_PAGE)?;
        let dptr = gpu_page_align(buf.ptr());
        {
            // Every operation on this memory is synchronous with respect to the CPU's writes
            // through the mapping (GDRCopy's requirement). Old drivers lack the call: skip.
            let _g = ctx.enter()?;
            result::pointer_set_sync_memops(dptr)?;
        }
        let mut mh = GdrMh::default();
        // SAFETY: dptr..dptr+GPU_PAGE is device memory we own for the life of the flag (buf).
        let rc = unsafe { (gdr.pin)(gdr.g, dptr as c_ulong, GPU_PAGE, 0, 0, &mut mh) };
        if rc != 0 {
            return Err(unsupported(format!(
                "gdr_pin_buffer of a GPU page failed ({rc}): the GPU or driver refuses BAR \
                 mappings"
            )));
        }
        let mut va: *mut c_void = std::ptr::null_mut();
        // SAFETY: mh is a live pin of GPU_PAGE bytes.
        let rc = unsafe { (gdr.map)(gdr.g, mh, &mut va, GPU_PAGE) };
        if rc != 0 || va.is_null() {
            // SAFETY: undo the pin made above.
            unsafe { (gdr.unpin)(gdr.g, mh) };
            return Err(unsupported(format!(
                "gdr_map of a pinned GPU page failed ({rc})"
            )));
        }
        Ok(GpuFlag {
            gdr,
            mh,
            va,
            dptr,
            _buf: buf,
        })
    }

    /// The address GPU code polls.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.dptr
    }

    /// The CPU address of the flag (the write-combining mapping).
    pub fn host_ptr(&self) -> *mut u64 {
        self.va.cast()
    }

    /// Sets the flag: a store through the mapping, then a full fence (drains write combining).
    pub fn store(&self, value: u64) {
        // SAFETY: an aligned u64 at the start of a mapped page we own.
        unsafe { self.host_ptr().write_volatile(value) };
        fence(Ordering::SeqCst);
    }

    /// Reads the flag through the mapping (uncached; not for tight polling).
    pub fn load(&self) -> u64 {
        fence(Ordering::SeqCst);
        // SAFETY: as in `store`.
        unsafe { self.host_ptr().read_volatile() }
    }
}

impl Drop for GpuFlag {
    fn drop(&mut self) {
        // SAFETY: va / mh come from gdr_map / gdr_pin_buffer of this gdr, undone once, before
        // the device memory (_buf) is freed.
        unsafe {
            (self.gdr.unmap)(self.gdr.g, self.mh, self.va, GPU_PAGE);
            (self.gdr.unpin)(self.gdr.g, self.mh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_align_up() {
        assert_eq!(gpu_page_align(0), 0);
        assert_eq!(gpu_page_align(1), GPU_PAGE as u64);
        assert_eq!(gpu_page_align(GPU_PAGE as u64), GPU_PAGE as u64);
        assert_eq!(gpu_page_align(0x7f00_0001_2345), 0x7f00_0002_0000);
    }

    #[test]
    fn a_missing_library_is_unsupported_naming_what_was_tried() {
        let e = Gdr::load(&["/nonexistent/libgdrapi.so.2".into()]).unwrap_err();
        let s = e.to_string();
        assert!(
            matches!(
                e,
                Error::Unsupported {
                    what: "GDRCopy",
                    ..
                }
            ),
            "{s}"
        );
        assert!(s.contains("/nonexistent/libgdrapi.so.2"), "{s}");
    }
}
