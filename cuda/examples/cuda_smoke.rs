//! Prints what the CUDA driver reports and runs a quick self-check on each GPU.
//!
//! ```text
//! cargo run -p stolon-cuda --example cuda_smoke            # all GPUs
//! cargo run -p stolon-cuda --example cuda_smoke -- 1       # GPU 1 only
//! ```
//!
//! Exit status: 0 all checks passed, 1 a check failed, 2 no usable CUDA here (the reason is
//! printed).

use std::ffi::c_void;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stolon_cuda::{
    memory, pointer_info, stream_write_value64, sys, vmm, Context, Device, DeviceBuffer, Event,
    HostCounter, IpcMemHandle, MemoryType, Module, PinnedHostBuffer, Result, Stream, VmmAllocation,
};

const T: Duration = Duration::from_secs(10);

fn check(name: &str, failures: &mut u32, f: impl FnOnce() -> Result<String>) {
    let start = Instant::now();
    match f() {
        Ok(note) => println!("  ok    {name:<34} {note} ({:.1} ms)", ms(start)),
        Err(e) => {
            *failures += 1;
            println!("  FAIL  {name:<34} {e}");
        }
    }
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

fn fail(msg: String) -> stolon_cuda::Error {
    stolon_cuda::Error::InvalidArgument(msg)
}

fn self_check(ctx: &Arc<Context>, failures: &mut u32) {
    let len = 64 << 20;
    check("device memory round trip", failures, || {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut buf = DeviceBuffer::alloc(ctx, len)?;
        buf.copy_from_host(0, &data)?;
        if buf.to_vec()? != data {
            return Err(fail("bytes differ".into()));
        }
        Ok(format!("{} MiB byte-exact", len >> 20))
    });
    check("pinned staging bandwidth", failures, || {
        let pinned = PinnedHostBuffer::alloc(ctx, len)?;
        let dev = DeviceBuffer::alloc(ctx, len)?;
        let s = Stream::new(ctx)?;
        let (a, b, c) = (
            Event::with_timing(ctx)?,
            Event::with_timing(ctx)?,
            Event::with_timing(ctx)?,
        );
        a.record(&s)?;
        // SAFETY: both buffers outlive the stream work (we wait below).
        unsafe { memory::copy_htod_async(&s, dev.ptr(), pinned.host_ptr(), len)? };
        b.record(&s)?;
        // SAFETY: as above.
        unsafe { memory::copy_dtoh_async(&s, pinned.host_ptr(), dev.ptr(), len)? };
        c.record(&s)?;
        s.wait_idle(T)?;
        let gbs = |ms: f32| len as f64 / (ms as f64 / 1e3) / 1e9;
        Ok(format!(
            "H2D {:.1} GB/s, D2H {:.1} GB/s",
            gbs(a.elapsed_ms(&b)?),
            gbs(b.elapsed_ms(&c)?)
        ))
    });
    check("mapped pinned memory from device", failures, || {
        let mut pinned = PinnedHostBuffer::alloc(ctx, 4096)?;
        // SAFETY: no device work uses the buffer yet.
        unsafe { pinned.as_mut_slice().fill(0xA5) };
        let dev = DeviceBuffer::alloc_zeroed(ctx, 4096)?;
        // SAFETY: both ranges are ours and idle.
        unsafe { memory::copy(ctx, dev.ptr(), pinned.device_ptr(), 4096)? };
        if dev.to_vec()?.iter().any(|&x| x != 0xA5) {
            return Err(fail("device did not see host bytes".into()));
        }
        Ok("device reads host memory".into())
    });
    check("host counter <- cuStreamWriteValue64", failures, || {
        let counter = HostCounter::new(ctx)?;
        let s = Stream::new(ctx)?;
        let start = Instant::now();
        // SAFETY: the counter outlives the stream work.
        unsafe { stream_write_value64(&s, counter.device_ptr(), 1)? };
        counter.wait_at_least(1, T)?;
        let us = start.elapsed().as_secs_f64() * 1e6;
        s.wait_idle(T)?;
        Ok(format!("CPU saw the write {us:.0} us after queueing"))
    });
    check("kernel polls a host flag", failures, || {
        let module = Module::load(ctx, stolon_cuda::SELFCHECK_PTX.as_bytes())?;
        let k = module.function("stolon_wait_then_store")?;
        let s = Stream::new(ctx)?;
        let (flag, done) = (HostCounter::new(ctx)?, HostCounter::new(ctx)?);
        let (mut f, mut t, mut o, mut v) = (flag.device_ptr(), 1u64, done.device_ptr(), 9u64);
        let mut params = [
            &mut f as *mut u64 as *mut c_void,
            &mut t as *mut u64 as *mut c_void,
            &mut o as *mut u64 as *mut c_void,
            &mut v as *mut u64 as *mut c_void,
        ];
        // SAFETY: the parameters match the kernel; the counters outlive it (we wait below).
        unsafe { k.launch(&s, (1, 1, 1), (1, 1, 1), 0, &mut params)? };
        std::thread::sleep(Duration::from_millis(20));
        if done.load() != 0 {
            return Err(fail("kernel ran past an unset flag".into()));
        }
        let start = Instant::now();
        flag.store(1);
        done.wait_at_least(9, T)?;
        let us = start.elapsed().as_secs_f64() * 1e6;
        s.wait_idle(T)?;
        Ok(format!("round trip CPU->GPU->CPU {us:.0} us"))
    });
    check("pointer info / CUDA IPC export", failures, || {
        let buf = DeviceBuffer::alloc(ctx, 1 << 20)?;
        let info = pointer_info(ctx, buf.ptr() + 64)?;
        if info.memory_type != MemoryType::Device || !info.ipc_capable || info.is_vmm {
            return Err(fail(format!("unexpected {info:?}")));
        }
        let ex = IpcMemHandle::export(ctx, buf.ptr() + 64)?;
        Ok(format!("handle {:?}, offset {}", ex.handle, ex.offset))
    });
    check("VMM export/import (same process)", failures, || {
        let dev = ctx.device();
        if !dev.supports_vmm()? || !dev.supports_posix_fd_export()? {
            return Ok("not supported on this device (skipped)".into());
        }
        let v = VmmAllocation::new(ctx, 1)?;
        // SAFETY: the allocation is ours and idle.
        unsafe { memory::memset_d8(ctx, v.ptr(), 0x42, v.len())? };
        let ex = vmm::export(ctx, v.ptr())?;
        let m = stolon_cuda::import_fd(ctx, std::os::fd::AsFd::as_fd(&ex.fd), ex.alloc_size)?;
        let mut b = [0u8; 16];
        // SAFETY: the mapping has at least 16 bytes.
        unsafe { memory::copy_dtoh(ctx, b.as_mut_ptr(), m.ptr() + 100, 16)? };
        if b != [0x42; 16] {
            return Err(fail("imported mapping shows other bytes".into()));
        }
        let info = pointer_info(ctx, v.ptr())?;
        Ok(format!(
            "granularity {} KiB, is_vmm {}, handle types {:#x}",
            vmm::allocation_granularity(&dev)? >> 10,
            info.is_vmm,
            info.allowed_handle_types
        ))
    });
}

fn main() -> ExitCode {
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    match sys::driver() {
        Ok(d) => println!("libcuda: {}", d.path),
        Err(e) => {
            println!("no CUDA driver: {e}");
            return ExitCode::from(2);
        }
    }
    match stolon_cuda::driver_version() {
        Ok(v) => println!("driver supports CUDA {v}"),
        Err(e) => println!("driver version: {e}"),
    }
    let devices = match Device::all() {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => {
            println!(
                "the driver sees no GPU: {:?}",
                stolon_cuda::result::driver().err()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            println!("cannot list devices: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failures = 0;
    for d in &devices {
        let info = || -> Result<String> {
            let (maj, min) = d.compute_capability()?;
            Ok(format!(
                "{} | {} | sm_{maj}{min} | {} SMs | {:.1} GiB | vmm {} | posix-fd {} | \
                 64-bit stream memops {}",
                d.name()?,
                d.pci_bus_id()?,
                d.attribute(sys::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                d.total_memory()? as f64 / (1u64 << 30) as f64,
                d.supports_vmm()?,
                d.supports_posix_fd_export()?,
                d.supports_stream_mem_ops_64()?,
            ))
        };
        match info() {
            Ok(s) => println!("GPU {}: {s}", d.ordinal()),
            Err(e) => println!("GPU {}: {e}", d.ordinal()),
        }
        let peers: Vec<String> = devices
            .iter()
            .filter(|p| *p != d)
            .map(|p| format!("{}:{}", p.ordinal(), d.can_access_peer(p).unwrap_or(false)))
            .collect();
        if !peers.is_empty() {
            println!("  peer access {}", peers.join(" "));
        }
    }
    for d in &devices {
        if only.is_some_and(|o| o != d.ordinal()) {
            continue;
        }
        println!("self-check on GPU {}:", d.ordinal());
        match d.primary_context() {
            Ok(ctx) => self_check(&ctx, &mut failures),
            Err(e) => {
                failures += 1;
                println!("  FAIL  primary context: {e}");
            }
        }
    }
    if failures == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{failures} check(s) failed");
        ExitCode::from(1)
    }
}
