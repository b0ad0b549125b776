//! Behaviour on a machine without the CUDA driver (CPU CI, laptops): loading fails cleanly,
//! naming what was tried, and every entry point returns `Error::LibraryNotFound` instead of
//! panicking. Where a driver is installed, the tests that need its absence say SKIP and return.

use std::time::Duration;

use stolon_cuda::{result, sys, Device, Error};

fn driver_absent() -> bool {
    if sys::is_loadable() {
        eprintln!("SKIP: libcuda.so.1 loads on this machine; this test is for machines without it");
        return false;
    }
    true
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(what: &str, r: stolon_cuda::Result<T>) {
    match r {
        Err(Error::LibraryNotFound(e)) => {
            assert!(!e.tried.is_empty(), "{what}: no path listed");
        }
        other => panic!("{what}: expected LibraryNotFound, got {other:?}"),
    }
}

#[test]
fn load_from_missing_paths_lists_each_path_and_reason() {
    let paths = [
        "/nonexistent/stolon-a/libcuda.so.1",
        "/nonexistent/stolon-b/libcuda.so.1",
    ];
    let err = sys::load_from(&paths).expect_err("must not load");
    let tried: Vec<&str> = err.tried.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(tried, paths);
    for (_, why) in &err.tried {
        assert!(!why.is_empty());
    }
    let text = err.to_string();
    for p in paths {
        assert!(text.contains(p), "{text}");
    }
    assert!(text.contains(sys::ENV_LIBCUDA), "{text}");
}

#[test]
fn a_library_without_the_driver_symbols_is_rejected_by_name() {
    // libc loads everywhere and exports none of the driver's symbols.
    let err = sys::load_from(&["libc.so.6"]).expect_err("libc is not a CUDA driver");
    let (path, why) = &err.tried[0];
    assert_eq!(path, "libc.so.6");
    assert!(why.contains("missing symbol"), "{why}");
    assert!(why.contains(sys::SYMBOLS[0].symbols[0]), "{why}");
}

#[test]
fn candidate_paths_include_the_soname_and_no_duplicates() {
    let paths = sys::candidate_paths();
    assert!(paths.iter().any(|p| p == "libcuda.so.1"));
    let mut sorted = paths.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), paths.len(), "{paths:?}");
}

#[test]
fn symbol_table_names_versioned_symbols() {
    let get = |api: &str| {
        sys::SYMBOLS
            .iter()
            .find(|s| s.api == api)
            .unwrap_or_else(|| panic!("{api} missing from the table"))
            .symbols
    };
    assert_eq!(get("cuMemAlloc")[0], "cuMemAlloc_v2");
    assert_eq!(get("cuMemcpyHtoD")[0], "cuMemcpyHtoD_v2");
    assert_eq!(get("cuIpcOpenMemHandle")[0], "cuIpcOpenMemHandle_v2");
    assert_eq!(
        get("cuDevicePrimaryCtxRelease")[0],
        "cuDevicePrimaryCtxRelease_v2"
    );
    assert_eq!(
        get("cuStreamWriteValue64"),
        ["cuStreamWriteValue64_v2", "cuStreamWriteValue64"]
    );
    assert_eq!(get("cuInit"), ["cuInit"]);
}

#[test]
fn is_present_is_false_without_the_driver() {
    if !driver_absent() {
        return;
    }
    assert!(!stolon_cuda::is_present());
    assert!(!sys::is_loadable());
}

#[test]
fn the_cached_load_error_names_every_candidate_path() {
    if !driver_absent() {
        return;
    }
    let err = sys::driver().expect_err("no driver here");
    let tried: Vec<String> = err.tried.iter().map(|(p, _)| p.clone()).collect();
    // The candidate list is read once, when the driver is first loaded; the env var does not
    // change during this test binary.
    assert_eq!(tried, sys::candidate_paths());
    let e = Error::from(err);
    assert!(e.is_unavailable());
    let text = e.to_string();
    for p in &tried {
        assert!(text.contains(p.as_str()), "{text}");
    }
}

