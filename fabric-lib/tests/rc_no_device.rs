//! Choosing the libibverbs RC backend (`verbs-rc`) on a machine without an RDMA device (every
//! machine available to the project) is a typed error that lists what was found. On a machine
//! with an active RDMA port the engine opens instead, and the test says so.

use fabric_lib::{EngineConfig, Error, TransferEngine};

#[test]
fn verbs_rc_without_a_device_is_a_typed_error_listing_what_was_found() {
    for provider in [fabric_lib::rc::PROVIDER, fabric_lib::rc::PROVIDER_ALIAS] {
        let err = match TransferEngine::new(EngineConfig::new(provider, 1)) {
            Ok(_) => {
                eprintln!("an RDMA port is usable here; nothing to check");
                return;
            }
            Err(e) => e,
        };
        let text = err.to_string();
        eprintln!("{provider}: {text}");
        let Error::RdmaUnavailable(msg) = &err else {
            panic!("expected RdmaUnavailable, got {err:?}");
        };
        assert!(
            text.starts_with("RDMA (verbs-rc) is not usable here"),
            "{text}"
        );
        assert!(msg.contains(&format!("provider {provider}")), "{msg}");
        // What was found: the library (loaded from where, or every path tried) and devices.
        assert!(msg.contains("libibverbs"), "{msg}");
        assert!(msg.contains("devices: "), "{msg}");
        if stolon_verbs::sys::is_present() {
            assert!(msg.contains("libibverbs loaded from"), "{msg}");
        } else {
            assert!(msg.contains("libibverbs not found"), "{msg}");
        }
    }
    // A device asked for by name fails the same way.
    let mut cfg = EngineConfig::new("verbs-rc", 1);
    cfg.domains[0].interface = Some("mlx5_0".into());
    match TransferEngine::new(cfg) {
        Err(Error::RdmaUnavailable(msg)) => assert!(msg.contains("mlx5_0"), "{msg}"),
        Err(e) => panic!("expected RdmaUnavailable, got {e:?}"),
        Ok(_) => {}
    }
}
