//! What a domain can be told: [`DomainConfig`] with its `STOLON_IB_*` overrides, and the queue
//! sizes it comes to on a given device ([`queue_sizes`]).

use crate::error::{Error, Result};
use crate::gid::{GidPolicy, GidSelector, LinkLayer};
use crate::handshake::HandshakeConfig;
use crate::qp::QpConfig;
use crate::wr::ImmPolicy;

use super::discovery::DeviceCaps;

/// Everything [`VerbsDomain::open`](crate::domain::VerbsDomain::open) can be told.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainConfig {
    /// Device name (`mlx5_0`); the first with an active port when `None`.
    pub device: Option<String>,
    /// Port number; the first active one when `None`.
    pub port: Option<u8>,
    /// Only ports of this link layer.
    pub link_layer: Option<LinkLayer>,
    pub gid: GidPolicy,
    /// QP attributes (its `port` is overwritten with the port opened).
    pub qp: QpConfig,
    pub handshake: HandshakeConfig,
    /// Peers the CQ is sized for.
    pub max_peers: u32,
    /// Send-queue depth of each data QP.
    pub send_queue_depth: u32,
    /// Send-queue depth of each message QP.
    pub msg_queue_depth: u32,
    /// Signal at least every Nth write.
    pub signal_every: u32,
    /// SGEs per send WR asked for (clamped to the device).
    pub max_send_sge: u32,
    /// Inline data asked for per WR (the provider may grant less; 0 disables).
    pub max_inline: u32,
    /// Receives kept posted on the write-with-immediate SRQ.
    pub imm_receives: u32,
    /// Receive buffers kept posted on the message SRQ.
    pub msg_receives: u32,
    /// Bytes per message buffer (the largest message).
    pub max_message: u32,
    /// Registered send buffers for messages.
    pub msg_send_buffers: u32,
    /// Which writes of a transfer carry the immediate.
    pub imm_policy: ImmPolicy,
    /// Register memory with `IBV_ACCESS_RELAXED_ORDERING` (PCIe relaxed ordering; faster GPU
    /// memory access on many platforms).
    pub relaxed_ordering: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            device: None,
            port: None,
            link_layer: None,
            gid: GidPolicy::default(),
            qp: QpConfig::default(),
            handshake: HandshakeConfig::default(),
            max_peers: 64,
            send_queue_depth: 512,
            msg_queue_depth: 64,
            signal_every: 16,
            max_send_sge: 4,
            max_inline: 64,
            imm_receives: 4096,
            msg_receives: 256,
            max_message: 8192,
            msg_send_buffers: 64,
            imm_policy: ImmPolicy::EveryWr,
            relaxed_ordering: true,
        }
    }
}

impl DomainConfig {
    /// Applies `STOLON_IB_*` overrides read through `var` (the environment, in practice):
    /// `DEVICE`, `PORT`, `GID_INDEX`, `GID_IP`, `TC`, `SL`, `TIMEOUT`, `RETRY_CNT`, `HOP_LIMIT`,
    /// `ROCE_V1`.
    ///
    /// # Errors
    /// [`Error::Config`] naming a value that does not parse.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::Config(format!("STOLON_IB_{name}={v:?} does not parse")))
        }
        if let Some(v) = var("STOLON_IB_DEVICE") {
            self.device = Some(v);
        }
        if let Some(v) = var("STOLON_IB_PORT") {
            self.port = Some(parse("PORT", &v)?);
        }
        if let Some(v) = var("STOLON_IB_GID_INDEX") {
            self.gid.selector = GidSelector::Index(parse("GID_INDEX", &v)?);
        }
        if let Some(v) = var("STOLON_IB_GID_IP") {
            self.gid.selector = GidSelector::Ip(parse("GID_IP", &v)?);
        }
        if let Some(v) = var("STOLON_IB_TC") {
            self.qp.traffic_class = parse("TC", &v)?;
        }
        if let Some(v) = var("STOLON_IB_SL") {
            self.qp.sl = parse("SL", &v)?;
        }
        if let Some(v) = var("STOLON_IB_TIMEOUT") {
            self.qp.timeout = parse("TIMEOUT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_RETRY_CNT") {
            self.qp.retry_cnt = parse("RETRY_CNT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_HOP_LIMIT") {
            self.qp.hop_limit = parse("HOP_LIMIT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_ROCE_V1") {
            self.gid.allow_roce_v1 = v.trim() == "1";
        }
        self.qp.validate()
    }
}

/// Queue sizes after clamping to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSizes {
    pub data_sq: u32,
    pub msg_sq: u32,
    pub imm_srq: u32,
    pub msg_srq: u32,
    pub cq: u32,
    pub send_sge: u32,
}

