//! Everything on a real GPU. Ignored by default; on a GPU machine:
//!
//! ```text
//! cargo test -p stolon-cuda --test gpu -- --ignored --test-threads=1
//! ```
//!
//! The IPC and VMM tests start a second process by running this test binary again with
//! `STOLON_CUDA_TEST_ROLE` set (a process cannot open its own IPC handles); tests that need two
//! GPUs say SKIP and pass on one.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use stolon_cuda::{
    memory, pointer_info, result, stream_wait_value64, stream_write_value64, sys, vmm, Context,
    Device, DeviceBuffer, Error, Event, HostCounter, HostRegistration, IpcMemHandle, MemoryType,
    Module, PinnedHostBuffer, Stream, VmmAllocation, WaitCondition,
};

const ROLE: &str = "STOLON_CUDA_TEST_ROLE";
const CHILD_OK: &str = "STOLON_CUDA_CHILD_OK";
const CHILD_FD: i32 = 100;
const T: Duration = Duration::from_secs(10);

fn ctx_on(ordinal: usize) -> Arc<Context> {
    assert!(
        stolon_cuda::is_present(),
        "no usable CUDA here: {:?}",
        result::driver().err()
    );
    Device::get(ordinal).unwrap().primary_context().unwrap()
}

fn ctx() -> Arc<Context> {
    ctx_on(0)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn env_usize(k: &str) -> usize {
    std::env::var(k).unwrap().parse().unwrap()
}

/// Runs this test binary again as a child in `role`, with `envs`, and `fd` (if any) available
/// as descriptor CHILD_FD. Panics unless the child reports success.
fn run_child(role: &str, envs: &[(&str, String)], fd: Option<BorrowedFd<'_>>) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "child_entry",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(fd) = fd {
        use std::os::unix::process::CommandExt;
        let raw = fd.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only calls dup2, which is
        // async-signal-safe; dup2 clears close-on-exec on the new descriptor.
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
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(&format!("{CHILD_OK} {role}")),
        "child {role} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// The entry point of child processes; does nothing when run as a plain test.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "ipc" => ipc_child(),
        "vmm" => vmm_child(),
        other => panic!("unknown child role {other}"),
    }
    println!("{CHILD_OK} {role}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn device_info() {
    assert!(stolon_cuda::is_present());
    let v = stolon_cuda::driver_version().unwrap();
    assert!(
        v >= stolon_cuda::DriverVersion {
            major: 11,
            minor: 7
        },
        "{v}"
    );
    let n = stolon_cuda::device_count().unwrap();
    assert!(n >= 1);
    for d in Device::all().unwrap() {
        let name = d.name().unwrap();
        let bus = d.pci_bus_id().unwrap();
        let cc = d.compute_capability().unwrap();
        eprintln!(
            "device {}: {name} at {bus}, sm_{}{}",
            d.ordinal(),
            cc.0,
            cc.1
        );
        assert!(!name.is_empty());
        assert_eq!(bus.matches(':').count(), 2, "{bus}");
        assert!(cc >= (7, 0));
        assert!(d.unified_addressing().unwrap());
        assert!(d.can_map_host_memory().unwrap());
        assert!(d.total_memory().unwrap() > 1 << 30);
        for p in Device::all().unwrap() {
            if p != d {
                eprintln!(
                    "  can access {}: {}",
                    p.ordinal(),
                    d.can_access_peer(&p).unwrap()
                );
            }
        }
    }
    assert!(matches!(
        Device::get(n),
        Err(Error::InvalidDevice { ordinal, count }) if ordinal == n && count == n
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn enter_binds_and_restores_the_previous_context() {
    let ctx = ctx();
    // SAFETY: null unbinds.
    unsafe { result::ctx_set_current(std::ptr::null_mut()).unwrap() };
    {
        let _g = ctx.enter().unwrap();
        assert_eq!(result::ctx_get_current().unwrap(), ctx.raw());
        assert_eq!(result::ctx_get_device().unwrap(), ctx.device().raw());
    }
    assert!(result::ctx_get_current().unwrap().is_null());
    ctx.make_current().unwrap();
    assert_eq!(result::ctx_get_current().unwrap(), ctx.raw());
    let (free, total) = ctx.memory_info().unwrap();
    assert!(free > 0 && free <= total);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn device_buffer_copies_are_byte_exact() {
    let ctx = ctx();
    let len = (1 << 20) + 3;
    let data = pattern(len, 7);
    let mut a = DeviceBuffer::alloc(&ctx, len).unwrap();
    a.copy_from_host(0, &data).unwrap();
    assert_eq!(a.to_vec().unwrap(), data);

    // Partial copies at odd offsets.
    let mut part = vec![0u8; 1000];
    a.copy_to_host(12345, &mut part).unwrap();
    assert_eq!(part, data[12345..13345]);
    a.copy_from_host(5, &[0xAB; 17]).unwrap();
    let mut head = vec![0u8; 30];
    a.copy_to_host(0, &mut head).unwrap();
    assert_eq!(&head[..5], &data[..5]);
    assert_eq!(&head[5..22], &[0xAB; 17]);
    assert_eq!(&head[22..], &data[22..30]);

    // Device to device.
    let mut b = DeviceBuffer::alloc_zeroed(&ctx, len).unwrap();
    assert!(b.to_vec().unwrap().iter().all(|&x| x == 0));
    b.copy_from_device(1, &a, 100, 4096).unwrap();
    let mut got = vec![0u8; 4096];
    b.copy_to_host(1, &mut got).unwrap();
    let mut want = a.to_vec().unwrap()[100..4196].to_vec();
    assert_eq!(got, want);
    b.fill(0x5A).unwrap();
    want = vec![0x5A; len];
    assert_eq!(b.to_vec().unwrap(), want);

    // Bounds and sizes are checked before the driver is called.
    assert!(matches!(
        a.copy_from_host(len - 1, &[1, 2]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.copy_to_host(usize::MAX, &mut [0]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        DeviceBuffer::alloc(&ctx, 0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn async_staging_through_pinned_memory() {
    let ctx = ctx();
    let len = 8 << 20;
    let data = pattern(len, 3);
    let mut src = PinnedHostBuffer::alloc(&ctx, len).unwrap();
    let dst = PinnedHostBuffer::alloc(&ctx, len).unwrap();
    // SAFETY: no device work touches the buffers yet.
    unsafe { src.as_mut_slice().copy_from_slice(&data) };
    let dev = DeviceBuffer::alloc(&ctx, len).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    let (start, end) = (
        Event::with_timing(&ctx).unwrap(),
        Event::with_timing(&ctx).unwrap(),
    );
    start.record(&stream).unwrap();
    // SAFETY: all three buffers outlive the stream work (we wait below) and do not overlap.
    unsafe {
        memory::copy_htod_async(&stream, dev.ptr(), src.host_ptr(), len).unwrap();
        memory::copy_dtoh_async(&stream, dst.host_ptr(), dev.ptr(), len).unwrap();
    }
    end.record(&stream).unwrap();
    stream.wait_idle(T).unwrap();
    end.wait(T).unwrap();
    assert!(stream.query().unwrap());
    // SAFETY: the stream is idle.
    assert_eq!(unsafe { dst.as_slice() }, &data[..]);
    let ms = start.elapsed_ms(&end).unwrap();
    eprintln!("{} MiB host->device->host in {ms:.3} ms", len >> 20);
    assert!(ms >= 0.0);

    // Unified-address async copy and memset on the stream, device to pinned.
    // SAFETY: as above.
    unsafe {
        memory::memset_d8_async(&stream, dev.ptr(), 0xEE, 4096).unwrap();
        memory::copy_async(&stream, dst.device_ptr(), dev.ptr(), 4096).unwrap();
    }
    stream.synchronize().unwrap();
    // SAFETY: the stream is idle.
    assert!(unsafe { dst.as_slice() }[..4096].iter().all(|&x| x == 0xEE));

    // A borrowed handle to the legacy default stream works too and is not destroyed.
    // SAFETY: null is the legacy default stream.
    let legacy = unsafe { Stream::from_raw(&ctx, std::ptr::null_mut()) };
    legacy.synchronize().unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn pinned_mapped_memory_is_visible_from_the_device() {
    let ctx = ctx();
    let len = 1 << 16;
    let data = pattern(len, 11);
    let mut pinned = PinnedHostBuffer::alloc(&ctx, len).unwrap();
    // SAFETY: zeroed at allocation; no device work yet.
    assert!(unsafe { pinned.as_slice() }.iter().all(|&x| x == 0));
    // SAFETY: no device work yet.
    unsafe { pinned.as_mut_slice().copy_from_slice(&data) };
    let dev = DeviceBuffer::alloc_zeroed(&ctx, len).unwrap();
    // Device reads host memory through the mapped address (cuMemcpy with unified addressing).
    // SAFETY: both ranges are ours and idle.
    unsafe { memory::copy(&ctx, dev.ptr(), pinned.device_ptr(), len).unwrap() };
    assert_eq!(dev.to_vec().unwrap(), data);

    // A kernel writes host memory through the mapped address.
    let module = Module::load(&ctx, stolon_cuda::SELFCHECK_PTX.as_bytes()).unwrap();
    let fill = module.function("stolon_fill_u8").unwrap();
    let stream = Stream::new(&ctx).unwrap();
    let (mut p, mut n, mut v) = (pinned.device_ptr(), len as u64, 0x3Cu8);
    let mut params = [
        &mut p as *mut u64 as *mut c_void,
        &mut n as *mut u64 as *mut c_void,
        &mut v as *mut u8 as *mut c_void,
    ];
    // SAFETY: the parameters match stolon_fill_u8(u8*, u64, u8); the buffer outlives the kernel.
    unsafe {
        fill.launch(&stream, (16, 1, 1), (256, 1, 1), 0, &mut params)
            .unwrap()
    };
    stream.wait_idle(T).unwrap();
    // SAFETY: the stream is idle.
    assert!(unsafe { pinned.as_slice() }.iter().all(|&x| x == 0x3C));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn host_registration_maps_existing_memory() {
    let ctx = ctx();
    let len = 1 << 20;
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: non-zero size.
    let host = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!host.is_null());
    {
        // SAFETY: `host` stays allocated until after the registration drops (end of block).
        let reg =
            unsafe { HostRegistration::new(&ctx, host, len, HostRegistration::DEFAULT_FLAGS) }
                .unwrap();
        let dptr = reg.device_ptr().expect("mapped");
        let info = pointer_info(&ctx, host as u64).unwrap();
        assert_eq!(info.memory_type, MemoryType::Host);
        let data = pattern(len, 5);
        let mut dev = DeviceBuffer::alloc(&ctx, len).unwrap();
        dev.copy_from_host(0, &data).unwrap();
        // SAFETY: both ranges are ours and idle.
        unsafe { memory::copy_dtod(&ctx, dptr, dev.ptr(), len).unwrap() };
        // SAFETY: the synchronous copy has finished.
        let seen = unsafe { std::slice::from_raw_parts(host, len) };
        assert_eq!(seen, &data[..]);
    }
    // SAFETY: allocated above with this layout; the registration is gone.
    unsafe { std::alloc::dealloc(host, layout) };
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn host_counter_observes_stream_writes_and_gates_streams() {
    let ctx = ctx();
    let dev = ctx.device();
    assert!(dev.supports_stream_mem_ops_64().unwrap());
    let counter = HostCounter::new(&ctx).unwrap();
    assert_eq!(counter.load(), 0);
    let stream = Stream::new(&ctx).unwrap();
    let buf = DeviceBuffer::alloc(&ctx, 64 << 20).unwrap();
    for i in 1..=100u64 {
        // SAFETY: the buffer and counter outlive the stream work (we wait below).
        unsafe {
            memory::memset_d8_async(&stream, buf.ptr(), i as u8, buf.len()).unwrap();
            stream_write_value64(&stream, counter.device_ptr(), i).unwrap();
        }
    }
    assert_eq!(counter.wait_at_least(100, T).unwrap(), 100);
    stream.wait_idle(T).unwrap();

    // The GPU waits for a flag the CPU raises, then signals back.
    let flag = HostCounter::new(&ctx).unwrap();
    let done = HostCounter::new(&ctx).unwrap();
    // SAFETY: flag and done outlive the stream work.
    unsafe {
        stream_wait_value64(&stream, flag.device_ptr(), 5, WaitCondition::GreaterOrEqual).unwrap();
        stream_write_value64(&stream, done.device_ptr(), 1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(done.load(), 0, "the stream ran past an unmet wait");
    assert!(!stream.query().unwrap());
    flag.store(5);
    done.wait_at_least(1, T).unwrap();
    stream.wait_idle(T).unwrap();

    assert!(matches!(
        // SAFETY: rejected before any driver call.
        unsafe { stream_write_value64(&stream, counter.device_ptr() + 4, 1) },
        Err(Error::InvalidArgument(_))
    ));
    let t = Duration::from_millis(20);
    assert!(matches!(
        counter.wait_at_least(1000, t),
        Err(Error::Timeout { .. })
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn kernel_polls_a_host_flag_and_signals_back() {
    let ctx = ctx();
    let module = Module::load(&ctx, stolon_cuda::SELFCHECK_PTX.as_bytes()).unwrap();
    let wait_then_store = module.function("stolon_wait_then_store").unwrap();
    let store = module.function("stolon_store_u64").unwrap();
    assert!(module.function("no_such_kernel").is_err());
    let stream = Stream::new(&ctx).unwrap();
    let flag = HostCounter::new(&ctx).unwrap();
    let done = HostCounter::new(&ctx).unwrap();
    let (mut f, mut target, mut out, mut v) = (flag.device_ptr(), 3u64, done.device_ptr(), 42u64);
    let mut params = [
        &mut f as *mut u64 as *mut c_void,
        &mut target as *mut u64 as *mut c_void,
        &mut out as *mut u64 as *mut c_void,
        &mut v as *mut u64 as *mut c_void,
    ];
    // SAFETY: parameters match the kernel; the counters outlive it (we wait below).
    unsafe {
        wait_then_store
            .launch(&stream, (1, 1, 1), (1, 1, 1), 0, &mut params)
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(done.load(), 0);
    flag.store(3);
    assert_eq!(done.wait_at_least(42, T).unwrap(), 42);
    stream.wait_idle(T).unwrap();

    let (mut p, mut val) = (done.device_ptr(), 7u64 << 40);
    let mut params = [
        &mut p as *mut u64 as *mut c_void,
        &mut val as *mut u64 as *mut c_void,
    ];
    // SAFETY: parameters match stolon_store_u64(u64*, u64); the counter outlives the kernel.
    unsafe {
        store
            .launch(&stream, (1, 1, 1), (1, 1, 1), 0, &mut params)
            .unwrap()
    };
    stream.wait_idle(T).unwrap();
    assert_eq!(done.load(), 7u64 << 40);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn pointer_info_classifies_memory() {
    let ctx = ctx();
    let buf = DeviceBuffer::alloc(&ctx, 3 << 20).unwrap();
    let info = pointer_info(&ctx, buf.ptr() + 100).unwrap();
    eprintln!("cuMemAlloc: {info:?}");
    assert_eq!(info.memory_type, MemoryType::Device);
    assert_eq!(info.device, Some(0));
    assert_eq!(info.context, ctx.raw() as usize);
    assert_eq!(info.range_start, buf.ptr());
    assert!(info.range_size >= buf.len());
    assert_eq!(info.alloc_start, buf.ptr());
    assert!(info.ipc_capable);
    assert!(!info.is_vmm);
    assert_ne!(info.buffer_id, 0);

    let pinned = PinnedHostBuffer::alloc(&ctx, 4096).unwrap();
    let info = pointer_info(&ctx, pinned.host_ptr() as u64).unwrap();
    eprintln!("pinned: {info:?}");
    assert_eq!(info.memory_type, MemoryType::Host);
    assert!(!info.is_vmm);

    let heap = vec![0u8; 4096];
    let info = pointer_info(&ctx, heap.as_ptr() as u64).unwrap();
    assert_eq!(info.memory_type, MemoryType::Unknown);

    let gran = vmm::allocation_granularity(&ctx.device()).unwrap();
    let v = VmmAllocation::chunked(&ctx, gran, 2).unwrap();
    let info = pointer_info(&ctx, v.ptr() + gran as u64 + 8).unwrap();
    eprintln!("VMM (2 chunks of {gran}), second chunk: {info:?}");
    assert_eq!(info.memory_type, MemoryType::Device);
    assert!(info.is_vmm);
    assert!(!info.ipc_capable);
    assert_ne!(
        info.allowed_handle_types & sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR as u64,
        0
    );
    assert_eq!(
        info.range_start,
        v.ptr(),
        "RANGE_START_ADDR is the reservation"
    );
    assert_eq!(info.range_size, v.len());
    assert_eq!(
        info.alloc_start,
        v.ptr() + gran as u64,
        "cuMemGetAddressRange: one mapping"
    );
    assert_eq!(info.alloc_size, gran);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn ipc_round_trip_through_a_child_process() {
    let ctx = ctx();
    let len = 4 << 20;
    let data = pattern(len, 21);
    let mut buf = DeviceBuffer::alloc(&ctx, len).unwrap();
    buf.copy_from_host(0, &data).unwrap();
    // Export an interior address, as for a tensor inside a caching-allocator segment.
    let offset = 1 << 20;
    let ex = IpcMemHandle::export(&ctx, buf.ptr() + offset as u64).unwrap();
    assert_eq!(ex.alloc_base, buf.ptr());
    assert_eq!(ex.offset, offset);
    assert_eq!(ex.handle, IpcMemHandle::of_buffer(&buf).unwrap());
    // The driver refuses to open a handle in the process that exported it.
    let own = ex.handle.open(&ctx);
    assert!(matches!(own, Err(Error::Driver { .. })), "{own:?}");

    let child_dev = if stolon_cuda::device_count().unwrap() > 1 {
        1
    } else {
        0
    };
    let span = 1 << 20;
    run_child(
        "ipc",
        &[
            ("IPC_HANDLE", hex(ex.handle.as_bytes())),
            ("IPC_OFFSET", ex.offset.to_string()),
            ("IPC_LEN", span.to_string()),
            ("IPC_DEVICE", child_dev.to_string()),
        ],
        None,
    );
    // The child checked our bytes and wrote 0xC3 over them.
    let mut got = vec![0u8; len];
    buf.copy_to_host(0, &mut got).unwrap();
    assert_eq!(&got[..offset], &data[..offset]);
    assert!(got[offset..offset + span].iter().all(|&x| x == 0xC3));
    assert_eq!(&got[offset + span..], &data[offset + span..]);
}

fn ipc_child() {
    let ctx = ctx_on(env_usize("IPC_DEVICE"));
    let handle = IpcMemHandle::from_bytes(&unhex(&std::env::var("IPC_HANDLE").unwrap())).unwrap();
    let (offset, len) = (env_usize("IPC_OFFSET"), env_usize("IPC_LEN"));
    let m = handle.open(&ctx).unwrap();
    if let Some(size) = m.alloc_size() {
        assert!(size >= offset + len, "mapping of {size} bytes");
    }
    let at = m.ptr() + offset as u64;
    let mut got = vec![0u8; len];
    // SAFETY: the exporter keeps the allocation alive while we run; the range is inside it.
    unsafe { memory::copy_dtoh(&ctx, got.as_mut_ptr(), at, len).unwrap() };
    // The parent's pattern, seed 21, starting at `offset`.
    assert_eq!(got, pattern(offset + len, 21)[offset..]);
    // SAFETY: as above.
    unsafe { memory::memset_d8(&ctx, at, 0xC3, len).unwrap() };
    ctx.synchronize().unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn vmm_export_import_through_a_child_process() {
    let ctx = ctx();
    let dev = ctx.device();
    assert!(dev.supports_vmm().unwrap() && dev.supports_posix_fd_export().unwrap());
    let v = VmmAllocation::new(&ctx, 3 << 20).unwrap(); // rounded up to the granularity
    let len = v.len();
    let data = pattern(len, 33);
    // SAFETY: the allocation is ours, `len` bytes, idle.
    unsafe { memory::copy_htod(&ctx, v.ptr(), data.as_ptr(), len).unwrap() };
    let ex = vmm::export(&ctx, v.ptr() + 4096).unwrap();
    assert_eq!(
        (ex.alloc_base, ex.alloc_size, ex.offset),
        (v.ptr(), len, 4096)
    );

    let child_dev = if stolon_cuda::device_count().unwrap() > 1 {
        1
    } else {
        0
    };
    run_child(
        "vmm",
        &[
            ("VMM_SIZE", len.to_string()),
            ("VMM_DEVICE", child_dev.to_string()),
        ],
        Some(std::os::fd::AsFd::as_fd(&ex.fd)),
    );
    let mut got = vec![0u8; len];
    // SAFETY: as above.
    unsafe { memory::copy_dtoh(&ctx, got.as_mut_ptr(), v.ptr(), len).unwrap() };
    assert!(got[..len / 2].iter().all(|&x| x == 0x7E));
    assert_eq!(&got[len / 2..], &data[len / 2..]);
}

fn vmm_child() {
    let ctx = ctx_on(env_usize("VMM_DEVICE"));
    let size = env_usize("VMM_SIZE");
    // SAFETY: the parent put the exported descriptor at CHILD_FD for the life of this process.
    let fd = unsafe { BorrowedFd::borrow_raw(CHILD_FD) };
    let m = stolon_cuda::import_fd(&ctx, fd, size).unwrap();
    assert_eq!(m.len(), size);
    let info = pointer_info(&ctx, m.ptr()).unwrap();
    assert!(info.is_vmm, "{info:?}");
    let mut got = vec![0u8; size];
    // SAFETY: the mapping is `size` bytes and the parent keeps the memory alive.
    unsafe { memory::copy_dtoh(&ctx, got.as_mut_ptr(), m.ptr(), size).unwrap() };
    assert_eq!(got, pattern(size, 33));
    // SAFETY: as above.
    unsafe { memory::memset_d8(&ctx, m.ptr(), 0x7E, size / 2).unwrap() };
    ctx.synchronize().unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn vmm_export_covers_the_chunk_mapped_at_the_address() {
    let ctx = ctx();
    let gran = vmm::allocation_granularity(&ctx.device()).unwrap();
    let v = VmmAllocation::chunked(&ctx, gran, 3).unwrap();
    let data = pattern(v.len(), 44);
    // SAFETY: ours, idle.
    unsafe { memory::copy_htod(&ctx, v.ptr(), data.as_ptr(), v.len()).unwrap() };
    let at = v.ptr() + gran as u64 + 10;
    let ex = vmm::export(&ctx, at).unwrap();
    assert_eq!(ex.alloc_base, v.ptr() + gran as u64);
    assert_eq!(ex.alloc_size, gran);
    assert_eq!(ex.offset, 10);
    // Importing in the same process maps the same physical chunk at a new address.
    let m = stolon_cuda::import_fd(&ctx, std::os::fd::AsFd::as_fd(&ex.fd), ex.alloc_size).unwrap();
    let mut got = vec![0u8; gran];
    // SAFETY: the mapping is `gran` bytes.
    unsafe { memory::copy_dtoh(&ctx, got.as_mut_ptr(), m.ptr(), gran).unwrap() };
    assert_eq!(got, data[gran..2 * gran]);
    // Per-chunk export of the allocation's own handles works the same.
    let fd2 = v.export_chunk_fd(2).unwrap();
    let m2 = stolon_cuda::import_fd(&ctx, std::os::fd::AsFd::as_fd(&fd2), gran).unwrap();
    // SAFETY: as above.
    unsafe { memory::copy_dtoh(&ctx, got.as_mut_ptr(), m2.ptr(), gran).unwrap() };
    assert_eq!(got, data[2 * gran..]);
    // Bad sizes are rejected.
    let r = stolon_cuda::import_fd(&ctx, std::os::fd::AsFd::as_fd(&fd2), gran + 1);
    assert!(r.is_err(), "{r:?}");
    // cuMemAlloc memory is not VMM memory.
    let plain = DeviceBuffer::alloc(&ctx, 4096).unwrap();
    assert!(stolon_cuda::export_fd(&ctx, plain.ptr()).is_err());
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn peer_copies_between_two_gpus() {
    if stolon_cuda::device_count().unwrap() < 2 {
        eprintln!("SKIP: needs two GPUs");
        return;
    }
    let (c0, c1) = (ctx_on(0), ctx_on(1));
    if !c0.device().can_access_peer(&c1.device()).unwrap() {
        eprintln!("SKIP: GPU 0 cannot access GPU 1");
        return;
    }
    c0.enable_peer_access(&c1).unwrap();
    c0.enable_peer_access(&c1).unwrap(); // already enabled is fine
    c1.enable_peer_access(&c0).unwrap();
    assert!(matches!(
        c0.enable_peer_access(&c0),
        Err(Error::InvalidArgument(_))
    ));
    let len = 32 << 20;
    let data = pattern(len, 55);
    let mut a = DeviceBuffer::alloc(&c0, len).unwrap();
    a.copy_from_host(0, &data).unwrap();
    let b = DeviceBuffer::alloc_zeroed(&c1, len).unwrap();
    let s = Stream::new(&c0).unwrap();
    // SAFETY: both buffers outlive the copy (we wait below).
    unsafe { memory::copy_peer_async(&s, b.ptr(), &c1, a.ptr(), &c0, len).unwrap() };
    s.wait_idle(T).unwrap();
    assert_eq!(b.to_vec().unwrap(), data);
    // Unified addressing copies across devices too.
    let mut c = DeviceBuffer::alloc_zeroed(&c0, len).unwrap();
    c.copy_from_device(0, &b, 0, len).unwrap();
    assert_eq!(c.to_vec().unwrap(), data);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn driver_errors_are_typed_and_named() {
    let ctx = ctx();
    let bogus = IpcMemHandle::from_bytes(&[0x5A; 64]).unwrap();
    match bogus.open(&ctx) {
        Err(Error::Driver { call, name, .. }) => {
            assert_eq!(call, "cuIpcOpenMemHandle");
            assert!(name.starts_with("CUDA_ERROR_"), "{name}");
        }
        other => panic!("expected a driver error, got {other:?}"),
    }
    let huge = DeviceBuffer::alloc(&ctx, 1 << 50);
    assert_eq!(
        huge.unwrap_err().driver_code(),
        Some(sys::CUDA_ERROR_OUT_OF_MEMORY)
    );
    assert!(Module::load(&ctx, b"not ptx").is_err());
    // The context still works after those (none of them is sticky).
    DeviceBuffer::alloc(&ctx, 4096).unwrap().fill(1).unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn a_forked_child_gets_a_clean_error() {
    let ctx = ctx();
    let buf = DeviceBuffer::alloc(&ctx, 4096).unwrap();
    // SAFETY: the child only reads an atomic, matches on the result, drops a value whose drop
    // skips the driver and frees nothing (the context Arc is still held by `ctx`), then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = result::is_forked_child()
            && matches!(Device::get(0), Err(Error::Forked))
            && matches!(result::driver(), Err(Error::Forked));
        drop(buf);
        // SAFETY: ends the child without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    // The parent is unaffected.
    assert!(!result::is_forked_child());
    buf.to_vec().unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored on a GPU machine"]
fn dmabuf_export_of_device_memory() {
    let c = ctx();
    let supported = c.device().dma_buf_supported().unwrap();
    let buf = DeviceBuffer::alloc(&c, 4 << 20).unwrap();
    match stolon_cuda::export_dmabuf(&c, buf.ptr() + 4096 + 3, 1 << 20) {
        Ok(d) => {
            assert!(supported, "exported although the attribute says no");
            assert_eq!(d.base, buf.ptr() + 4096);
            assert_eq!(d.offset, 3);
            assert!(d.fd.as_raw_fd() >= 0);
            eprintln!("dma-buf export: {} bytes at {:#x}", d.len, d.base);
        }
        Err(e) => {
            // Proprietary kernel modules or an old kernel: say so, the fallback is peermem.
            eprintln!("SKIP-ish: dma-buf export refused (attribute {supported}): {e}");
            assert!(!supported || e.driver_code() == Some(sys::CUDA_ERROR_NOT_SUPPORTED));
        }
    }
}
