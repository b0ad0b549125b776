//! Raw libibverbs ABI (rdma-core), loaded at run time.
//!
//! libibverbs exports the control path (`ibv_get_device_list`, `ibv_open_device`,
//! `ibv_create_qp`, `ibv_modify_qp`, ...) by symbol; those are resolved once with `libloading`.
//! The data path (`ibv_post_send`, `ibv_post_recv`, `ibv_post_srq_recv`, `ibv_poll_cq`) is made
//! of `static inline` functions in `<infiniband/verbs.h>` that call through the function table
//! `ibv_context::ops` of the provider (mlx5 for ConnectX), so this module mirrors the layouts of
//! `struct ibv_context`, `struct ibv_context_ops` and every struct passed across the boundary,
//! and calls through that table the way the header does. `tests/abi_layout.rs` compares every
//! mirrored size and offset with the installed C headers when they are present.
//!
//! `ibv_query_port` needs care: the public name is a macro around the inline
//! `___ibv_query_port`, which calls `verbs_context::query_port(ctx, port, attr, sizeof(*attr))`
//! when the provider has it, and otherwise the exported symbol `ibv_query_port`, whose third
//! argument is a `struct _compat_ibv_port_attr` (the pre-`port_cap_flags2` prefix of
//! `ibv_port_attr`). [`query_port`] does the same.
//!
//! `ibv_reg_mr` is also a macro: it picks the exported `ibv_reg_mr_iova2` when access flags from
//! the optional range (relaxed ordering) are used. [`LibIbverbs::reg_mr_any`] does the same.
//!
//! Nothing here is safe to call without reading the matching `# Safety` section: every pointer is
//! a libibverbs object whose lifetime the caller manages. The safe layer is `crate::domain`.

#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

/// An opaque slot of a function table or struct that stolon never touches.
pub type Opaque = *const c_void;

// ---------------------------------------------------------------------------------------------
// Constants (verbs.h, verbs_api.h, ib_user_ioctl_verbs.h).

// enum ibv_gid_type
pub const IBV_GID_TYPE_IB: u32 = 0;
pub const IBV_GID_TYPE_ROCE_V1: u32 = 1;
pub const IBV_GID_TYPE_ROCE_V2: u32 = 2;

// enum ibv_mtu
pub const IBV_MTU_256: u32 = 1;
pub const IBV_MTU_512: u32 = 2;
pub const IBV_MTU_1024: u32 = 3;
pub const IBV_MTU_2048: u32 = 4;
pub const IBV_MTU_4096: u32 = 5;

// enum ibv_port_state
pub const IBV_PORT_NOP: u32 = 0;
pub const IBV_PORT_DOWN: u32 = 1;
pub const IBV_PORT_INIT: u32 = 2;
pub const IBV_PORT_ARMED: u32 = 3;
pub const IBV_PORT_ACTIVE: u32 = 4;
pub const IBV_PORT_ACTIVE_DEFER: u32 = 5;

// link layer
pub const IBV_LINK_LAYER_UNSPECIFIED: u8 = 0;
pub const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
pub const IBV_LINK_LAYER_ETHERNET: u8 = 2;

/// `ibv_port_attr::flags`: the port needs a GRH on every packet (virtualised IB ports).
pub const IBV_QPF_GRH_REQUIRED: u8 = 1 << 0;

// enum ibv_wc_status
pub const IBV_WC_SUCCESS: u32 = 0;
pub const IBV_WC_LOC_LEN_ERR: u32 = 1;
pub const IBV_WC_LOC_QP_OP_ERR: u32 = 2;
pub const IBV_WC_LOC_EEC_OP_ERR: u32 = 3;
pub const IBV_WC_LOC_PROT_ERR: u32 = 4;
pub const IBV_WC_WR_FLUSH_ERR: u32 = 5;
pub const IBV_WC_MW_BIND_ERR: u32 = 6;
pub const IBV_WC_BAD_RESP_ERR: u32 = 7;
pub const IBV_WC_LOC_ACCESS_ERR: u32 = 8;
pub const IBV_WC_REM_INV_REQ_ERR: u32 = 9;
pub const IBV_WC_REM_ACCESS_ERR: u32 = 10;
pub const IBV_WC_REM_OP_ERR: u32 = 11;
pub const IBV_WC_RETRY_EXC_ERR: u32 = 12;
pub const IBV_WC_RNR_RETRY_EXC_ERR: u32 = 13;
pub const IBV_WC_LOC_RDD_VIOL_ERR: u32 = 14;
pub const IBV_WC_REM_INV_RD_REQ_ERR: u32 = 15;
pub const IBV_WC_REM_ABORT_ERR: u32 = 16;
pub const IBV_WC_INV_EECN_ERR: u32 = 17;
pub const IBV_WC_INV_EEC_STATE_ERR: u32 = 18;
pub const IBV_WC_FATAL_ERR: u32 = 19;
pub const IBV_WC_RESP_TIMEOUT_ERR: u32 = 20;
pub const IBV_WC_GENERAL_ERR: u32 = 21;
pub const IBV_WC_TM_ERR: u32 = 22;
pub const IBV_WC_TM_RNDV_INCOMPLETE: u32 = 23;

