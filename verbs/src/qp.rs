//! RC queue-pair setup: the `ibv_modify_qp` attributes of every transition, as pure functions,
//! and the state machine RESET → INIT → RTR → RTS (→ ERR → RESET for reconnection) as typestate.
//!
//! The attribute masks follow `ibv_modify_qp(3)` for `IBV_QPT_RC`:
//!
//! | to    | required attributes |
//! |-------|---------------------|
//! | INIT  | STATE, PKEY_INDEX, PORT, ACCESS_FLAGS |
//! | RTR   | STATE, AV, PATH_MTU, DEST_QPN, RQ_PSN, MAX_DEST_RD_ATOMIC, MIN_RNR_TIMER |
//! | RTS   | STATE, SQ_PSN, MAX_QP_RD_ATOMIC, RETRY_CNT, RNR_RETRY, TIMEOUT |
//! | ERR   | STATE (from any state) |
//! | RESET | STATE (from any state) |
//!
//! A [`Qp`] is generic over a [`QpDriver`], the thing that applies a transition: the real QP in
//! `crate::domain`, or a recording fake in tests. Transitions consume the QP and give it back in
//! the new state, or, when the driver refuses, in the old state with the error (a failed
//! `ibv_modify_qp` leaves the QP as it was).

use std::ffi::c_int;
use std::marker::PhantomData;

use crate::error::{Error, Result};
use crate::gid::{Gid, LinkLayer};
use crate::sys;

/// Largest packet sequence number + 1 (PSNs are 24 bits).
pub const PSN_MODULUS: u32 = 1 << 24;
/// QP numbers are 24 bits.
pub const QPN_MAX: u32 = (1 << 24) - 1;

/// `enum ibv_mtu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    M256 = 1,
    M512 = 2,
    M1024 = 3,
    M2048 = 4,
    M4096 = 5,
}

impl Mtu {
    pub fn from_sys(v: u32) -> Option<Mtu> {
        Some(match v {
            sys::IBV_MTU_256 => Mtu::M256,
            sys::IBV_MTU_512 => Mtu::M512,
            sys::IBV_MTU_1024 => Mtu::M1024,
            sys::IBV_MTU_2048 => Mtu::M2048,
            sys::IBV_MTU_4096 => Mtu::M4096,
            _ => return None,
        })
    }

    pub fn to_sys(self) -> u32 {
        self as u32
    }

    pub fn bytes(self) -> u32 {
        128 << (self as u32)
    }
}

/// The state a transition leads to (`enum ibv_qp_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
    Error,
}

impl QpState {
    pub fn to_sys(self) -> u32 {
        match self {
            QpState::Reset => sys::IBV_QPS_RESET,
            QpState::Init => sys::IBV_QPS_INIT,
            QpState::Rtr => sys::IBV_QPS_RTR,
            QpState::Rts => sys::IBV_QPS_RTS,
            QpState::Error => sys::IBV_QPS_ERR,
        }
    }
}

/// Everything about an RC connection that is configuration rather than discovery. The defaults
/// are the usual ones for large transfers on ConnectX; every one can be changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QpConfig {
    /// Port number (1-based); the domain sets it from the port it opened.
    pub port: u8,
    /// P_Key table index.
    pub pkey_index: u16,
    /// `qp_access_flags`: what the peer may do to memory through this QP.
    pub access: u32,
    /// Upper bound on the path MTU; the path MTU is the smallest of this, ours and the peer's.
    pub max_mtu: Mtu,
    /// `min_rnr_timer` (5 bits): how long the peer is told to wait before retrying when we had no
    /// receive posted. 12 = 0.64 ms.
    pub min_rnr_timer: u8,
    /// Local ACK timeout exponent (5 bits): 4.096 us * 2^timeout; 0 waits forever, so it is
    /// refused. 18 = 1.07 s, long enough for incast on a loaded fabric.
    pub timeout: u8,
    /// Transport retries (3 bits) before `IBV_WC_RETRY_EXC_ERR`.
    pub retry_cnt: u8,
    /// RNR retries (3 bits); 7 means retry forever. A write with immediate needs a receive on the
    /// peer, which the peer keeps stocked, so running out is a transient; transfer deadlines
    /// (not the NIC) decide when to give up.
    pub rnr_retry: u8,
    /// Outstanding RDMA reads/atomics we may issue; clamped to the device.
    pub max_rd_atomic: u8,
    /// Outstanding RDMA reads/atomics the peer may issue to us; clamped to the device.
    pub max_dest_rd_atomic: u8,
    /// Service level (4 bits).
    pub sl: u8,
    /// GRH traffic class (RoCE: DSCP << 2 | ECN).
    pub traffic_class: u8,
    /// GRH hop limit.
    pub hop_limit: u8,
    /// GRH flow label (20 bits; 0 lets the NIC choose, RoCE v2 hashes it into the UDP port).
    pub flow_label: u32,
    /// `static_rate` (`enum ibv_rate`; 0 = port rate).
    pub static_rate: u8,
    /// Source path bits (LMC) for IB.
    pub src_path_bits: u8,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            port: 1,
            pkey_index: 0,
            access: sys::IBV_ACCESS_LOCAL_WRITE | sys::IBV_ACCESS_REMOTE_WRITE,
            max_mtu: Mtu::M4096,
            min_rnr_timer: 12,
            timeout: 18,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 16,
            max_dest_rd_atomic: 16,
            sl: 0,
            traffic_class: 0,
            hop_limit: 64,
            flow_label: 0,
            static_rate: 0,
            src_path_bits: 0,
        }
    }
}

