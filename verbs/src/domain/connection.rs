//! Peers of a [`VerbsDomain`]: creating their queue pairs, carrying out their handshakes, and
//! resetting or dropping them when a connection fails.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::handshake::{self, Action, Handshake, LocalStatic, Phase, Step};
use crate::qp::{AnyQp, Qp};
use crate::wr::SendQueue;

use super::event::{DomainEvent, PeerId};
use super::verbs_domain::{Peer, VerbsDomain};

impl VerbsDomain {
    fn ensure_peer(&mut self, peer: PeerId) -> Result<()> {
        if self.peers.contains_key(&peer) {
            return Ok(());
        }
        if self.peers.len() >= self.cfg.max_peers as usize {
            return Err(Error::Config(format!(
                "max_peers = {} reached",
                self.cfg.max_peers
            )));
        }
        let data = self.create_qp(&self.srq_imm.clone(), self.sizes.data_sq)?;
        let msg = self.create_qp(&self.srq_msg.clone(), self.sizes.msg_sq)?;
        self.max_inline = self
            .max_inline
            .min(data.cap.max_inline_data)
            .min(msg.cap.max_inline_data);
        let data_depth = data.cap.max_send_wr.min(self.sizes.data_sq);
        let msg_depth = msg.cap.max_send_wr.min(self.sizes.msg_sq);
        let data = Qp::new(data).init(&self.init)?;
        let msg = Qp::new(msg).init(&self.init)?;
        let port = self.port();
        let local = LocalStatic {
            data_qpn: data.qp_num(),
            msg_qpn: msg.qp_num(),
            lid: port.lid,
            gid: self.gid.gid,
            mtu: port.active_mtu,
            link_layer: port.link_layer,
        };
        self.qpn_to_peer.insert(data.qp_num(), peer);
        self.qpn_to_peer.insert(msg.qp_num(), peer);
        // The first epoch must exceed every epoch an earlier handshake with this peer used, in
        // this process or one before it: the wall clock in ns, kept monotonic here, leaving
        // 2^20 attempts per handshake.
        let epoch = handshake::initial_epoch().max(self.next_epoch);
        self.next_epoch = epoch + (1 << 20);
        let hs = Handshake::new(
            self.cfg.handshake.clone(),
            local,
            epoch,
            self.rng.next_u64(),
        );
        self.peers.insert(
            peer,
            Peer {
                data: Some(AnyQp::Init(data)),
                msg: Some(AnyQp::Init(msg)),
                data_sq: SendQueue::new(data_depth, self.cfg.signal_every),
                // Every message send is signalled: its buffer is released on its completion.
                msg_sq: SendQueue::new(msg_depth, 1),
                hs,
            },
        );
        Ok(())
    }

    /// Starts connecting to `peer` (creating its QPs).
    ///
    /// # Errors
    /// [`Error::Verbs`] when the QPs cannot be created; [`Error::Config`] past `max_peers`.
    pub fn connect(&mut self, peer: PeerId, now: Instant) -> Result<Vec<DomainEvent>> {
        self.ensure_peer(peer)?;
        let step = self
            .peers
            .get_mut(&peer)
            .expect("just ensured")
            .hs
            .start(now);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    /// Handles handshake bytes from `peer` (creating its QPs on first contact).
    ///
    /// # Errors
    /// As for [`Self::connect`].
    pub fn on_handshake(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<DomainEvent>> {
        self.ensure_peer(peer)?;
        let step = self
            .peers
            .get_mut(&peer)
            .expect("just ensured")
            .hs
            .on_bytes(now, bytes);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    /// Drives handshake timers.
    pub fn tick(&mut self, now: Instant) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in ids {
            let step = self.peers.get_mut(&peer).expect("listed").hs.on_tick(now);
            self.apply(peer, step, &mut out);
        }
        out
    }

    /// When [`Self::tick`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.hs.next_deadline())
            .min()
    }

    pub fn is_established(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.hs.phase() == Phase::Established)
    }

