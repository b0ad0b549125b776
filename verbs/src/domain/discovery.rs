//! Finding devices and ports: what libibverbs and sysfs say about each device, its ports and
//! their GID tables, as plain data ([`DeviceInfo`]), and the choice of a port among them.

use std::ffi::{c_int, CStr};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Errno, Error, PortSummary, Result};
use crate::gid::{Gid, GidEntry, GidType, LinkLayer};
use crate::qp::Mtu;
use crate::sys::{self, LibIbverbs};

use super::resources::Context;

// ---------------------------------------------------------------------------------------------
// Discovery results (plain data).

/// `enum ibv_port_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Other(u32),
}

impl PortState {
    pub fn from_sys(v: u32) -> Self {
        match v {
            sys::IBV_PORT_DOWN => PortState::Down,
            sys::IBV_PORT_INIT => PortState::Init,
            sys::IBV_PORT_ARMED => PortState::Armed,
            sys::IBV_PORT_ACTIVE => PortState::Active,
            sys::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Other(other),
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, PortState::Active | PortState::ActiveDefer)
    }

    pub fn name(self) -> String {
        match self {
            PortState::Down => "DOWN".into(),
            PortState::Init => "INIT (no subnet manager?)".into(),
            PortState::Armed => "ARMED".into(),
            PortState::Active => "ACTIVE".into(),
            PortState::ActiveDefer => "ACTIVE_DEFER".into(),
            PortState::Other(v) => format!("state {v}"),
        }
    }
}

/// One port of a device.
#[derive(Clone, Debug, PartialEq)]
pub struct PortInfo {
    pub port: u8,
    pub state: PortState,
    pub link_layer: LinkLayer,
    pub active_mtu: Mtu,
    pub lid: u16,
    pub active_speed: u8,
    pub active_width: u8,
    /// Link speed from speed × width, when both codes are known.
    pub gbps: Option<f64>,
    /// Largest message (`max_msg_sz`).
    pub max_msg_size: u32,
    /// `IBV_QPF_GRH_REQUIRED`.
    pub grh_required: bool,
    pub gid_table: Vec<GidEntry>,
    /// The Ethernet netdev behind a RoCE port (or the IPoIB one), when known.
    pub netdev: Option<String>,
}

/// The device limits stolon sizes its queues by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_qp_rd_atom: i32,
    pub max_qp_init_rd_atom: i32,
    pub max_mr_size: u64,
}

impl DeviceCaps {
    fn from_sys(a: &sys::ibv_device_attr) -> Self {
        let u = |v: c_int| v.max(0) as u32;
        DeviceCaps {
            max_qp_wr: u(a.max_qp_wr),
            max_sge: u(a.max_sge),
            max_cqe: u(a.max_cqe),
            max_srq_wr: u(a.max_srq_wr),
            max_srq_sge: u(a.max_srq_sge),
            max_qp_rd_atom: a.max_qp_rd_atom,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom,
            max_mr_size: a.max_mr_size,
        }
    }
}

/// One RDMA device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `mlx5_0`.
    pub name: String,
    /// PCI address (`0000:17:00.0`), from the realpath of `/sys/class/infiniband/<dev>/device`.
    pub pci_address: Option<String>,
    pub fw_version: String,
    /// Node GUID in host order.
    pub node_guid: u64,
    pub caps: DeviceCaps,
    pub ports: Vec<PortInfo>,
}

/// Per-lane data rate of `active_speed` codes, in Gbit/s (nominal, after encoding).
fn lane_gbps(speed: u8) -> Option<f64> {
    Some(match speed {
        1 => 2.5,     // SDR
        2 => 5.0,     // DDR
        4 => 10.0,    // QDR
        8 => 10.0,    // FDR10
        16 => 14.0,   // FDR
        32 => 25.0,   // EDR
        64 => 50.0,   // HDR
        128 => 100.0, // NDR
        _ => return None,
    })
}

/// Lanes of `active_width` codes.
fn lanes(width: u8) -> Option<u32> {
    Some(match width {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => return None,
    })
}