impl QpConfig {
    /// Checks every field against its bit width.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let checks: [(&str, u32, u32); 9] = [
            ("port", self.port as u32, 255),
            ("min_rnr_timer", self.min_rnr_timer as u32, 31),
            ("timeout", self.timeout as u32, 31),
            ("retry_cnt", self.retry_cnt as u32, 7),
            ("rnr_retry", self.rnr_retry as u32, 7),
            ("sl", self.sl as u32, 15),
            ("flow_label", self.flow_label, (1 << 20) - 1),
            ("max_rd_atomic", self.max_rd_atomic as u32, 255),
            ("max_dest_rd_atomic", self.max_dest_rd_atomic as u32, 255),
        ];
        for (name, v, max) in checks {
            if v > max {
                return Err(Error::Config(format!("{name} = {v} exceeds {max}")));
            }
        }
        if self.port == 0 {
            return Err(Error::Config("port numbers start at 1".into()));
        }
        if self.timeout == 0 {
            return Err(Error::Config(
                "timeout 0 disables the ACK timer: a dead peer would never be noticed".into(),
            ));
        }
        if self.hop_limit == 0 {
            return Err(Error::Config(
                "hop_limit 0 drops every routed packet".into(),
            ));
        }
        Ok(())
    }

    /// Clamps the read/atomic depths to what the device supports (`max_qp_init_rd_atom`,
    /// `max_qp_rd_atom` of `ibv_query_device`).
    pub fn clamp_to_device(&mut self, max_qp_init_rd_atom: i32, max_qp_rd_atom: i32) {
        let cap = |v: u8, max: i32| v.min(max.clamp(0, 255) as u8);
        self.max_rd_atomic = cap(self.max_rd_atomic, max_qp_init_rd_atom);
        self.max_dest_rd_atomic = cap(self.max_dest_rd_atomic, max_qp_rd_atom);
    }
}

/// Our side of the path, as discovered on the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPath {
    pub link_layer: LinkLayer,
    /// The port's `active_mtu`.
    pub active_mtu: Mtu,
    /// `sgid_index` chosen by [`crate::gid::select_gid`].
    pub sgid_index: u8,
    /// Whether to put a GRH on packets (always on RoCE).
    pub use_grh: bool,
}

/// The peer's QP, as learnt from the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteQp {
    pub qpn: u32,
    /// The peer's first send PSN: our receive PSN.
    pub psn: u32,
    pub lid: u16,
    pub gid: Gid,
    /// The peer port's `active_mtu`.
    pub mtu: Mtu,
}

/// One `ibv_modify_qp` call: the attributes, the mask of those that count, and the target state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modify {
    pub attr: sys::ibv_qp_attr,
    pub mask: c_int,
    pub to: QpState,
}

/// Attributes for RESET → INIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitAttrs(pub Modify);
/// Attributes for INIT → RTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtrAttrs(pub Modify);
/// Attributes for RTR → RTS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtsAttrs(pub Modify);

/// RESET → INIT: port, P_Key index, access flags.
///
/// # Errors
/// [`Error::Config`] when the configuration is out of range.
pub fn init_attrs(cfg: &QpConfig) -> Result<InitAttrs> {
    cfg.validate()?;
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_INIT,
        pkey_index: cfg.pkey_index,
        port_num: cfg.port,
        qp_access_flags: cfg.access,
        ..Default::default()
    };
    let mask =
        sys::IBV_QP_STATE | sys::IBV_QP_PKEY_INDEX | sys::IBV_QP_PORT | sys::IBV_QP_ACCESS_FLAGS;
    Ok(InitAttrs(Modify {
        attr,
        mask,
        to: QpState::Init,
    }))
}

