//! The values that name a port's addresses: [`Gid`], its [`GidType`], one [`GidEntry`] of a
//! port's GID table, and the port's [`LinkLayer`]. Plain data with no policy (choosing a GID
//! is [`crate::gid`]'s job, which re-exports these), so [`crate::error`] can name them without
//! depending on anything above it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::sys;

/// A 128-bit GID, in the byte order it has on the wire (network order).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The all-zero GID (an empty table slot).
    pub const ZERO: Gid = Gid([0; 16]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// The GID read as an IPv6 address.
    pub fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }

    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4_mapped(&self) -> Option<Ipv4Addr> {
        let b = &self.0;
        if b[..10] == [0; 10] && b[10] == 0xff && b[11] == 0xff {
            Some(Ipv4Addr::new(b[12], b[13], b[14], b[15]))
        } else {
            None
        }
    }

    /// The IP address this GID stands for on RoCE: IPv4 when mapped, else IPv6.
    pub fn ip(&self) -> IpAddr {
        match self.ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(self.to_ipv6()),
        }
    }

    /// Whether this is an IPv6 link-local GID (`fe80::/10`), which is not routable.
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && (self.0[1] & 0xc0) == 0x80
    }

    /// The GID a RoCE port derives from an IP address.
    pub fn from_ip(ip: IpAddr) -> Gid {
        match ip {
            IpAddr::V4(v4) => Gid(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => Gid(v6.octets()),
        }
    }

    pub fn to_sys(self) -> sys::ibv_gid {
        sys::ibv_gid::from_raw(self.0)
    }

    pub fn from_sys(g: &sys::ibv_gid) -> Gid {
        Gid(g.raw())
    }
}

impl std::fmt::Display for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The colon-separated 16-bit groups that `ibv_devinfo -v` and sysfs print.
        let b = &self.0;
        for i in 0..8 {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", b[2 * i], b[2 * i + 1])?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Gid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// `enum ibv_gid_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GidType {
    /// InfiniBand.
    Ib,
    /// RoCE v1: Ethernet frames, not routable.
    RoceV1,
    /// RoCE v2: UDP/IP, routable.
    RoceV2,
}

impl GidType {
    pub fn from_sys(t: u32) -> Option<Self> {
        match t {
            sys::IBV_GID_TYPE_IB => Some(GidType::Ib),
            sys::IBV_GID_TYPE_ROCE_V1 => Some(GidType::RoceV1),
            sys::IBV_GID_TYPE_ROCE_V2 => Some(GidType::RoceV2),
            _ => None,
        }
    }

    /// Parses sysfs `ports/<p>/gid_attrs/types/<i>` ("IB/RoCE v1", "RoCE v2"). On an
    /// InfiniBand port "IB/RoCE v1" means IB.
    pub fn from_sysfs(text: &str, link: LinkLayer) -> Option<Self> {
        match text.trim() {
            "RoCE v2" => Some(GidType::RoceV2),
            "IB/RoCE v1" | "RoCE v1" | "IB" => Some(match link {
                LinkLayer::InfiniBand => GidType::Ib,
                LinkLayer::Ethernet => GidType::RoceV1,
            }),
            _ => None,
        }
    }
}

impl std::fmt::Display for GidType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GidType::Ib => "IB",
            GidType::RoceV1 => "RoCE v1",
            GidType::RoceV2 => "RoCE v2",
        })
    }
}

/// The link layer of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE.
    Ethernet,
}

impl LinkLayer {
    /// From `ibv_port_attr::link_layer`; "unspecified" (old kernels) means InfiniBand, as in
    /// libibverbs.
    pub fn from_sys(l: u8) -> Option<Self> {
        match l {
            sys::IBV_LINK_LAYER_UNSPECIFIED | sys::IBV_LINK_LAYER_INFINIBAND => {
                Some(LinkLayer::InfiniBand)
            }
            sys::IBV_LINK_LAYER_ETHERNET => Some(LinkLayer::Ethernet),
            _ => None,
        }
    }

    pub fn to_sys(self) -> u8 {
        match self {
            LinkLayer::InfiniBand => sys::IBV_LINK_LAYER_INFINIBAND,
            LinkLayer::Ethernet => sys::IBV_LINK_LAYER_ETHERNET,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet (RoCE)",
        }
    }
}

/// One entry of a port's GID table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: Gid,
    pub gid_type: GidType,
    /// Interface index of the netdev behind the GID (RoCE); 0 when none.
    pub ifindex: u32,
}

impl std::fmt::Display for GidEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {} {}", self.index, self.gid, self.gid_type)?;
        if self.gid_type != GidType::Ib {
            write!(f, " ({})", self.gid.ip())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Gid {
        Gid::from_ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn link_local() -> Gid {
        Gid::from_ip("fe80::1e34:daff:fe5a:1234".parse().unwrap())
    }

    #[test]
    fn gid_text_and_ip_forms() {
        let g = v4(192, 168, 1, 2);
        assert_eq!(g.to_string(), "0000:0000:0000:0000:0000:ffff:c0a8:0102");
        assert_eq!(g.ip(), "192.168.1.2".parse::<IpAddr>().unwrap());
        assert!(link_local().is_link_local());
        assert!(!g.is_link_local());
        assert_eq!(Gid::from_sys(&g.to_sys()), g);
    }

    #[test]
    fn sysfs_types() {
        assert_eq!(
            GidType::from_sysfs("RoCE v2\n", LinkLayer::Ethernet),
            Some(GidType::RoceV2)
        );
        assert_eq!(
            GidType::from_sysfs("IB/RoCE v1", LinkLayer::Ethernet),
            Some(GidType::RoceV1)
        );
        assert_eq!(
            GidType::from_sysfs("IB/RoCE v1", LinkLayer::InfiniBand),
            Some(GidType::Ib)
        );
        assert_eq!(GidType::from_sysfs("bogus", LinkLayer::InfiniBand), None);
        assert_eq!(LinkLayer::from_sys(0), Some(LinkLayer::InfiniBand));
        assert_eq!(LinkLayer::from_sys(2), Some(LinkLayer::Ethernet));
        assert_eq!(LinkLayer::from_sys(9), None);
    }

    proptest! {
        #[test]
        fn ip_round_trips_through_gid(a in any::<[u8; 4]>(), b in any::<[u8; 16]>()) {
            let ip4 = IpAddr::V4(Ipv4Addr::from(a));
            prop_assert_eq!(Gid::from_ip(ip4).ip(), ip4);
            let g = Gid(b);
            prop_assert_eq!(Gid::from_ip(g.ip()), g);
        }
    }
}
