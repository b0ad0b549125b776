//! The domain abstraction the worker drives: one endpoint of one backend.
//!
//! Backends are an enum rather than trait objects: the worker's hot path dispatches with one
//! `match`, and each backend stays a plain struct with its own invariants.

use std::ffi::c_void;

use crate::domain_types::{CqError, DomainAttrs, DomainSpec, Posted};
use crate::error::Result;
use crate::libfabric::{FabricDomain, Mr};
use crate::rc::{RcDomain, RcMr};
#[cfg(feature = "test-doubles")]
use crate::reorder::{LoopMr, ReorderDomain};
use crate::sys::libfabric::{fi_addr_t, fi_cq_data_entry};

/// One endpoint of some backend.
pub(crate) enum Domain {
    /// A libfabric RDM endpoint (efa, verbs;ofi_rxm, tcp;ofi_rxm, net, shm, udp;ofi_rxd).
    Fabric(FabricDomain),
    /// The in-process reordering test double (provider name `reorder`; only with the
    /// `test-doubles` feature, which tests turn on); see `crate::reorder`.
    #[cfg(feature = "test-doubles")]
    Reorder(ReorderDomain),
    /// A ConnectX port driven through libibverbs RC queue pairs (provider `verbs-rc`); see
    /// [`crate::rc`].
    Rc(Box<RcDomain>),
}

/// A registration on one domain.
pub(crate) enum MrHandle {
    Fabric(Mr),
    #[cfg(feature = "test-doubles")]
    Reorder(LoopMr),
    Rc(RcMr),
}

impl MrHandle {
    pub(crate) fn key(&self) -> u64 {
        match self {
            MrHandle::Fabric(m) => m.key(),
            #[cfg(feature = "test-doubles")]
            MrHandle::Reorder(m) => m.key,
            MrHandle::Rc(m) => m.rkey as u64,
        }
    }
    pub(crate) fn desc(&self) -> *mut c_void {
        match self {
            MrHandle::Fabric(m) => m.desc(),
            #[cfg(feature = "test-doubles")]
            MrHandle::Reorder(_) => std::ptr::null_mut(),
            // The verbs backend's local descriptor is the lkey.
            MrHandle::Rc(m) => m.lkey as usize as *mut c_void,
        }
    }
}

impl Domain {
    /// Opens the backend `spec` names; `max_message` is the largest message the worker sends
    /// (its header included).
    pub(crate) fn open(spec: &DomainSpec, max_message: usize) -> Result<Self> {
        if crate::rc::is_rc_provider(&spec.provider) {
            return Ok(Domain::Rc(Box::new(RcDomain::open(spec, max_message)?)));
        }
        #[cfg(test)]
        if spec.provider == crate::rc::double::PROVIDER {
            let dev = crate::rc::double::MemDevice::open(spec, max_message)?;
            return Ok(Domain::Rc(Box::new(RcDomain::with_device(
                spec,
                Box::new(dev),
            )?)));
        }
        #[cfg(feature = "test-doubles")]
        if spec.provider == crate::reorder::PROVIDER {
            return Ok(Domain::Reorder(ReorderDomain::open(spec)?));
        }
        Ok(Domain::Fabric(FabricDomain::open(spec)?))
    }

    pub(crate) fn attrs(&self) -> &DomainAttrs {
        match self {
            Domain::Fabric(d) => &d.attrs,
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(d) => &d.attrs,
            Domain::Rc(d) => &d.attrs,
        }
    }

    pub(crate) fn name(&self) -> &[u8] {
        match self {
            Domain::Fabric(d) => d.name(),
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(d) => d.name(),
            Domain::Rc(d) => d.name(),
        }
    }

    pub(crate) fn insert_addr(&mut self, name: &[u8]) -> Result<fi_addr_t> {
        match self {
            Domain::Fabric(d) => d.insert_addr(name),
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(d) => d.insert_addr(name),
            Domain::Rc(d) => d.insert_addr(name),
        }
    }

    pub(crate) fn remove_addr(&mut self, addr: fi_addr_t) {
        match self {
            Domain::Fabric(d) => d.remove_addr(addr),
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(d) => d.remove_addr(addr),
            Domain::Rc(d) => d.remove_addr(addr),
        }
    }

    /// # Safety
    /// The memory must stay valid until the region is closed with [`Self::close_mr`].
    pub(crate) unsafe fn register(
        &mut self,
        ptr: *const u8,
        len: usize,
        key: u64,
    ) -> Result<MrHandle> {
        match self {
            // SAFETY: forwarded contract.
            Domain::Fabric(d) => unsafe { d.register(ptr, len, key) }.map(MrHandle::Fabric),
            #[cfg(feature = "test-doubles")]
            // SAFETY: forwarded contract.
            Domain::Reorder(d) => unsafe { d.register(ptr, len, key) }.map(MrHandle::Reorder),
            // SAFETY: forwarded contract (the device picks its own keys).
            Domain::Rc(d) => unsafe { d.register(ptr, len) }.map(MrHandle::Rc),
        }
    }

