//! [`VerbsDomain`]: the state of one open port, opening it, registering memory, and keeping the
//! receive queues stocked. Peers and handshakes are in `connection`, posting and polling in
//! `datapath`.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Arc;

use crate::completion::{Finished, QpErrors, TransferId, TransferTable, WrId, WrKind};
use crate::error::{Errno, Error, Result};
use crate::gid::{self, GidChoice};
use crate::handshake::{self, Handshake};
use crate::qp::{self, AnyQp, InitAttrs, LocalPath};
use crate::sys::{self, LibIbverbs};
use crate::wr::{Limits, RecvChain, RecvStock, SendQueue};

use super::config::{queue_sizes, DomainConfig, QueueSizes};
use super::discovery::{choose_port, ifname, interface_addrs, open_all, DeviceInfo, PortInfo};
use super::event::{DomainEvent, PeerId};
use super::resources::{
    post_srq, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QueuePair,
    SharedReceiveQueue,
};

pub(super) struct Peer {
    pub(super) data: Option<AnyQp<QueuePair>>,
    pub(super) msg: Option<AnyQp<QueuePair>>,
    pub(super) data_sq: SendQueue,
    pub(super) msg_sq: SendQueue,
    pub(super) hs: Handshake,
}

/// One ConnectX port.
pub struct VerbsDomain {
    // Field order is drop order: QPs, then SRQs, the message buffers' MR, the CQ, the PD, the
    // context (each also kept alive by the Arcs of what depends on it), then the raw buffers.
    pub(super) peers: HashMap<PeerId, Peer>,
    pub(super) srq_imm: Arc<SharedReceiveQueue>,
    pub(super) srq_msg: Arc<SharedReceiveQueue>,
    pub(super) msg_mr: MemoryRegion,
    pub(super) cq: Arc<CompletionQueue>,
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) _ctx: Arc<Context>,
    pub(super) lib: &'static LibIbverbs,
    pub(super) info: DeviceInfo,
    pub(super) port_index: usize,
    pub(super) gid: GidChoice,
    pub(super) local_path: LocalPath,
    pub(super) cfg: DomainConfig,
    pub(super) sizes: QueueSizes,
    pub(super) init: InitAttrs,
    pub(super) qpn_to_peer: HashMap<u32, PeerId>,
    pub(super) transfers: TransferTable,
    pub(super) qp_errors: QpErrors,
    pub(super) imm_stock: RecvStock,
    pub(super) msg_stock: RecvStock,
    pub(super) free_recv_bufs: Vec<u32>,
    pub(super) free_send_bufs: Vec<u32>,
    pub(super) send_buf_of: HashMap<TransferId, u32>,
    /// Granted inline size of the QPs (the smallest seen).
    pub(super) max_inline: u32,
    pub(super) next_epoch: u64,
    pub(super) rng: handshake::Rng,
    pub(super) wcs: Vec<sys::ibv_wc>,
    /// Receive buffers then send buffers, `max_message` bytes each; registered as `msg_mr`.
    pub(super) msg_mem: Box<[u8]>,
}

/// Opens the configured (or first active) port. Alias of [`VerbsDomain::open`].
///
/// # Errors
/// See [`VerbsDomain::open`].
pub fn open_device(cfg: DomainConfig) -> Result<VerbsDomain> {
    VerbsDomain::open(cfg)
}

