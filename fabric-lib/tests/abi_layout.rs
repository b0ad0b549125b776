//! Checks fabric-lib's hand-written libfabric layouts against the installed C headers.
//! Skipped, with a message, where the headers (libfabric-dev) or a C compiler are missing.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use fabric_lib::sys::libfabric as fi;

fn c_layout() -> Option<HashMap<String, usize>> {
    if !std::path::Path::new("/usr/include/rdma/fabric.h").exists() {
        eprintln!("SKIP: /usr/include/rdma/fabric.h not installed (apt install libfabric-dev)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("stolon-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("abi_layout");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/abi_layout.c");
    let ok = Command::new("cc")
        .args([src, "-o"])
        .arg(&exe)
        .status()
        .ok()?
        .success();
    assert!(ok, "compiling abi_layout.c failed");
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(
        text.lines()
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse::<i64>().unwrap() as usize)
            })
            .collect(),
    )
}

macro_rules! check {
    ($c:expr, $errs:expr, size $t:ident) => {
        let k = format!("{}.SIZEOF", stringify!($t));
        if $c[&k] != size_of::<fi::$t>() {
            $errs.push(format!("{k}: C {} Rust {}", $c[&k], size_of::<fi::$t>()));
        }
    };
    ($c:expr, $errs:expr, $t:ident . $m:ident) => {
        check!($c, $errs, $t . $m => $m)
    };
    ($c:expr, $errs:expr, $t:ident . $m:ident => $rm:ident) => {
        let k = format!("{}.{}", stringify!($t), stringify!($m));
        if $c[&k] != offset_of!(fi::$t, $rm) {
            $errs.push(format!("{k}: C {} Rust {}", $c[&k], offset_of!(fi::$t, $rm)));
        }
    };
}

#[test]
fn layouts_match_the_c_headers() {
    let Some(c) = c_layout() else { return };
    let mut e: Vec<String> = Vec::new();
    check!(c, e, size fi_info);
    check!(c, e, fi_info.caps);
    check!(c, e, fi_info.addr_format);
    check!(c, e, fi_info.src_addrlen);
    check!(c, e, fi_info.handle);
    check!(c, e, fi_info.tx_attr);
    check!(c, e, fi_info.domain_attr);
    check!(c, e, fi_info.fabric_attr);
    check!(c, e, fi_info.nic);
    check!(c, e, size fi_tx_attr);
    check!(c, e, fi_tx_attr.inject_size);
    check!(c, e, fi_tx_attr.size);
    check!(c, e, fi_tx_attr.tclass);
    check!(c, e, size fi_rx_attr);
    check!(c, e, fi_rx_attr.size);
    check!(c, e, size fi_ep_attr);
    check!(c, e, fi_ep_attr.max_msg_size);
    check!(c, e, fi_ep_attr.auth_key);
    check!(c, e, size fi_domain_attr);
    check!(c, e, fi_domain_attr.name);
    check!(c, e, fi_domain_attr.threading);
    check!(c, e, fi_domain_attr.mr_mode);
    check!(c, e, fi_domain_attr.cq_data_size);
    check!(c, e, fi_domain_attr.caps);
    check!(c, e, fi_domain_attr.auth_key);
    check!(c, e, fi_domain_attr.mr_cnt);
    check!(c, e, fi_domain_attr.tclass);
    check!(c, e, size fi_fabric_attr);
    check!(c, e, fi_fabric_attr.prov_name);
    check!(c, e, fi_fabric_attr.api_version);
    check!(c, e, fi_ops.close);
    check!(c, e, fi_ops.bind);
    check!(c, e, fi_ops.control);
    check!(c, e, size fid);
    check!(c, e, fid.ops);
    check!(c, e, fi_ops_fabric.domain);
    check!(c, e, fid_fabric.ops);
    check!(c, e, size fi_cq_attr);
    check!(c, e, fi_cq_attr.format);
    check!(c, e, fi_cq_attr.wait_set);
    check!(c, e, size fi_av_attr);
    check!(c, e, fi_av_attr.count);
    check!(c, e, fi_av_attr.flags);
    check!(c, e, fi_ops_domain.av_open);
    check!(c, e, fi_ops_domain.cq_open);
    check!(c, e, fi_ops_domain.endpoint);
    check!(c, e, fi_ops_mr.reg);
    check!(c, e, fid_domain.ops);
    check!(c, e, fid_domain.mr);
    check!(c, e, size fid_mr);
    check!(c, e, fid_mr.mem_desc);
    check!(c, e, fid_mr.key);
    check!(c, e, fi_ops_av.insert);
    check!(c, e, fi_ops_av.remove);
    check!(c, e, fid_av.ops);
    check!(c, e, size fi_cq_data_entry);
    check!(c, e, fi_cq_data_entry.data);
    check!(c, e, size fi_cq_err_entry);
    check!(c, e, fi_cq_err_entry.err);
    check!(c, e, fi_cq_err_entry.prov_errno);
    check!(c, e, fi_cq_err_entry.err_data);
    check!(c, e, fi_ops_cq.read);
    check!(c, e, fi_ops_cq.readerr);
    check!(c, e, fi_ops_cq.strerror);
    check!(c, e, fid_cq.ops);
    check!(c, e, fi_ops_cm.getname);
    check!(c, e, fi_ops_msg.recv);
    check!(c, e, fi_ops_msg.send);
    check!(c, e, fi_ops_rma.write);
    check!(c, e, fi_ops_rma.writedata);
    check!(c, e, fi_ops_rma.writemsg);
    check!(c, e, size fi_msg_rma);
    check!(c, e, fi_msg_rma.addr);
    check!(c, e, fi_msg_rma.rma_iov);
    check!(c, e, fi_msg_rma.data);
    check!(c, e, size fi_rma_iov);
    check!(c, e, fi_rma_iov.key);
    check!(c, e, fi_ops_fabric.trywait);
    check!(c, e, fid_ep.ops);
    check!(c, e, fid_ep.cm);
    check!(c, e, fid_ep.msg);
    check!(c, e, fid_ep.rma);
    check!(c, e, size fi_mr_attr);
    check!(c, e, fi_mr_attr.access);
    check!(c, e, fi_mr_attr.requested_key);
    check!(c, e, fi_mr_attr.iface);
    check!(c, e, fi_mr_attr.device);
    check!(c, e, fi_ops_mr.regattr);
    assert_eq!(c["FI_HMEM_CUDA"], fi::FI_HMEM_CUDA as usize);
    assert_eq!(c["FI_ENABLE"], fi::FI_ENABLE as usize);
    assert_eq!(c["FI_GETWAIT"], fi::FI_GETWAIT as usize);
    assert_eq!(c["FI_WAIT_FD"], fi::FI_WAIT_FD as usize);
    assert_eq!(c["FI_DELIVERY_COMPLETE"], fi::FI_DELIVERY_COMPLETE as usize);
    assert_eq!(c["FI_COMPLETION"], fi::FI_COMPLETION as usize);
    assert_eq!(c["FI_EAVAIL"], fi::FI_EAVAIL as usize);
    assert_eq!(c["FI_ENOKEY"], fi::FI_ENOKEY as usize);
    assert!(e.is_empty(), "layout mismatches:\n{}", e.join("\n"));
}
