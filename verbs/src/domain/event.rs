//! What a domain reports to its driver, and how it names peers.

use crate::completion::{self, Finished, TransferId};
use crate::error::Error;
use crate::handshake;

/// A peer, as the engine numbers them.
pub type PeerId = u32;

/// What [`VerbsDomain`](crate::domain::VerbsDomain) reports to its driver.
#[derive(Debug)]
pub enum DomainEvent {
    /// Deliver these handshake bytes to `peer` out of band; hand its answers to
    /// [`VerbsDomain::on_handshake`](crate::domain::VerbsDomain::on_handshake).
    SendHandshake { peer: PeerId, bytes: Vec<u8> },
    /// `peer` is connected both ways; writes and messages may be posted.
    Established { peer: PeerId },
    /// `peer`'s connection was reset (it restarted, or a QP failed); in-flight transfers were
    /// failed and reconnection is under way.
    ConnectionReset { peer: PeerId, reason: String },
    /// The handshake with `peer` gave up.
    GaveUp { peer: PeerId, error: Error },
    /// A transfer finished. When `drained` is false (an early failure or cancellation) some of
    /// its WRs may still be in the send queue: keep its memory until [`DomainEvent::Drained`].
    Finished(Finished),
    /// A transfer reported earlier with `drained: false` has nothing left in any queue.
    Drained(TransferId),
    /// A write with immediate landed (the peer is unknown when its QP was just torn down).
    Imm { peer: Option<PeerId>, imm: u32 },
    /// A message arrived.
    Message {
        peer: Option<PeerId>,
        data: Vec<u8>,
        imm: Option<u32>,
    },
    /// A handshake observation, for logs.
    Handshake {
        peer: PeerId,
        event: handshake::Event,
    },
    /// A completion stolon did not post.
    Stray {
        wr_id: u64,
        status: completion::WcStatus,
    },
}
