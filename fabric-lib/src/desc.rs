//! Engine addresses and memory descriptors, and their byte and text forms.
//!
//! Peers exchange these over any channel (a store, HTTP, a file), so decoding treats its input as
//! untrusted: every length is bounded, a CRC32 trailer catches corruption, and any defect becomes
//! [`Error::Decode`].

use base64::Engine as _;

use crate::error::{Error, Result};

/// Most domains one engine may have.
pub const MAX_DOMAINS: usize = 16;
const MAX_NAME: usize = 1024;
const MAX_PROVIDER: usize = 64;
/// Version written. 3 added the VMM socket to [`NvlinkAddr`] and [`VmmShare`] to [`GpuDesc`];
/// version 2 values still decode (without them), anything else is a [`Error::Decode`].
const VERSION: u8 = 3;
/// Oldest version still decoded.
const MIN_VERSION: u8 = 2;
/// Most physical allocations one shared VMM region may span.
pub const MAX_VMM_CHUNKS: u64 = 1 << 20;
/// Longest VMM socket name (a Unix socket path holds at most 107 bytes).
const MAX_SOCKET_NAME: usize = 107;
const ADDR_MAGIC: &[u8; 4] = b"STad";
const DESC_MAGIC: &[u8; 4] = b"STmd";
const ADDR_TEXT: &str = "stolon-addr1:";
const DESC_TEXT: &str = "stolon-mem1:";

/// How to reach one domain (one NIC endpoint) of an engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainAddr {
    /// Full libfabric provider string, e.g. `tcp;ofi_rxm`.
    pub provider: String,
    /// The endpoint's raw address (`fi_getname`).
    pub name: Vec<u8>,
    /// Remote addresses on this domain are virtual addresses, not offsets.
    pub virt_addr: bool,
    /// Key of the engine's small scratch region that receives immediate-only writes.
    pub scratch_key: u64,
    /// Address of that scratch region (as a remote address: 0 when offsets are used).
    pub scratch_addr: u64,
}

/// How to reach an engine over NVLink (CUDA IPC) from another process on the same host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NvlinkAddr {
    /// Identity of the host (its boot id): NVLink is only tried between equal ids.
    pub host_id: Vec<u8>,
    /// Name of the engine's shared-memory mailbox that receives NVLink immediates.
    pub mailbox: String,
    /// The engine's process id: CUDA IPC is only possible between different processes.
    pub pid: u32,
    /// The engine's Unix socket that hands out VMM allocations as file descriptors
    /// (`@name` for the abstract namespace, else a path); empty when it serves none.
    pub vmm_socket: String,
}

/// The address of an engine: one entry per domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Random identity of the engine instance (a restarted peer gets a new one).
    pub engine_id: u64,
    /// Largest message the engine's receive buffers take.
    pub max_message: u32,
    pub domains: Vec<DomainAddr>,
    /// Present when the engine accepts NVLink writes into its GPU memory.
    pub nvlink: Option<NvlinkAddr>,
}

/// What a peer needs about a GPU region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GpuDesc {
    /// CUDA device ordinal on the owner.
    pub device: u32,
    /// CUDA IPC handle (64 bytes) of the allocation holding the region; empty when the memory
    /// cannot be shared that way.
    pub ipc_handle: Vec<u8>,
    /// Offset of the region's first byte inside that allocation.
    pub ipc_offset: u64,
    /// Registered with the owner's domains (FI_HMEM): fabric writes go straight into it with
    /// the descriptor's keys; otherwise they go through staging.
    pub direct: bool,
    /// Present when the region is CUDA VMM memory the owner can export as file descriptors
    /// (over its `vmm_socket`): NVLink writers map it that way instead of through CUDA IPC.
    pub vmm: Option<VmmShare>,
}

