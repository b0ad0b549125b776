//! Choosing the source GID (and whether to use a GRH) for a port. Pure: the domain reads the
//! GID table and the netdev's addresses, this module decides.
//!
//! * **InfiniBand** routes by LID inside a subnet; a GRH (and so a GID) is needed only across
//!   subnets, on ports that demand it (`IBV_QPF_GRH_REQUIRED`), or when asked for. GID index 0
//!   (subnet prefix + port GUID) is the port's own GID.
//! * **RoCE** (Ethernet link layer) always needs a GRH: the GID is the IP address packets carry.
//!   RoCE v2 (UDP/IP, routable) is preferred; among RoCE v2 GIDs, one whose address is an address
//!   of the port's netdev, then IPv4-mapped over global IPv6 over link-local IPv6 (or the other
//!   way round when IPv6 is preferred), then the lowest index. An index or an IP address in the
//!   configuration overrides the choice.

use std::net::IpAddr;

pub use crate::addr::{Gid, GidEntry, GidType, LinkLayer};
use crate::error::{Error, Result};

/// How the GID is chosen.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum GidSelector {
    /// Let [`select_gid`] decide.
    #[default]
    Auto,
    /// This table index (`STOLON_IB_GID_INDEX`-style override).
    Index(u32),
    /// The GID carrying this IP address (RoCE).
    Ip(IpAddr),
}

/// Which address family to prefer among RoCE v2 GIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FamilyPreference {
    /// IPv4-mapped first (what most RoCE fabrics are configured for).
    #[default]
    Ipv4,
    /// Global IPv6 first.
    Ipv6,
}

/// The knobs of GID selection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GidPolicy {
    pub selector: GidSelector,
    pub family: FamilyPreference,
    /// Accept RoCE v1 GIDs when no RoCE v2 GID exists (v1 is not routable: one L2 domain only).
    pub allow_roce_v1: bool,
    /// Put a GRH on InfiniBand packets too (needed across IB subnets).
    pub ib_use_grh: bool,
}

/// What [`select_gid`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GidChoice {
    /// `ah_attr.grh.sgid_index`.
    pub index: u8,
    /// Our GID, sent to the peer (it becomes the peer's `dgid`). Zero on an IB port without a
    /// readable GID table.
    pub gid: Gid,
    pub gid_type: GidType,
    /// Whether QPs of this port put a GRH on packets (`ah_attr.is_global`).
    pub use_grh: bool,
}

fn index_u8(e: &GidEntry, table: &[GidEntry]) -> Result<u8> {
    u8::try_from(e.index).map_err(|_| Error::GidIndexNotUsable {
        index: e.index,
        why: "sgid_index must fit in 8 bits".into(),
        available: table.to_vec(),
    })
}

/// Chooses the source GID for a port.
///
/// `netdev_addrs` are the IP addresses of the port's netdev (RoCE; may be empty when unknown);
/// `grh_required` is `IBV_QPF_GRH_REQUIRED` from the port attributes.
///
/// # Errors
/// [`Error::NoUsableGid`], [`Error::GidIndexNotUsable`] or [`Error::GidIpNotFound`], each with
/// the table, so the message shows what there was to choose from.
pub fn select_gid(
    link: LinkLayer,
    table: &[GidEntry],
    netdev_addrs: &[IpAddr],
    policy: &GidPolicy,
    grh_required: bool,
) -> Result<GidChoice> {
    match link {
        LinkLayer::InfiniBand => select_ib(table, policy, grh_required),
        LinkLayer::Ethernet => select_roce(table, netdev_addrs, policy),
    }
}