/// Unicast LIDs are 0x0001..=0xbfff.
fn unicast_lid(lid: u16) -> bool {
    (1..0xc000).contains(&lid)
}

/// INIT → RTR: the address vector towards the peer, path MTU, the peer's QPN, our receive PSN
/// (the peer's send PSN), responder resources and the RNR timer.
///
/// On RoCE the address vector is global (GRH with the peer's GID as `dgid`); on InfiniBand it
/// is the peer's LID, plus a GRH when `local.use_grh`.
///
/// # Errors
/// [`Error::Config`] for an out-of-range configuration; [`Error::Incompatible`] when the peer's
/// values cannot be addressed (zero GID where a GRH is needed, a non-unicast LID, a QPN or PSN
/// over 24 bits).
pub fn rtr_attrs(cfg: &QpConfig, local: &LocalPath, remote: &RemoteQp) -> Result<RtrAttrs> {
    cfg.validate()?;
    if remote.qpn > QPN_MAX || remote.psn >= PSN_MODULUS {
        return Err(Error::Incompatible(format!(
            "peer QPN {:#x} / PSN {:#x} exceed 24 bits",
            remote.qpn, remote.psn
        )));
    }
    let global = match local.link_layer {
        LinkLayer::Ethernet => true,
        LinkLayer::InfiniBand => local.use_grh,
    };
    if global && remote.gid.is_zero() {
        return Err(Error::Incompatible(format!(
            "a GRH is needed on this {} port but the peer sent no GID",
            local.link_layer.name()
        )));
    }
    if local.link_layer == LinkLayer::InfiniBand && !unicast_lid(remote.lid) {
        return Err(Error::Incompatible(format!(
            "peer LID {:#x} is not a unicast LID (is the subnet manager running?)",
            remote.lid
        )));
    }
    let path_mtu = local.active_mtu.min(remote.mtu).min(cfg.max_mtu);
    let mut ah = sys::ibv_ah_attr {
        dlid: if local.link_layer == LinkLayer::InfiniBand {
            remote.lid
        } else {
            0
        },
        sl: cfg.sl,
        src_path_bits: cfg.src_path_bits,
        static_rate: cfg.static_rate,
        is_global: global as u8,
        port_num: cfg.port,
        ..Default::default()
    };
    if global {
        ah.grh = sys::ibv_global_route {
            dgid: remote.gid.to_sys(),
            flow_label: cfg.flow_label,
            sgid_index: local.sgid_index,
            hop_limit: cfg.hop_limit,
            traffic_class: cfg.traffic_class,
        };
    }
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_RTR,
        path_mtu: path_mtu.to_sys(),
        dest_qp_num: remote.qpn,
        rq_psn: remote.psn,
        max_dest_rd_atomic: cfg.max_dest_rd_atomic,
        min_rnr_timer: cfg.min_rnr_timer,
        ah_attr: ah,
        ..Default::default()
    };
    let mask = sys::IBV_QP_STATE
        | sys::IBV_QP_AV
        | sys::IBV_QP_PATH_MTU
        | sys::IBV_QP_DEST_QPN
        | sys::IBV_QP_RQ_PSN
        | sys::IBV_QP_MAX_DEST_RD_ATOMIC
        | sys::IBV_QP_MIN_RNR_TIMER;
    Ok(RtrAttrs(Modify {
        attr,
        mask,
        to: QpState::Rtr,
    }))
}

/// RTR → RTS: our send PSN, ACK timeout, retry counts, initiator depth.
///
/// # Errors
/// [`Error::Config`] for an out-of-range configuration or a PSN over 24 bits.
pub fn rts_attrs(cfg: &QpConfig, sq_psn: u32) -> Result<RtsAttrs> {
    cfg.validate()?;
    if sq_psn >= PSN_MODULUS {
        return Err(Error::Config(format!(
            "send PSN {sq_psn:#x} exceeds 24 bits"
        )));
    }
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_RTS,
        sq_psn,
        timeout: cfg.timeout,
        retry_cnt: cfg.retry_cnt,
        rnr_retry: cfg.rnr_retry,
        max_rd_atomic: cfg.max_rd_atomic,
        ..Default::default()
    };
    let mask = sys::IBV_QP_STATE
        | sys::IBV_QP_SQ_PSN
        | sys::IBV_QP_TIMEOUT
        | sys::IBV_QP_RETRY_CNT
        | sys::IBV_QP_RNR_RETRY
        | sys::IBV_QP_MAX_QP_RD_ATOMIC;
    Ok(RtsAttrs(Modify {
        attr,
        mask,
        to: QpState::Rts,
    }))
}

