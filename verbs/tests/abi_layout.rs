//! Checks stolon-verbs' hand-written libibverbs layouts and constants against the installed C
//! headers. Skipped, with a message, where the headers (libibverbs-dev) or a C compiler are
//! missing.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use stolon_verbs::sys;

fn c_layout() -> Option<HashMap<String, i64>> {
    if !std::path::Path::new("/usr/include/infiniband/verbs.h").exists() {
        eprintln!(
            "SKIP: /usr/include/infiniband/verbs.h not installed (apt install libibverbs-dev)"
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!("stolon-verbs-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("abi_layout");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/abi_layout.c");
    let status = match Command::new("cc").args([src, "-o"]).arg(&exe).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIP: no C compiler ({e})");
            return None;
        }
    };
    assert!(status.success(), "compiling abi_layout.c failed");
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(
        text.lines()
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse::<i64>().unwrap())
            })
            .collect(),
    )
}

macro_rules! size {
    ($t:ident) => {
        (
            format!("{}.SIZEOF", stringify!($t)),
            size_of::<sys::$t>() as i64,
        )
    };
}

macro_rules! off {
    ($t:ident . $m:ident) => {
        (
            format!("{}.{}", stringify!($t), stringify!($m)),
            offset_of!(sys::$t, $m) as i64,
        )
    };
}

macro_rules! konst {
    ($($k:ident),* $(,)?) => {
        vec![$((stringify!($k).to_string(), sys::$k as i64)),*]
    };
}

