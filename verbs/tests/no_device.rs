//! What `open_device` says on a machine without RDMA hardware (this CI machine): a typed error
//! naming what was found. On a machine with an active RDMA port the domain opens instead, and
//! the test says so.

use stolon_verbs::domain::{list_devices, open_device, DomainConfig};
use stolon_verbs::{sys, Error};

#[test]
fn open_device_without_hardware_is_a_clear_typed_error() {
    let err = match open_device(DomainConfig::default()) {
        Ok(d) => {
            eprintln!("an RDMA port is active here, nothing to check: {d:?}");
            return;
        }
        Err(e) => e,
    };
    let text = err.to_string();
    eprintln!("open_device: {text}");
    match &err {
        Error::LibraryNotFound(load) => {
            assert!(!load.tried.is_empty());
            assert!(text.contains("libibverbs.so.1"), "{text}");
            assert!(text.contains("STOLON_LIBIBVERBS"), "{text}");
        }
        Error::NoDevices { detail } => {
            assert!(
                detail.contains("ibv_get_device_list") || detail.contains("could be opened"),
                "{text}"
            );
            assert!(detail.contains("/sys/class/infiniband"), "{text}");
        }
        Error::NoActivePort { found } => assert!(!found.is_empty(), "{text}"),
        other => panic!("unexpected error kind: {other:?}"),
    }
    // Listing fails the same way.
    let listed = list_devices().unwrap_err();
    assert_eq!(
        std::mem::discriminant(&listed),
        std::mem::discriminant(&err)
    );
    // Asking for a device by name fails no differently when there is none at all.
    let named = DomainConfig {
        device: Some("mlx5_0".into()),
        ..Default::default()
    };
    let e = open_device(named).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LibraryNotFound(_) | Error::NoDevices { .. } | Error::DeviceNotFound { .. }
        ),
        "{e}"
    );
}

#[test]
fn a_missing_library_lists_every_path_tried() {
    let Err(err) = sys::load_from(["/nonexistent/libibverbs.so.1", "libstolon-no-such-lib.so.1"])
    else {
        panic!("loaded a library that does not exist");
    };
    assert_eq!(err.tried.len(), 2);
    let text = Error::from(err).to_string();
    assert!(text.contains("/nonexistent/libibverbs.so.1"), "{text}");
    assert!(text.contains("libstolon-no-such-lib.so.1"), "{text}");
    assert!(text.contains("STOLON_LIBIBVERBS"), "{text}");
}

#[test]
fn a_library_without_the_verbs_symbols_is_refused() {
    let Err(err) = sys::load_from(["libc.so.6"]) else {
        panic!("libc accepted as libibverbs")
    };
    assert_eq!(err.tried.len(), 1);
    assert!(
        err.tried[0].1.contains("ibv_get_device_list"),
        "{:?}",
        err.tried
    );
}

#[test]
fn reports_the_loaded_library() {
    match sys::lib() {
        Ok(lib) => eprintln!(
            "libibverbs from {}: _ibv_query_gid_ex {}, ibv_reg_mr_iova2 {}, ibv_reg_dmabuf_mr {}",
            lib.path,
            lib.query_gid_ex.is_some(),
            lib.reg_mr_iova2.is_some(),
            lib.reg_dmabuf_mr.is_some()
        ),
        Err(e) => eprintln!("{e}"),
    }
}
