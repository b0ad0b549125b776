//! Leases: how a writer learns that a peer's region takes its writes, and how the owner takes
//! that back.
//!
//! A provider cannot be trusted to refuse a bad write cleanly (a stale key on tcp reports success
//! and then kills the connection; on shm and udp later writes hang: `../docs/architecture.md`).
//! So no write leaves a worker for a remote region before the region's owner has confirmed that
//! descriptor, byte for byte, as one of its live registrations:
//!
//! - The writer's worker asks once per distinct descriptor (`LeaseReq`: the descriptor's bytes
//!   and the writer's own address); writes wait ("parked") until the answer. The owner compares
//!   the bytes with what it published at registration: a stale, revoked, forged-length or
//!   unknown-key descriptor never matches and is refused (`LeaseRefused`, with the reason); the
//!   writes fail on the writer with [`crate::Error::Rejected`], and nothing is posted.
//! - Unregistering sends `Revoke` to every holder. A holder stops posting to the region, waits
//!   until each of its writes there has completed (delivered), drops any NVLink mapping of it, and
//!   answers `RevokeAck`. The owner closes the registration, releases the memory and returns from
//!   `unregister()` only then (or after the revoke timeout, for a holder that never answers).
//! - `Bye`: a stopping engine tells every peer it knows, which fail what they have for it at
//!   once (instead of at their transfers' deadlines).
//! - `Landed` acknowledges staged messages: the owner sends it once a staged chunk sits in the
//!   destination's (GPU) memory, or was refused, so a delivered staged write completes only then.
//!
//! The messages travel as ordinary worker messages (header kind `KIND_CTRL`); this module only
//! encodes and decodes them.

/// An op that needs no lease (the peer's scratch region, sends).
pub(crate) const NO_LEASE: u32 = u32::MAX;

/// Control messages between workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ctrl {
    /// Writer -> owner: may `lease` (the writer's index) write through this descriptor?
    LeaseReq {
        lease: u32,
        region: u64,
        desc: Vec<u8>,
        writer: Vec<u8>,
    },
    /// Owner -> writer: yes.
    LeaseOk { lease: u32 },
    /// Owner -> writer: no, and why.
    LeaseRefused { lease: u32, reason: String },
    /// Owner -> writer: the region is being unregistered; drain and answer.
    Revoke { region: u64 },
    /// Writer -> owner: nothing of this writer's is in flight to the region any more.
    RevokeAck { region: u64 },
    /// Owner -> writer: staged chunks `token` landed (true) or were refused (false).
    Landed { entries: Vec<(u64, bool)> },
    /// An engine that is stopping, to every peer it knows: fail what you have for me now.
    Bye,
    /// The answer to `Bye`: nothing more will be sent to the stopping engine (which closes its
    /// endpoint only then, so no peer posts to a closing connection: libfabric 1.17's rxm
    /// crashed doing that).
    ByeAck,
}

const LEASE_REQ: u8 = 1;
const LEASE_OK: u8 = 2;
const LEASE_REFUSED: u8 = 3;
const REVOKE: u8 = 4;
const REVOKE_ACK: u8 = 5;
const LANDED: u8 = 6;
const BYE: u8 = 7;
const BYE_ACK: u8 = 8;

/// Most `Landed` entries in one message (9 bytes each, far below a message buffer).
pub(crate) const MAX_LANDED: usize = 1024;

impl Ctrl {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        match self {
            Ctrl::LeaseReq {
                lease,
                region,
                desc,
                writer,
            } => {
                out.push(LEASE_REQ);
                out.extend_from_slice(&lease.to_le_bytes());
                out.extend_from_slice(&region.to_le_bytes());
                bytes(&mut out, desc);
                bytes(&mut out, writer);
            }
            Ctrl::LeaseOk { lease } => {
                out.push(LEASE_OK);
                out.extend_from_slice(&lease.to_le_bytes());
            }
            Ctrl::LeaseRefused { lease, reason } => {
                out.push(LEASE_REFUSED);
                out.extend_from_slice(&lease.to_le_bytes());
                bytes(&mut out, reason.as_bytes());
            }
            Ctrl::Revoke { region } => {
                out.push(REVOKE);
                out.extend_from_slice(&region.to_le_bytes());
            }
            Ctrl::RevokeAck { region } => {
                out.push(REVOKE_ACK);
                out.extend_from_slice(&region.to_le_bytes());
            }
            Ctrl::Landed { entries } => {
                out.push(LANDED);
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for (token, ok) in entries {
                    out.extend_from_slice(&token.to_le_bytes());
                    out.push(*ok as u8);
                }
            }
            Ctrl::Bye => out.push(BYE),
            Ctrl::ByeAck => out.push(BYE_ACK),
        }
        out
    }

    /// Decodes a message from an untrusted peer; None for anything malformed.
    pub(crate) fn decode(b: &[u8]) -> Option<Ctrl> {
        let mut r = Reader { b, at: 1 };
        let c = match *b.first()? {
            LEASE_REQ => Ctrl::LeaseReq {
                lease: r.u32()?,
                region: r.u64()?,
                desc: r.bytes()?.to_vec(),
                writer: r.bytes()?.to_vec(),
            },
            LEASE_OK => Ctrl::LeaseOk { lease: r.u32()? },
            LEASE_REFUSED => Ctrl::LeaseRefused {
                lease: r.u32()?,
                reason: String::from_utf8_lossy(r.bytes()?).into_owned(),
            },
            REVOKE => Ctrl::Revoke { region: r.u64()? },
            REVOKE_ACK => Ctrl::RevokeAck { region: r.u64()? },
            LANDED => {
                let n = r.u32()? as usize;
                if n > MAX_LANDED {
                    return None;
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let token = r.u64()?;
                    let ok = match r.take(1)?[0] {
                        0 => false,
                        1 => true,
                        _ => return None,
                    };
                    entries.push((token, ok));
                }
                Ctrl::Landed { entries }
            }
            BYE => Ctrl::Bye,
            BYE_ACK => Ctrl::ByeAck,
            _ => return None,
        };
        (r.at == b.len()).then_some(c)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Vec<Ctrl> {
        vec![
            Ctrl::LeaseReq {
                lease: 7,
                region: 1 << 40,
                desc: vec![1, 2, 3],
                writer: vec![9; 300],
            },
            Ctrl::LeaseOk { lease: 3 },
            Ctrl::LeaseRefused {
                lease: 4,
                reason: "region 5 is not registered".into(),
            },
            Ctrl::Revoke { region: 11 },
            Ctrl::RevokeAck { region: 12 },
            Ctrl::Landed {
                entries: vec![(1, true), (u64::MAX, false)],
            },
            Ctrl::Bye,
            Ctrl::ByeAck,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for c in all() {
            assert_eq!(Ctrl::decode(&c.encode()), Some(c));
        }
    }

    #[test]
    fn truncated_or_extended_messages_are_refused() {
        for c in all() {
            let b = c.encode();
            for n in 0..b.len() {
                assert_eq!(Ctrl::decode(&b[..n]), None, "{c:?} cut at {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(Ctrl::decode(&longer), None, "{c:?} with a trailing byte");
        }
        assert_eq!(Ctrl::decode(&[99, 0, 0, 0, 0]), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Ctrl::decode(&b);
        }
    }
}