fn select_ib(table: &[GidEntry], policy: &GidPolicy, grh_required: bool) -> Result<GidChoice> {
    let use_grh = policy.ib_use_grh || grh_required;
    let entry =
        match &policy.selector {
            GidSelector::Ip(ip) => {
                return Err(Error::GidIpNotFound {
                    ip: *ip,
                    available: table.to_vec(),
                });
            }
            GidSelector::Index(i) => {
                let e = table.iter().find(|e| e.index == *i).ok_or_else(|| {
                    Error::GidIndexNotUsable {
                        index: *i,
                        why: "no such entry".into(),
                        available: table.to_vec(),
                    }
                })?;
                if e.gid.is_zero() {
                    return Err(Error::GidIndexNotUsable {
                        index: *i,
                        why: "the entry is empty".into(),
                        available: table.to_vec(),
                    });
                }
                Some(e)
            }
            GidSelector::Auto => table
                .iter()
                .filter(|e| !e.gid.is_zero())
                .min_by_key(|e| (e.index != 0, e.index)),
        };
    match entry {
        Some(e) => Ok(GidChoice {
            index: index_u8(e, table)?,
            gid: e.gid,
            gid_type: e.gid_type,
            use_grh,
        }),
        None if use_grh => Err(Error::NoUsableGid {
            link: LinkLayer::InfiniBand.name(),
            why: "a GRH is required but the port has no GID".into(),
            available: table.to_vec(),
        }),
        // LID routing needs no GID.
        None => Ok(GidChoice {
            index: 0,
            gid: Gid::ZERO,
            gid_type: GidType::Ib,
            use_grh: false,
        }),
    }
}

/// The sort key of a RoCE candidate: lower is better.
fn roce_rank(e: &GidEntry, netdev_addrs: &[IpAddr], family: FamilyPreference) -> (u8, u8, u8, u32) {
    let version = match e.gid_type {
        GidType::RoceV2 => 0,
        _ => 1,
    };
    let on_netdev = if netdev_addrs.is_empty() || netdev_addrs.contains(&e.gid.ip()) {
        0
    } else {
        1
    };
    let fam = if e.gid.is_link_local() {
        2
    } else {
        match (e.gid.ipv4_mapped().is_some(), family) {
            (true, FamilyPreference::Ipv4) | (false, FamilyPreference::Ipv6) => 0,
            _ => 1,
        }
    };
    (version, on_netdev, fam, e.index)
}

