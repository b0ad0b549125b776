//! `enum ibv_wc_status` as a Rust enum: the number, the C name, and how it prints.
//!
//! A leaf under [`crate::error`] (whose completion-failure variants carry it) and
//! [`crate::completion`] (which re-exports it and maps each status to an error).

use crate::sys;

/// `enum ibv_wc_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcStatus {
    Success,
    LocLenErr,
    LocQpOpErr,
    LocEecOpErr,
    LocProtErr,
    WrFlushErr,
    MwBindErr,
    BadRespErr,
    LocAccessErr,
    RemInvReqErr,
    RemAccessErr,
    RemOpErr,
    RetryExcErr,
    RnrRetryExcErr,
    LocRddViolErr,
    RemInvRdReqErr,
    RemAbortErr,
    InvEecnErr,
    InvEecStateErr,
    FatalErr,
    RespTimeoutErr,
    GeneralErr,
    TmErr,
    TmRndvIncomplete,
    /// A value newer than this build knows.
    Unknown(u32),
}

const STATUSES: [(u32, WcStatus, &str); 24] = [
    (sys::IBV_WC_SUCCESS, WcStatus::Success, "IBV_WC_SUCCESS"),
    (
        sys::IBV_WC_LOC_LEN_ERR,
        WcStatus::LocLenErr,
        "IBV_WC_LOC_LEN_ERR",
    ),
    (
        sys::IBV_WC_LOC_QP_OP_ERR,
        WcStatus::LocQpOpErr,
        "IBV_WC_LOC_QP_OP_ERR",
    ),
    (
        sys::IBV_WC_LOC_EEC_OP_ERR,
        WcStatus::LocEecOpErr,
        "IBV_WC_LOC_EEC_OP_ERR",
    ),
    (
        sys::IBV_WC_LOC_PROT_ERR,
        WcStatus::LocProtErr,
        "IBV_WC_LOC_PROT_ERR",
    ),
    (
        sys::IBV_WC_WR_FLUSH_ERR,
        WcStatus::WrFlushErr,
        "IBV_WC_WR_FLUSH_ERR",
    ),
    (
        sys::IBV_WC_MW_BIND_ERR,
        WcStatus::MwBindErr,
        "IBV_WC_MW_BIND_ERR",
    ),
    (
        sys::IBV_WC_BAD_RESP_ERR,
        WcStatus::BadRespErr,
        "IBV_WC_BAD_RESP_ERR",
    ),
    (
        sys::IBV_WC_LOC_ACCESS_ERR,
        WcStatus::LocAccessErr,
        "IBV_WC_LOC_ACCESS_ERR",
    ),
    (
        sys::IBV_WC_REM_INV_REQ_ERR,
        WcStatus::RemInvReqErr,
        "IBV_WC_REM_INV_REQ_ERR",
    ),
    (
        sys::IBV_WC_REM_ACCESS_ERR,
        WcStatus::RemAccessErr,
        "IBV_WC_REM_ACCESS_ERR",
    ),
    (
        sys::IBV_WC_REM_OP_ERR,
        WcStatus::RemOpErr,
        "IBV_WC_REM_OP_ERR",
    ),
    (
        sys::IBV_WC_RETRY_EXC_ERR,
        WcStatus::RetryExcErr,
        "IBV_WC_RETRY_EXC_ERR",
    ),
    (
        sys::IBV_WC_RNR_RETRY_EXC_ERR,
        WcStatus::RnrRetryExcErr,
        "IBV_WC_RNR_RETRY_EXC_ERR",
    ),
    (
        sys::IBV_WC_LOC_RDD_VIOL_ERR,
        WcStatus::LocRddViolErr,
        "IBV_WC_LOC_RDD_VIOL_ERR",
    ),
    (
        sys::IBV_WC_REM_INV_RD_REQ_ERR,
        WcStatus::RemInvRdReqErr,
        "IBV_WC_REM_INV_RD_REQ_ERR",
    ),
    (
        sys::IBV_WC_REM_ABORT_ERR,
        WcStatus::RemAbortErr,
        "IBV_WC_REM_ABORT_ERR",
    ),
    (
        sys::IBV_WC_INV_EECN_ERR,
        WcStatus::InvEecnErr,
        "IBV_WC_INV_EECN_ERR",
    ),
    (
        sys::IBV_WC_INV_EEC_STATE_ERR,
        WcStatus::InvEecStateErr,
        "IBV_WC_INV_EEC_STATE_ERR",
    ),
    (
        sys::IBV_WC_FATAL_ERR,
        WcStatus::FatalErr,
        "IBV_WC_FATAL_ERR",
    ),
    (
        sys::IBV_WC_RESP_TIMEOUT_ERR,
        WcStatus::RespTimeoutErr,
        "IBV_WC_RESP_TIMEOUT_ERR",
    ),
    (
        sys::IBV_WC_GENERAL_ERR,
        WcStatus::GeneralErr,
        "IBV_WC_GENERAL_ERR",
    ),
    (sys::IBV_WC_TM_ERR, WcStatus::TmErr, "IBV_WC_TM_ERR"),
    (
        sys::IBV_WC_TM_RNDV_INCOMPLETE,
        WcStatus::TmRndvIncomplete,
        "IBV_WC_TM_RNDV_INCOMPLETE",
    ),
];

impl WcStatus {
    pub fn from_sys(v: u32) -> WcStatus {
        STATUSES
            .iter()
            .find(|s| s.0 == v)
            .map_or(WcStatus::Unknown(v), |s| s.1)
    }

    pub fn to_sys(self) -> u32 {
        match self {
            WcStatus::Unknown(v) => v,
            known => STATUSES
                .iter()
                .find(|s| s.1 == known)
                .map_or(u32::MAX, |s| s.0),
        }
    }

    /// The name of the C enumerator.
    pub fn name(self) -> &'static str {
        STATUSES
            .iter()
            .find(|s| s.1 == self)
            .map_or("unknown ibv_wc_status", |s| s.2)
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WcStatus::Unknown(v) => write!(f, "ibv_wc_status {v}"),
            s => f.write_str(s.name()),
        }
    }
}