/// Any state → ERR: outstanding work requests complete with `IBV_WC_WR_FLUSH_ERR`.
pub fn error_attrs() -> Modify {
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_ERR,
        ..Default::default()
    };
    Modify {
        attr,
        mask: sys::IBV_QP_STATE,
        to: QpState::Error,
    }
}

/// Any state → RESET: the QP forgets its peer and can be set up again with the same QPN.
pub fn reset_attrs() -> Modify {
    let attr = sys::ibv_qp_attr {
        qp_state: sys::IBV_QPS_RESET,
        ..Default::default()
    };
    Modify {
        attr,
        mask: sys::IBV_QP_STATE,
        to: QpState::Reset,
    }
}

// ---------------------------------------------------------------------------------------------
// Typestate.

/// Applies `ibv_modify_qp` (or pretends to, in tests).
pub trait QpDriver {
    /// The QP number, stable across resets.
    fn qp_num(&self) -> u32;
    /// Applies one transition.
    ///
    /// # Errors
    /// Whatever the driver reports; the QP must then be in the state it was in before.
    fn modify(&mut self, m: &Modify) -> Result<()>;
}

/// Typestate marker: freshly created or reset.
#[derive(Debug)]
pub enum Reset {}
/// Typestate marker: bound to a port, may post receives.
#[derive(Debug)]
pub enum Init {}
/// Typestate marker: ready to receive from one peer.
#[derive(Debug)]
pub enum Rtr {}
/// Typestate marker: ready to send; only here may sends be posted.
#[derive(Debug)]
pub enum Rts {}
/// Typestate marker: in error; outstanding work is being flushed.
#[derive(Debug)]
pub enum Errored {}

/// A queue pair whose verbs state is `S`.
#[derive(Debug)]
pub struct Qp<D, S> {
    driver: D,
    _state: PhantomData<S>,
}

/// A refused transition: the QP, still in its old state, and why.
#[derive(Debug)]
pub struct TransitionFailed<D, S> {
    pub qp: Qp<D, S>,
    pub error: Error,
}

impl<D, S> From<TransitionFailed<D, S>> for Error {
    fn from(t: TransitionFailed<D, S>) -> Error {
        t.error
    }
}

type Transition<D, From, To> = std::result::Result<Qp<D, To>, TransitionFailed<D, From>>;

impl<D: QpDriver, S> Qp<D, S> {
    fn apply<T>(mut self, m: &Modify) -> Transition<D, S, T> {
        match self.driver.modify(m) {
            Ok(()) => Ok(Qp {
                driver: self.driver,
                _state: PhantomData,
            }),
            Err(error) => Err(TransitionFailed { qp: self, error }),
        }
    }

    /// The driver, for queries that do not change the state.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    pub fn qp_num(&self) -> u32 {
        self.driver.qp_num()
    }

    /// Moves to ERR from any state, flushing outstanding work.
    ///
    /// # Errors
    /// The driver's error, with the QP unchanged.
    pub fn into_error(self) -> Transition<D, S, Errored> {
        self.apply(&error_attrs())
    }

    /// Moves to RESET from any state. Work still queued is dropped without completions on most
    /// providers, so move to ERR and drain first when completions matter.
    ///
    /// # Errors
    /// The driver's error, with the QP unchanged.
    pub fn reset(self) -> Transition<D, S, Reset> {
        self.apply(&reset_attrs())
    }
}

impl<D: QpDriver> Qp<D, Reset> {
    /// A QP just returned by `ibv_create_qp` is in RESET.
    pub fn new(driver: D) -> Self {
        Qp {
            driver,
            _state: PhantomData,
        }
    }

    /// RESET → INIT.
    ///
    /// # Errors
    /// The driver's error, with the QP still in RESET.
    pub fn init(self, attrs: &InitAttrs) -> Transition<D, Reset, Init> {
        self.apply(&attrs.0)
    }
}

impl<D: QpDriver> Qp<D, Init> {
    /// INIT → RTR.
    ///
    /// # Errors
    /// The driver's error, with the QP still in INIT.
    pub fn ready_to_receive(self, attrs: &RtrAttrs) -> Transition<D, Init, Rtr> {
        self.apply(&attrs.0)
    }
}

