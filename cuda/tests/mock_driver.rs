//! The safe layer against a mock driver (`tests/mock_libcuda.c`, built here with `cc` and loaded
//! through `$STOLON_LIBCUDA`), so context binding, reference counts, cleanup, bounds checks and
//! the VMM plumbing are exercised on machines without a GPU. It checks stolon-cuda's own logic,
//! not CUDA's semantics: `tests/gpu.rs` does that on a GPU. Skipped (SKIP printed) without a C
//! compiler.

use std::ffi::{c_int, c_void};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use stolon_cuda::{
    memory, pointer_info, result, stream_wait_value64, stream_write_value64, sys, vmm, Context,
    Device, DeviceBuffer, Error, Event, HostCounter, HostRegistration, IpcMemHandle, MemoryType,
    Module, PinnedHostBuffer, Stream, VmmAllocation, WaitCondition,
};

const ROLE: &str = "STOLON_CUDA_MOCK_ROLE";
const CHILD_OK: &str = "STOLON_CUDA_MOCK_CHILD_OK";
/// Set in a child: its mock is built without the dma-buf entry point.
const OLD_DRIVER: &str = "STOLON_CUDA_MOCK_OLD_DRIVER";
const T: Duration = Duration::from_secs(5);

// Object kinds counted by mock_live (enum kind in mock_libcuda.c).
const DEV: c_int = 1;
const HOST: c_int = 2;
const REG: c_int = 3;
const STREAM: c_int = 4;
const EVENT: c_int = 5;
const MODULE: c_int = 6;
const VHANDLE: c_int = 8;
const VMAP: c_int = 9;
const VRES: c_int = 10;

struct Mock {
    lib: libloading::Library,
}

impl Mock {
    fn live(&self, kind: c_int) -> c_int {
        // SAFETY: mock_live is `int mock_live(int)` in mock_libcuda.c.
        unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn(c_int) -> c_int>(b"mock_live")
                .unwrap();
            f(kind)
        }
    }

    fn primary_refs(&self, dev: c_int) -> c_int {
        // SAFETY: mock_primary_refs is `int mock_primary_refs(int)` in mock_libcuda.c.
        unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn(c_int) -> c_int>(b"mock_primary_refs")
                .unwrap();
            f(dev)
        }
    }

    fn counts(&self) -> Vec<c_int> {
        [DEV, HOST, REG, STREAM, EVENT, MODULE, VHANDLE, VMAP, VRES]
            .iter()
            .map(|&k| self.live(k))
            .collect()
    }
}

fn build() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("stolon-cuda-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("libcuda.so.1");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mock_libcuda.c");
    let mut cc = Command::new("cc");
    if std::env::var_os(OLD_DRIVER).is_some() {
        // A driver older than CUDA 11.7: no cuMemGetHandleForAddressRange.
        cc.arg("-DMOCK_NO_DMABUF");
    }
    let out = match cc
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(src)
        .arg("-lpthread")
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: no C compiler (cc): {e}");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "building the mock driver failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(so)
}

/// Builds and selects the mock driver (once), and serialises the tests: they count the mock's
/// live objects, which are process-wide.
fn mock() -> Option<(MutexGuard<'static, ()>, &'static Mock)> {
    static MOCK: OnceLock<Option<Mock>> = OnceLock::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    let m = MOCK.get_or_init(|| {
        let so = build()?;
        std::env::set_var(sys::ENV_LIBCUDA, &so);
        // SAFETY: the mock's constructors do nothing.
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        // Load it as the driver now; once mapped, the file can go.
        sys::driver().expect("the mock driver loads");
        let _ = std::fs::remove_dir_all(so.parent().unwrap());
        Some(Mock { lib })
    });
    let m = m.as_ref()?;
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Each test starts with nothing bound on its thread.
    if stolon_cuda::is_present() {
        // SAFETY: null unbinds.
        unsafe { result::ctx_set_current(std::ptr::null_mut()).unwrap() };
    }
    Some((guard, m))
}

fn ctx(ordinal: usize) -> Arc<Context> {
    Device::get(ordinal).unwrap().primary_context().unwrap()
}

#[test]
fn the_mock_is_loaded_and_describes_its_devices() {
    let Some((_g, _m)) = mock() else { return };
    let d = sys::driver().unwrap();
    assert!(d.path.ends_with("libcuda.so.1") && d.path.contains("stolon-cuda-mock"));
    assert!(stolon_cuda::is_present());
    assert_eq!(stolon_cuda::driver_version().unwrap().to_string(), "13.0");
    assert_eq!(stolon_cuda::device_count().unwrap(), 2);
    let devs = Device::all().unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[1].name().unwrap(), "Stolon Mock GPU 1");
    assert_eq!(devs[1].pci_bus_id().unwrap(), "0000:11:00.0");
    assert_eq!(devs[0].compute_capability().unwrap(), (9, 0));
    assert!(devs[0].unified_addressing().unwrap());
    assert!(devs[0].can_access_peer(&devs[1]).unwrap());
    assert!(!devs[0].can_access_peer(&devs[0]).unwrap());
    assert!(matches!(
        Device::get(2),
        Err(Error::InvalidDevice {
            ordinal: 2,
            count: 2
        })
    ));
}

