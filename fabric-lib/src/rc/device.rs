//! The device layer the verbs-rc backend drives, as a trait: the `stolon_verbs` domain on
//! hardware, an in-memory double in tests.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;

use stolon_verbs::completion::TransferId;
use stolon_verbs::domain::{DomainEvent, PeerId};
use stolon_verbs::wr::WriteSeg;
use stolon_verbs::Error as VError;

use super::RcMr;

/// The device layer as this backend drives it: `stolon_verbs::domain::VerbsDomain` on
/// hardware, an in-memory double in tests. Events are the device layer's [`DomainEvent`]s.
pub(crate) trait Device: Send {
    /// Device and port, for `DomainAttrs::domain`.
    fn describe(&self) -> String;
    /// Largest message of the port.
    fn max_msg_size(&self) -> usize;
    /// Send-queue depth per peer.
    fn queue_depth(&self) -> usize;
    /// An address of this host on the port's network, for the handshake socket.
    fn local_ip(&self) -> Option<IpAddr>;

    /// Registers host memory peers may write.
    ///
    /// # Safety
    /// The memory must stay mapped until the returned registration is dropped.
    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<RcMr, VError>;

    /// Registers GPU memory (a CUDA device pointer) peers may write, by its address: needs the
    /// nvidia-peermem kernel module.
    ///
    /// # Safety
    /// The device memory must stay allocated until the returned registration is dropped.
    unsafe fn register_gpu(&mut self, ptr: u64, len: usize) -> Result<RcMr, VError>;

    /// Whether the device layer can register dma-bufs (`ibv_reg_dmabuf_mr` exported).
    fn supports_dmabuf(&self) -> bool;

    /// Registers `len` bytes at `offset` of the dma-buf `fd`, addressed as `iova`, peers may
    /// write. The registration keeps its own reference to the dma-buf; `fd` stays the caller's.
    ///
    /// # Safety
    /// The memory behind the dma-buf must stay allocated until the registration is dropped.
    unsafe fn register_dmabuf(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<RcMr, VError>;

    fn connect(&mut self, peer: PeerId, now: Instant) -> Result<Vec<DomainEvent>, VError>;
    fn on_handshake(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<DomainEvent>, VError>;
    fn tick(&mut self, now: Instant) -> Vec<DomainEvent>;
    fn next_deadline(&self) -> Option<Instant>;
    fn is_established(&self, peer: PeerId) -> bool;
    fn disconnect(&mut self, peer: PeerId) -> Vec<DomainEvent>;

    /// Posts a batch of writes to one peer as one chained post under one transfer: one WR per
    /// write, `imms[i]` on WR `i`, selectively signalled (the chain completes with its last
    /// WR). Takes a prefix as long as the send queue has room for; returns the transfer and how
    /// many writes it took, or `None` when the send queue is full.
    ///
    /// # Safety
    /// Every local range taken must stay registered and valid until the transfer has drained;
    /// the remote ranges and keys must be ones the peer handed out.
    unsafe fn write_chain(
        &mut self,
        peer: PeerId,
        segs: &[WriteSeg],
        imms: &[Option<u32>],
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<(TransferId, usize)>, VError>;

    /// Sends one message (copied); `None` when no buffer or send slot is free.
    fn send_one(
        &mut self,
        peer: PeerId,
        data: &[u8],
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<TransferId>, VError>;

    fn poll(&mut self, now: Instant, out: &mut Vec<DomainEvent>) -> Result<usize, VError>;

    /// Test hook: whether the side channel loses the next outgoing handshake datagram. Only the
    /// test double ever says yes.
    fn lose_datagram(&mut self) -> bool {
        false
    }
}

impl Device for stolon_verbs::domain::VerbsDomain {
    fn describe(&self) -> String {
        format!(
            "{}:{} ({}, GID {} {:?})",
            self.device().name,
            self.port().port,
            self.port().link_layer.name(),
            self.gid().index,
            self.gid().gid_type
        )
    }

    fn max_msg_size(&self) -> usize {
        self.port().max_msg_size as usize
    }

    fn queue_depth(&self) -> usize {
        self.sizes().data_sq as usize
    }

    fn local_ip(&self) -> Option<IpAddr> {
        use stolon_verbs::gid::GidType;
        if self.gid().gid_type == GidType::RoceV2 && !self.gid().gid.is_link_local() {
            return Some(self.gid().gid.ip());
        }
        let names: Vec<String> = self.port().netdev.iter().cloned().collect();
        let addrs = stolon_verbs::domain::interface_addrs(&names);
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<RcMr, VError> {
        // SAFETY: forwarded contract.
        let mr = unsafe { stolon_verbs::domain::VerbsDomain::register(self, ptr, len, true) }?;
        Ok(RcMr {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            _keep: Box::new(mr),
        })
    }

    unsafe fn register_gpu(&mut self, ptr: u64, len: usize) -> Result<RcMr, VError> {
        // Registration by device address, which needs the nvidia-peermem kernel module: the
        // fallback when dma-buf registration is not possible (see `gpu_registration_order`).
        // SAFETY: forwarded contract (the pointer names device memory kept allocated).
        let mr = unsafe {
            stolon_verbs::domain::VerbsDomain::register(self, ptr as *mut u8, len, true)
        }?;
        Ok(RcMr {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            _keep: Box::new(mr),
        })
    }

    fn supports_dmabuf(&self) -> bool {
        stolon_verbs::domain::VerbsDomain::supports_dmabuf(self)
    }

    unsafe fn register_dmabuf(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<RcMr, VError> {
        // SAFETY: forwarded contract; the kernel takes its own reference to the dma-buf.
        let mr = unsafe {
            stolon_verbs::domain::VerbsDomain::register_dmabuf(
                self,
                fd.as_raw_fd(),
                offset,
                len,
                iova,
                true,
            )
        }?;
        Ok(RcMr {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            _keep: Box::new(mr),
        })
    }

    fn connect(&mut self, peer: PeerId, now: Instant) -> Result<Vec<DomainEvent>, VError> {
        stolon_verbs::domain::VerbsDomain::connect(self, peer, now)
    }

    fn on_handshake(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<DomainEvent>, VError> {
        stolon_verbs::domain::VerbsDomain::on_handshake(self, peer, bytes, now)
    }

    fn tick(&mut self, now: Instant) -> Vec<DomainEvent> {
        stolon_verbs::domain::VerbsDomain::tick(self, now)
    }

    fn next_deadline(&self) -> Option<Instant> {
        stolon_verbs::domain::VerbsDomain::next_deadline(self)
    }

    fn is_established(&self, peer: PeerId) -> bool {
        stolon_verbs::domain::VerbsDomain::is_established(self, peer)
    }

    fn disconnect(&mut self, peer: PeerId) -> Vec<DomainEvent> {
        stolon_verbs::domain::VerbsDomain::disconnect(self, peer)
    }

    unsafe fn write_chain(
        &mut self,
        peer: PeerId,
        segs: &[WriteSeg],
        imms: &[Option<u32>],
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<(TransferId, usize)>, VError> {
        // SAFETY: forwarded contract; the plan's SGEs are the caller's registered local ranges.
        unsafe { self.post_ops(peer, segs, imms, now, out) }
    }

    fn send_one(
        &mut self,
        peer: PeerId,
        data: &[u8],
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<TransferId>, VError> {
        self.send_message(peer, data, None, now, out)
    }

    fn poll(&mut self, now: Instant, out: &mut Vec<DomainEvent>) -> Result<usize, VError> {
        stolon_verbs::domain::VerbsDomain::poll(self, now, out)
    }
}