impl<D: QpDriver> Qp<D, Rtr> {
    /// RTR → RTS.
    ///
    /// # Errors
    /// The driver's error, with the QP still in RTR.
    pub fn ready_to_send(self, attrs: &RtsAttrs) -> Transition<D, Rtr, Rts> {
        self.apply(&attrs.0)
    }
}

impl<D: QpDriver> Qp<D, Rts> {
    /// The driver, for posting sends; only a QP in RTS hands it out mutably.
    pub fn sender(&mut self) -> &mut D {
        &mut self.driver
    }
}

/// A QP in whichever state it is, for storage in a table.
#[derive(Debug)]
pub enum AnyQp<D> {
    Reset(Qp<D, Reset>),
    Init(Qp<D, Init>),
    Rtr(Qp<D, Rtr>),
    Rts(Qp<D, Rts>),
    Error(Qp<D, Errored>),
}

impl<D: QpDriver> AnyQp<D> {
    pub fn state(&self) -> QpState {
        match self {
            AnyQp::Reset(_) => QpState::Reset,
            AnyQp::Init(_) => QpState::Init,
            AnyQp::Rtr(_) => QpState::Rtr,
            AnyQp::Rts(_) => QpState::Rts,
            AnyQp::Error(_) => QpState::Error,
        }
    }

    pub fn driver(&self) -> &D {
        match self {
            AnyQp::Reset(q) => q.driver(),
            AnyQp::Init(q) => q.driver(),
            AnyQp::Rtr(q) => q.driver(),
            AnyQp::Rts(q) => q.driver(),
            AnyQp::Error(q) => q.driver(),
        }
    }

    pub fn qp_num(&self) -> u32 {
        self.driver().qp_num()
    }

    /// The QP when it may send.
    pub fn rts_mut(&mut self) -> Option<&mut Qp<D, Rts>> {
        match self {
            AnyQp::Rts(q) => Some(q),
            _ => None,
        }
    }

    /// Any state → ERR → RESET → INIT: ready to be connected again, same QPN. Used for
    /// teardown before reconnecting. On a refused step the QP is left in the state it reached
    /// and the error is returned.
    ///
    /// # Errors
    /// The first refused transition.
    pub fn recycle(self, init: &InitAttrs) -> (AnyQp<D>, Result<()>) {
        let errored = match self {
            AnyQp::Reset(q) => return AnyQp::from_reset(q, init),
            AnyQp::Error(q) => q,
            AnyQp::Init(q) => match q.into_error() {
                Ok(q) => q,
                Err(f) => return (AnyQp::Init(f.qp), Err(f.error)),
            },
            AnyQp::Rtr(q) => match q.into_error() {
                Ok(q) => q,
                Err(f) => return (AnyQp::Rtr(f.qp), Err(f.error)),
            },
            AnyQp::Rts(q) => match q.into_error() {
                Ok(q) => q,
                Err(f) => return (AnyQp::Rts(f.qp), Err(f.error)),
            },
        };
        match errored.reset() {
            Ok(q) => AnyQp::from_reset(q, init),
            Err(f) => (AnyQp::Error(f.qp), Err(f.error)),
        }
    }

    fn from_reset(q: Qp<D, Reset>, init: &InitAttrs) -> (AnyQp<D>, Result<()>) {
        match q.init(init) {
            Ok(q) => (AnyQp::Init(q), Ok(())),
            Err(f) => (AnyQp::Reset(f.qp), Err(f.error)),
        }
    }