/// Sizes every queue: the CQ must hold one entry per signalled send WR that can be outstanding
/// on every QP of every peer, plus every posted receive, or it overruns (a fatal CQ error).
///
/// # Errors
/// [`Error::Config`] when the device's CQ cannot hold that many, naming what to reduce.
pub fn queue_sizes(cfg: &DomainConfig, caps: &DeviceCaps) -> Result<QueueSizes> {
    let nz = |v: u32, what: &str| {
        if v == 0 {
            Err(Error::Config(format!("{what} must be at least 1")))
        } else {
            Ok(v)
        }
    };
    let data_sq = nz(cfg.send_queue_depth, "send_queue_depth")?.min(caps.max_qp_wr);
    let msg_sq = nz(cfg.msg_queue_depth, "msg_queue_depth")?.min(caps.max_qp_wr);
    let imm_srq = nz(cfg.imm_receives, "imm_receives")?.min(caps.max_srq_wr);
    let msg_srq = nz(cfg.msg_receives, "msg_receives")?.min(caps.max_srq_wr);
    nz(cfg.max_peers, "max_peers")?;
    nz(cfg.max_message, "max_message")?;
    let send_sge = nz(cfg.max_send_sge, "max_send_sge")?
        .min(caps.max_sge)
        .max(1);
    let need =
        cfg.max_peers as u64 * (data_sq as u64 + msg_sq as u64) + imm_srq as u64 + msg_srq as u64;
    if need > caps.max_cqe as u64 {
        return Err(Error::Config(format!(
            "the CQ would need {need} entries ({} peers x ({data_sq} + {msg_sq}) send slots + \
             {imm_srq} + {msg_srq} receives) but the device allows {}; lower max_peers or the \
             queue depths",
            cfg.max_peers, caps.max_cqe
        )));
    }
    Ok(QueueSizes {
        data_sq,
        msg_sq,
        imm_srq,
        msg_srq,
        cq: need as u32,
        send_sge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::discovery::tests::caps;
    use std::collections::HashMap;

    #[test]
    fn queue_sizing() {
        let cfg = DomainConfig::default();
        let s = queue_sizes(&cfg, &caps()).unwrap();
        assert_eq!(s.cq, 64 * (512 + 64) + 4096 + 256);
        assert_eq!(s.send_sge, 4);
        let small = DeviceCaps {
            max_cqe: 10_000,
            max_qp_wr: 256,
            max_sge: 2,
            ..caps()
        };
        let e = queue_sizes(&cfg, &small).unwrap_err();
        assert!(e.to_string().contains("lower max_peers"), "{e}");
        let few = DomainConfig {
            max_peers: 4,
            ..cfg.clone()
        };
        let s = queue_sizes(&few, &small).unwrap();
        assert_eq!((s.data_sq, s.send_sge), (256, 2));
        let zero = DomainConfig {
            send_queue_depth: 0,
            ..cfg
        };
        assert!(queue_sizes(&zero, &caps()).is_err());
    }

    #[test]
    fn env_overrides() {
        let env: HashMap<&str, &str> = [
            ("STOLON_IB_DEVICE", "mlx5_3"),
            ("STOLON_IB_PORT", "1"),
            ("STOLON_IB_GID_INDEX", "3"),
            ("STOLON_IB_TC", "106"),
            ("STOLON_IB_TIMEOUT", "20"),
        ]
        .into_iter()
        .collect();
        let mut c = DomainConfig::default();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.device.as_deref(), Some("mlx5_3"));
        assert_eq!(c.gid.selector, GidSelector::Index(3));
        assert_eq!(
            (c.qp.traffic_class, c.qp.timeout, c.port),
            (106, 20, Some(1))
        );
        let mut c = DomainConfig::default();
        let bad = c.apply_env(|k| (k == "STOLON_IB_TIMEOUT").then(|| "40".to_string()));
        assert!(matches!(bad, Err(Error::Config(_))));
        let mut c = DomainConfig::default();
        assert!(c
            .apply_env(|k| (k == "STOLON_IB_PORT").then(|| "x".to_string()))
            .is_err());
    }
}