/// How a writer maps a VMM region of another process: the owner's socket hands out the
/// physical allocations behind it as file descriptors to whoever presents `token`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmmShare {
    /// Random secret of the region: only holders of the descriptor get the descriptors.
    pub token: [u8; 16],
    /// Number of physical allocations (mappings) covering the region, in address order.
    pub chunks: u64,
    /// Offset of the region's first byte in the first mapping.
    pub offset: u64,
    /// Total size of those mappings: the writer reserves and maps this much.
    pub span: u64,
}

/// What a peer needs to write into a registered region: owner, bounds and per-domain keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemDesc {
    pub owner: PeerAddr,
    pub region_id: u64,
    /// Virtual address of the first byte on the owner.
    pub base: u64,
    pub len: u64,
    /// Remote key on each of the owner's domains.
    pub keys: Vec<u64>,
    /// Set for GPU memory: over the fabric such a region is written through staging, and over
    /// NVLink through CUDA IPC.
    pub gpu: Option<GpuDesc>,
}

impl MemDesc {
    /// The remote address to post for `offset` bytes into the region on the owner's domain `d`.
    pub fn remote_addr(&self, d: usize, offset: u64) -> u64 {
        if self.owner.domains[d].virt_addr {
            self.base + offset
        } else {
            offset
        }
    }

