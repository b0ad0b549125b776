//! What travels outside the RDMA fabric for the `verbs-rc` backend: the endpoint name a domain
//! publishes in the engine's address, and the UDP datagram that carries one connection-handshake
//! message between two domains. Both are pure byte formats, decoded as untrusted input.
//!
//! # Endpoint name (`DomainAddr::name`)
//! | off | field |
//! |----:|-------|
//! | 0 | magic `STVR` |
//! | 4 | version (1), address family (4 or 6) |
//! | 6 | UDP port of the handshake socket (u16) |
//! | 8 | instance (u64): random per opened domain, so a restarted peer is a new endpoint |
//! | 16 | IP address (4 or 16 bytes) |
//!
//! # Datagram
//! | off | field |
//! |----:|-------|
//! | 0 | magic `STVD` |
//! | 4 | version (1), reserved (0) |
//! | 6 | length of the sender's endpoint name (u16) |
//! | 8 | instance of the receiver it is meant for (u64) |
//! | 16 | the sender's endpoint name |
//! | .. | one handshake message ([`stolon_verbs::handshake::MESSAGE_LEN`] bytes) |
//! | .. | CRC32 of everything before |
//!
//! The receiver drops a datagram meant for another instance (a restarted process that got the
//! same UDP port) and one that fails any check; the handshake's retries cover the loss.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{Error, Result};
use stolon_verbs::handshake::MESSAGE_LEN;

const NAME_MAGIC: &[u8; 4] = b"STVR";
const DGRAM_MAGIC: &[u8; 4] = b"STVD";
const VERSION: u8 = 1;
/// Largest endpoint name (IPv6).
pub(crate) const MAX_NAME: usize = 32;
/// Largest datagram.
pub(crate) const MAX_DATAGRAM: usize = 16 + MAX_NAME + MESSAGE_LEN + 4;

fn bad(what: &'static str, why: impl Into<String>) -> Error {
    Error::Decode {
        what,
        why: why.into(),
    }
}

/// Where a `verbs-rc` domain takes handshake datagrams, and which opening of it this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EndpointName {
    pub addr: SocketAddr,
    pub instance: u64,
}

impl EndpointName {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_NAME);
        b.extend_from_slice(NAME_MAGIC);
        b.push(VERSION);
        b.push(if self.addr.is_ipv4() { 4 } else { 6 });
        b.extend_from_slice(&self.addr.port().to_le_bytes());
        b.extend_from_slice(&self.instance.to_le_bytes());
        match self.addr.ip() {
            IpAddr::V4(v4) => b.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b.extend_from_slice(&v6.octets()),
        }
        b
    }

    /// # Errors
    /// [`Error::Decode`] for anything but a well-formed name.
    pub(crate) fn decode(b: &[u8]) -> Result<Self> {
        const W: &str = "verbs-rc endpoint name";
        if b.len() < 20 || &b[..4] != NAME_MAGIC {
            return Err(bad(W, "not a verbs-rc endpoint name"));
        }
        if b[4] != VERSION {
            return Err(bad(
                W,
                format!("version {} (this build speaks {VERSION})", b[4]),
            ));
        }
        let port = u16::from_le_bytes([b[6], b[7]]);
        let instance = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let ip = match (b[5], b.len()) {
            (4, 20) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&b[16..20]).unwrap())),
            (6, 32) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[16..32]).unwrap())),
            (f, n) => return Err(bad(W, format!("family {f} with {n} bytes"))),
        };
        if port == 0 || instance == 0 || ip.is_unspecified() {
            return Err(bad(W, "port, instance and address must be set"));
        }
        Ok(EndpointName {
            addr: SocketAddr::new(ip, port),
            instance,
        })
    }
}

/// One handshake message from `from` to the domain opened as `to_instance`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Datagram {
    pub to_instance: u64,
    pub from: EndpointName,
    pub message: [u8; MESSAGE_LEN],
}

impl Datagram {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let name = self.from.encode();
        let mut b = Vec::with_capacity(MAX_DATAGRAM);
        b.extend_from_slice(DGRAM_MAGIC);
        b.push(VERSION);
        b.push(0);
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.to_instance.to_le_bytes());
        b.extend_from_slice(&name);
        b.extend_from_slice(&self.message);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// # Errors
    /// [`Error::Decode`] for a wrong magic, version, length or CRC, or a bad sender name. The
    /// handshake message itself is checked by the handshake.
    pub(crate) fn decode(b: &[u8]) -> Result<Self> {
        const W: &str = "verbs-rc handshake datagram";
        if b.len() < 20 || &b[..4] != DGRAM_MAGIC {
            return Err(bad(W, "not a verbs-rc handshake datagram"));
        }
        if b[4] != VERSION {
            return Err(bad(
                W,
                format!("version {} (this build speaks {VERSION})", b[4]),
            ));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(bad(W, "CRC mismatch"));
        }
        let n = u16::from_le_bytes([b[6], b[7]]) as usize;
        if n > MAX_NAME || body.len() != 16 + n + MESSAGE_LEN {
            return Err(bad(W, format!("{} bytes with a {n}-byte name", b.len())));
        }
        Ok(Datagram {
            to_instance: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            from: EndpointName::decode(&body[16..16 + n])?,
            message: body[16 + n..].try_into().expect("length checked"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(ip: &str, port: u16, instance: u64) -> EndpointName {
        EndpointName {
            addr: SocketAddr::new(ip.parse().unwrap(), port),
            instance,
        }
    }

    #[test]
    fn names_round_trip_and_reject_defects() {
        for n in [name("10.1.2.3", 4791, 7), name("fe80::1", 1, u64::MAX)] {
            let b = n.encode();
            assert!(b.len() <= MAX_NAME);
            assert_eq!(EndpointName::decode(&b).unwrap(), n);
        }
        let good = name("10.1.2.3", 4791, 7).encode();
        let mut v = good.clone();
        v[4] = 9;
        assert!(EndpointName::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        assert!(EndpointName::decode(&good[..19]).is_err());
        assert!(EndpointName::decode(b"REORDER12345678").is_err());
        assert!(EndpointName::decode(&name("0.0.0.0", 1, 1).encode()).is_err());
        assert!(EndpointName::decode(&name("10.0.0.1", 0, 1).encode()).is_err());
        assert!(EndpointName::decode(&name("10.0.0.1", 1, 0).encode()).is_err());
    }

    proptest! {
        #[test]
        fn datagrams_round_trip_and_any_corruption_is_refused(
            ip in any::<[u8; 4]>().prop_filter("set", |a| *a != [0; 4]),
            port in 1u16..,
            inst in 1u64..,
            to in any::<u64>(),
            msg in prop::collection::vec(any::<u8>(), MESSAGE_LEN),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let d = Datagram {
                to_instance: to,
                from: EndpointName { addr: SocketAddr::new(IpAddr::from(ip), port), instance: inst },
                message: msg.try_into().unwrap(),
            };
            let b = d.encode();
            prop_assert!(b.len() <= MAX_DATAGRAM);
            prop_assert_eq!(Datagram::decode(&b).unwrap(), d);
            let mut c = b.clone();
            let i = flip.index(c.len());
            c[i] ^= 1 << bit;
            prop_assert!(Datagram::decode(&c).is_err());
            prop_assert!(Datagram::decode(&b[..b.len() - 1]).is_err());
        }
    }
}