impl VerbsDomain {
    /// Opens a port and builds the shared objects.
    ///
    /// # Errors
    /// [`Error::LibraryNotFound`] (paths tried), [`Error::NoDevices`], [`Error::NoActivePort`]
    /// (every port seen), [`Error::DeviceNotFound`], GID selection errors, [`Error::Config`] for
    /// sizes the device cannot take, and [`Error::Verbs`] for a failing call.
    pub fn open(mut cfg: DomainConfig) -> Result<Self> {
        let mut all = open_all()?;
        let infos: Vec<DeviceInfo> = all.iter().map(|(_, d)| d.clone()).collect();
        let (di, pi) = choose_port(&infos, cfg.device.as_deref(), cfg.port, cfg.link_layer)?;
        let (ctx, info) = all.swap_remove(di);
        drop(all); // closes the other devices
        let lib = ctx.lib;
        let port = info.ports[pi].clone();
        let names: Vec<String> = port
            .gid_table
            .iter()
            .filter_map(|e| (e.ifindex != 0).then(|| ifname(e.ifindex)).flatten())
            .chain(port.netdev.clone())
            .collect();
        let addrs = interface_addrs(&names);
        let gid = gid::select_gid(
            port.link_layer,
            &port.gid_table,
            &addrs,
            &cfg.gid,
            port.grh_required,
        )?;
        cfg.qp.port = port.port;
        cfg.qp
            .clamp_to_device(info.caps.max_qp_init_rd_atom, info.caps.max_qp_rd_atom);
        cfg.qp.validate()?;
        let init = qp::init_attrs(&cfg.qp)?;
        let sizes = queue_sizes(&cfg, &info.caps)?;
        let local_path = LocalPath {
            link_layer: port.link_layer,
            active_mtu: port.active_mtu,
            sgid_index: gid.index,
            use_grh: gid.use_grh,
        };

        // SAFETY: ctx.raw is the live context of the chosen device.
        let pd = unsafe { (lib.alloc_pd)(ctx.raw) };
        if pd.is_null() {
            return Err(Error::Verbs {
                call: "ibv_alloc_pd",
                source: Errno::last(),
            });
        }
        let pd = Arc::new(ProtectionDomain {
            ctx: ctx.clone(),
            raw: pd,
        });
        // SAFETY: as above; no completion channel (polled), vector 0.
        let cq = unsafe {
            (lib.create_cq)(
                ctx.raw,
                sizes.cq as c_int,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_cq",
                source: Errno::last(),
            });
        }
        let cq = Arc::new(CompletionQueue {
            ctx: ctx.clone(),
            raw: cq,
        });
        let srq_imm = Self::create_srq(&pd, sizes.imm_srq)?;
        let srq_msg = Self::create_srq(&pd, sizes.msg_srq)?;

        let nbuf = sizes.msg_srq as usize + cfg.msg_send_buffers as usize;
        let mut msg_mem = vec![0u8; nbuf * cfg.max_message as usize].into_boxed_slice();
        // SAFETY: msg_mem is owned by the domain and dropped after msg_mr (field order) and after
        // the SRQs and QPs that may still reference it.
        let msg_mr = unsafe {
            Self::reg(
                &pd,
                msg_mem.as_mut_ptr().cast(),
                msg_mem.len().max(1),
                sys::IBV_ACCESS_LOCAL_WRITE,
            )?
        };