#[test]
fn every_call_binds_its_context_and_restores_the_previous_one() {
    let Some((_g, _m)) = mock() else { return };
    let (c0, c1) = (ctx(0), ctx(1));
    // Nothing bound: the mock fails any call that needs a context, so these only pass if the
    // safe layer binds c0 around each call...
    let mut buf = DeviceBuffer::alloc(&c0, 4096).unwrap();
    buf.copy_from_host(0, &[1; 16]).unwrap();
    // ...and unbinds it afterwards.
    assert!(result::ctx_get_current().unwrap().is_null());
    // Another context bound by the caller (PyTorch's current device) survives our calls.
    c1.make_current().unwrap();
    let s = Stream::new(&c0).unwrap();
    buf.fill(3).unwrap();
    s.synchronize().unwrap();
    drop(s);
    drop(buf);
    assert_eq!(result::ctx_get_current().unwrap(), c1.raw());
    assert_eq!(result::ctx_get_device().unwrap(), 1);
    {
        let _g = c0.enter().unwrap();
        assert_eq!(result::ctx_get_device().unwrap(), 0);
    }
    assert_eq!(result::ctx_get_current().unwrap(), c1.raw());
    // Raw calls without a bound context are refused by the (mock) driver, as by the real one.
    // SAFETY: null unbinds.
    unsafe { result::ctx_set_current(std::ptr::null_mut()).unwrap() };
    let e = result::mem_alloc(16).unwrap_err();
    assert_eq!(e.driver_code(), Some(sys::CUDA_ERROR_INVALID_CONTEXT));
    assert!(e.to_string().contains("CUDA_ERROR_INVALID_CONTEXT"), "{e}");
}

#[test]
fn primary_context_references_follow_the_objects() {
    let Some((_g, m)) = mock() else { return };
    let before = m.primary_refs(0);
    let c = ctx(0);
    assert_eq!(m.primary_refs(0), before + 1);
    let buf = DeviceBuffer::alloc(&c, 64).unwrap();
    let s = Stream::new(&c).unwrap();
    drop(c);
    // The buffer and stream keep the context alive.
    assert_eq!(m.primary_refs(0), before + 1);
    drop(buf);
    assert_eq!(m.primary_refs(0), before + 1);
    drop(s);
    assert_eq!(m.primary_refs(0), before);
}

#[test]
fn drops_release_every_object() {
    let Some((_g, m)) = mock() else { return };
    let before = m.counts();
    {
        let c = ctx(0);
        let _buf = DeviceBuffer::alloc(&c, 1000).unwrap();
        let _pinned = PinnedHostBuffer::alloc(&c, 1000).unwrap();
        let _counter = HostCounter::new(&c).unwrap();
        let mut host = vec![0u8; 8192];
        // SAFETY: `host` outlives the registration (declared earlier, dropped later).
        let _reg = unsafe {
            HostRegistration::new(
                &c,
                host.as_mut_ptr(),
                host.len(),
                HostRegistration::DEFAULT_FLAGS,
            )
        }
        .unwrap();
        let _s = Stream::new(&c).unwrap();
        let _e = Event::new(&c).unwrap();
        let module = Module::load(&c, stolon_cuda::SELFCHECK_PTX.as_bytes()).unwrap();
        let _f = module.function("stolon_fill_u8").unwrap();
        let _v = VmmAllocation::chunked(&c, 2 << 20, 2).unwrap();
        let fd = _v.export_chunk_fd(1).unwrap();
        let _mapped = stolon_cuda::import_fd(&c, fd.as_fd(), 2 << 20).unwrap();
        let during = m.counts();
        assert!(
            during.iter().zip(&before).all(|(d, b)| d > b),
            "{during:?} vs {before:?}"
        );
        // Unregistering before `host` is freed: drop order is reverse declaration order.
        drop(_reg);
        drop(host);
    }
    assert_eq!(m.counts(), before);
}