/// Link speed in Gbit/s from `active_speed` and `active_width` (e.g. HDR × 4 = 200).
pub fn link_speed_gbps(active_speed: u8, active_width: u8) -> Option<f64> {
    Some(lane_gbps(active_speed)? * lanes(active_width)? as f64)
}

/// The PCI address at the end of a device's canonical sysfs path.
pub fn pci_address(canonical: &Path) -> Option<String> {
    let last = canonical.file_name()?.to_str()?;
    let b = last.as_bytes();
    // dddd:bb:dd.f
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit());
    ok.then(|| last.to_string())
}

/// Picks the device and port: the named ones, else the first ACTIVE port (of the wanted link
/// layer, if given), in device order.
///
/// # Errors
/// [`Error::DeviceNotFound`], [`Error::PortUnusable`] or [`Error::NoActivePort`] listing every
/// port seen.
pub fn choose_port(
    devices: &[DeviceInfo],
    device: Option<&str>,
    port: Option<u8>,
    link: Option<LinkLayer>,
) -> Result<(usize, usize)> {
    let candidates: Vec<usize> = match device {
        Some(name) => {
            let i = devices.iter().position(|d| d.name == name).ok_or_else(|| {
                Error::DeviceNotFound {
                    name: name.to_string(),
                    available: devices.iter().map(|d| d.name.clone()).collect(),
                }
            })?;
            vec![i]
        }
        None => (0..devices.len()).collect(),
    };
    if let (Some(name), Some(p)) = (device, port) {
        let d = &devices[candidates[0]];
        let pi = d
            .ports
            .iter()
            .position(|x| x.port == p)
            .ok_or_else(|| Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: format!("the device has ports 1..={}", d.ports.len()),
            })?;
        let info = &d.ports[pi];
        if !info.state.is_active() {
            return Err(Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: info.state.name(),
            });
        }
        if let Some(l) = link.filter(|l| *l != info.link_layer) {
            return Err(Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: format!("link layer is {}, not {}", info.link_layer.name(), l.name()),
            });
        }
        return Ok((candidates[0], pi));
    }
    for &di in &candidates {
        for (pi, p) in devices[di].ports.iter().enumerate() {
            if p.state.is_active()
                && port.map_or(true, |want| want == p.port)
                && link.map_or(true, |l| l == p.link_layer)
            {
                return Ok((di, pi));
            }
        }
    }
    let found = candidates
        .iter()
        .flat_map(|&di| {
            devices[di].ports.iter().map(move |p| PortSummary {
                device: devices[di].name.clone(),
                port: p.port,
                state: p.state.name(),
                link_layer: p.link_layer.name().to_string(),
            })
        })
        .collect();
    Err(Error::NoActivePort { found })
}

// ---------------------------------------------------------------------------------------------
// Reading devices, ports and GID tables.

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libibverbs strings are NUL-terminated and outlive this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn sysfs_dev(name: &str) -> std::path::PathBuf {
    Path::new("/sys/class/infiniband").join(name)
}

pub(super) fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as std::ffi::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    (!p.is_null()).then(|| cstr(buf.as_ptr()))
}

fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: c is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// IP addresses of the named interfaces (`getifaddrs`).
pub fn interface_addrs(names: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || !names.iter().any(|n| *n == cstr(ifa.ifa_name)) {
            continue;
        }
        // SAFETY: ifa_addr is non-null; its family says which sockaddr it is.
        unsafe {
            match (*ifa.ifa_addr).sa_family as c_int {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(IpAddr::from(a.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Reads a port's GID table: `_ibv_query_gid_ex` (type and netdev included) when exported,
/// else `ibv_query_gid` with the type and netdev from sysfs.
///
/// # Safety
/// `ctx` must be a live context of `lib`.
unsafe fn read_gid_table(
    lib: &LibIbverbs,
    ctx: *mut sys::ibv_context,
    dev: &str,
    port: u8,
    len: i32,
    link: LinkLayer,
) -> Vec<GidEntry> {
    let attrs = sysfs_dev(dev)
        .join("ports")
        .join(port.to_string())
        .join("gid_attrs");
    let mut out = Vec::new();
    for i in 0..len.max(0) as u32 {
        if let Some(q) = lib.query_gid_ex {
            let mut e = sys::ibv_gid_entry::default();
            // SAFETY: ctx is live (caller); e is a writable entry of the size passed.
            let rc = unsafe {
                q(
                    ctx,
                    port as u32,
                    i,
                    &mut e,
                    0,
                    std::mem::size_of::<sys::ibv_gid_entry>(),
                )
            };
            if rc == 0 {
                let gid = Gid::from_sys(&e.gid);
                let default_type = if link == LinkLayer::InfiniBand {
                    GidType::Ib
                } else {
                    GidType::RoceV1
                };
                if !gid.is_zero() {
                    out.push(GidEntry {
                        index: i,
                        gid,
                        gid_type: GidType::from_sys(e.gid_type).unwrap_or(default_type),
                        ifindex: e.ndev_ifindex,
                    });
                }
                continue;
            }
            if rc == libc::ENODATA || rc == libc::EINVAL {
                continue; // an empty slot
            }
            // Anything else (an old kernel without the ioctl): fall back below.
        }
        let mut g = sys::ibv_gid::default();
        // SAFETY: ctx is live (caller); g is a writable ibv_gid.
        if unsafe { (lib.query_gid)(ctx, port, i as c_int, &mut g) } != 0 {
            continue;
        }
        let gid = Gid::from_sys(&g);
        if gid.is_zero() {
            continue;
        }
        let read = |what: &str| std::fs::read_to_string(attrs.join(what).join(i.to_string())).ok();
        let gid_type = read("types")
            .and_then(|t| GidType::from_sysfs(&t, link))
            .unwrap_or(if link == LinkLayer::InfiniBand {
                GidType::Ib
            } else {
                GidType::RoceV1
            });
        let ifx = read("ndevs").map(|n| ifindex(n.trim())).unwrap_or(0);
        out.push(GidEntry {
            index: i,
            gid,
            gid_type,
            ifindex: ifx,
        });
    }
    out
}

/// Queries a device's attributes and ports.
///
/// # Safety
/// `ctx` must be a live context of `lib` for the device named `name`.
///
/// # Errors
/// [`Error::Verbs`] when the device or a port cannot be queried.
unsafe fn probe(lib: &LibIbverbs, ctx: *mut sys::ibv_context, name: &str) -> Result<DeviceInfo> {
    let mut attr = sys::ibv_device_attr::default();
    // SAFETY: ctx is live (caller); attr is writable.
    let rc = unsafe { (lib.query_device)(ctx, &mut attr) };
    if rc != 0 {
        return Err(Error::verbs("ibv_query_device", rc));
    }
    let mut ports = Vec::new();
    for p in 1..=attr.phys_port_cnt {
        let mut pa = sys::ibv_port_attr::default();
        // SAFETY: ctx is live (caller).
        let rc = unsafe { sys::query_port(lib, ctx, p, &mut pa) };
        if rc != 0 {
            return Err(Error::verbs("ibv_query_port", rc));
        }
        let link = LinkLayer::from_sys(pa.link_layer).unwrap_or(LinkLayer::InfiniBand);
        // SAFETY: ctx is live (caller).
        let gid_table = unsafe { read_gid_table(lib, ctx, name, p, pa.gid_tbl_len, link) };
        let netdev = gid_table
            .iter()
            .find(|e| e.ifindex != 0)
            .and_then(|e| ifname(e.ifindex))
            .or_else(|| {
                let d = sysfs_dev(name)
                    .join("ports")
                    .join(p.to_string())
                    .join("gid_attrs/ndevs/0");
                std::fs::read_to_string(d)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            });
        ports.push(PortInfo {
            port: p,
            state: PortState::from_sys(pa.state),
            link_layer: link,
            active_mtu: Mtu::from_sys(pa.active_mtu).unwrap_or(Mtu::M1024),
            lid: pa.lid,
            active_speed: pa.active_speed,
            active_width: pa.active_width,
            gbps: link_speed_gbps(pa.active_speed, pa.active_width),
            max_msg_size: pa.max_msg_sz,
            grh_required: pa.flags & sys::IBV_QPF_GRH_REQUIRED != 0,
            gid_table,
            netdev,
        });
    }
    let fw = attr
        .fw_ver
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    Ok(DeviceInfo {
        name: name.to_string(),
        pci_address: std::fs::canonicalize(sysfs_dev(name).join("device"))
            .ok()
            .and_then(|p| pci_address(&p)),
        fw_version: fw,
        node_guid: u64::from_be(attr.node_guid),
        caps: DeviceCaps::from_sys(&attr),
        ports,
    })
}

/// Why libibverbs reports no device, in words.
fn no_device_detail(lib: &LibIbverbs, errno: Option<Errno>) -> String {
    let class = Path::new("/sys/class/infiniband");
    let sysfs = match std::fs::read_dir(class) {
        Ok(rd) => {
            let names: Vec<String> = rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            if names.is_empty() {
                "/sys/class/infiniband is empty".to_string()
            } else {
                format!("/sys/class/infiniband lists {} but no userspace provider claimed them (install rdma-core's ibverbs-providers)", names.join(", "))
            }
        }
        Err(_) => "/sys/class/infiniband does not exist: the kernel has no RDMA device (or no ib_core / mlx5_ib module loaded)".to_string(),
    };
    let uverbs = if Path::new("/dev/infiniband").exists() {
        ""
    } else {
        "; /dev/infiniband is missing (in a container, pass the devices through)"
    };
    let call = match errno {
        Some(e) if e.0 == libc::ENOSYS => {
            format!("ibv_get_device_list failed: {e}: the kernel has no RDMA (uverbs) support")
        }
        Some(e) => format!("ibv_get_device_list failed: {e}"),
        None => "ibv_get_device_list returned 0 devices".to_string(),
    };
    format!("{call} (libibverbs from {}); {sysfs}{uverbs}", lib.path)
}

/// The device list, freed on drop.
struct DeviceList<'a> {
    lib: &'a LibIbverbs,
    raw: *mut *mut sys::ibv_device,
    n: usize,
}

impl DeviceList<'_> {
    fn get(&self, i: usize) -> *mut sys::ibv_device {
        assert!(i < self.n);
        // SAFETY: raw holds n device pointers (ibv_get_device_list's contract).
        unsafe { *self.raw.add(i) }
    }
}

impl Drop for DeviceList<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_get_device_list and is freed once; contexts opened from it
        // stay valid (libibverbs keeps opened devices alive).
        unsafe { (self.lib.free_device_list)(self.raw) };
    }
}

fn device_list(lib: &'static LibIbverbs) -> Result<DeviceList<'static>> {
    let mut n: c_int = 0;
    // SAFETY: n is a valid out-parameter.
    let raw = unsafe { (lib.get_device_list)(&mut n) };
    if raw.is_null() {
        let e = Errno::last();
        return Err(Error::NoDevices {
            detail: no_device_detail(lib, Some(e)),
        });
    }
    let list = DeviceList {
        lib,
        raw,
        n: n.max(0) as usize,
    };
    if list.n == 0 {
        return Err(Error::NoDevices {
            detail: no_device_detail(lib, None),
        });
    }
    Ok(list)
}

/// Lists every RDMA device with its ports and GID tables.
///
/// # Errors
/// [`Error::LibraryNotFound`] with the paths tried, or [`Error::NoDevices`] saying why there are
/// none.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    Ok(open_all()?.into_iter().map(|(_, d)| d).collect())
}

pub(super) fn open_all() -> Result<Vec<(Arc<Context>, DeviceInfo)>> {
    let lib = sys::lib()?;
    let list = device_list(lib)?;
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for i in 0..list.n {
        let dev = list.get(i);
        // SAFETY: dev is a device of the live list.
        let name = cstr(unsafe { (lib.get_device_name)(dev) });
        // SAFETY: as above.
        let raw = unsafe { (lib.open_device)(dev) };
        if raw.is_null() {
            failures.push(format!("{name}: ibv_open_device: {}", Errno::last()));
            continue;
        }
        let ctx = Arc::new(Context { lib, raw });
        // SAFETY: ctx.raw is the live context just opened for `name`.
        match unsafe { probe(lib, ctx.raw, &name) } {
            Ok(info) => out.push((ctx, info)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if out.is_empty() {
        return Err(Error::NoDevices {
            detail: format!("no device could be opened: {}", failures.join("; ")),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn port(p: u8, state: PortState, link: LinkLayer) -> PortInfo {
        PortInfo {
            port: p,
            state,
            link_layer: link,
            active_mtu: Mtu::M4096,
            lid: 0,
            active_speed: 64,
            active_width: 2,
            gbps: link_speed_gbps(64, 2),
            max_msg_size: 1 << 30,
            grh_required: false,
            gid_table: Vec::new(),
            netdev: None,
        }
    }

    /// A ConnectX-7-like device's limits (the configuration tests use them too).
    pub(in crate::domain) fn caps() -> DeviceCaps {
        DeviceCaps {
            max_qp_wr: 32768,
            max_sge: 30,
            max_cqe: 4_194_303,
            max_srq_wr: 32767,
            max_srq_sge: 31,
            max_qp_rd_atom: 16,
            max_qp_init_rd_atom: 16,
            max_mr_size: u64::MAX,
        }
    }

    fn dev(name: &str, ports: Vec<PortInfo>) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            pci_address: None,
            fw_version: String::new(),
            node_guid: 0,
            caps: caps(),
            ports,
        }
    }

    #[test]
    fn link_speeds() {
        assert_eq!(link_speed_gbps(64, 2), Some(200.0), "HDR x4");
        assert_eq!(link_speed_gbps(128, 2), Some(400.0), "NDR x4");
        assert_eq!(link_speed_gbps(32, 2), Some(100.0), "EDR x4");
        assert_eq!(link_speed_gbps(128, 16), Some(200.0), "NDR x2");
        assert_eq!(link_speed_gbps(16, 1), Some(14.0), "FDR x1");
        assert_eq!(link_speed_gbps(3, 2), None);
        assert_eq!(link_speed_gbps(64, 3), None);
    }

    #[test]
    fn pci_addresses_from_sysfs_paths() {
        let p = Path::new("/sys/devices/pci0000:16/0000:16:02.0/0000:17:00.0");
        assert_eq!(pci_address(p).as_deref(), Some("0000:17:00.0"));
        assert_eq!(
            pci_address(Path::new("/sys/devices/virtual/net/rxe0")),
            None
        );
    }

    #[test]
    fn port_choice_and_its_errors() {
        let devs = vec![
            dev(
                "mlx5_0",
                vec![port(1, PortState::Down, LinkLayer::InfiniBand)],
            ),
            dev(
                "mlx5_1",
                vec![
                    port(1, PortState::Init, LinkLayer::InfiniBand),
                    port(2, PortState::Active, LinkLayer::Ethernet),
                ],
            ),
        ];
        assert_eq!(choose_port(&devs, None, None, None).unwrap(), (1, 1));
        assert_eq!(
            choose_port(&devs, Some("mlx5_1"), Some(2), None).unwrap(),
            (1, 1)
        );
        let e = choose_port(&devs, None, None, Some(LinkLayer::InfiniBand)).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::NoActivePort { ref found } if found.len() == 3),
            "{text}"
        );
        assert!(text.contains("mlx5_0 port 1 (DOWN, InfiniBand)"), "{text}");
        assert!(text.contains("no subnet manager"), "{text}");
        let e = choose_port(&devs, Some("mlx5_9"), None, None).unwrap_err();
        assert!(e.to_string().contains("mlx5_0, mlx5_1"), "{e}");
        let e = choose_port(&devs, Some("mlx5_0"), Some(1), None).unwrap_err();
        assert!(matches!(e, Error::PortUnusable { .. }), "{e}");
        let e = choose_port(&devs, Some("mlx5_1"), Some(3), None).unwrap_err();
        assert!(e.to_string().contains("ports 1..=2"), "{e}");
        assert!(matches!(
            choose_port(&[], None, None, None),
            Err(Error::NoActivePort { .. })
        ));
    }

    #[test]
    fn loopback_interface_addresses() {
        let addrs = interface_addrs(&["lo".to_string()]);
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
        assert!(interface_addrs(&["no-such-if0".to_string()]).is_empty());
    }
}