fn rust_layout() -> Vec<(String, i64)> {
    let wr = offset_of!(sys::ibv_send_wr, wr);
    let ext = offset_of!(sys::ibv_send_wr, ext);
    let mut v = vec![
        size!(ibv_gid),
        size!(ibv_gid_entry),
        off!(ibv_gid_entry.gid),
        off!(ibv_gid_entry.gid_index),
        off!(ibv_gid_entry.port_num),
        off!(ibv_gid_entry.gid_type),
        off!(ibv_gid_entry.ndev_ifindex),
        size!(ibv_device_attr),
        off!(ibv_device_attr.node_guid),
        off!(ibv_device_attr.max_mr_size),
        off!(ibv_device_attr.vendor_id),
        off!(ibv_device_attr.max_qp_wr),
        off!(ibv_device_attr.device_cap_flags),
        off!(ibv_device_attr.max_sge),
        off!(ibv_device_attr.max_cqe),
        off!(ibv_device_attr.max_qp_rd_atom),
        off!(ibv_device_attr.max_qp_init_rd_atom),
        off!(ibv_device_attr.atomic_cap),
        off!(ibv_device_attr.max_srq_wr),
        off!(ibv_device_attr.max_srq_sge),
        off!(ibv_device_attr.max_pkeys),
        off!(ibv_device_attr.local_ca_ack_delay),
        off!(ibv_device_attr.phys_port_cnt),
        size!(ibv_port_attr),
        off!(ibv_port_attr.state),
        off!(ibv_port_attr.max_mtu),
        off!(ibv_port_attr.active_mtu),
        off!(ibv_port_attr.gid_tbl_len),
        off!(ibv_port_attr.port_cap_flags),
        off!(ibv_port_attr.max_msg_sz),
        off!(ibv_port_attr.pkey_tbl_len),
        off!(ibv_port_attr.lid),
        off!(ibv_port_attr.sm_lid),
        off!(ibv_port_attr.lmc),
        off!(ibv_port_attr.active_width),
        off!(ibv_port_attr.active_speed),
        off!(ibv_port_attr.phys_state),
        off!(ibv_port_attr.link_layer),
        off!(ibv_port_attr.flags),
        off!(ibv_port_attr.port_cap_flags2),
        size!(ibv_sge),
        off!(ibv_sge.addr),
        off!(ibv_sge.length),
        off!(ibv_sge.lkey),
        size!(ibv_send_wr),
        off!(ibv_send_wr.wr_id),
        off!(ibv_send_wr.next),
        off!(ibv_send_wr.sg_list),
        off!(ibv_send_wr.num_sge),
        off!(ibv_send_wr.opcode),
        off!(ibv_send_wr.send_flags),
        off!(ibv_send_wr.imm_data),
        off!(ibv_send_wr.wr),
        size!(ibv_recv_wr),
        off!(ibv_recv_wr.next),
        off!(ibv_recv_wr.sg_list),
        off!(ibv_recv_wr.num_sge),
        size!(ibv_wc),
        off!(ibv_wc.wr_id),
        off!(ibv_wc.status),
        off!(ibv_wc.opcode),
        off!(ibv_wc.vendor_err),
        off!(ibv_wc.byte_len),
        off!(ibv_wc.imm_data),
        off!(ibv_wc.qp_num),
        off!(ibv_wc.src_qp),
        off!(ibv_wc.wc_flags),
        off!(ibv_wc.pkey_index),
        off!(ibv_wc.slid),
        off!(ibv_wc.sl),
        off!(ibv_wc.dlid_path_bits),
        size!(ibv_qp_cap),
        off!(ibv_qp_cap.max_recv_wr),
        off!(ibv_qp_cap.max_inline_data),
        size!(ibv_qp_init_attr),
        off!(ibv_qp_init_attr.send_cq),
        off!(ibv_qp_init_attr.srq),
        off!(ibv_qp_init_attr.cap),
        off!(ibv_qp_init_attr.qp_type),
        off!(ibv_qp_init_attr.sq_sig_all),
        size!(ibv_global_route),
        off!(ibv_global_route.flow_label),
        off!(ibv_global_route.sgid_index),
        off!(ibv_global_route.hop_limit),
        off!(ibv_global_route.traffic_class),
        size!(ibv_ah_attr),
        off!(ibv_ah_attr.dlid),
        off!(ibv_ah_attr.sl),
        off!(ibv_ah_attr.src_path_bits),
        off!(ibv_ah_attr.static_rate),
        off!(ibv_ah_attr.is_global),
        off!(ibv_ah_attr.port_num),
        size!(ibv_qp_attr),
        off!(ibv_qp_attr.qp_state),
        off!(ibv_qp_attr.path_mtu),
        off!(ibv_qp_attr.qkey),
        off!(ibv_qp_attr.rq_psn),
        off!(ibv_qp_attr.sq_psn),
        off!(ibv_qp_attr.dest_qp_num),
        off!(ibv_qp_attr.qp_access_flags),
        off!(ibv_qp_attr.cap),
        off!(ibv_qp_attr.ah_attr),
        off!(ibv_qp_attr.alt_ah_attr),
        off!(ibv_qp_attr.pkey_index),
        off!(ibv_qp_attr.en_sqd_async_notify),
        off!(ibv_qp_attr.max_rd_atomic),
        off!(ibv_qp_attr.max_dest_rd_atomic),
        off!(ibv_qp_attr.min_rnr_timer),
        off!(ibv_qp_attr.port_num),
        off!(ibv_qp_attr.timeout),
        off!(ibv_qp_attr.retry_cnt),
        off!(ibv_qp_attr.rnr_retry),
        off!(ibv_qp_attr.alt_timeout),
        off!(ibv_qp_attr.rate_limit),
        size!(ibv_srq_attr),
        off!(ibv_srq_attr.max_sge),
        off!(ibv_srq_attr.srq_limit),
        size!(ibv_srq_init_attr),
        off!(ibv_srq_init_attr.attr),
        size!(ibv_device),
        off!(ibv_device.node_type),
        off!(ibv_device.name),
        off!(ibv_device.dev_name),
        off!(ibv_device.dev_path),
        off!(ibv_device.ibdev_path),
        size!(ibv_context_ops),
        off!(ibv_context_ops.poll_cq),
        off!(ibv_context_ops.post_srq_recv),
        off!(ibv_context_ops.post_send),
        off!(ibv_context_ops.post_recv),
        off!(ibv_context_ops._compat_async_event),
        size!(ibv_context),
        off!(ibv_context.ops),
        off!(ibv_context.cmd_fd),
        off!(ibv_context.num_comp_vectors),
        off!(ibv_context.mutex),
        off!(ibv_context.abi_compat),
        size!(verbs_context),
        off!(verbs_context.query_port),
        off!(verbs_context.sz),
        off!(verbs_context.context),
        size!(ibv_pd),
        off!(ibv_pd.handle),
        size!(ibv_mr),
        off!(ibv_mr.addr),
        off!(ibv_mr.length),
        off!(ibv_mr.lkey),
        off!(ibv_mr.rkey),
        size!(ibv_cq),
        off!(ibv_cq.cqe),
        off!(ibv_cq.mutex),
        off!(ibv_cq.cond),
        off!(ibv_cq.async_events_completed),
        size!(ibv_srq),
        off!(ibv_srq.handle),
        off!(ibv_srq.mutex),
        off!(ibv_srq.events_completed),
        size!(ibv_qp),
        off!(ibv_qp.srq),
        off!(ibv_qp.qp_num),
        off!(ibv_qp.state),
        off!(ibv_qp.qp_type),
        off!(ibv_qp.mutex),
        off!(ibv_qp.events_completed),
    ];
    // Members inside the anonymous unions of ibv_send_wr.
    v.extend([
        (
            "ibv_send_wr.wr.rdma.remote_addr".into(),
            (wr + offset_of!(sys::ibv_send_wr_rdma, remote_addr)) as i64,
        ),
        (
            "ibv_send_wr.wr.rdma.rkey".into(),
            (wr + offset_of!(sys::ibv_send_wr_rdma, rkey)) as i64,
        ),
        (
            "ibv_send_wr.wr.atomic.rkey".into(),
            (wr + offset_of!(sys::ibv_send_wr_atomic, rkey)) as i64,
        ),
        (
            "ibv_send_wr.wr.ud.remote_qkey".into(),
            (wr + offset_of!(sys::ibv_send_wr_ud, remote_qkey)) as i64,
        ),
        (
            "ibv_send_wr.qp_type.xrc.remote_srqn".into(),
            offset_of!(sys::ibv_send_wr, xrc_remote_srqn) as i64,
        ),
        ("ibv_send_wr.bind_mw".into(), ext as i64),
        ("ibv_send_wr.tso".into(), ext as i64),
        (
            "ibv_send_wr.bind_mw.bind_info.mw_access_flags".into(),
            (ext + offset_of!(sys::ibv_send_wr_bind_mw, bind_info)
                + offset_of!(sys::ibv_mw_bind_info, mw_access_flags)) as i64,
        ),
    ]);
    v.extend(konst![
        IBV_GID_TYPE_IB,
        IBV_GID_TYPE_ROCE_V1,
        IBV_GID_TYPE_ROCE_V2,
        IBV_MTU_256,
        IBV_MTU_1024,
        IBV_MTU_4096,
        IBV_PORT_DOWN,
        IBV_PORT_ACTIVE,
        IBV_PORT_ACTIVE_DEFER,
        IBV_LINK_LAYER_UNSPECIFIED,
        IBV_LINK_LAYER_INFINIBAND,
        IBV_LINK_LAYER_ETHERNET,
        IBV_QPF_GRH_REQUIRED,
        IBV_WC_SUCCESS,
        IBV_WC_LOC_LEN_ERR,
        IBV_WC_LOC_PROT_ERR,
        IBV_WC_WR_FLUSH_ERR,
        IBV_WC_REM_INV_REQ_ERR,
        IBV_WC_REM_ACCESS_ERR,
        IBV_WC_REM_OP_ERR,
        IBV_WC_RETRY_EXC_ERR,
        IBV_WC_RNR_RETRY_EXC_ERR,
        IBV_WC_FATAL_ERR,
        IBV_WC_RESP_TIMEOUT_ERR,
        IBV_WC_GENERAL_ERR,
        IBV_WC_TM_RNDV_INCOMPLETE,
        IBV_WC_SEND,
        IBV_WC_RDMA_WRITE,
        IBV_WC_RECV,
        IBV_WC_RECV_RDMA_WITH_IMM,
        IBV_WC_GRH,
        IBV_WC_WITH_IMM,
        IBV_ACCESS_LOCAL_WRITE,
        IBV_ACCESS_REMOTE_WRITE,
        IBV_ACCESS_REMOTE_READ,
        IBV_ACCESS_REMOTE_ATOMIC,
        IBV_ACCESS_RELAXED_ORDERING,
        IBV_ACCESS_OPTIONAL_RANGE,
        IBV_QPT_RC,
        IBV_QP_STATE,
        IBV_QP_ACCESS_FLAGS,
        IBV_QP_PKEY_INDEX,
        IBV_QP_PORT,
        IBV_QP_AV,
        IBV_QP_PATH_MTU,
        IBV_QP_TIMEOUT,
        IBV_QP_RETRY_CNT,
        IBV_QP_RNR_RETRY,
        IBV_QP_RQ_PSN,
        IBV_QP_MAX_QP_RD_ATOMIC,
        IBV_QP_MIN_RNR_TIMER,
        IBV_QP_SQ_PSN,
        IBV_QP_MAX_DEST_RD_ATOMIC,
        IBV_QP_DEST_QPN,
        IBV_QP_RATE_LIMIT,
        IBV_QPS_RESET,
        IBV_QPS_INIT,
        IBV_QPS_RTR,
        IBV_QPS_RTS,
        IBV_QPS_ERR,
        IBV_WR_RDMA_WRITE,
        IBV_WR_RDMA_WRITE_WITH_IMM,
        IBV_WR_SEND,
        IBV_WR_SEND_WITH_IMM,
        IBV_SEND_SIGNALED,
        IBV_SEND_INLINE,
        IBV_SEND_FENCE,
    ]);
    v
}

#[test]
fn layouts_and_constants_match_the_c_headers() {
    let Some(c) = c_layout() else { return };
    let rust = rust_layout();
    let mut errs = Vec::new();
    for (k, v) in &rust {
        match c.get(k) {
            Some(cv) if cv == v => {}
            // rdma-core 50 appended `active_speed_ex`; the port query takes the caller's size,
            // so a mirror shorter than newer headers is still read correctly.
            Some(cv) if k == "ibv_port_attr.SIZEOF" && cv > v => {
                eprintln!("note: ibv_port_attr is {cv} bytes in these headers, {v} mirrored")
            }
            Some(cv) => errs.push(format!("{k}: C {cv} Rust {v}")),
            None => errs.push(format!("{k}: not printed by abi_layout.c")),
        }
    }
    // Everything the C program prints is checked.
    for k in c.keys() {
        if !rust.iter().any(|(r, _)| r == k) {
            errs.push(format!("{k}: printed by abi_layout.c but not checked"));
        }
    }
    assert!(errs.is_empty(), "layout mismatches:\n{}", errs.join("\n"));
    eprintln!("checked {} sizes, offsets and constants", rust.len());
}