    /// Checks that `[offset, offset+len)` lies inside the region.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds(format!(
                "remote range [{offset}, {offset}+{len}) exceeds the {}-byte region",
                self.len
            ))),
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(magic: &[u8; 4]) -> Self {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(magic);
        v.push(VERSION);
        Writer(v)
    }
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.0);
        self.0.extend_from_slice(&crc.to_le_bytes());
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
    /// Version of the value being read.
    version: u8,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], magic: &[u8; 4], what: &'static str) -> Result<Self> {
        let err = |why: &str| Error::Decode {
            what,
            why: why.to_string(),
        };
        if buf.len() < 9 {
            return Err(err("too short"));
        }
        if &buf[..4] != magic {
            return Err(err("wrong magic bytes (not a stolon value of this kind)"));
        }
        if !(MIN_VERSION..=VERSION).contains(&buf[4]) {
            return Err(err(&format!(
                "unsupported version {} (this build reads {MIN_VERSION} to {VERSION})",
                buf[4]
            )));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(err("checksum mismatch (corrupted or truncated)"));
        }
        Ok(Reader {
            buf: body,
            pos: 5,
            what,
            version: buf[4],
        })
    }
    fn err(&self, why: String) -> Error {
        Error::Decode {
            what: self.what,
            why,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format!("truncated at byte {}", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(self.err(format!("field of {n} bytes exceeds {max}")));
        }
        self.take(n)
    }
    fn end(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.err(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

impl PeerAddr {
    fn write(&self, w: &mut Writer) {
        w.u64(self.engine_id);
        w.u64(self.max_message as u64);
        w.u8(self.domains.len() as u8);
        for d in &self.domains {
            w.bytes(d.provider.as_bytes());
            w.bytes(&d.name);
            w.u8(d.virt_addr as u8);
            w.u64(d.scratch_key);
            w.u64(d.scratch_addr);
        }
        match &self.nvlink {
            None => w.u8(0),
            Some(n) => {
                w.u8(1);
                w.bytes(&n.host_id);
                w.bytes(n.mailbox.as_bytes());
                w.u64(n.pid as u64);
                w.bytes(n.vmm_socket.as_bytes());
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let engine_id = r.u64()?;
        let max_message = r.u64()?;
        if max_message > u32::MAX as u64 {
            return Err(r.err(format!("max_message {max_message}")));
        }
        let max_message = max_message as u32;
        let n = r.u8()? as usize;
        if n == 0 || n > MAX_DOMAINS {
            return Err(r.err(format!("{n} domains (must be 1..={MAX_DOMAINS})")));
        }
        let mut domains = Vec::with_capacity(n);
        for _ in 0..n {
            let provider = std::str::from_utf8(r.bytes(MAX_PROVIDER)?)
                .map_err(|_| r.err("provider name is not UTF-8".into()))?
                .to_string();
            let name = r.bytes(MAX_NAME)?.to_vec();
            if name.is_empty() {
                return Err(r.err("empty endpoint name".into()));
            }
            let virt_addr = match r.u8()? {
                0 => false,
                1 => true,
                x => return Err(r.err(format!("bad flag {x}"))),
            };
            let scratch_key = r.u64()?;
            let scratch_addr = r.u64()?;
            domains.push(DomainAddr {
                provider,
                name,
                virt_addr,
                scratch_key,
                scratch_addr,
            });
        }
        let nvlink = match r.u8()? {
            0 => None,
            1 => {
                let host_id = r.bytes(64)?.to_vec();
                let mailbox = std::str::from_utf8(r.bytes(255)?)
                    .map_err(|_| r.err("mailbox name is not UTF-8".into()))?
                    .to_string();
                let pid = r.u64()? as u32;
                let vmm_socket = if r.version >= 3 {
                    std::str::from_utf8(r.bytes(MAX_SOCKET_NAME)?)
                        .map_err(|_| r.err("VMM socket name is not UTF-8".into()))?
                        .to_string()
                } else {
                    String::new()
                };
                Some(NvlinkAddr {
                    host_id,
                    mailbox,
                    pid,
                    vmm_socket,
                })
            }
            x => return Err(r.err(format!("bad nvlink flag {x}"))),
        };
        Ok(PeerAddr {
            engine_id,
            max_message,
            domains,
            nvlink,
        })
    }

    /// The byte form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(ADDR_MAGIC);
        self.write(&mut w);
        w.finish()
    }

    /// Decodes the byte form.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, ADDR_MAGIC, "address")?;
        let a = Self::read(&mut r)?;
        r.end()?;
        Ok(a)
    }

    /// The text form (`stolon-addr1:` + URL-safe base64).
    pub fn to_text(&self) -> String {
        format!("{ADDR_TEXT}{}", b64().encode(self.to_bytes()))
    }

    /// Decodes the text form.
    pub fn from_text(s: &str) -> Result<Self> {
        Self::from_bytes(&decode_text(s, ADDR_TEXT, "address")?)
    }
}

impl MemDesc {
    /// The byte form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(DESC_MAGIC);
        self.owner.write(&mut w);
        w.u64(self.region_id);
        w.u64(self.base);
        w.u64(self.len);
        for k in &self.keys {
            w.u64(*k);
        }
        match &self.gpu {
            None => w.u8(0),
            Some(g) => {
                w.u8(1);
                w.u64(g.device as u64);
                w.bytes(&g.ipc_handle);
                w.u64(g.ipc_offset);
                w.u8(g.direct as u8);
                match &g.vmm {
                    None => w.u8(0),
                    Some(v) => {
                        w.u8(1);
                        w.0.extend_from_slice(&v.token);
                        w.u64(v.chunks);
                        w.u64(v.offset);
                        w.u64(v.span);
                    }
                }
            }
        }
        w.finish()
    }

    /// Decodes the byte form.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, DESC_MAGIC, "memory descriptor")?;
        let owner = PeerAddr::read(&mut r)?;
        let region_id = r.u64()?;
        let base = r.u64()?;
        let len = r.u64()?;
        if base.checked_add(len).is_none() {
            return Err(r.err(format!("region [{base:#x}, +{len}) overflows")));
        }
        let keys = (0..owner.domains.len())
            .map(|_| r.u64())
            .collect::<Result<Vec<_>>>()?;
        let gpu = match r.u8()? {
            0 => None,
            1 => {
                let device = r.u64()?;
                if device > u32::MAX as u64 {
                    return Err(r.err(format!("device {device}")));
                }
                let ipc_handle = r.bytes(64)?.to_vec();
                let ipc_offset = r.u64()?;
                let direct = match r.u8()? {
                    0 => false,
                    1 => true,
                    x => return Err(r.err(format!("bad direct flag {x}"))),
                };
                let vmm = if r.version >= 3 {
                    match r.u8()? {
                        0 => None,
                        1 => {
                            let token: [u8; 16] = r.take(16)?.try_into().unwrap();
                            let chunks = r.u64()?;
                            let offset = r.u64()?;
                            let span = r.u64()?;
                            if chunks == 0 || chunks > MAX_VMM_CHUNKS {
                                return Err(r.err(format!(
                                    "VMM region of {chunks} allocations (must be 1..={MAX_VMM_CHUNKS})"
                                )));
                            }
                            if offset.checked_add(len).map_or(true, |end| end > span) {
                                return Err(r.err(format!(
                                    "VMM region [{offset}, +{len}) exceeds its {span}-byte mappings"
                                )));
                            }
                            Some(VmmShare {
                                token,
                                chunks,
                                offset,
                                span,
                            })
                        }
                        x => return Err(r.err(format!("bad VMM flag {x}"))),
                    }
                } else {
                    None
                };
                Some(GpuDesc {
                    device: device as u32,
                    ipc_handle,
                    ipc_offset,
                    direct,
                    vmm,
                })
            }
            x => return Err(r.err(format!("bad gpu flag {x}"))),
        };
        r.end()?;
        Ok(MemDesc {
            owner,
            region_id,
            base,
            len,
            keys,
            gpu,
        })
    }

    /// The text form (`stolon-mem1:` + URL-safe base64).
    pub fn to_text(&self) -> String {
        format!("{DESC_TEXT}{}", b64().encode(self.to_bytes()))
    }

    /// Decodes the text form.
    pub fn from_text(s: &str) -> Result<Self> {
        Self::from_bytes(&decode_text(s, DESC_TEXT, "memory descriptor")?)
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn decode_text(s: &str, prefix: &str, what: &'static str) -> Result<Vec<u8>> {
    let body = s.trim().strip_prefix(prefix).ok_or_else(|| Error::Decode {
        what,
        why: format!("text does not start with {prefix:?}"),
    })?;
    b64().decode(body).map_err(|e| Error::Decode {
        what,
        why: format!("bad base64: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr_strategy() -> impl Strategy<Value = PeerAddr> {
        let dom = (
            "[a-z;_]{1,20}",
            proptest::collection::vec(any::<u8>(), 1..64),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(provider, name, virt_addr, scratch_key, scratch_addr)| {
                DomainAddr {
                    provider,
                    name,
                    virt_addr,
                    scratch_key,
                    scratch_addr,
                }
            });
        let nv = proptest::option::of(
            (
                proptest::collection::vec(any::<u8>(), 16),
                "[a-z0-9/_-]{1,40}",
                "(@?[a-z0-9/_-]{1,60})?",
            )
                .prop_map(|(host_id, mailbox, vmm_socket)| NvlinkAddr {
                    host_id,
                    mailbox,
                    pid: 7,
                    vmm_socket,
                }),
        );
        (any::<u64>(), proptest::collection::vec(dom, 1..=4), nv).prop_map(
            |(engine_id, domains, nvlink)| PeerAddr {
                engine_id,
                max_message: 65536,
                domains,
                nvlink,
            },
        )
    }

    fn desc_strategy() -> impl Strategy<Value = MemDesc> {
        (
            addr_strategy(),
            any::<u64>(),
            0u64..1 << 48,
            0u64..1 << 40,
            any::<u64>(),
            proptest::option::of((
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..=64),
                any::<u64>(),
                proptest::option::of((
                    any::<[u8; 16]>(),
                    1..=MAX_VMM_CHUNKS,
                    0u64..1 << 30,
                    0u64..1 << 30,
                )),
            )),
        )
            .prop_map(|(owner, region_id, base, len, k, g)| {
                let keys = (0..owner.domains.len() as u64)
                    .map(|i| k.wrapping_add(i))
                    .collect();
                let gpu = g.map(|(device, ipc_handle, ipc_offset, vmm)| GpuDesc {
                    device,
                    direct: ipc_offset % 2 == 0,
                    ipc_handle,
                    ipc_offset,
                    vmm: vmm.map(|(token, chunks, offset, slack)| VmmShare {
                        token,
                        chunks,
                        offset,
                        span: offset + len + slack,
                    }),
                });
                MemDesc {
                    owner,
                    region_id,
                    base,
                    len,
                    keys,
                    gpu,
                }
            })
    }

    proptest! {
        #[test]
        fn addr_round_trips(a in addr_strategy()) {
            prop_assert_eq!(PeerAddr::from_bytes(&a.to_bytes()).unwrap(), a.clone());
            prop_assert_eq!(PeerAddr::from_text(&a.to_text()).unwrap(), a);
        }

        #[test]
        fn desc_round_trips(d in desc_strategy()) {
            prop_assert_eq!(MemDesc::from_bytes(&d.to_bytes()).unwrap(), d.clone());
            prop_assert_eq!(MemDesc::from_text(&d.to_text()).unwrap(), d);
        }

        #[test]
        fn corrupted_desc_is_an_error(d in desc_strategy(), pos in any::<prop::sample::Index>(),
                                      flip in 1u8..=255) {
            let mut b = d.to_bytes();
            let i = pos.index(b.len());
            b[i] ^= flip;
            let r = matches!(MemDesc::from_bytes(&b), Err(Error::Decode { .. }));
            prop_assert!(r, "corruption not detected");
        }

        #[test]
        fn truncated_addr_is_an_error(a in addr_strategy(), cut in any::<prop::sample::Index>()) {
            let b = a.to_bytes();
            let n = cut.index(b.len());
            let r = matches!(PeerAddr::from_bytes(&b[..n]), Err(Error::Decode { .. }));
            prop_assert!(r, "truncation not detected");
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = MemDesc::from_bytes(&b);
            let _ = PeerAddr::from_bytes(&b);
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An address and a GPU descriptor as version 2 (before VMM sharing) wrote them.
    const V2_ADDR: &str = "535461640288776655443322110000010000000000010b007463703b6f66695f72786d\
        0300090807002a000000000000000000000000000000010400626f6f740a002f73746f6c6f6e2d6d62d20400\
        0000000000a01dbdd3";
    const V2_DESC: &str = "53546d640288776655443322110000010000000000010b007463703b6f66695f72786d\
        0300090807002a000000000000000000000000000000010400626f6f740a002f73746f6c6f6e2d6d62d20400\
        00000000000500000000000000000000700000000000100000000000004d00000000000000010100000000000000\
        4000abababababababababababababababababababababababababababababababababababababababababababab\
        abababababababababababababababababababab000200000000000000351905a1";

    #[test]
    fn version_2_values_still_decode_without_vmm_fields() {
        let a = PeerAddr::from_bytes(&unhex(V2_ADDR)).unwrap();
        let n = a.nvlink.as_ref().unwrap();
        assert_eq!(
            (n.pid, n.mailbox.as_str(), n.vmm_socket.as_str()),
            (1234, "/stolon-mb", "")
        );
        let d = MemDesc::from_bytes(&unhex(V2_DESC)).unwrap();
        assert_eq!(d.owner, a);
        assert_eq!(
            (d.region_id, d.base, d.len, d.keys.clone()),
            (5, 0x7000_0000, 4096, vec![77])
        );
        let g = d.gpu.as_ref().unwrap();
        assert_eq!(
            (g.device, g.ipc_offset, g.direct, g.ipc_handle.len()),
            (1, 512, false, 64)
        );
        assert_eq!(g.vmm, None);
        // Re-encoded, it is a current-version value that decodes to the same thing.
        let b = d.to_bytes();
        assert_eq!(b[4], VERSION);
        assert_eq!(MemDesc::from_bytes(&b).unwrap(), d);
    }

    #[test]
    fn unknown_versions_are_rejected_by_name() {
        for v in [0u8, 1, VERSION + 1, 255] {
            let mut b = unhex(V2_DESC);
            b[4] = v;
            let n = b.len() - 4;
            let crc = crc32fast::hash(&b[..n]).to_le_bytes();
            b[n..].copy_from_slice(&crc);
            match MemDesc::from_bytes(&b) {
                Err(Error::Decode { why, .. }) => {
                    assert!(why.contains(&format!("unsupported version {v}")), "{why}")
                }
                r => panic!("version {v}: {r:?}"),
            }
        }
    }

    fn vmm_desc(offset: u64, span: u64, chunks: u64) -> MemDesc {
        let mut d = MemDesc::from_bytes(&unhex(V2_DESC)).unwrap();
        d.owner.nvlink.as_mut().unwrap().vmm_socket = "@stolon-vmm-test".into();
        d.gpu.as_mut().unwrap().vmm = Some(VmmShare {
            token: [7; 16],
            chunks,
            offset,
            span,
        });
        d
    }

    #[test]
    fn vmm_layouts_that_cannot_hold_the_region_are_refused() {
        // len is 4096.
        let ok = vmm_desc(100, 4196, 1);
        assert_eq!(MemDesc::from_bytes(&ok.to_bytes()).unwrap(), ok);
        for bad in [
            vmm_desc(101, 4196, 1),
            vmm_desc(u64::MAX, 4196, 1),
            vmm_desc(0, 4096, 0),
            vmm_desc(0, 4096, MAX_VMM_CHUNKS + 1),
        ] {
            assert!(
                matches!(
                    MemDesc::from_bytes(&bad.to_bytes()),
                    Err(Error::Decode { .. })
                ),
                "{bad:?}"
            );
        }
        let mut long = vmm_desc(0, 4096, 1);
        long.owner.nvlink.as_mut().unwrap().vmm_socket = "x".repeat(MAX_SOCKET_NAME + 1);
        assert!(MemDesc::from_bytes(&long.to_bytes()).is_err());
    }

    #[test]
    fn an_address_is_not_a_descriptor() {
        let a = PeerAddr {
            engine_id: 1,
            max_message: 65536,
            domains: vec![DomainAddr {
                provider: "tcp;ofi_rxm".into(),
                name: vec![1, 2, 3],
                virt_addr: false,
                scratch_key: 7,
                scratch_addr: 0,
            }],
            nvlink: None,
        };
        assert!(matches!(
            MemDesc::from_bytes(&a.to_bytes()),
            Err(Error::Decode { .. })
        ));
        assert!(MemDesc::from_text(&a.to_text()).is_err());
    }

    #[test]
    fn remote_addr_follows_the_addressing_mode() {
        let mut d = MemDesc {
            owner: PeerAddr {
                engine_id: 1,
                max_message: 65536,
                domains: vec![DomainAddr {
                    provider: "shm".into(),
                    name: vec![1],
                    virt_addr: true,
                    scratch_key: 0,
                    scratch_addr: 0,
                }],
                nvlink: None,
            },
            region_id: 1,
            base: 0x1000,
            len: 100,
            keys: vec![5],
            gpu: None,
        };
        assert_eq!(d.remote_addr(0, 10), 0x100a);
        d.owner.domains[0].virt_addr = false;
        assert_eq!(d.remote_addr(0, 10), 10);
        assert!(d.check_range(90, 10).is_ok());
        assert!(matches!(d.check_range(91, 10), Err(Error::OutOfBounds(_))));
        assert!(matches!(
            d.check_range(u64::MAX, 2),
            Err(Error::OutOfBounds(_))
        ));
    }
}