#[test]
fn device_buffer_copies_and_bounds() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut a = DeviceBuffer::alloc(&c, data.len()).unwrap();
    a.copy_from_host(0, &data).unwrap();
    assert_eq!(a.to_vec().unwrap(), data);
    let mut b = DeviceBuffer::alloc_zeroed(&c, 100).unwrap();
    b.copy_from_device(10, &a, 5, 50).unwrap();
    let got = b.to_vec().unwrap();
    assert_eq!(&got[10..60], &data[5..55]);
    assert!(got[..10].iter().chain(&got[60..]).all(|&x| x == 0));
    assert!(matches!(
        b.copy_from_device(60, &a, 0, 50),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.copy_from_device(0, &a, 9990, 50),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.copy_to_host(9999, &mut [0; 2]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.copy_from_host(usize::MAX, &[1]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        DeviceBuffer::alloc(&c, 0),
        Err(Error::InvalidArgument(_))
    ));
    a.copy_from_host(10_000, &[]).unwrap(); // empty at the end is fine
    let e = DeviceBuffer::alloc(&c, 1 << 50).unwrap_err();
    assert_eq!(e.driver_code(), Some(sys::CUDA_ERROR_OUT_OF_MEMORY));
    assert_eq!(
        e.to_string(),
        "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory"
    );
}

#[test]
fn pinned_buffers_start_zeroed_and_counters_see_stream_writes() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let p = PinnedHostBuffer::alloc(&c, 5000).unwrap();
    // SAFETY: no device work.
    assert!(unsafe { p.as_slice() }.iter().all(|&x| x == 0));
    assert_eq!(p.device_ptr(), p.host_ptr() as u64);

    let counter = HostCounter::new(&c).unwrap();
    let s = Stream::new(&c).unwrap();
    for i in 1..=10 {
        // SAFETY: the counter outlives the (immediate) stream work.
        unsafe { stream_write_value64(&s, counter.device_ptr(), i).unwrap() };
    }
    assert_eq!(counter.wait_at_least(10, T).unwrap(), 10);
    assert_eq!(counter.fetch_add(5), 10);
    assert_eq!(counter.load(), 15);
    let err = counter
        .wait_at_least(16, Duration::from_millis(30))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    // A stream wait released by another thread.
    let flag = Arc::new(HostCounter::new(&c).unwrap());
    let f2 = flag.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        f2.store(7);
    });
    // SAFETY: the flag outlives the wait.
    unsafe { stream_wait_value64(&s, flag.device_ptr(), 7, WaitCondition::Equal).unwrap() };
    t.join().unwrap();
    assert!(matches!(
        // SAFETY: rejected before the driver is called.
        unsafe { stream_write_value64(&s, counter.device_ptr() + 1, 1) },
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn events_time_stream_work() {
    let Some((_g, _m)) = mock() else { return };
    let (c0, c1) = (ctx(0), ctx(1));
    let s = Stream::new(&c0).unwrap();
    let (a, b) = (
        Event::with_timing(&c0).unwrap(),
        Event::with_timing(&c0).unwrap(),
    );
    a.record(&s).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    b.record(&s).unwrap();
    b.wait(T).unwrap();
    assert!(a.elapsed_ms(&b).unwrap() >= 4.0);
    let untimed = Event::new(&c0).unwrap();
    untimed.record(&s).unwrap();
    assert!(untimed.query().unwrap());
    assert!(a.elapsed_ms(&untimed).is_err());
    s.wait_event(&untimed).unwrap();
    let other = Stream::new(&c1).unwrap();
    assert!(matches!(a.record(&other), Err(Error::InvalidArgument(_))));
}

#[test]
fn pointer_info_tells_memory_kinds_apart() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let buf = DeviceBuffer::alloc(&c, 1 << 16).unwrap();
    let i = pointer_info(&c, buf.ptr() + 10).unwrap();
    assert_eq!(i.memory_type, MemoryType::Device);
    assert_eq!((i.range_start, i.range_size), (buf.ptr(), 1 << 16));
    assert_eq!((i.alloc_start, i.alloc_size), (buf.ptr(), 1 << 16));
    assert_eq!(i.device, Some(0));
    assert_eq!(i.context, c.raw() as usize);
    assert!(i.ipc_capable && !i.is_vmm);
    assert_ne!(i.buffer_id, 0);

    let p = PinnedHostBuffer::alloc(&c, 100).unwrap();
    assert_eq!(
        pointer_info(&c, p.host_ptr() as u64).unwrap().memory_type,
        MemoryType::Host
    );
    let heap = [0u8; 64];
    let u = pointer_info(&c, heap.as_ptr() as u64).unwrap();
    assert_eq!(u.memory_type, MemoryType::Unknown);
    assert_eq!(u.device, None);

    let v = VmmAllocation::chunked(&c, 2 << 20, 2).unwrap();
    let i = pointer_info(&c, v.ptr() + (2 << 20) + 8).unwrap();
    assert!(i.is_vmm && !i.ipc_capable);
    assert_eq!(i.range_start, v.ptr());
    assert_eq!(i.alloc_start, v.ptr() + (2 << 20));
    assert_eq!(i.allowed_handle_types, 1);
}

#[test]
fn vmm_memory_exports_and_imports_through_descriptors() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let gran = vmm::allocation_granularity(&c.device()).unwrap();
    assert_eq!(gran, 2 << 20);
    let v = VmmAllocation::new(&c, 1).unwrap();
    assert_eq!((v.len(), v.chunks(), v.chunk_size()), (gran, 1, gran));
    let v = VmmAllocation::chunked(&c, gran, 3).unwrap();
    let data: Vec<u8> = (0..v.len()).map(|i| (i / 4096) as u8 ^ i as u8).collect();
    // SAFETY: the allocation is ours and `len` bytes.
    unsafe { memory::copy_htod(&c, v.ptr(), data.as_ptr(), v.len()).unwrap() };
    let ex = vmm::export(&c, v.ptr() + 2 * gran as u64 + 99).unwrap();
    assert_eq!(
        (ex.alloc_base, ex.alloc_size, ex.offset),
        (v.ptr() + 2 * gran as u64, gran, 99)
    );
    let m = stolon_cuda::import_fd(&c, ex.fd.as_fd(), ex.alloc_size).unwrap();
    let mut got = vec![0u8; gran];
    // SAFETY: the mapping is `gran` bytes.
    unsafe { memory::copy_dtoh(&c, got.as_mut_ptr(), m.ptr(), gran).unwrap() };
    assert_eq!(got, data[2 * gran..]);
    // Writes through the import land in the original.
    // SAFETY: as above.
    unsafe { memory::memset_d8(&c, m.ptr(), 0xAA, 10).unwrap() };
    let mut head = [0u8; 10];
    // SAFETY: inside the allocation.
    unsafe { memory::copy_dtoh(&c, head.as_mut_ptr(), v.ptr() + 2 * gran as u64, 10).unwrap() };
    assert_eq!(head, [0xAA; 10]);
    m.grant_access(&Device::get(1).unwrap()).unwrap();

    assert!(matches!(
        stolon_cuda::import_fd(&c, ex.fd.as_fd(), gran + 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        stolon_cuda::import_fd(&c, ex.fd.as_fd(), 0),
        Err(Error::InvalidArgument(_))
    ));
    let plain = DeviceBuffer::alloc(&c, 64).unwrap();
    assert!(matches!(
        stolon_cuda::export_fd(&c, plain.ptr()),
        Err(Error::Driver { .. })
    ));
    assert!(matches!(
        VmmAllocation::chunked(&c, gran + 1, 1),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        v.export_chunk_fd(3),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn vmm_layout_walks_the_mappings_and_an_import_rebuilds_them_back_to_back() {
    let Some((_g, m)) = mock() else { return };
    let before = m.counts();
    {
        let c = ctx(0);
        let gran = vmm::allocation_granularity(&c.device()).unwrap();
        let v = VmmAllocation::chunked(&c, gran, 3).unwrap();
        let data: Vec<u8> = (0..v.len()).map(|i| (i % 251) as u8).collect();
        // SAFETY: the allocation is ours and `len` bytes.
        unsafe { memory::copy_htod(&c, v.ptr(), data.as_ptr(), v.len()).unwrap() };
        // A range from the middle of chunk 0 to the middle of chunk 2.
        let start = v.ptr() + gran as u64 / 2;
        let (chunks, off) = vmm::layout(&c, start, 2 * gran).unwrap();
        assert_eq!(off, gran / 2);
        assert_eq!(chunks.len(), 3);
        for (i, ch) in chunks.iter().enumerate() {
            assert_eq!((ch.base, ch.size), (v.ptr() + (i * gran) as u64, gran));
            assert!(ch.exportable_as_fd());
        }
        // Exactly one chunk when the range stays inside it.
        let (one, off1) = vmm::layout(&c, v.ptr() + gran as u64 + 5, 10).unwrap();
        assert_eq!((one.len(), off1), (1, 5));
        // Not VMM memory, or not mapped: an error.
        let plain = DeviceBuffer::alloc(&c, 64).unwrap();
        assert!(vmm::layout(&c, plain.ptr(), 64).is_err());
        assert!(vmm::layout(&c, v.ptr(), 3 * gran + 1).is_err());
        assert!(matches!(
            vmm::layout(&c, v.ptr(), 0),
            Err(Error::InvalidArgument(_))
        ));

        // Rebuild the three chunks in one range, as a writer in another process would.
        let mut imp = stolon_cuda::VmmImport::reserve(&c, 3 * gran).unwrap();
        for ch in &chunks {
            let fd = stolon_cuda::export_fd(&c, ch.base).unwrap();
            imp.map_next(fd.as_fd(), ch.size).unwrap();
        }
        let fd = stolon_cuda::export_fd(&c, chunks[0].base).unwrap();
        assert!(matches!(
            imp.map_next(fd.as_fd(), gran),
            Err(Error::InvalidArgument(_))
        ));
        let mapped = imp.finish().unwrap();
        assert_eq!(mapped.len(), 3 * gran);
        let mut got = vec![0u8; 3 * gran];
        // SAFETY: the mapping is 3 * gran bytes.
        unsafe { memory::copy_dtoh(&c, got.as_mut_ptr(), mapped.ptr(), got.len()).unwrap() };
        assert_eq!(got, data);
        // A write across a chunk boundary of the import lands in both originals.
        let at = mapped.ptr() + gran as u64 - 4;
        // SAFETY: 8 bytes inside the mapping.
        unsafe { memory::memset_d8(&c, at, 0xEE, 8).unwrap() };
        let mut back = [0u8; 8];
        // SAFETY: 8 bytes inside the original allocation.
        unsafe { memory::copy_dtoh(&c, back.as_mut_ptr(), v.ptr() + gran as u64 - 4, 8).unwrap() };
        assert_eq!(back, [0xEE; 8]);

        // An unfinished import is undone on drop; a short one does not finish.
        let mut part = stolon_cuda::VmmImport::reserve(&c, 2 * gran).unwrap();
        let fd = stolon_cuda::export_fd(&c, chunks[1].base).unwrap();
        part.map_next(fd.as_fd(), gran).unwrap();
        assert!(matches!(part.finish(), Err(Error::InvalidArgument(_))));
        let mut part = stolon_cuda::VmmImport::reserve(&c, gran).unwrap();
        part.map_next(fd.as_fd(), gran).unwrap();
        drop(part);
        assert!(matches!(
            stolon_cuda::VmmImport::reserve(&c, gran + 1),
            Err(Error::InvalidArgument(_))
        ));

        // An allocation created without the POSIX fd handle type is reported as such.
        let prop = sys::CUmemAllocationProp {
            type_: sys::CU_MEM_ALLOCATION_TYPE_PINNED,
            location: sys::CUmemLocation {
                type_: sys::CU_MEM_LOCATION_TYPE_DEVICE,
                id: 0,
            },
            ..Default::default()
        };
        let _cg = c.enter().unwrap();
        let h = result::mem_create(gran, &prop).unwrap();
        let p = result::mem_address_reserve(gran, gran).unwrap();
        // SAFETY: fresh reservation and allocation of the same size.
        unsafe { result::mem_map(p, gran, 0, h).unwrap() };
        let (lone, _) = vmm::layout(&c, p, gran).unwrap();
        assert!(!lone[0].exportable_as_fd());
        assert!(stolon_cuda::export_fd(&c, p).is_err());
        // SAFETY: undo the mapping, the handle and the reservation made above.
        unsafe {
            result::mem_unmap(p, gran).unwrap();
            result::mem_release(h).unwrap();
            result::mem_address_free(p, gran).unwrap();
        }
    }
    assert_eq!(m.counts(), before, "every VMM object released");
}

#[test]
fn ipc_export_reports_the_allocation_and_refuses_to_open_in_process() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let buf = DeviceBuffer::alloc(&c, 1 << 20).unwrap();
    let ex = IpcMemHandle::export(&c, buf.ptr() + 4096).unwrap();
    assert_eq!(
        (ex.alloc_base, ex.alloc_size, ex.offset),
        (buf.ptr(), 1 << 20, 4096)
    );
    assert_eq!(ex.handle, IpcMemHandle::of_buffer(&buf).unwrap());
    let again = IpcMemHandle::from_bytes(ex.handle.as_bytes()).unwrap();
    match again.open(&c) {
        Err(Error::Driver { call, name, .. }) => {
            assert_eq!(call, "cuIpcOpenMemHandle");
            assert_eq!(name, "CUDA_ERROR_INVALID_CONTEXT");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn selfcheck_kernels_launch_with_their_parameters() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let module = Module::load(&c, stolon_cuda::SELFCHECK_PTX.as_bytes()).unwrap();
    assert!(matches!(module.function("nope"), Err(Error::Driver { .. })));
    assert!(matches!(
        module.function("a\0b"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(Module::load(&c, b"garbage").is_err());
    assert!(matches!(
        Module::load(&c, b""),
        Err(Error::InvalidArgument(_))
    ));
    let s = Stream::new(&c).unwrap();
    let pinned = PinnedHostBuffer::alloc(&c, 1000).unwrap();
    let fill = module.function("stolon_fill_u8").unwrap();
    let (mut p, mut n, mut v) = (pinned.device_ptr(), 999u64, 0x77u8);
    let mut params = [
        &mut p as *mut u64 as *mut c_void,
        &mut n as *mut u64 as *mut c_void,
        &mut v as *mut u8 as *mut c_void,
    ];
    // SAFETY: the parameters match the kernel; the buffer outlives it.
    unsafe {
        fill.launch(&s, (4, 1, 1), (64, 1, 1), 0, &mut params)
            .unwrap()
    };
    s.wait_idle(T).unwrap();
    // SAFETY: the stream is idle.
    let bytes = unsafe { pinned.as_slice() };
    assert!(bytes[..999].iter().all(|&x| x == 0x77) && bytes[999] == 0);

    let (flag, done) = (
        Arc::new(HostCounter::new(&c).unwrap()),
        HostCounter::new(&c).unwrap(),
    );
    let f2 = flag.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        f2.store(2);
    });
    let k = module.function("stolon_wait_then_store").unwrap();
    let (mut f, mut target, mut o, mut val) = (flag.device_ptr(), 2u64, done.device_ptr(), 5u64);
    let mut params = [
        &mut f as *mut u64 as *mut c_void,
        &mut target as *mut u64 as *mut c_void,
        &mut o as *mut u64 as *mut c_void,
        &mut val as *mut u64 as *mut c_void,
    ];
    // SAFETY: as above.
    unsafe { k.launch(&s, (1, 1, 1), (1, 1, 1), 0, &mut params).unwrap() };
    t.join().unwrap();
    assert_eq!(done.wait_at_least(5, T).unwrap(), 5);
    let other = Stream::new(&ctx(1)).unwrap();
    // SAFETY: rejected before the driver is called.
    let r = unsafe { k.launch(&other, (1, 1, 1), (1, 1, 1), 0, &mut params) };
    assert!(matches!(r, Err(Error::InvalidArgument(_))));
}

#[test]
fn peer_access_and_peer_copies() {
    let Some((_g, _m)) = mock() else { return };
    let (c0, c1) = (ctx(0), ctx(1));
    c0.enable_peer_access(&c1).unwrap();
    c0.enable_peer_access(&c1).unwrap(); // already enabled is success
    assert!(matches!(
        c0.enable_peer_access(&c0),
        Err(Error::InvalidArgument(_))
    ));
    let mut a = DeviceBuffer::alloc(&c0, 256).unwrap();
    a.copy_from_host(0, &[9; 256]).unwrap();
    let b = DeviceBuffer::alloc_zeroed(&c1, 256).unwrap();
    let s = Stream::new(&c0).unwrap();
    // SAFETY: both buffers outlive the copy.
    unsafe { memory::copy_peer_async(&s, b.ptr(), &c1, a.ptr(), &c0, 256).unwrap() };
    s.wait_idle(T).unwrap();
    assert_eq!(b.to_vec().unwrap(), vec![9; 256]);
    let (free, total) = c1.memory_info().unwrap();
    assert!(free < total);
}

#[test]
fn a_forked_child_gets_a_clean_error() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let buf = DeviceBuffer::alloc(&c, 4096).unwrap();
    // SAFETY: the child only reads atomics, matches results, drops a value whose drop skips the
    // driver and frees nothing (the context Arc is still held by `c`), then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = result::is_forked_child()
            && matches!(Device::get(0), Err(Error::Forked))
            && matches!(stolon_cuda::device_count(), Err(Error::Forked))
            && !stolon_cuda::is_present();
        drop(buf);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    assert!(!result::is_forked_child());
    buf.to_vec().unwrap();
}

const CHILD_FD: i32 = 100;

/// Runs this test binary again in `role`; `fd`, if any, becomes descriptor CHILD_FD there (the
/// same plumbing as tests/gpu.rs).
fn run_child(role: &str, envs: &[(&str, &str)], fd: Option<std::os::fd::BorrowedFd<'_>>) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env_remove(sys::ENV_LIBCUDA);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(fd) = fd {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let raw = fd.as_raw_fd();
        // SAFETY: runs between fork and exec and only calls dup2 (async-signal-safe), which
        // clears close-on-exec on the new descriptor.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{CHILD_OK} {role}")),
        "child {role} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The entry point of child processes; does nothing as a plain test.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let Some((_g, _m)) = mock() else {
        println!("{CHILD_OK} {role}");
        return;
    };
    match role.as_str() {
        "no_device" => {
            assert!(!stolon_cuda::is_present());
            assert!(sys::is_loadable());
            assert_eq!(stolon_cuda::device_count().unwrap(), 0);
            assert!(Device::all().unwrap().is_empty());
            assert_eq!(Device::get(0).unwrap_err(), Error::NoDevice);
            assert!(Error::NoDevice.is_unavailable());
            // The version answers without a device.
            assert_eq!(stolon_cuda::driver_version().unwrap().major, 13);
        }
        "vmm" => {
            let c = ctx(0);
            let size: usize = std::env::var("VMM_SIZE").unwrap().parse().unwrap();
            // SAFETY: the parent put the exported descriptor at CHILD_FD for our lifetime.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(CHILD_FD) };
            let m = stolon_cuda::import_fd(&c, fd, size).unwrap();
            let mut got = vec![0u8; size];
            // SAFETY: the mapping is `size` bytes.
            unsafe { memory::copy_dtoh(&c, got.as_mut_ptr(), m.ptr(), size).unwrap() };
            assert!(got.iter().all(|&x| x == 0x31));
            // SAFETY: as above.
            unsafe { memory::memset_d8(&c, m.ptr(), 0x32, size / 2).unwrap() };
        }
        "old_driver" => {
            // The driver loads without the optional entry point; dma-buf export says so.
            assert!(sys::driver()
                .unwrap()
                .cuMemGetHandleForAddressRange
                .is_none());
            assert!(!result::has_dmabuf_export().unwrap());
            let dev = Device::get(0).unwrap();
            assert!(!dev.dma_buf_supported().unwrap());
            let c = ctx(0);
            let buf = DeviceBuffer::alloc(&c, 1 << 16).unwrap();
            match stolon_cuda::export_dmabuf(&c, buf.ptr(), 4096) {
                Err(Error::Unsupported { what, why }) => {
                    assert_eq!(what, "dma-buf export");
                    assert!(why.contains("cuMemGetHandleForAddressRange"), "{why}");
                }
                other => panic!("{other:?}"),
            }
            // Everything else still works.
            buf.to_vec().unwrap();
        }
        "stub" => {
            let e = Device::get(0).unwrap_err();
            assert_eq!(e.driver_code(), Some(sys::CUDA_ERROR_STUB_LIBRARY), "{e:?}");
            assert!(e.is_unavailable());
            assert!(e.to_string().contains("cuInit"), "{e}");
        }
        other => panic!("unknown role {other}"),
    }
    println!("{CHILD_OK} {role}");
}

#[test]
fn no_device_and_stub_library_are_typed() {
    let Some((_g, _m)) = mock() else { return };
    run_child("no_device", &[("STOLON_MOCK_CUDA_DEVICES", "0")], None);
    run_child("stub", &[("STOLON_MOCK_CUDA_STUB", "1")], None);
}

#[test]
fn vmm_memory_reaches_a_child_process() {
    let Some((_g, _m)) = mock() else { return };
    let c = ctx(0);
    let v = VmmAllocation::new(&c, 1).unwrap();
    // SAFETY: ours, idle.
    unsafe { memory::memset_d8(&c, v.ptr(), 0x31, v.len()).unwrap() };
    let fd = stolon_cuda::export_fd(&c, v.ptr()).unwrap();
    let size = v.len().to_string();
    run_child("vmm", &[("VMM_SIZE", &size)], Some(fd.as_fd()));
    let mut got = vec![0u8; v.len()];
    // SAFETY: ours, idle.
    unsafe { memory::copy_dtoh(&c, got.as_mut_ptr(), v.ptr(), v.len()).unwrap() };
    assert!(got[..v.len() / 2].iter().all(|&x| x == 0x32));
    assert!(got[v.len() / 2..].iter().all(|&x| x == 0x31));
}

fn fd_size(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat writes one struct stat for an open descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st.st_size as u64
}

#[test]
fn device_memory_exports_as_a_dmabuf_on_page_boundaries() {
    let Some((_g, _m)) = mock() else { return };
    let page = stolon_cuda::dmabuf::host_page_size();
    let c = ctx(0);
    assert!(result::has_dmabuf_export().unwrap());
    assert!(Device::get(0).unwrap().dma_buf_supported().unwrap());
    let buf = DeviceBuffer::alloc(&c, 16 * page).unwrap();
    assert_eq!(buf.ptr() % page as u64, 0);

    // A range inside one page: that page, with the offset of the bytes asked for.
    let d = stolon_cuda::export_dmabuf(&c, buf.ptr() + 100, 1000).unwrap();
    assert_eq!((d.base, d.len, d.offset), (buf.ptr(), page, 100));
    assert_eq!(fd_size(d.fd.as_fd()), page as u64);
    // Straddling a page boundary: both pages.
    let d = stolon_cuda::export_dmabuf(&c, buf.ptr() + page as u64 - 8, 16).unwrap();
    assert_eq!(
        (d.base, d.len, d.offset),
        (buf.ptr(), 2 * page, page as u64 - 8)
    );
    // The whole buffer.
    let d = stolon_cuda::export_dmabuf(&c, buf.ptr(), 16 * page).unwrap();
    assert_eq!((d.len, d.offset), (16 * page, 0));
    // VMM memory too.
    let v = VmmAllocation::new(&c, 1).unwrap();
    let d = stolon_cuda::export_dmabuf(&c, v.ptr() + 5, 10).unwrap();
    assert_eq!((d.base, d.offset), (v.ptr(), 5));
    // Every call binds the context and restores the thread's (none).
    assert!(result::ctx_get_current().unwrap().is_null());

    // Rounding past the end of the allocation: the driver refuses, typed.
    let small = DeviceBuffer::alloc(&c, 100).unwrap();
    let e = stolon_cuda::export_dmabuf(&c, small.ptr(), 100).unwrap_err();
    assert_eq!(
        e.driver_code(),
        Some(sys::CUDA_ERROR_INVALID_VALUE),
        "{e:?}"
    );
    // Memory the driver does not know.
    let heap = vec![0u8; 3 * page];
    let e = stolon_cuda::export_dmabuf(&c, heap.as_ptr() as u64, page).unwrap_err();
    assert_eq!(
        e.driver_code(),
        Some(sys::CUDA_ERROR_INVALID_VALUE),
        "{e:?}"
    );
    assert!(matches!(
        stolon_cuda::export_dmabuf(&c, buf.ptr(), 0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_device_without_dmabuf_support_says_so() {
    let Some((_g, _m)) = mock() else { return };
    let dev = Device::get(1).unwrap();
    assert!(!dev.dma_buf_supported().unwrap());
    let c = ctx(1);
    let buf = DeviceBuffer::alloc(&c, 1 << 16).unwrap();
    let e = stolon_cuda::export_dmabuf(&c, buf.ptr(), 1 << 16).unwrap_err();
    assert_eq!(
        e.driver_code(),
        Some(sys::CUDA_ERROR_NOT_SUPPORTED),
        "{e:?}"
    );
    assert!(!e.is_unavailable());
    assert!(
        e.to_string().contains("cuMemGetHandleForAddressRange"),
        "{e}"
    );
}

#[test]
fn a_driver_without_the_entry_point_still_loads_and_says_dmabuf_is_unsupported() {
    let Some((_g, _m)) = mock() else { return };
    run_child("old_driver", &[(OLD_DRIVER, "1")], None);
}

/// Builds the GDRCopy stand-in (`tests/mock_libgdrapi.c`) once; its path.
fn gdr_mock() -> Option<&'static PathBuf> {
    static GDR: OnceLock<Option<PathBuf>> = OnceLock::new();
    GDR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("stolon-gdr-mock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let so = dir.join("libgdrapi.so.2");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mock_libgdrapi.c");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&so)
            .arg(src)
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "building the GDRCopy mock failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(so)
    })
    .as_ref()
}

fn gdr_live(so: &PathBuf) -> c_int {
    // SAFETY: the mock is already loaded by stolon-cuda; this is a second handle to it, and
    // mock_gdr_live is `int mock_gdr_live(void)`.
    unsafe {
        let lib = libloading::Library::new(so).unwrap();
        let f = lib
            .get::<unsafe extern "C" fn() -> c_int>(b"mock_gdr_live")
            .unwrap();
        f()
    }
}

#[test]
fn gpu_flags_pin_and_map_one_gpu_page_and_undo_both() {
    let Some((_g, _m)) = mock() else { return };
    let Some(so) = gdr_mock() else { return };
    std::env::set_var(stolon_cuda::gdr::ENV_LIBGDRAPI, so);
    let c = ctx(0);
    let flag = stolon_cuda::GpuFlag::new(&c).unwrap();
    let gdr = stolon_cuda::Gdr::get().unwrap();
    assert_eq!(gdr.path, so.to_string_lossy());
    // Pinned and mapped exactly once, at a GPU-page boundary.
    assert_eq!(gdr_live(so), 1000 + 10 + 1);
    assert_eq!(flag.device_ptr() % stolon_cuda::gdr::GPU_PAGE as u64, 0);
    assert_eq!(flag.load(), 0);
    flag.store(0xABCD_0001);
    assert_eq!(flag.load(), 0xABCD_0001);
    // The mock's device memory is host memory, and its mapping is the memory itself: the
    // store is at the device address the GPU would poll.
    // SAFETY: a live mock allocation (see above), 8 bytes at a page boundary.
    assert_eq!(unsafe { *(flag.device_ptr() as *const u64) }, 0xABCD_0001);
    let second = stolon_cuda::GpuFlag::new(&c).unwrap();
    assert_ne!(second.device_ptr(), flag.device_ptr());
    assert_eq!(gdr_live(so), 2 * 1010 + 1);
    drop((flag, second));
    // Unmapped and unpinned; the gdr_t stays open for the next flag.
    assert_eq!(gdr_live(so), 1);
}

#[test]
fn without_the_gdrdrv_module_gdrcopy_is_unsupported() {
    let Some((_g, _m)) = mock() else { return };
    let Some(so) = gdr_mock() else { return };
    std::env::set_var("MOCK_GDR_NO_DRIVER", "1");
    let r = stolon_cuda::Gdr::load(&[so.to_string_lossy().into_owned()]);
    std::env::remove_var("MOCK_GDR_NO_DRIVER");
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unsupported {
                what: "GDRCopy",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("gdrdrv"), "{e}");
}