        let mut d = VerbsDomain {
            peers: HashMap::new(),
            srq_imm,
            srq_msg,
            msg_mr,
            cq,
            pd,
            _ctx: ctx,
            lib,
            port_index: pi,
            info,
            gid,
            local_path,
            sizes,
            init,
            qpn_to_peer: HashMap::new(),
            transfers: TransferTable::new(),
            qp_errors: QpErrors::default(),
            imm_stock: RecvStock::new(sizes.imm_srq, (sizes.imm_srq / 8).max(1)),
            msg_stock: RecvStock::new(sizes.msg_srq, (sizes.msg_srq / 8).max(1)),
            free_recv_bufs: (0..sizes.msg_srq).rev().collect(),
            free_send_bufs: (sizes.msg_srq..nbuf as u32).rev().collect(),
            send_buf_of: HashMap::new(),
            max_inline: cfg.max_inline,
            next_epoch: 1,
            rng: handshake::Rng::new(handshake::os_seed()),
            wcs: vec![sys::ibv_wc::default(); 256],
            msg_mem,
            cfg,
        };
        d.refill()?;
        Ok(d)
    }

    fn create_srq(pd: &Arc<ProtectionDomain>, depth: u32) -> Result<Arc<SharedReceiveQueue>> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: std::ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr: depth,
                max_sge: 1,
                srq_limit: 0,
            },
        };
        // SAFETY: pd is live; attr is initialised and outlives the call.
        let raw = unsafe { (pd.ctx.lib.create_srq)(pd.raw, &mut attr) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_srq",
                source: Errno::last(),
            });
        }
        Ok(Arc::new(SharedReceiveQueue {
            pd: pd.clone(),
            raw,
        }))
    }

    /// # Safety
    /// `addr..addr+len` must stay mapped while the region is registered.
    ///
    /// # Errors
    /// [`Error::Verbs`] from `ibv_reg_mr`.
    unsafe fn reg(
        pd: &Arc<ProtectionDomain>,
        addr: *mut c_void,
        len: usize,
        access: c_uint,
    ) -> Result<MemoryRegion> {
        // SAFETY: pd is live; the caller keeps the memory mapped.
        let raw = unsafe { pd.ctx.lib.reg_mr_any(pd.raw, addr, len, access) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_reg_mr",
                source: Errno::last(),
            });
        }
        Ok(MemoryRegion {
            pd: pd.clone(),
            raw,
        })
    }

    /// The device opened.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// The port opened.
    pub fn port(&self) -> &PortInfo {
        &self.info.ports[self.port_index]
    }

    /// The GID (and GRH use) chosen.
    pub fn gid(&self) -> &GidChoice {
        &self.gid
    }

    /// Queue sizes in effect.
    pub fn sizes(&self) -> QueueSizes {
        self.sizes
    }

    /// Limits writes are planned with.
    pub fn limits(&self) -> Limits {
        Limits {
            max_send_wr: self.sizes.data_sq,
            max_sge: self.sizes.send_sge,
            max_msg_size: self.port().max_msg_size as u64,
            max_inline: self.max_inline,
        }
    }

    fn access(&self, remote_write: bool) -> c_uint {
        let mut a = sys::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            a |= sys::IBV_ACCESS_REMOTE_WRITE;
        }
        if self.cfg.relaxed_ordering {
            a |= sys::IBV_ACCESS_RELAXED_ORDERING;
        }
        a
    }

    /// Registers host memory (and, with `remote_write`, lets peers write into it).
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped until the region is dropped, and must not be freed while
    /// a transfer using it is in flight.
    ///
    /// # Errors
    /// [`Error::Verbs`] from `ibv_reg_mr`.
    pub unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<MemoryRegion> {
        // SAFETY: forwarded contract.
        unsafe { Self::reg(&self.pd, ptr.cast(), len, self.access(remote_write)) }
    }

    /// Whether the loaded libibverbs exports `ibv_reg_dmabuf_mr` (rdma-core 34 or newer); the
    /// kernel and device may still refuse a registration.
    pub fn supports_dmabuf(&self) -> bool {
        self.lib.reg_dmabuf_mr.is_some()
    }

    /// Registers GPU (or other device) memory exported as a dma-buf: `len` bytes at `offset` in
    /// the buffer `fd`, addressed by peers as `iova`. The registration holds its own reference
    /// to the dma-buf: `fd` may be closed once this returns.
    ///
    /// # Safety
    /// The dma-buf must stay allocated until the region is dropped.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when libibverbs predates `ibv_reg_dmabuf_mr` (rdma-core 34);
    /// [`Error::Verbs`] when the kernel or device refuses.
    pub unsafe fn register_dmabuf(
        &self,
        fd: std::os::fd::RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        remote_write: bool,
    ) -> Result<MemoryRegion> {
        let Some(f) = self.lib.reg_dmabuf_mr else {
            return Err(Error::Unsupported {
                what: "ibv_reg_dmabuf_mr",
                why: format!(
                    "{} does not export it (rdma-core 34 or newer needed)",
                    self.lib.path
                ),
            });
        };
        let access = self.access(remote_write);
        // SAFETY: pd is live; the caller keeps the dma-buf allocated.
        let mut raw = unsafe { f(self.pd.raw, offset, len, iova, fd, access as c_int) };
        if raw.is_null() && access & sys::IBV_ACCESS_OPTIONAL_RANGE != 0 {
            // Older kernels refuse optional flags (relaxed ordering) here: retry without them.
            let plain = access & !sys::IBV_ACCESS_OPTIONAL_RANGE;
            // SAFETY: as above.
            raw = unsafe { f(self.pd.raw, offset, len, iova, fd, plain as c_int) };
        }
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_reg_dmabuf_mr",
                source: Errno::last(),
            });
        }
        Ok(MemoryRegion {
            pd: self.pd.clone(),
            raw,
        })
    }

    pub(super) fn create_qp(&self, srq: &Arc<SharedReceiveQueue>, depth: u32) -> Result<QueuePair> {
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: self.cq.raw,
            recv_cq: self.cq.raw,
            srq: srq.raw,
            cap: sys::ibv_qp_cap {
                max_send_wr: depth,
                max_recv_wr: 0,
                max_send_sge: self.sizes.send_sge,
                max_recv_sge: 0,
                max_inline_data: self.cfg.max_inline,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: pd, cq and srq are live; attr is initialised and outlives the call.
        let raw = unsafe { (self.lib.create_qp)(self.pd.raw, &mut attr) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_qp",
                source: Errno::last(),
            });
        }
        Ok(QueuePair {
            _pd: self.pd.clone(),
            _cq: self.cq.clone(),
            _srq: srq.clone(),
            lib: self.lib,
            raw,
            cap: attr.cap,
        })
    }

    pub(super) fn finish(&mut self, f: Finished, out: &mut Vec<DomainEvent>) {
        if f.drained {
            if let Some(b) = self.send_buf_of.remove(&f.id) {
                self.free_send_bufs.push(b);
            }
        }
        out.push(DomainEvent::Finished(f));
    }

    pub(super) fn drained(&mut self, id: TransferId, out: &mut Vec<DomainEvent>) {
        if let Some(b) = self.send_buf_of.remove(&id) {
            self.free_send_bufs.push(b);
        }
        out.push(DomainEvent::Drained(id));
    }

    /// Posts receives to bring both SRQs back to their targets.
    pub(super) fn refill(&mut self) -> Result<()> {
        let n = self.imm_stock.refill();
        if n > 0 {
            let id = WrId {
                kind: WrKind::RecvImm,
                slot: 0,
                generation: 0,
                count: 0,
            }
            .encode();
            let mut chain = RecvChain::empty(std::iter::repeat(id).take(n as usize));
            // SAFETY: the WRs have no SGEs; the SRQ is live.
            let posted = unsafe { post_srq(&self.srq_imm, &mut chain) }?;
            self.imm_stock.added(posted);
        }
        let n = self
            .msg_stock
            .refill()
            .min(self.free_recv_bufs.len() as u32);
        if n > 0 {
            let max = self.cfg.max_message as u64;
            let base = self.msg_mem.as_ptr() as u64;
            let lkey = self.msg_mr.lkey();
            let bufs: Vec<u32> = (0..n).filter_map(|_| self.free_recv_bufs.pop()).collect();
            let mut chain = RecvChain::buffers(bufs.iter().map(|&b| {
                let id = WrId {
                    kind: WrKind::RecvMsg,
                    slot: b,
                    generation: 0,
                    count: 0,
                }
                .encode();
                (
                    id,
                    sys::ibv_sge {
                        addr: base + b as u64 * max,
                        length: max as u32,
                        lkey,
                    },
                )
            }));
            // SAFETY: each SGE is a receive buffer of msg_mem, registered as msg_mr, not
            // read until its completion returns it to free_recv_bufs.
            let r = unsafe { post_srq(&self.srq_msg, &mut chain) };
            let posted = *r.as_ref().unwrap_or(&0);
            // Buffers not posted go back to the free list.
            self.free_recv_bufs
                .extend(bufs[posted as usize..].iter().rev());
            self.msg_stock.added(posted);
            r?;
        }
        Ok(())
    }
}

impl Drop for VerbsDomain {
    fn drop(&mut self) {
        // QPs first (the field order does the rest; the Arcs guarantee it).
        self.peers.clear();
    }
}

impl std::fmt::Debug for VerbsDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDomain")
            .field("device", &self.info.name)
            .field("port", &self.port().port)
            .field("gid", &self.gid)
            .field("peers", &self.peers.len())
            .field("transfers", &self.transfers.active())
            .finish_non_exhaustive()
    }
}