    /// Carries out a handshake step.
    fn apply(&mut self, peer: PeerId, step: Step, out: &mut Vec<DomainEvent>) {
        for event in step.events {
            out.push(DomainEvent::Handshake { peer, event });
        }
        for action in step.actions {
            match action {
                Action::Send(m) => out.push(DomainEvent::SendHandshake {
                    peer,
                    bytes: m.encode().to_vec(),
                }),
                Action::Teardown(reason) => {
                    let reason = reason.to_string();
                    let err = Error::ConnectionReset {
                        peer,
                        reason: reason.clone(),
                    };
                    if let Err(e) = self.recycle(peer, &err, out) {
                        self.drop_peer(peer, e, out);
                        return;
                    }
                    out.push(DomainEvent::ConnectionReset { peer, reason });
                }
                Action::Connect(c) => {
                    if let Err(e) = self.connect_qps(peer, &c) {
                        self.drop_peer(peer, e, out);
                        return;
                    }
                }
                Action::Established => out.push(DomainEvent::Established { peer }),
                Action::GiveUp(error) => {
                    self.fail_transfers(peer, &error, out);
                    out.push(DomainEvent::GaveUp { peer, error });
                }
            }
        }
    }

    fn connect_qps(&mut self, peer: PeerId, c: &handshake::Connect) -> Result<()> {
        let attrs = c.attrs(&self.cfg.qp, &self.local_path)?;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        for (slot, (rtr, rts)) in [(&mut p.data, attrs.data), (&mut p.msg, attrs.msg)] {
            let q = slot.take().ok_or(Error::NotConnected(peer))?;
            let (q, r) = q.connect(&rtr, &rts);
            *slot = Some(q);
            r?;
        }
        Ok(())
    }

    /// Fails the peer's transfers and brings both QPs back to INIT.
    fn recycle(&mut self, peer: PeerId, err: &Error, out: &mut Vec<DomainEvent>) -> Result<()> {
        self.fail_transfers(peer, err, out);
        let init = self.init;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        p.data_sq.reset();
        p.msg_sq.reset();
        for slot in [&mut p.data, &mut p.msg] {
            let q = slot.take().ok_or(Error::NotConnected(peer))?;
            let qpn = q.qp_num();
            let (q, r) = q.recycle(&init);
            *slot = Some(q);
            r?;
            self.qp_errors.clear(qpn);
        }
        Ok(())
    }

    /// Destroys a peer's QPs after an unrecoverable error.
    fn drop_peer(&mut self, peer: PeerId, error: Error, out: &mut Vec<DomainEvent>) {
        self.fail_transfers(peer, &error, out);
        if let Some(p) = self.peers.remove(&peer) {
            for q in [p.data, p.msg].into_iter().flatten() {
                self.qpn_to_peer.remove(&q.qp_num());
            }
        }
        out.push(DomainEvent::GaveUp { peer, error });
    }

    /// Forgets `peer`: fails its transfers and destroys its QPs.
    pub fn disconnect(&mut self, peer: PeerId) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        if self.peers.contains_key(&peer) {
            self.drop_peer(peer, Error::NotConnected(peer), &mut out);
        }
        out
    }

    /// Retires every transfer to `peer` (its QPs are being reset or destroyed).
    fn fail_transfers(&mut self, peer: PeerId, error: &Error, out: &mut Vec<DomainEvent>) {
        let (failed, drained) = self.transfers.fail_peer(peer, error);
        for f in failed {
            self.finish(f, out);
        }
        for id in drained {
            self.drained(id, out);
        }
    }

    pub(super) fn local_failure(
        &mut self,
        peer: PeerId,
        e: &Error,
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) {
        if let Some(p) = self.peers.get_mut(&peer) {
            let step = p.hs.local_failure(now, &e.to_string());
            self.apply(peer, step, out);
        }
    }
}