#[test]
fn every_entry_point_returns_library_not_found() {
    if !driver_absent() {
        return;
    }
    assert_not_found("driver_version", stolon_cuda::driver_version());
    assert_not_found("device_count", stolon_cuda::device_count());
    assert_not_found("Device::get", Device::get(0));
    assert_not_found("Device::all", Device::all());
    assert_not_found("result::driver", result::driver());
    assert_not_found("driver_get_version", result::driver_get_version());
    assert_not_found("device_get_count", result::device_get_count());
    assert_not_found("device_get", result::device_get(0));
    assert_not_found("device_get_name", result::device_get_name(0));
    assert_not_found("device_get_pci_bus_id", result::device_get_pci_bus_id(0));
    assert_not_found("device_get_attribute", result::device_get_attribute(0, 75));
    assert_not_found("device_total_mem", result::device_total_mem(0));
    assert_not_found(
        "device_can_access_peer",
        result::device_can_access_peer(0, 1),
    );
    assert_not_found(
        "device_primary_ctx_retain",
        result::device_primary_ctx_retain(0),
    );
    assert_not_found("ctx_get_current", result::ctx_get_current());
    assert_not_found("ctx_get_device", result::ctx_get_device());
    assert_not_found("ctx_synchronize", result::ctx_synchronize());
    assert_not_found("mem_get_info", result::mem_get_info());
    assert_not_found("mem_alloc", result::mem_alloc(4096));
    assert_not_found(
        "mem_get_address_range",
        result::mem_get_address_range(0x1000),
    );
    assert_not_found("mem_host_alloc", result::mem_host_alloc(4096, 0));
    assert_not_found(
        "mem_host_get_device_pointer",
        result::mem_host_get_device_pointer(0x1000),
    );
    assert_not_found("ipc_get_mem_handle", result::ipc_get_mem_handle(0x1000));
    let h = sys::CUipcMemHandle { reserved: [0; 64] };
    assert_not_found("ipc_open_mem_handle", result::ipc_open_mem_handle(h, 1));
    let prop = sys::CUmemAllocationProp::default();
    assert_not_found("mem_create", result::mem_create(1 << 21, &prop));
    assert_not_found(
        "mem_retain_allocation_handle",
        result::mem_retain_allocation_handle(0x1000),
    );
    assert_not_found(
        "mem_get_allocation_granularity",
        result::mem_get_allocation_granularity(&prop, 0),
    );
    assert_not_found(
        "mem_address_reserve",
        result::mem_address_reserve(1 << 21, 0),
    );
    assert_not_found("stream_create", result::stream_create(1));
    assert_not_found("event_create", result::event_create(2));
    let stdin = std::io::stdin();
    use std::os::fd::AsFd;
    assert_not_found(
        "mem_import_from_fd",
        result::mem_import_from_fd(stdin.as_fd()),
    );

    // The unsafe calls check for the driver before calling anything, so with no driver loaded
    // they cannot touch the (meaningless) arguments below.
    // SAFETY: no driver is loaded (checked above); each call returns before any driver call.
    unsafe {
        assert_not_found(
            "device_primary_ctx_release",
            result::device_primary_ctx_release(0),
        );
        assert_not_found(
            "ctx_set_current",
            result::ctx_set_current(std::ptr::null_mut()),
        );
        assert_not_found(
            "ctx_enable_peer_access",
            result::ctx_enable_peer_access(std::ptr::null_mut()),
        );
        assert_not_found("mem_free", result::mem_free(0));
        assert_not_found("memcpy", result::memcpy(0, 0, 1));
        assert_not_found(
            "memcpy_async",
            result::memcpy_async(0, 0, 1, std::ptr::null_mut()),
        );
        assert_not_found("memcpy_htod", result::memcpy_htod(0, std::ptr::null(), 1));
        assert_not_found(
            "memcpy_dtoh",
            result::memcpy_dtoh(std::ptr::null_mut(), 0, 1),
        );
        assert_not_found("memcpy_dtod", result::memcpy_dtod(0, 0, 1));
        assert_not_found(
            "memcpy_peer_async",
            result::memcpy_peer_async(
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                1,
                std::ptr::null_mut(),
            ),
        );
        assert_not_found("memset_d8", result::memset_d8(0, 0, 1));
        assert_not_found("mem_free_host", result::mem_free_host(std::ptr::null_mut()));
        assert_not_found(
            "mem_host_register",
            result::mem_host_register(std::ptr::null_mut(), 1, 0),
        );
        assert_not_found(
            "mem_host_unregister",
            result::mem_host_unregister(std::ptr::null_mut()),
        );
        assert_not_found(
            "pointer_get_attribute",
            result::pointer_get_attribute::<u32>(sys::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, 0x1000),
        );
        assert_not_found("ipc_close_mem_handle", result::ipc_close_mem_handle(0));
        assert_not_found("mem_release", result::mem_release(0));
        assert_not_found("mem_export_to_fd", result::mem_export_to_fd(0));
        assert_not_found("mem_map", result::mem_map(0, 1 << 21, 0, 0));
        assert_not_found("mem_unmap", result::mem_unmap(0, 1 << 21));
        assert_not_found("mem_address_free", result::mem_address_free(0, 1 << 21));
        assert_not_found("mem_set_access", result::mem_set_access(0, 1 << 21, &[]));
        assert_not_found("stream_query", result::stream_query(std::ptr::null_mut()));
        assert_not_found(
            "stream_write_value64",
            result::stream_write_value64(std::ptr::null_mut(), 0, 1, 0),
        );
        assert_not_found(
            "stream_wait_value64",
            result::stream_wait_value64(std::ptr::null_mut(), 0, 1, 0),
        );
        assert_not_found("event_query", result::event_query(std::ptr::null_mut()));
        assert_not_found(
            "module_load_data",
            result::module_load_data(std::ptr::null()),
        );
    }
}

#[test]
fn errors_read_well() {
    let e = Error::Driver {
        call: "cuMemAlloc",
        code: sys::CUDA_ERROR_OUT_OF_MEMORY,
        name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
        message: "out of memory".into(),
    };
    assert_eq!(
        e.to_string(),
        "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory"
    );
    assert_eq!(e.driver_code(), Some(2));
    assert!(!e.is_unavailable());
    assert!(Error::NoDevice.is_unavailable());
    assert!(Error::Forked.is_unavailable());
    let t = Error::Timeout {
        waited: Duration::from_millis(5),
        what: "stream work",
    };
    assert!(t.to_string().contains("stream work"));
}

#[test]
fn ipc_handles_round_trip_as_bytes() {
    let bytes: Vec<u8> = (0..64u8).collect();
    let h = stolon_cuda::IpcMemHandle::from_bytes(&bytes).unwrap();
    assert_eq!(h.as_bytes().as_slice(), bytes.as_slice());
    assert!(matches!(
        stolon_cuda::IpcMemHandle::from_bytes(&bytes[..63]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn selfcheck_ptx_names_its_kernels() {
    for k in [
        "stolon_store_u64",
        "stolon_wait_then_store",
        "stolon_fill_u8",
    ] {
        assert!(
            stolon_cuda::SELFCHECK_PTX.contains(&format!(".entry {k}(")),
            "{k}"
        );
    }
}