    /// Registers CUDA device memory where the backend can touch it.
    ///
    /// # Safety
    /// The device memory must stay allocated until the region is closed.
    pub(crate) unsafe fn register_hmem(
        &mut self,
        ptr: u64,
        len: usize,
        key: u64,
        device: usize,
    ) -> Result<MrHandle> {
        match self {
            Domain::Fabric(d) => {
                // SAFETY: forwarded contract.
                unsafe { d.register_hmem(ptr, len, key, device) }.map(MrHandle::Fabric)
            }
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(_) => Err(crate::error::Error::Config(
                "the reorder double has no GPU memory".into(),
            )),
            // SAFETY: forwarded contract.
            Domain::Rc(d) => unsafe { d.register_hmem(ptr, len, device) }.map(MrHandle::Rc),
        }
    }

    pub(crate) fn close_mr(&mut self, mr: MrHandle) -> Result<()> {
        match (self, mr) {
            (Domain::Fabric(d), MrHandle::Fabric(m)) => d.close_mr(m),
            #[cfg(feature = "test-doubles")]
            (Domain::Reorder(d), MrHandle::Reorder(m)) => {
                d.close_mr(m);
                Ok(())
            }
            // Dropping the registration deregisters it.
            (Domain::Rc(_), MrHandle::Rc(m)) => {
                drop(m);
                Ok(())
            }
            _ => unreachable!("a region is closed on the domain that registered it"),
        }
    }

    /// Closes the endpoint ahead of the registrations (shutdown order); the rest closes on drop.
    pub(crate) fn close_endpoint(&mut self) -> Result<()> {
        match self {
            Domain::Fabric(d) => d.close_endpoint(),
            _ => Ok(()),
        }
    }

    /// The descriptor an idle worker may sleep on, if the backend has one.
    pub(crate) fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Domain::Fabric(d) => d.wait_fd(),
            _ => None,
        }
    }

    /// Whether the worker may now sleep on [`Self::wait_fd`] (see `fi_trywait`).
    pub(crate) fn trywait(&mut self) -> bool {
        match self {
            Domain::Fabric(d) => d.trywait(),
            _ => false,
        }
    }

    /// # Safety
    /// See [`FabricDomain::post_write`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post_write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
        delivered: bool,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        match self {
            // SAFETY: forwarded contract.
            Domain::Fabric(d) => unsafe {
                d.post_write(buf, len, desc, dest, raddr, key, data, delivered, ctx)
            },
            #[cfg(feature = "test-doubles")]
            // SAFETY: forwarded contract.
            Domain::Reorder(d) => unsafe { d.post_write(buf, len, dest, raddr, key, data, ctx) },
            // SAFETY: forwarded contract; `desc` is the region's lkey.
            Domain::Rc(d) => unsafe { d.post_write(buf, len, desc, dest, raddr, key, data, ctx) },
        }
    }

    /// # Safety
    /// See [`FabricDomain::inject_write`].
    pub(crate) unsafe fn inject_write(
        &mut self,
        buf: *const u8,
        len: usize,
        dest: fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
    ) -> Result<Posted> {
        match self {
            // SAFETY: forwarded contract.
            Domain::Fabric(d) => unsafe { d.inject_write(buf, len, dest, raddr, key, data) },
            _ => {
                unreachable!("only libfabric domains offer inject")
            }
        }
    }

    /// # Safety
    /// See [`FabricDomain::post_send`].
    pub(crate) unsafe fn post_send(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: fi_addr_t,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        match self {
            // SAFETY: forwarded contract.
            Domain::Fabric(d) => unsafe { d.post_send(buf, len, desc, dest, ctx) },
            #[cfg(feature = "test-doubles")]
            // SAFETY: forwarded contract.
            Domain::Reorder(d) => unsafe { d.post_send(buf, len, dest, ctx) },
            // SAFETY: forwarded contract.
            Domain::Rc(d) => unsafe { d.post_send(buf, len, dest, ctx) },
        }
    }

    /// # Safety
    /// See [`FabricDomain::post_recv`].
    pub(crate) unsafe fn post_recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        match self {
            // SAFETY: forwarded contract.
            Domain::Fabric(d) => unsafe { d.post_recv(buf, len, desc, ctx) },
            #[cfg(feature = "test-doubles")]
            // SAFETY: forwarded contract.
            Domain::Reorder(d) => unsafe { d.post_recv(buf, len, ctx) },
            // SAFETY: forwarded contract.
            Domain::Rc(d) => unsafe { d.post_recv(buf, len, ctx) },
        }
    }

    pub(crate) fn poll(&mut self, out: &mut [fi_cq_data_entry]) -> Result<usize, CqError> {
        match self {
            Domain::Fabric(d) => d.poll(out),
            #[cfg(feature = "test-doubles")]
            Domain::Reorder(d) => d.poll(out),
            Domain::Rc(d) => d.poll(out),
        }
    }
}