    /// INIT → RTR → RTS with the given attributes. The QP must be in INIT.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when not in INIT; otherwise the first refused transition,
    /// with the QP left where it got to.
    pub fn connect(self, rtr: &RtrAttrs, rts: &RtsAttrs) -> (AnyQp<D>, Result<()>) {
        let q = match self {
            AnyQp::Init(q) => q,
            other => {
                let s = other.state();
                return (
                    other,
                    Err(Error::InvalidArgument(format!(
                        "connect from {s:?}, not Init"
                    ))),
                );
            }
        };
        let q = match q.ready_to_receive(rtr) {
            Ok(q) => q,
            Err(f) => return (AnyQp::Init(f.qp), Err(f.error)),
        };
        match q.ready_to_send(rts) {
            Ok(q) => (AnyQp::Rts(q), Ok(())),
            Err(f) => (AnyQp::Rtr(f.qp), Err(f.error)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A driver that checks every transition against the verbs rules (legal source state,
    /// required mask bits) the way a provider would, and records it.
    #[derive(Debug, Default)]
    pub(crate) struct FakeQp {
        pub qpn: u32,
        pub state: Option<QpState>,
        pub log: Vec<Modify>,
        /// Refuse the next transition to this state.
        pub refuse: Option<QpState>,
    }

    pub(crate) fn required_mask(to: QpState) -> c_int {
        match to {
            QpState::Init => {
                sys::IBV_QP_STATE
                    | sys::IBV_QP_PKEY_INDEX
                    | sys::IBV_QP_PORT
                    | sys::IBV_QP_ACCESS_FLAGS
            }
            QpState::Rtr => {
                sys::IBV_QP_STATE
                    | sys::IBV_QP_AV
                    | sys::IBV_QP_PATH_MTU
                    | sys::IBV_QP_DEST_QPN
                    | sys::IBV_QP_RQ_PSN
                    | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                    | sys::IBV_QP_MIN_RNR_TIMER
            }
            QpState::Rts => {
                sys::IBV_QP_STATE
                    | sys::IBV_QP_SQ_PSN
                    | sys::IBV_QP_MAX_QP_RD_ATOMIC
                    | sys::IBV_QP_RETRY_CNT
                    | sys::IBV_QP_RNR_RETRY
                    | sys::IBV_QP_TIMEOUT
            }
            QpState::Error | QpState::Reset => sys::IBV_QP_STATE,
        }
    }

    impl QpDriver for FakeQp {
        fn qp_num(&self) -> u32 {
            self.qpn
        }

        fn modify(&mut self, m: &Modify) -> Result<()> {
            let from = self.state.unwrap_or(QpState::Reset);
            let legal = match m.to {
                QpState::Init => from == QpState::Reset || from == QpState::Init,
                QpState::Rtr => from == QpState::Init,
                QpState::Rts => from == QpState::Rtr || from == QpState::Rts,
                QpState::Error | QpState::Reset => true,
            };
            if self.refuse == Some(m.to) {
                self.refuse = None;
                return Err(Error::verbs("ibv_modify_qp", libc::EINVAL));
            }
            assert!(legal, "illegal transition {from:?} -> {:?}", m.to);
            let need = required_mask(m.to);
            assert_eq!(m.mask & need, need, "missing attributes for {:?}", m.to);
            assert_eq!(m.attr.qp_state, m.to.to_sys());
            self.state = Some(m.to);
            self.log.push(*m);
            Ok(())
        }
    }

    fn roce_local() -> LocalPath {
        LocalPath {
            link_layer: LinkLayer::Ethernet,
            active_mtu: Mtu::M4096,
            sgid_index: 3,
            use_grh: true,
        }
    }

    fn remote() -> RemoteQp {
        RemoteQp {
            qpn: 0x1234,
            psn: 0xabcdef,
            lid: 0,
            gid: Gid::from_ip("10.0.0.7".parse().unwrap()),
            mtu: Mtu::M1024,
        }
    }

    #[test]
    fn full_setup_through_typestate() {
        let cfg = QpConfig::default();
        let qp = Qp::new(FakeQp {
            qpn: 7,
            ..Default::default()
        });
        let qp = qp.init(&init_attrs(&cfg).unwrap()).unwrap();
        let qp = qp
            .ready_to_receive(&rtr_attrs(&cfg, &roce_local(), &remote()).unwrap())
            .unwrap();
        let mut qp = qp.ready_to_send(&rts_attrs(&cfg, 0x42).unwrap()).unwrap();
        assert_eq!(qp.sender().state, Some(QpState::Rts));
        let log = &qp.driver().log;
        assert_eq!(log.len(), 3);
        let rtr = log[1].attr;
        assert_eq!(rtr.dest_qp_num, 0x1234);
        assert_eq!(rtr.rq_psn, 0xabcdef);
        assert_eq!(
            rtr.path_mtu,
            sys::IBV_MTU_1024,
            "path MTU is the smaller of the two ports"
        );
        assert_eq!(rtr.ah_attr.is_global, 1);
        assert_eq!(rtr.ah_attr.grh.sgid_index, 3);
        assert_eq!(rtr.ah_attr.grh.hop_limit, 64);
        assert_eq!(Gid::from_sys(&rtr.ah_attr.grh.dgid), remote().gid);
        assert_eq!(rtr.ah_attr.port_num, 1);
        let rts = log[2].attr;
        assert_eq!(
            (rts.sq_psn, rts.timeout, rts.retry_cnt, rts.rnr_retry),
            (0x42, 18, 7, 7)
        );
        // Reconnection: RTS -> ERR -> RESET -> INIT, same QPN.
        let qp = qp.into_error().unwrap().reset().unwrap();
        assert_eq!(qp.qp_num(), 7);
        assert!(qp.init(&init_attrs(&cfg).unwrap()).is_ok());
    }

    #[test]
    fn infiniband_uses_the_lid_and_no_grh_by_default() {
        let cfg = QpConfig {
            sl: 3,
            ..Default::default()
        };
        let local = LocalPath {
            link_layer: LinkLayer::InfiniBand,
            active_mtu: Mtu::M4096,
            sgid_index: 0,
            use_grh: false,
        };
        let r = RemoteQp {
            lid: 0x17,
            gid: Gid::ZERO,
            mtu: Mtu::M4096,
            ..remote()
        };
        let a = rtr_attrs(&cfg, &local, &r).unwrap().0.attr;
        assert_eq!(
            (a.ah_attr.dlid, a.ah_attr.is_global, a.ah_attr.sl),
            (0x17, 0, 3)
        );
        assert_eq!(a.path_mtu, sys::IBV_MTU_4096);
        // LID 0 means no subnet manager: refused with a hint.
        let err = rtr_attrs(&cfg, &local, &RemoteQp { lid: 0, ..r }).unwrap_err();
        assert!(err.to_string().contains("subnet manager"), "{err}");
        // GRH on IB needs the peer's GID.
        let grh = LocalPath {
            use_grh: true,
            ..local
        };
        assert!(matches!(
            rtr_attrs(&cfg, &grh, &r),
            Err(Error::Incompatible(_))
        ));
        let with_gid = RemoteQp {
            gid: Gid([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            ..r
        };
        let a = rtr_attrs(&cfg, &grh, &with_gid).unwrap().0.attr;
        assert_eq!((a.ah_attr.is_global, a.ah_attr.dlid), (1, 0x17));
    }

    #[test]
    fn roce_needs_the_peer_gid() {
        let r = RemoteQp {
            gid: Gid::ZERO,
            ..remote()
        };
        assert!(matches!(
            rtr_attrs(&QpConfig::default(), &roce_local(), &r),
            Err(Error::Incompatible(_))
        ));
    }

    #[test]
    fn config_ranges_are_checked() {
        for bad in [
            QpConfig {
                timeout: 0,
                ..Default::default()
            },
            QpConfig {
                timeout: 32,
                ..Default::default()
            },
            QpConfig {
                retry_cnt: 8,
                ..Default::default()
            },
            QpConfig {
                rnr_retry: 8,
                ..Default::default()
            },
            QpConfig {
                min_rnr_timer: 32,
                ..Default::default()
            },
            QpConfig {
                sl: 16,
                ..Default::default()
            },
            QpConfig {
                flow_label: 1 << 20,
                ..Default::default()
            },
            QpConfig {
                port: 0,
                ..Default::default()
            },
            QpConfig {
                hop_limit: 0,
                ..Default::default()
            },
        ] {
            assert!(matches!(init_attrs(&bad), Err(Error::Config(_))), "{bad:?}");
        }
        assert!(rts_attrs(&QpConfig::default(), PSN_MODULUS).is_err());
        let mut c = QpConfig::default();
        c.clamp_to_device(4, 8);
        assert_eq!((c.max_rd_atomic, c.max_dest_rd_atomic), (4, 8));
    }

    #[test]
    fn refused_transitions_give_the_qp_back_unchanged() {
        let cfg = QpConfig::default();
        let fake = FakeQp {
            qpn: 1,
            refuse: Some(QpState::Rts),
            ..Default::default()
        };
        let any = AnyQp::Init(Qp::new(fake).init(&init_attrs(&cfg).unwrap()).unwrap());
        let rtr = rtr_attrs(&cfg, &roce_local(), &remote()).unwrap();
        let rts = rts_attrs(&cfg, 5).unwrap();
        let (any, r) = any.connect(&rtr, &rts);
        assert!(r.is_err());
        assert_eq!(any.state(), QpState::Rtr, "left where it got to");
        let (any, r) = any.recycle(&init_attrs(&cfg).unwrap());
        r.unwrap();
        assert_eq!(any.state(), QpState::Init);
        let (any, r) = any.connect(&rtr, &rts);
        r.unwrap();
        assert_eq!(any.state(), QpState::Rts);
        let (any, r) = any.connect(&rtr, &rts);
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
        assert_eq!(any.state(), QpState::Rts);
    }

    fn arb_mtu() -> impl Strategy<Value = Mtu> {
        (1u32..=5).prop_map(|v| Mtu::from_sys(v).unwrap())
    }

    fn arb_config() -> impl Strategy<Value = QpConfig> {
        (
            (1u8..=2, any::<u16>(), 1u8..=31, 0u8..=7, 0u8..=7, 0u8..=31),
            (
                0u8..=15,
                any::<u8>(),
                1u8..=255,
                0u32..(1 << 20),
                arb_mtu(),
                any::<u8>(),
            ),
        )
            .prop_map(
                |(
                    (port, pkey_index, timeout, retry_cnt, rnr_retry, min_rnr_timer),
                    (sl, tc, hop, fl, max_mtu, rd),
                )| QpConfig {
                    port,
                    pkey_index,
                    timeout,
                    retry_cnt,
                    rnr_retry,
                    min_rnr_timer,
                    sl,
                    traffic_class: tc,
                    hop_limit: hop,
                    flow_label: fl,
                    max_mtu,
                    max_rd_atomic: rd,
                    max_dest_rd_atomic: rd / 2,
                    ..Default::default()
                },
            )
    }

    proptest! {
        /// Every transition built from a valid configuration carries exactly the required
        /// attributes, with the configured values, and a provider-like driver accepts the
        /// sequence RESET -> INIT -> RTR -> RTS -> ERR -> RESET -> INIT.
        #[test]
        fn transitions_carry_the_configured_values(
            cfg in arb_config(),
            roce in any::<bool>(),
            local_mtu in arb_mtu(),
            remote_mtu in arb_mtu(),
            qpn in 1u32..=QPN_MAX,
            rpsn in 0u32..PSN_MODULUS,
            spsn in 0u32..PSN_MODULUS,
            lid in 1u16..0xc000,
            sgid in any::<u8>(),
            gid in any::<[u8; 16]>().prop_filter("non-zero", |g| *g != [0; 16]),
        ) {
            let local = LocalPath {
                link_layer: if roce { LinkLayer::Ethernet } else { LinkLayer::InfiniBand },
                active_mtu: local_mtu,
                sgid_index: sgid,
                use_grh: roce,
            };
            let r = RemoteQp { qpn, psn: rpsn, lid, gid: Gid(gid), mtu: remote_mtu };
            let init = init_attrs(&cfg).unwrap();
            let rtr = rtr_attrs(&cfg, &local, &r).unwrap();
            let rts = rts_attrs(&cfg, spsn).unwrap();
            for m in [init.0, rtr.0, rts.0] {
                prop_assert_eq!(m.mask, required_mask(m.to));
            }
            let i = init.0.attr;
            prop_assert_eq!((i.port_num, i.pkey_index, i.qp_access_flags), (cfg.port, cfg.pkey_index, cfg.access));
            let a = rtr.0.attr;
            prop_assert_eq!(a.path_mtu, local_mtu.min(remote_mtu).min(cfg.max_mtu).to_sys());
            prop_assert_eq!((a.dest_qp_num, a.rq_psn), (qpn, rpsn));
            prop_assert_eq!((a.min_rnr_timer, a.max_dest_rd_atomic), (cfg.min_rnr_timer, cfg.max_dest_rd_atomic));
            prop_assert_eq!((a.ah_attr.sl, a.ah_attr.port_num), (cfg.sl, cfg.port));
            if roce {
                prop_assert_eq!(a.ah_attr.is_global, 1);
                prop_assert_eq!(a.ah_attr.dlid, 0);
                prop_assert_eq!(a.ah_attr.grh.dgid.raw(), gid);
                prop_assert_eq!(a.ah_attr.grh.sgid_index, sgid);
                prop_assert_eq!((a.ah_attr.grh.hop_limit, a.ah_attr.grh.traffic_class), (cfg.hop_limit, cfg.traffic_class));
                prop_assert_eq!(a.ah_attr.grh.flow_label, cfg.flow_label);
            } else {
                prop_assert_eq!((a.ah_attr.is_global, a.ah_attr.dlid), (0, lid));
                prop_assert_eq!(a.ah_attr.grh, sys::ibv_global_route::default());
            }
            let s = rts.0.attr;
            prop_assert_eq!((s.sq_psn, s.timeout, s.retry_cnt, s.rnr_retry, s.max_rd_atomic),
                (spsn, cfg.timeout, cfg.retry_cnt, cfg.rnr_retry, cfg.max_rd_atomic));

            let qp = Qp::new(FakeQp { qpn: 9, ..Default::default() });
            let qp = qp.init(&init).unwrap().ready_to_receive(&rtr).unwrap().ready_to_send(&rts).unwrap();
            let qp = qp.into_error().unwrap().reset().unwrap().init(&init).unwrap();
            prop_assert_eq!(qp.driver().log.len(), 6);
        }
    }
}