// enum ibv_wc_opcode
pub const IBV_WC_SEND: u32 = 0;
pub const IBV_WC_RDMA_WRITE: u32 = 1;
pub const IBV_WC_RDMA_READ: u32 = 2;
pub const IBV_WC_RECV: u32 = 1 << 7;
pub const IBV_WC_RECV_RDMA_WITH_IMM: u32 = IBV_WC_RECV + 1;

// enum ibv_wc_flags
pub const IBV_WC_GRH: c_uint = 1 << 0;
pub const IBV_WC_WITH_IMM: c_uint = 1 << 1;

// enum ibv_access_flags
pub const IBV_ACCESS_LOCAL_WRITE: c_uint = 1;
pub const IBV_ACCESS_REMOTE_WRITE: c_uint = 1 << 1;
pub const IBV_ACCESS_REMOTE_READ: c_uint = 1 << 2;
pub const IBV_ACCESS_REMOTE_ATOMIC: c_uint = 1 << 3;
pub const IBV_ACCESS_RELAXED_ORDERING: c_uint = 1 << 20;
/// `IBV_ACCESS_OPTIONAL_RANGE`: bits 20..=29; such flags need `ibv_reg_mr_iova2`.
pub const IBV_ACCESS_OPTIONAL_RANGE: c_uint = (((1 << 29) << 1) - 1) & !((1 << 20) - 1);

// enum ibv_qp_type
pub const IBV_QPT_RC: u32 = 2;

// enum ibv_qp_attr_mask
pub const IBV_QP_STATE: c_int = 1 << 0;
pub const IBV_QP_CUR_STATE: c_int = 1 << 1;
pub const IBV_QP_EN_SQD_ASYNC_NOTIFY: c_int = 1 << 2;
pub const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub const IBV_QP_PORT: c_int = 1 << 5;
pub const IBV_QP_QKEY: c_int = 1 << 6;
pub const IBV_QP_AV: c_int = 1 << 7;
pub const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const IBV_QP_ALT_PATH: c_int = 1 << 14;
pub const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const IBV_QP_PATH_MIG_STATE: c_int = 1 << 18;
pub const IBV_QP_CAP: c_int = 1 << 19;
pub const IBV_QP_DEST_QPN: c_int = 1 << 20;
pub const IBV_QP_RATE_LIMIT: c_int = 1 << 25;

// enum ibv_qp_state
pub const IBV_QPS_RESET: u32 = 0;
pub const IBV_QPS_INIT: u32 = 1;
pub const IBV_QPS_RTR: u32 = 2;
pub const IBV_QPS_RTS: u32 = 3;
pub const IBV_QPS_SQD: u32 = 4;
pub const IBV_QPS_SQE: u32 = 5;
pub const IBV_QPS_ERR: u32 = 6;

// enum ibv_wr_opcode
pub const IBV_WR_RDMA_WRITE: u32 = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: u32 = 1;
pub const IBV_WR_SEND: u32 = 2;
pub const IBV_WR_SEND_WITH_IMM: u32 = 3;
pub const IBV_WR_RDMA_READ: u32 = 4;

// enum ibv_send_flags
pub const IBV_SEND_FENCE: c_uint = 1 << 0;
pub const IBV_SEND_SIGNALED: c_uint = 1 << 1;
pub const IBV_SEND_SOLICITED: c_uint = 1 << 2;
pub const IBV_SEND_INLINE: c_uint = 1 << 3;

/// `__VERBS_ABI_IS_EXTENDED`: `ibv_context::abi_compat` of a context embedded in a
/// `verbs_context`.
pub const VERBS_ABI_IS_EXTENDED: *mut c_void = usize::MAX as *mut c_void;