fn select_roce(
    table: &[GidEntry],
    netdev_addrs: &[IpAddr],
    policy: &GidPolicy,
) -> Result<GidChoice> {
    let link = LinkLayer::Ethernet.name();
    let usable = |e: &&GidEntry| {
        !e.gid.is_zero()
            && match e.gid_type {
                GidType::RoceV2 => true,
                GidType::RoceV1 => policy.allow_roce_v1,
                GidType::Ib => false,
            }
    };
    let entry =
        match &policy.selector {
            GidSelector::Index(i) => {
                let e = table.iter().find(|e| e.index == *i).ok_or_else(|| {
                    Error::GidIndexNotUsable {
                        index: *i,
                        why: "no such entry".into(),
                        available: table.to_vec(),
                    }
                })?;
                if e.gid.is_zero() {
                    return Err(Error::GidIndexNotUsable {
                        index: *i,
                        why: "the entry is empty".into(),
                        available: table.to_vec(),
                    });
                }
                // An explicit index is honoured whatever its RoCE version.
                e
            }
            GidSelector::Ip(ip) => {
                let want = Gid::from_ip(*ip);
                table
                    .iter()
                    .filter(|e| e.gid == want && e.gid_type != GidType::Ib)
                    .min_by_key(|e| (e.gid_type != GidType::RoceV2, e.index))
                    .ok_or_else(|| Error::GidIpNotFound {
                        ip: *ip,
                        available: table.to_vec(),
                    })?
            }
            GidSelector::Auto => table
                .iter()
                .filter(usable)
                .min_by_key(|e| roce_rank(e, netdev_addrs, policy.family))
                .ok_or_else(|| {
                    let has_v1 = table
                        .iter()
                        .any(|e| !e.gid.is_zero() && e.gid_type == GidType::RoceV1);
                    Error::NoUsableGid {
                        link,
                        why: if has_v1 {
                            "only RoCE v1 GIDs (set allow_roce_v1, or give the port an IP address \
                             so a RoCE v2 GID appears)"
                                .into()
                        } else {
                            "no RoCE v2 GID: the netdev has no IP address".into()
                        },
                        available: table.to_vec(),
                    }
                })?,
        };
    Ok(GidChoice {
        index: index_u8(entry, table)?,
        gid: entry.gid,
        gid_type: entry.gid_type,
        use_grh: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Gid {
        Gid::from_ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn e(index: u32, gid: Gid, gid_type: GidType) -> GidEntry {
        GidEntry {
            index,
            gid,
            gid_type,
            ifindex: 3,
        }
    }

    fn link_local() -> Gid {
        Gid::from_ip("fe80::1e34:daff:fe5a:1234".parse().unwrap())
    }

    /// A typical ConnectX RoCE table: link-local v1/v2, then IPv4 v1/v2, then global IPv6.
    fn roce_table() -> Vec<GidEntry> {
        let g6 = Gid::from_ip("2001:db8::5".parse().unwrap());
        vec![
            e(0, link_local(), GidType::RoceV1),
            e(1, link_local(), GidType::RoceV2),
            e(2, v4(10, 0, 0, 5), GidType::RoceV1),
            e(3, v4(10, 0, 0, 5), GidType::RoceV2),
            e(4, g6, GidType::RoceV1),
            e(5, g6, GidType::RoceV2),
        ]
    }

    #[test]
    fn roce_prefers_v2_ipv4_of_the_netdev() {
        let addrs = ["10.0.0.5".parse().unwrap()];
        let c = select_gid(
            LinkLayer::Ethernet,
            &roce_table(),
            &addrs,
            &GidPolicy::default(),
            false,
        )
        .unwrap();
        assert_eq!((c.index, c.gid_type, c.use_grh), (3, GidType::RoceV2, true));
    }

    #[test]
    fn roce_ipv6_preference_and_link_local_last() {
        let policy = GidPolicy {
            family: FamilyPreference::Ipv6,
            ..Default::default()
        };
        let c = select_gid(LinkLayer::Ethernet, &roce_table(), &[], &policy, false).unwrap();
        assert_eq!(c.index, 5);
        // With only link-local v2 left, it is still chosen rather than failing.
        let t: Vec<_> = roce_table().into_iter().filter(|e| e.index < 2).collect();
        let c = select_gid(LinkLayer::Ethernet, &t, &[], &GidPolicy::default(), false).unwrap();
        assert_eq!(c.index, 1);
    }

    #[test]
    fn roce_prefers_an_address_of_the_netdev() {
        let mut t = roce_table();
        t.push(e(7, v4(172, 16, 0, 9), GidType::RoceV2));
        let addrs = ["172.16.0.9".parse().unwrap()];
        let c = select_gid(
            LinkLayer::Ethernet,
            &t,
            &addrs,
            &GidPolicy::default(),
            false,
        )
        .unwrap();
        assert_eq!(c.index, 7);
    }

    #[test]
    fn roce_overrides() {
        let t = roce_table();
        let by_index = GidPolicy {
            selector: GidSelector::Index(2),
            ..Default::default()
        };
        let c = select_gid(LinkLayer::Ethernet, &t, &[], &by_index, false).unwrap();
        assert_eq!((c.index, c.gid_type), (2, GidType::RoceV1));
        let by_ip = GidPolicy {
            selector: GidSelector::Ip("10.0.0.5".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            select_gid(LinkLayer::Ethernet, &t, &[], &by_ip, false)
                .unwrap()
                .index,
            3
        );
        let missing = GidPolicy {
            selector: GidSelector::Ip("10.9.9.9".parse().unwrap()),
            ..Default::default()
        };
        let err = select_gid(LinkLayer::Ethernet, &t, &[], &missing, false).unwrap_err();
        assert!(matches!(err, Error::GidIpNotFound { .. }), "{err}");
        assert!(err.to_string().contains("10.0.0.5"), "{err}");
        let bad = GidPolicy {
            selector: GidSelector::Index(40),
            ..Default::default()
        };
        assert!(matches!(
            select_gid(LinkLayer::Ethernet, &t, &[], &bad, false),
            Err(Error::GidIndexNotUsable { index: 40, .. })
        ));
    }

    #[test]
    fn roce_without_v2_is_an_error_unless_v1_is_allowed() {
        let t: Vec<_> = roce_table()
            .into_iter()
            .filter(|e| e.gid_type == GidType::RoceV1)
            .collect();
        let err =
            select_gid(LinkLayer::Ethernet, &t, &[], &GidPolicy::default(), false).unwrap_err();
        assert!(matches!(err, Error::NoUsableGid { .. }));
        assert!(err.to_string().contains("RoCE v1"), "{err}");
        let allow = GidPolicy {
            allow_roce_v1: true,
            ..Default::default()
        };
        assert_eq!(
            select_gid(LinkLayer::Ethernet, &t, &[], &allow, false)
                .unwrap()
                .index,
            2
        );
        let err =
            select_gid(LinkLayer::Ethernet, &[], &[], &GidPolicy::default(), false).unwrap_err();
        assert!(err.to_string().contains("no RoCE v2 GID"), "{err}");
    }

    #[test]
    fn infiniband_is_lid_routed_unless_grh_is_needed() {
        let port_gid = Gid([
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x0c, 0x42, 0xa1, 0x03, 0, 0x5a, 0x12, 0x34,
        ]);
        let t = vec![e(0, port_gid, GidType::Ib)];
        let c = select_gid(LinkLayer::InfiniBand, &t, &[], &GidPolicy::default(), false).unwrap();
        assert_eq!((c.index, c.gid, c.use_grh), (0, port_gid, false));
        let c = select_gid(LinkLayer::InfiniBand, &t, &[], &GidPolicy::default(), true).unwrap();
        assert!(c.use_grh);
        // No table at all: fine for LID routing, an error when a GRH is needed.
        let c = select_gid(
            LinkLayer::InfiniBand,
            &[],
            &[],
            &GidPolicy::default(),
            false,
        )
        .unwrap();
        assert_eq!((c.gid, c.use_grh), (Gid::ZERO, false));
        let grh = GidPolicy {
            ib_use_grh: true,
            ..Default::default()
        };
        assert!(matches!(
            select_gid(LinkLayer::InfiniBand, &[], &[], &grh, false),
            Err(Error::NoUsableGid { .. })
        ));
        let ip = GidPolicy {
            selector: GidSelector::Ip("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        assert!(select_gid(LinkLayer::InfiniBand, &t, &[], &ip, false).is_err());
    }

    fn arb_entry() -> impl Strategy<Value = GidEntry> {
        (
            0u32..300,
            prop_oneof![
                any::<[u8; 4]>().prop_map(|b| v4(b[0], b[1], b[2], b[3])),
                any::<[u8; 16]>().prop_map(Gid),
                Just(Gid::ZERO),
                Just(link_local()),
            ],
            prop_oneof![
                Just(GidType::RoceV1),
                Just(GidType::RoceV2),
                Just(GidType::Ib)
            ],
        )
            .prop_map(|(index, gid, gid_type)| GidEntry {
                index,
                gid,
                gid_type,
                ifindex: 1,
            })
    }

    proptest! {
        /// Auto selection on RoCE picks a non-zero RoCE v2 GID whenever one exists, and no other
        /// usable v2 GID ranks strictly better; it fails only when none exists.
        #[test]
        fn roce_auto_choice_is_the_best_v2(
            table in proptest::collection::vec(arb_entry(), 0..12),
            pick in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
        ) {
            let addrs: Vec<IpAddr> = pick.iter().filter(|_| !table.is_empty())
                .map(|i| i.get(&table).gid.ip()).collect();
            let fits = |e: &GidEntry| e.index < 256;
            let policy = GidPolicy::default();
            let got = select_gid(LinkLayer::Ethernet, &table, &addrs, &policy, false);
            let best = table.iter()
                .filter(|e| !e.gid.is_zero() && e.gid_type == GidType::RoceV2)
                .min_by_key(|e| roce_rank(e, &addrs, policy.family));
            match (got, best) {
                (Ok(c), Some(b)) => {
                    prop_assert!(fits(b));
                    prop_assert_eq!(c.index as u32, b.index);
                    prop_assert_eq!(c.gid_type, GidType::RoceV2);
                    prop_assert!(c.use_grh);
                    prop_assert!(!c.gid.is_zero());
                }
                (Err(Error::GidIndexNotUsable { .. }), Some(b)) => prop_assert!(!fits(b)),
                (Err(Error::NoUsableGid { .. }), None) => {}
                (other, b) => prop_assert!(false, "got {:?} for best {:?}", other, b),
            }
        }

    }
}