// ---------------------------------------------------------------------------------------------
// Plain data structs.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_gid_global {
    /// Big-endian on the wire and in memory (`__be64`).
    pub subnet_prefix: u64,
    /// Big-endian (`__be64`).
    pub interface_id: u64,
}

/// `union ibv_gid`: 16 raw bytes, 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_gid {
    pub raw: [u8; 16],
    pub global: ibv_gid_global,
}

impl ibv_gid {
    pub const fn from_raw(raw: [u8; 16]) -> Self {
        ibv_gid { raw }
    }

    pub fn raw(&self) -> [u8; 16] {
        // SAFETY: both members are 16 bytes of plain data; any bit pattern is a valid [u8; 16].
        unsafe { self.raw }
    }
}

impl Default for ibv_gid {
    fn default() -> Self {
        ibv_gid { raw: [0; 16] }
    }
}

impl std::fmt::Debug for ibv_gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ibv_gid({:02x?})", self.raw())
    }
}

impl PartialEq for ibv_gid {
    fn eq(&self, other: &Self) -> bool {
        self.raw() == other.raw()
    }
}

impl Eq for ibv_gid {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_gid_entry {
    pub gid: ibv_gid,
    pub gid_index: u32,
    pub port_num: u32,
    /// `enum ibv_gid_type`.
    pub gid_type: u32,
    /// Interface index of the netdev behind this GID; 0 when there is none.
    pub ndev_ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_device_attr {
    pub fw_ver: [c_char; 64],
    pub node_guid: u64,
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: c_int,
    pub max_qp_wr: c_int,
    pub device_cap_flags: c_uint,
    pub max_sge: c_int,
    pub max_sge_rd: c_int,
    pub max_cq: c_int,
    pub max_cqe: c_int,
    pub max_mr: c_int,
    pub max_pd: c_int,
    pub max_qp_rd_atom: c_int,
    pub max_ee_rd_atom: c_int,
    pub max_res_rd_atom: c_int,
    pub max_qp_init_rd_atom: c_int,
    pub max_ee_init_rd_atom: c_int,
    pub atomic_cap: u32,
    pub max_ee: c_int,
    pub max_rdd: c_int,
    pub max_mw: c_int,
    pub max_raw_ipv6_qp: c_int,
    pub max_raw_ethy_qp: c_int,
    pub max_mcast_grp: c_int,
    pub max_mcast_qp_attach: c_int,
    pub max_total_mcast_qp_attach: c_int,
    pub max_ah: c_int,
    pub max_fmr: c_int,
    pub max_map_per_fmr: c_int,
    pub max_srq: c_int,
    pub max_srq_wr: c_int,
    pub max_srq_sge: c_int,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
}

impl Default for ibv_device_attr {
    fn default() -> Self {
        // SAFETY: every member is an integer or an array of integers; all-zero is valid.
        unsafe { std::mem::zeroed() }
    }
}

/// `struct ibv_port_attr` as of rdma-core 44 (ends at `port_cap_flags2`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_port_attr {
    /// `enum ibv_port_state`.
    pub state: u32,
    /// `enum ibv_mtu`.
    pub max_mtu: u32,
    /// `enum ibv_mtu`.
    pub active_mtu: u32,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

/// Bytes of `ibv_port_attr` that the exported (compat) `ibv_query_port` symbol fills: rdma-core's
/// private `struct _compat_ibv_port_attr` is the layout before `port_cap_flags2` was added. The
/// header declares it incomplete, so this cannot be checked against it; [`query_port`] only
/// relies on the compat struct being no larger than `ibv_port_attr`, which holds by
/// construction (fields are only ever appended).
pub const COMPAT_PORT_ATTR_LEN: usize = std::mem::offset_of!(ibv_port_attr, port_cap_flags2);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_send_wr_rdma {
    pub remote_addr: u64,
    pub rkey: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_send_wr_atomic {
    pub remote_addr: u64,
    pub compare_add: u64,
    pub swap: u64,
    pub rkey: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_send_wr_ud {
    pub ah: *mut c_void,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
}

/// The `wr` union of `struct ibv_send_wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_wr {
    pub rdma: ibv_send_wr_rdma,
    pub atomic: ibv_send_wr_atomic,
    pub ud: ibv_send_wr_ud,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_mw_bind_info {
    pub mr: *mut ibv_mr,
    pub addr: u64,
    pub length: u64,
    pub mw_access_flags: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_send_wr_bind_mw {
    pub mw: *mut c_void,
    pub rkey: u32,
    pub bind_info: ibv_mw_bind_info,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_send_wr_tso {
    pub hdr: *mut c_void,
    pub hdr_sz: u16,
    pub mss: u16,
}

/// The trailing anonymous union of `struct ibv_send_wr` (memory-window bind or TSO).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_ext {
    pub bind_mw: ibv_send_wr_bind_mw,
    pub tso: ibv_send_wr_tso,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ibv_send_wr {
    pub wr_id: u64,
    pub next: *mut ibv_send_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
    /// `enum ibv_wr_opcode`.
    pub opcode: u32,
    pub send_flags: c_uint,
    /// Immediate data in network byte order (`__be32`) for `*_WITH_IMM` opcodes.
    pub imm_data: u32,
    pub wr: ibv_send_wr_wr,
    /// `qp_type.xrc.remote_srqn`.
    pub xrc_remote_srqn: u32,
    pub ext: ibv_send_wr_ext,
}

impl Default for ibv_send_wr {
    fn default() -> Self {
        // SAFETY: integers, null pointers and unions of those: all-zero is valid.
        unsafe { std::mem::zeroed() }
    }
}

impl std::fmt::Debug for ibv_send_wr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: `rdma` is plain data; reading it for display is sound whatever the opcode.
        let rdma = unsafe { self.wr.rdma };
        f.debug_struct("ibv_send_wr")
            .field("wr_id", &self.wr_id)
            .field("next", &self.next)
            .field("num_sge", &self.num_sge)
            .field("opcode", &self.opcode)
            .field("send_flags", &self.send_flags)
            .field("imm_data", &self.imm_data)
            .field("rdma", &rdma)
            .finish_non_exhaustive()
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_recv_wr {
    pub wr_id: u64,
    pub next: *mut ibv_recv_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
}

impl Default for ibv_recv_wr {
    fn default() -> Self {
        ibv_recv_wr {
            wr_id: 0,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_wc {
    pub wr_id: u64,
    /// `enum ibv_wc_status`.
    pub status: u32,
    /// `enum ibv_wc_opcode`; only valid when `status` is success.
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Network byte order when `wc_flags & IBV_WC_WITH_IMM`.
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_qp_cap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_qp_init_attr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub cap: ibv_qp_cap,
    /// `enum ibv_qp_type`.
    pub qp_type: u32,
    pub sq_sig_all: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_global_route {
    pub dgid: ibv_gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_ah_attr {
    pub grh: ibv_global_route,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_qp_attr {
    /// `enum ibv_qp_state`.
    pub qp_state: u32,
    pub cur_qp_state: u32,
    /// `enum ibv_mtu`.
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: ibv_qp_cap,
    pub ah_attr: ibv_ah_attr,
    pub alt_ah_attr: ibv_ah_attr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ibv_srq_attr {
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ibv_srq_init_attr {
    pub srq_context: *mut c_void,
    pub attr: ibv_srq_attr,
}

// ---------------------------------------------------------------------------------------------
// Objects owned by libibverbs. Only the members stolon reads are named.

#[repr(C)]
pub struct _ibv_device_ops {
    pub _dummy1: Opaque,
    pub _dummy2: Opaque,
}

#[repr(C)]
pub struct ibv_device {
    pub _ops: _ibv_device_ops,
    pub node_type: c_int,
    pub transport_type: c_int,
    pub name: [c_char; 64],
    pub dev_name: [c_char; 64],
    pub dev_path: [c_char; 256],
    pub ibdev_path: [c_char; 256],
}

pub type PostSendFn =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> c_int;
pub type PostRecvFn =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;
pub type PostSrqRecvFn =
    unsafe extern "C" fn(*mut ibv_srq, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;
pub type PollCqFn = unsafe extern "C" fn(*mut ibv_cq, c_int, *mut ibv_wc) -> c_int;
pub type QueryPortExFn =
    unsafe extern "C" fn(*mut ibv_context, u8, *mut ibv_port_attr, usize) -> c_int;

/// `struct ibv_context_ops`: the provider's data-path table (33 slots).
#[repr(C)]
pub struct ibv_context_ops {
    pub _compat_query_device: Opaque,
    pub _compat_query_port: Opaque,
    pub _compat_alloc_pd: Opaque,
    pub _compat_dealloc_pd: Opaque,
    pub _compat_reg_mr: Opaque,
    pub _compat_rereg_mr: Opaque,
    pub _compat_dereg_mr: Opaque,
    pub alloc_mw: Opaque,
    pub bind_mw: Opaque,
    pub dealloc_mw: Opaque,
    pub _compat_create_cq: Opaque,
    pub poll_cq: Option<PollCqFn>,
    pub req_notify_cq: Opaque,
    pub _compat_cq_event: Opaque,
    pub _compat_resize_cq: Opaque,
    pub _compat_destroy_cq: Opaque,
    pub _compat_create_srq: Opaque,
    pub _compat_modify_srq: Opaque,
    pub _compat_query_srq: Opaque,
    pub _compat_destroy_srq: Opaque,
    pub post_srq_recv: Option<PostSrqRecvFn>,
    pub _compat_create_qp: Opaque,
    pub _compat_query_qp: Opaque,
    pub _compat_modify_qp: Opaque,
    pub _compat_destroy_qp: Opaque,
    pub post_send: Option<PostSendFn>,
    pub post_recv: Option<PostRecvFn>,
    pub _compat_create_ah: Opaque,
    pub _compat_destroy_ah: Opaque,
    pub _compat_attach_mcast: Opaque,
    pub _compat_detach_mcast: Opaque,
    pub _compat_async_event: Opaque,
}

#[repr(C)]
pub struct ibv_context {
    pub device: *mut ibv_device,
    pub ops: ibv_context_ops,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
    pub mutex: libc::pthread_mutex_t,
    pub abi_compat: *mut c_void,
}

/// `struct verbs_context` of rdma-core 44. The struct "grows up": new members are added at the
/// front, so the distance from a member to the embedded `context` never changes, and `sz` (set
/// by the library) says how far back from `context` the library's struct reaches.
#[repr(C)]
pub struct verbs_context {
    pub query_port: Option<QueryPortExFn>,
    /// advise_mr ... close_xrcd (37 function pointers stolon does not call).
    pub _ops: [Opaque; 37],
    pub _abi_placeholder3: u64,
    pub sz: usize,
    pub context: ibv_context,
}

#[repr(C)]
pub struct ibv_pd {
    pub context: *mut ibv_context,
    pub handle: u32,
}

#[repr(C)]
pub struct ibv_mr {
    pub context: *mut ibv_context,
    pub pd: *mut ibv_pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// Opaque: created with a NULL channel by stolon (busy polling).
#[repr(C)]
pub struct ibv_comp_channel {
    _private: [u8; 0],
}

#[repr(C)]
pub struct ibv_cq {
    pub context: *mut ibv_context,
    pub channel: *mut ibv_comp_channel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub comp_events_completed: u32,
    pub async_events_completed: u32,
}

#[repr(C)]
pub struct ibv_srq {
    pub context: *mut ibv_context,
    pub srq_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub handle: u32,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub events_completed: u32,
}

#[repr(C)]
pub struct ibv_qp {
    pub context: *mut ibv_context,
    pub qp_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub handle: u32,
    pub qp_num: u32,
    /// `enum ibv_qp_state`: libibverbs' cached view, updated by `ibv_modify_qp`.
    pub state: u32,
    pub qp_type: u32,
    pub mutex: libc::pthread_mutex_t,
    pub cond: libc::pthread_cond_t,
    pub events_completed: u32,
}

// ---------------------------------------------------------------------------------------------
// Exported functions.

/// The functions libibverbs exports by symbol. Optional ones are newer than rdma-core 17
/// (`IBVERBS_1.1`), the oldest library stolon accepts.
pub struct LibIbverbs {
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut ibv_device,
    pub free_device_list: unsafe extern "C" fn(*mut *mut ibv_device),
    pub get_device_name: unsafe extern "C" fn(*mut ibv_device) -> *const c_char,
    pub open_device: unsafe extern "C" fn(*mut ibv_device) -> *mut ibv_context,
    pub close_device: unsafe extern "C" fn(*mut ibv_context) -> c_int,
    pub query_device: unsafe extern "C" fn(*mut ibv_context, *mut ibv_device_attr) -> c_int,
    /// The exported compat symbol: the third argument is a `_compat_ibv_port_attr`, which is the
    /// first [`COMPAT_PORT_ATTR_LEN`] bytes of `ibv_port_attr`. Use [`query_port`].
    pub query_port_compat: unsafe extern "C" fn(*mut ibv_context, u8, *mut ibv_port_attr) -> c_int,
    pub query_gid: unsafe extern "C" fn(*mut ibv_context, u8, c_int, *mut ibv_gid) -> c_int,
    /// `_ibv_query_gid_ex` (IBVERBS_1.11): the GID with its type and netdev.
    pub query_gid_ex: Option<
        unsafe extern "C" fn(*mut ibv_context, u32, u32, *mut ibv_gid_entry, u32, usize) -> c_int,
    >,
    pub alloc_pd: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_pd,
    pub dealloc_pd: unsafe extern "C" fn(*mut ibv_pd) -> c_int,
    pub reg_mr: unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr,
    /// `ibv_reg_mr_iova2` (IBVERBS_1.8): needed for flags in `IBV_ACCESS_OPTIONAL_RANGE`.
    pub reg_mr_iova2:
        Option<unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, u64, c_uint) -> *mut ibv_mr>,
    /// `ibv_reg_dmabuf_mr` (IBVERBS_1.12): GPU memory exported as a dma-buf.
    pub reg_dmabuf_mr:
        Option<unsafe extern "C" fn(*mut ibv_pd, u64, usize, u64, c_int, c_int) -> *mut ibv_mr>,
    pub dereg_mr: unsafe extern "C" fn(*mut ibv_mr) -> c_int,
    pub create_cq: unsafe extern "C" fn(
        *mut ibv_context,
        c_int,
        *mut c_void,
        *mut ibv_comp_channel,
        c_int,
    ) -> *mut ibv_cq,
    pub destroy_cq: unsafe extern "C" fn(*mut ibv_cq) -> c_int,
    pub create_srq: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_srq_init_attr) -> *mut ibv_srq,
    pub destroy_srq: unsafe extern "C" fn(*mut ibv_srq) -> c_int,
    pub create_qp: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp,
    pub modify_qp: unsafe extern "C" fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int,
    pub destroy_qp: unsafe extern "C" fn(*mut ibv_qp) -> c_int,
    pub wc_status_str: Option<unsafe extern "C" fn(u32) -> *const c_char>,
    /// Where the library was loaded from.
    pub path: String,
    _lib: libloading::Library,
}

/// Why libibverbs could not be loaded: every path tried, with the loader's answer for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub tried: Vec<(String, String)>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "libibverbs could not be loaded; tried:")?;
        for (path, why) in &self.tried {
            write!(f, " [{path}: {why}]")?;
        }
        write!(
            f,
            " (install rdma-core's libibverbs1, or set STOLON_LIBIBVERBS to the path of \
             libibverbs.so.1)"
        )
    }
}

impl std::error::Error for LoadError {}

/// Environment variable naming the library to load before the system one.
pub const ENV_PATH: &str = "STOLON_LIBIBVERBS";

/// Candidate library paths, in the order they are tried.
pub fn candidate_paths() -> Vec<String> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os(ENV_PATH) {
        if !p.is_empty() {
            paths.push(p.to_string_lossy().into_owned());
        }
    }
    paths.push("libibverbs.so.1".to_string());
    paths
}

/// Looks up one exported function.
///
/// # Safety
/// `T` must be the exact function-pointer type of the symbol `name`.
///
/// # Errors
/// The loader's message when the symbol is missing.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, String> {
    // SAFETY: the caller promises that T matches the symbol's type.
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| e.to_string())
}

/// Looks up an exported function that older libraries lack.
///
/// # Safety
/// As for [`symbol`].
unsafe fn optional<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Option<T> {
    // SAFETY: forwarded contract.
    unsafe { symbol(lib, name) }.ok()
}

/// Loads libibverbs from the first of `paths` that opens and exports every required symbol.
///
/// # Errors
/// [`LoadError`] with each path and why it was refused.
pub fn load_from<I, S>(paths: I) -> Result<LibIbverbs, LoadError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut tried = Vec::new();
    for path in paths {
        let path = path.as_ref().to_string();
        // SAFETY: loading libibverbs runs its constructors, which only initialise its own state
        // (and read its configuration files); nothing in this process is touched.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(e) => {
                tried.push((path, e.to_string()));
                continue;
            }
        };
        // SAFETY: each type below is the prototype verbs.h declares for that symbol (the default
        // symbol version, which is what dlsym returns); the pointers are copied out and `lib`
        // moves into the returned struct, so it outlives every use.
        let loaded = unsafe {
            (|| -> Result<LibIbverbs, String> {
                Ok(LibIbverbs {
                    get_device_list: symbol(&lib, b"ibv_get_device_list\0")?,
                    free_device_list: symbol(&lib, b"ibv_free_device_list\0")?,
                    get_device_name: symbol(&lib, b"ibv_get_device_name\0")?,
                    open_device: symbol(&lib, b"ibv_open_device\0")?,
                    close_device: symbol(&lib, b"ibv_close_device\0")?,
                    query_device: symbol(&lib, b"ibv_query_device\0")?,
                    query_port_compat: symbol(&lib, b"ibv_query_port\0")?,
                    query_gid: symbol(&lib, b"ibv_query_gid\0")?,
                    query_gid_ex: optional(&lib, b"_ibv_query_gid_ex\0"),
                    alloc_pd: symbol(&lib, b"ibv_alloc_pd\0")?,
                    dealloc_pd: symbol(&lib, b"ibv_dealloc_pd\0")?,
                    reg_mr: symbol(&lib, b"ibv_reg_mr\0")?,
                    reg_mr_iova2: optional(&lib, b"ibv_reg_mr_iova2\0"),
                    reg_dmabuf_mr: optional(&lib, b"ibv_reg_dmabuf_mr\0"),
                    dereg_mr: symbol(&lib, b"ibv_dereg_mr\0")?,
                    create_cq: symbol(&lib, b"ibv_create_cq\0")?,
                    destroy_cq: symbol(&lib, b"ibv_destroy_cq\0")?,
                    create_srq: symbol(&lib, b"ibv_create_srq\0")?,
                    destroy_srq: symbol(&lib, b"ibv_destroy_srq\0")?,
                    create_qp: symbol(&lib, b"ibv_create_qp\0")?,
                    modify_qp: symbol(&lib, b"ibv_modify_qp\0")?,
                    destroy_qp: symbol(&lib, b"ibv_destroy_qp\0")?,
                    wc_status_str: optional(&lib, b"ibv_wc_status_str\0"),
                    path: path.clone(),
                    _lib: lib,
                })
            })()
        };
        match loaded {
            Ok(l) => return Ok(l),
            Err(e) => tried.push((path, e)),
        }
    }
    Err(LoadError { tried })
}

/// The process-wide libibverbs, loaded on first use from [`candidate_paths`].
///
/// # Errors
/// [`LoadError`] naming every path tried (the answer is cached for the process).
pub fn lib() -> Result<&'static LibIbverbs, LoadError> {
    static LIB: OnceLock<Result<LibIbverbs, LoadError>> = OnceLock::new();
    LIB.get_or_init(|| load_from(candidate_paths()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether libibverbs can be loaded on this machine (says nothing about devices).
pub fn is_present() -> bool {
    lib().is_ok()
}

impl LibIbverbs {
    /// libibverbs' name for a work-completion status.
    pub fn status_str(&self, status: u32) -> String {
        let Some(f) = self.wc_status_str else {
            return format!("status {status}");
        };
        // SAFETY: ibv_wc_status_str accepts any value and returns a static string.
        let p = unsafe { f(status) };
        if p.is_null() {
            return format!("status {status}");
        }
        // SAFETY: p is a NUL-terminated static string owned by libibverbs.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Registers memory the way the `ibv_reg_mr` macro does: through `ibv_reg_mr_iova2` (with
    /// the address as IOVA) when flags from the optional range are asked for and the library
    /// has it, otherwise through `ibv_reg_mr` with those flags dropped.
    ///
    /// # Safety
    /// `pd` must be a live protection domain; `addr..addr+len` must be mapped memory of this
    /// process for as long as the region stays registered.
    ///
    /// # Errors
    /// Returns null with `errno` set, as libibverbs does.
    pub unsafe fn reg_mr_any(
        &self,
        pd: *mut ibv_pd,
        addr: *mut c_void,
        len: usize,
        access: c_uint,
    ) -> *mut ibv_mr {
        match self.reg_mr_iova2 {
            // SAFETY: forwarded contract; iova = addr makes remote addresses virtual addresses.
            Some(f) => unsafe { f(pd, addr, len, addr as u64, access) },
            // SAFETY: forwarded contract; access without optional flags fits c_int.
            None => unsafe {
                (self.reg_mr)(
                    pd,
                    addr,
                    len,
                    (access & !IBV_ACCESS_OPTIONAL_RANGE) as c_int,
                )
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The header's inline functions.

/// `verbs_get_ctx(ctx)`: the extended context around `ctx`, when there is one.
///
/// # Safety
/// `ctx` must be a live context returned by `ibv_open_device`.
pub unsafe fn verbs_get_ctx(ctx: *mut ibv_context) -> Option<*mut verbs_context> {
    // SAFETY: ctx is live (caller); abi_compat is a plain pointer member.
    if unsafe { (*ctx).abi_compat } != VERBS_ABI_IS_EXTENDED {
        return None;
    }
    let off = std::mem::offset_of!(verbs_context, context);
    // SAFETY: an extended context is always embedded as the last member of a verbs_context,
    // so stepping back by the offset of that member stays inside the library's allocation.
    Some(unsafe { ctx.cast::<u8>().sub(off) }.cast::<verbs_context>())
}

/// `ibv_query_port` as the header's inline wrapper does it: the provider's sized
/// `verbs_context::query_port` when present, else the exported compat symbol (which fills the
/// first [`COMPAT_PORT_ATTR_LEN`] bytes; the rest stay zero).
///
/// # Safety
/// `ctx` must be a live context returned by `ibv_open_device` of `lib`.
///
/// # Errors
/// Returns the errno value libibverbs returns (0 on success).
pub unsafe fn query_port(
    lib: &LibIbverbs,
    ctx: *mut ibv_context,
    port: u8,
    attr: &mut ibv_port_attr,
) -> c_int {
    *attr = ibv_port_attr::default();
    // SAFETY: ctx is live (caller).
    if let Some(vctx) = unsafe { verbs_get_ctx(ctx) } {
        let need =
            std::mem::size_of::<verbs_context>() - std::mem::offset_of!(verbs_context, query_port);
        // SAFETY: vctx points at the library's verbs_context; `sz` sits right before `context`
        // and is always present. `query_port` is only read when `sz` says the library's struct
        // reaches back that far, exactly the `verbs_get_ctx_op` test of the header.
        unsafe {
            if (*vctx).sz >= need {
                if let Some(f) = (*vctx).query_port {
                    return f(ctx, port, attr, std::mem::size_of::<ibv_port_attr>());
                }
            }
        }
    }
    // SAFETY: the compat symbol writes at most COMPAT_PORT_ATTR_LEN bytes, fewer than `attr` has.
    unsafe { (lib.query_port_compat)(ctx, port, attr) }
}

/// `ibv_post_send`: `qp->context->ops.post_send(qp, wr, bad_wr)`.
///
/// # Safety
/// `qp` must be a live QP; `wr` a valid NULL-terminated list whose SGEs name registered memory
/// that stays valid until the matching completions are polled (or the QP is destroyed).
///
/// # Errors
/// Returns the errno value of the provider (0 on success, `*bad_wr` names the first WR refused).
pub unsafe fn post_send(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int {
    // SAFETY: qp and its context are live (caller); the ops table is filled by the provider.
    match unsafe { (*(*qp).context).ops.post_send } {
        // SAFETY: forwarded contract.
        Some(f) => unsafe { f(qp, wr, bad_wr) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_post_recv`.
///
/// # Safety
/// As for [`post_send`], for receive WRs.
///
/// # Errors
/// As for [`post_send`].
pub unsafe fn post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: qp and its context are live (caller).
    match unsafe { (*(*qp).context).ops.post_recv } {
        // SAFETY: forwarded contract.
        Some(f) => unsafe { f(qp, wr, bad_wr) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_post_srq_recv`.
///
/// # Safety
/// As for [`post_send`], for receive WRs on a live SRQ.
///
/// # Errors
/// As for [`post_send`].
pub unsafe fn post_srq_recv(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    // SAFETY: srq and its context are live (caller).
    match unsafe { (*(*srq).context).ops.post_srq_recv } {
        // SAFETY: forwarded contract.
        Some(f) => unsafe { f(srq, wr, bad_wr) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_poll_cq`: up to `wc.len()` completions.
///
/// # Safety
/// `cq` must be a live CQ used by one thread at a time.
///
/// # Errors
/// A negative value when polling failed; otherwise the number of entries written.
pub unsafe fn poll_cq(cq: *mut ibv_cq, wc: &mut [ibv_wc]) -> c_int {
    let n = wc.len().min(c_int::MAX as usize) as c_int;
    // SAFETY: cq and its context are live (caller).
    match unsafe { (*(*cq).context).ops.poll_cq } {
        // SAFETY: wc has room for n entries.
        Some(f) => unsafe { f(cq, n, wc.as_mut_ptr()) },
        None => -libc::EOPNOTSUPP,
    }
}
