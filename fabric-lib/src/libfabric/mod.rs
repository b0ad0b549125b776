//! One libfabric RDM endpoint on one provider and interface: a *domain* in stolon's terms.
//!
//! [`FabricDomain`] owns the fabric, domain, address vector, completion queue and endpoint of one
//! NIC (or one software provider instance) and exposes the few operations the worker needs. It is
//! used from one thread at a time (the worker that owns it); the libfabric domain is opened with
//! `FI_THREAD_DOMAIN` accordingly.

use std::ffi::{c_void, CStr, CString};
use std::ptr;

pub use crate::domain_types::{CqError, DomainAttrs, DomainSpec, Posted};
use crate::error::{Error, Result};
use crate::sys::libfabric::{self as fi, LibFabric};

/// A registered memory region on one domain; closed through [`FabricDomain::close_mr`].
#[derive(Debug)]
pub struct Mr {
    raw: *mut fi::fid_mr,
}

impl Mr {
    /// The key a peer must use to write into this region.
    pub fn key(&self) -> u64 {
        // SAFETY: raw is a live fid_mr returned by fi_mr_reg and not yet closed.
        unsafe { (*self.raw).key }
    }

    /// The local descriptor passed with data-path calls.
    pub fn desc(&self) -> *mut c_void {
        // SAFETY: as in `key`.
        unsafe { (*self.raw).mem_desc }
    }
}

/// One endpoint with its own fabric, domain, CQ and AV.
pub struct FabricDomain {
    lib: &'static LibFabric,
    info: *mut fi::fi_info,
    fabric: *mut fi::fid_fabric,
    domain: *mut fi::fid_domain,
    cq: *mut fi::fid_cq,
    av: *mut fi::fid_av,
    ep: *mut fi::fid_ep,
    name: Vec<u8>,
    /// The CQ's wait object when it has one (`attrs.wait_fd`).
    wait_fd: Option<std::os::fd::RawFd>,
    pub attrs: DomainAttrs,
}

// SAFETY: a FabricDomain is owned and used by one thread at a time (the worker); the raw objects
// it holds are never shared, and libfabric allows a domain to move between threads.
unsafe impl Send for FabricDomain {}

fn check(lib: &LibFabric, call: &'static str, rc: isize) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Fabric {
            call,
            code: rc,
            message: lib.error_string(rc),
        })
    }
}

fn cstr_or_empty(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libfabric strings in fi_info are NUL-terminated and live as long as the info.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Duplicates a Rust string into malloc'd memory that `fi_freeinfo` may free.
fn strdup(s: &str) -> Result<*mut std::ffi::c_char> {
    let c = CString::new(s).map_err(|_| Error::Config(format!("NUL byte in {s:?}")))?;
    // SAFETY: c is a valid NUL-terminated string; strdup copies it.
    let p = unsafe { libc::strdup(c.as_ptr()) };
    if p.is_null() {
        return Err(Error::Config("out of memory".into()));
    }
    Ok(p)
}

/// The first IPv4 address of network interface `name`.
fn interface_ipv4(name: &str) -> Result<String> {
    let mut found = None;
    // SAFETY: getifaddrs allocates a list we only read and then free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(Error::Config(format!(
                "getifaddrs: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET
                && CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    found
        .map(|a| a.to_string())
        .ok_or_else(|| Error::ProviderNotFound {
            what: format!("interface {name:?}"),
            detail: "no such interface with an IPv4 address".into(),
        })
}

/// Whether small writes may use `fi_inject_write*` on this provider.
///
/// Only where it was seen to be safe: on libfabric 1.17, injected writes to a peer that dies make
/// `tcp;ofi_rxm` crash inside `fi_cq_read`, and on `udp;ofi_rxd` they lose events
/// (shared/LIBFABRIC.md). `STOLON_INJECT=1` / `=0` forces it on / off.
pub fn inject_allowed(provider: &str) -> bool {
    match std::env::var("STOLON_INJECT").as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    matches!(provider, "shm" | "efa")
}

/// Lists the RDM providers and interfaces usable here with stolon's required capabilities.
pub fn list_providers(provider: Option<&str>) -> Result<Vec<DomainAttrs>> {
    let lib = fi::lib().map_err(|e| Error::LibraryNotFound(e.to_string()))?;
    let spec = provider.map(DomainSpec::new);
    let info = getinfo(lib, spec.as_ref(), false)?;
    let mut out = Vec::new();
    let mut cur = info;
    while !cur.is_null() {
        // SAFETY: cur walks the list fi_getinfo returned, which stays alive until freeinfo below.
        out.push(unsafe { read_attrs(cur) });
        // SAFETY: as above.
        cur = unsafe { (*cur).next };
    }
    // SAFETY: info came from fi_getinfo and is freed once.
    unsafe { (lib.freeinfo)(info) };
    Ok(out)
}

/// Reads the granted attributes of one fi_info entry.
///
/// # Safety
/// `info` must point to a valid fi_info returned by fi_getinfo.
unsafe fn read_attrs(info: *const fi::fi_info) -> DomainAttrs {
    // SAFETY: the caller guarantees info and its attribute structs are valid.
    unsafe {
        let i = &*info;
        let d = &*i.domain_attr;
        let f = &*i.fabric_attr;
        let ep = &*i.ep_attr;
        DomainAttrs {
            provider: cstr_or_empty(f.prov_name),
            fabric: cstr_or_empty(f.name),
            domain: cstr_or_empty(d.name),
            virt_addr: d.mr_mode & fi::FI_MR_VIRT_ADDR != 0,
            prov_key: d.mr_mode & fi::FI_MR_PROV_KEY != 0,
            mr_local: d.mr_mode & fi::FI_MR_LOCAL != 0,
            max_msg_size: ep.max_msg_size,
            inject_size: (*i.tx_attr).inject_size,
            tx_size: (*i.tx_attr).size,
            rx_size: (*i.rx_attr).size,
            cq_data_size: d.cq_data_size,
            use_inject: inject_allowed(&cstr_or_empty(f.prov_name)),
            hmem: i.caps & fi::FI_HMEM != 0,
            wait_fd: false,
            // Built-in providers report 100 * major + minor of the library as their major
            // version (117.0 for libfabric 1.17.0); the fix came with 1.19.
            zero_byte_delivery_lost: cstr_or_empty(f.prov_name) == "shm"
                && f.prov_version < fi::fi_version(119, 0),
        }
    }
}

fn getinfo(
    lib: &'static LibFabric,
    spec: Option<&DomainSpec>,
    hmem: bool,
) -> Result<*mut fi::fi_info> {
    // SAFETY: fi_dupinfo(NULL) allocates an empty fi_info with all attribute structs.
    let hints = unsafe { (lib.dupinfo)(ptr::null()) };
    if hints.is_null() {
        return Err(Error::Config("fi_allocinfo failed".into()));
    }
    let result = (|| {
        // SAFETY: hints and its attribute structs were allocated by fi_dupinfo; strings placed in
        // them are malloc'd so fi_freeinfo can free them.
        unsafe {
            let h = &mut *hints;
            h.caps = fi::FI_MSG | fi::FI_RMA | fi::FI_WRITE | fi::FI_REMOTE_WRITE;
            if hmem {
                h.caps |= fi::FI_HMEM;
            }
            h.mode = fi::FI_CONTEXT | fi::FI_CONTEXT2;
            (*h.ep_attr).type_ = fi::FI_EP_RDM;
            let d = &mut *h.domain_attr;
            d.mr_mode =
                fi::FI_MR_LOCAL | fi::FI_MR_VIRT_ADDR | fi::FI_MR_ALLOCATED | fi::FI_MR_PROV_KEY;
            if hmem {
                d.mr_mode |= fi::FI_MR_HMEM;
            }
            d.threading = fi::FI_THREAD_DOMAIN;
            (*h.tx_attr).msg_order = 0;
            (*h.rx_attr).msg_order = 0;
            let mut node = None;
            let mut flags = 0;
            if let Some(spec) = spec {
                (*h.fabric_attr).prov_name = strdup(&spec.provider_string())?;
                if let Some(iface) = &spec.interface {
                    d.name = strdup(iface)?;
                }
                // Socket providers in 1.17 ignore the domain-name hint: bind the interface's own
                // address instead, so `interface` really selects the interface.
                let iface_node = match (&spec.interface, &spec.node) {
                    (Some(iface), None)
                        if crate::domain_types::is_socket_provider(&spec.provider) =>
                    {
                        Some(interface_ipv4(iface)?)
                    }
                    _ => None,
                };
                if let Some(n) = spec.node.as_ref().or(iface_node.as_ref()) {
                    node = Some(
                        CString::new(n.as_str())
                            .map_err(|_| Error::Config(format!("NUL byte in node {n:?}")))?,
                    );
                    flags |= fi::FI_SOURCE;
                }
            }
            let mut info = ptr::null_mut();
            let rc = (lib.getinfo)(
                fi::api_version_for(lib.runtime_version(), hmem),
                node.as_ref().map_or(ptr::null(), |n| n.as_ptr()),
                ptr::null(),
                flags,
                hints,
                &mut info,
            );
            if rc != 0 || info.is_null() {
                let what = match spec {
                    Some(s) => format!("{s:?}"),
                    None => "any provider".to_string(),
                };
                return Err(Error::ProviderNotFound {
                    what,
                    detail: format!(
                        "fi_getinfo: {} (needs an RDM endpoint with FI_MSG, FI_RMA and remote CQ \
                         data; run `python -m stolon info` to list what is usable)",
                        lib.error_string(rc as isize)
                    ),
                });
            }
            Ok(info)
        }
    })();
    // SAFETY: hints came from fi_dupinfo and is freed exactly once.
    unsafe { (lib.freeinfo)(hints) };
    result
}

impl FabricDomain {
    /// Opens fabric, domain, CQ, AV and an enabled RDM endpoint for `spec`.
    pub fn open(spec: &DomainSpec) -> Result<Self> {
        let lib = fi::lib().map_err(|e| Error::LibraryNotFound(e.to_string()))?;
        let info = match spec.hmem {
            true => getinfo(lib, Some(spec), true).or_else(|_| getinfo(lib, Some(spec), false))?,
            false => getinfo(lib, Some(spec), false)?,
        };
        let mut dom = FabricDomain {
            lib,
            info,
            fabric: ptr::null_mut(),
            domain: ptr::null_mut(),
            cq: ptr::null_mut(),
            av: ptr::null_mut(),
            ep: ptr::null_mut(),
            name: Vec::new(),
            wait_fd: None,
            // SAFETY: info is the valid list head fi_getinfo returned.
            attrs: unsafe { read_attrs(info) },
        };
        if dom.attrs.cq_data_size < 4 {
            return Err(Error::ProviderNotFound {
                what: format!("{spec:?}"),
                detail: format!("remote CQ data is {} bytes, need 4", dom.attrs.cq_data_size),
            });
        }
        // SAFETY: each call follows the libfabric object lifecycle: fabric from info, domain
        // from fabric, CQ/AV/EP from domain; every pointer passed is either the valid object just
        // created or a properly initialised attribute struct. Drop closes them in reverse order.
        unsafe {
            let rc = (lib.fabric)((*info).fabric_attr, &mut dom.fabric, ptr::null_mut());
            check(lib, "fi_fabric", rc as isize)?;
            let rc =
                ((*(*dom.fabric).ops).domain)(dom.fabric, info, &mut dom.domain, ptr::null_mut());
            check(lib, "fi_domain", rc as isize)?;

            dom.open_cq()?;
            let ops = &*(*dom.domain).ops;

            let mut av_attr = fi::fi_av_attr {
                type_: fi::FI_AV_TABLE,
                rx_ctx_bits: 0,
                count: 256,
                ep_per_node: 0,
                name: ptr::null(),
                map_addr: ptr::null_mut(),
                flags: 0,
            };
            let rc = (ops.av_open)(dom.domain, &mut av_attr, &mut dom.av, ptr::null_mut());
            check(lib, "fi_av_open", rc as isize)?;

            let rc = (ops.endpoint)(dom.domain, info, &mut dom.ep, ptr::null_mut());
            check(lib, "fi_endpoint", rc as isize)?;
            let ep_fid = &mut (*dom.ep).fid as *mut fi::fid;
            let ep_ops = &*(*dom.ep).fid.ops;
            let rc = (ep_ops.bind)(ep_fid, &mut (*dom.av).fid, 0);
            check(lib, "fi_ep_bind(av)", rc as isize)?;
            let rc = (ep_ops.bind)(ep_fid, &mut (*dom.cq).fid, fi::FI_TRANSMIT | fi::FI_RECV);
            check(lib, "fi_ep_bind(cq)", rc as isize)?;
            let rc = (ep_ops.control)(ep_fid, fi::FI_ENABLE, ptr::null_mut());
            check(lib, "fi_enable", rc as isize)?;

            let mut len = 0usize;
            let getname = (*(*dom.ep).cm).getname;
            // The first call reports the size with -FI_ETOOSMALL.
            let _ = getname(ep_fid, ptr::null_mut(), &mut len);
            if len == 0 || len > 4096 {
                len = 256;
            }
            let mut buf = vec![0u8; len];
            let rc = getname(ep_fid, buf.as_mut_ptr().cast(), &mut len);
            check(lib, "fi_getname", rc as isize)?;
            buf.truncate(len);
            dom.name = buf;
        }
        Ok(dom)
    }

    /// Opens the completion queue: with a file-descriptor wait object where the provider gives
    /// one (so an idle worker sleeps until traffic arrives), else without (the worker polls).
    /// `STOLON_WAIT_FD=0` forces the latter.
    fn open_cq(&mut self) -> Result<()> {
        let want_fd = std::env::var("STOLON_WAIT_FD").map_or(true, |v| v != "0");
        let size = (self.attrs.tx_size + self.attrs.rx_size).max(1024);
        let open = |dom: &mut Self, wait_obj| {
            let mut cq_attr = fi::fi_cq_attr {
                size,
                flags: 0,
                format: fi::FI_CQ_FORMAT_DATA,
                wait_obj,
                signaling_vector: 0,
                wait_cond: 0,
                wait_set: ptr::null_mut(),
            };
            // SAFETY: the domain is open; cq_attr lives across the call; dom.cq receives the CQ.
            unsafe {
                let ops = &*(*dom.domain).ops;
                (ops.cq_open)(dom.domain, &mut cq_attr, &mut dom.cq, ptr::null_mut())
            }
        };
        if want_fd && open(self, fi::FI_WAIT_FD) == 0 {
            let mut fd: std::os::fd::RawFd = -1;
            // SAFETY: the CQ is open; FI_GETWAIT writes one int (the descriptor) for FI_WAIT_FD.
            let rc = unsafe {
                let cq_fid = &mut (*self.cq).fid as *mut fi::fid;
                ((*(*cq_fid).ops).control)(cq_fid, fi::FI_GETWAIT, (&mut fd as *mut i32).cast())
            };
            if rc == 0 && fd >= 0 {
                self.wait_fd = Some(fd);
                self.attrs.wait_fd = true;
                return Ok(());
            }
            // No usable descriptor (udp;ofi_rxd): a CQ without a wait object instead.
            // SAFETY: the CQ was just opened, nothing is bound to it yet; closed once.
            unsafe {
                let cq_fid = &mut (*self.cq).fid as *mut fi::fid;
                ((*(*cq_fid).ops).close)(cq_fid);
            }
            self.cq = ptr::null_mut();
        }
        let rc = open(self, fi::FI_WAIT_NONE);
        check(self.lib, "fi_cq_open", rc as isize)
    }

    /// The CQ's wait descriptor, if it has one.
    pub fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        self.wait_fd
    }

    /// `fi_trywait` on the CQ: true when the worker may sleep on [`Self::wait_fd`] (nothing is
    /// pending and the descriptor will signal new events), false when it must poll first.
    pub fn trywait(&mut self) -> bool {
        if self.wait_fd.is_none() {
            return false;
        }
        // SAFETY: fabric and CQ are open; the array holds one valid fid for the call.
        let rc = unsafe {
            let mut fid = &mut (*self.cq).fid as *mut fi::fid;
            ((*(*self.fabric).ops).trywait)(self.fabric, &mut fid, 1)
        };
        rc == 0
    }

    /// Closes the endpoint (cancelling what is posted) ahead of the registrations and the other
    /// objects, which [`Drop`] closes. Idempotent.
    pub fn close_endpoint(&mut self) -> Result<()> {
        if self.ep.is_null() {
            return Ok(());
        }
        // SAFETY: ep is the live endpoint of this domain; nulled so it is closed once.
        let rc = unsafe { ((*(*self.ep).fid.ops).close)(&mut (*self.ep).fid) };
        self.ep = ptr::null_mut();
        check(self.lib, "fi_close(endpoint)", rc as isize)
    }

    /// This endpoint's address, to be given to peers.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Adds a peer endpoint address to the AV.
    pub fn insert_addr(&mut self, name: &[u8]) -> Result<fi::fi_addr_t> {
        let mut addr: fi::fi_addr_t = fi::FI_ADDR_NOTAVAIL;
        // SAFETY: av is open; name points to `name.len()` readable bytes of one address in this
        // provider's format (checked by the provider), and addr receives one fi_addr_t.
        let rc = unsafe {
            ((*(*self.av).ops).insert)(
                self.av,
                name.as_ptr().cast(),
                1,
                &mut addr,
                0,
                ptr::null_mut(),
            )
        };
        if rc != 1 || addr == fi::FI_ADDR_NOTAVAIL {
            return Err(Error::Fabric {
                call: "fi_av_insert",
                code: rc as isize,
                message: "peer address rejected".into(),
            });
        }
        Ok(addr)
    }

    /// Removes a peer from the AV (its connection state is dropped).
    pub fn remove_addr(&mut self, mut addr: fi::fi_addr_t) {
        // SAFETY: av is open and addr was returned by insert on this AV.
        unsafe {
            ((*(*self.av).ops).remove)(self.av, &mut addr, 1, 0);
        }
    }

    /// Registers `len` bytes at `ptr` for local use and remote writes, asking for `key`.
    ///
    /// # Safety
    /// The memory must stay valid until the returned region is closed with [`Self::close_mr`].
    pub unsafe fn register(&mut self, ptr: *const u8, len: usize, key: u64) -> Result<Mr> {
        let access = fi::FI_SEND | fi::FI_RECV | fi::FI_WRITE | fi::FI_REMOTE_WRITE;
        let mut mr = ptr::null_mut();
        // SAFETY: the domain is open; the caller keeps the memory valid while registered.
        let rc = unsafe {
            ((*(*self.domain).mr).reg)(
                &mut (*self.domain).fid,
                ptr.cast(),
                len,
                access,
                0,
                key,
                0,
                &mut mr,
                ptr::null_mut(),
            )
        };
        check(self.lib, "fi_mr_reg", rc as isize)?;
        Ok(Mr { raw: mr })
    }

    /// The API version this domain's fabric was opened with.
    fn api_version(&self) -> u32 {
        // SAFETY: info is the list head fi_getinfo returned, kept until drop; its fabric_attr
        // is always allocated.
        unsafe { (*(*self.info).fabric_attr).api_version }
    }

    /// Registers `len` bytes of CUDA device memory on device `cuda_device` (FI_HMEM): from a
    /// dma-buf (`FI_MR_DMABUF`) where [`fi::gpu_mr_path`] allows it, else (or when the provider
    /// refuses the dma-buf) through the CUDA interface. An error makes the engine stage.
    ///
    /// # Safety
    /// The device memory must stay allocated until the region is closed.
    pub unsafe fn register_hmem(
        &mut self,
        ptr: u64,
        len: usize,
        key: u64,
        cuda_device: usize,
    ) -> Result<Mr> {
        let runtime = self.lib.runtime_version();
        let api = self.api_version();
        // Ask CUDA only where the answer matters (never with libfabric 1.17).
        let cuda_dmabuf = self.attrs.hmem
            && fi::gpu_mr_path(runtime, api, true, true) == fi::GpuMrPath::DmaBuf
            && stolon_cuda::Device::get(cuda_device)
                .and_then(|d| d.dma_buf_supported())
                .unwrap_or(false);
        match fi::gpu_mr_path(runtime, api, self.attrs.hmem, cuda_dmabuf) {
            fi::GpuMrPath::Staging => {
                return Err(Error::Config(format!(
                    "{} cannot register GPU memory (no FI_HMEM)",
                    self.attrs.provider
                )))
            }
            fi::GpuMrPath::DmaBuf => {
                // SAFETY: forwarded contract; gpu_mr_path chose DmaBuf, so API >= 1.20.
                if let Ok(mr) = unsafe { self.register_dmabuf(ptr, len, key, cuda_device) } {
                    return Ok(mr);
                }
                // The export or the provider refused: the CUDA interface next.
            }
            fi::GpuMrPath::CudaIface => {}
        }
        let iov = libc::iovec {
            iov_base: ptr as *mut c_void,
            iov_len: len,
        };
        let attr = fi::fi_mr_attr {
            mr_iov: &iov,
            iov_count: 1,
            access: fi::FI_SEND | fi::FI_RECV | fi::FI_WRITE | fi::FI_REMOTE_WRITE,
            offset: 0,
            requested_key: key,
            context: ptr::null_mut(),
            auth_key_size: 0,
            auth_key: ptr::null_mut(),
            iface: fi::FI_HMEM_CUDA,
            device: cuda_device as u64,
        };
        let mut mr = ptr::null_mut();
        // SAFETY: the domain is open and was granted FI_HMEM; attr and iov live across the call;
        // the caller keeps the device memory allocated while registered.
        let rc =
            unsafe { ((*(*self.domain).mr).regattr)(&mut (*self.domain).fid, &attr, 0, &mut mr) };
        check(self.lib, "fi_mr_regattr(FI_HMEM_CUDA)", rc as isize)?;
        Ok(Mr { raw: mr })
    }

    /// `fi_mr_regattr` with `FI_MR_DMABUF`: exports the page-aligned range around
    /// `ptr..ptr+len` as a CUDA dma-buf and registers `len` bytes at `ptr` from it. The
    /// descriptor is closed once registered (the provider holds its own reference).
    ///
    /// # Safety
    /// The device memory must stay allocated until the region is closed; the domain must have
    /// been opened with API version >= 1.20.
    unsafe fn register_dmabuf(
        &mut self,
        ptr: u64,
        len: usize,
        key: u64,
        cuda_device: usize,
    ) -> Result<Mr> {
        use std::os::fd::AsRawFd;
        let ctx = stolon_cuda::Device::get(cuda_device)
            .and_then(|d| d.primary_context())
            .map_err(crate::staging::cuda_err)?;
        let exported =
            stolon_cuda::export_dmabuf(&ctx, ptr, len).map_err(crate::staging::cuda_err)?;
        let dmabuf = fi::fi_mr_dmabuf {
            fd: exported.fd.as_raw_fd(),
            offset: exported.offset,
            len,
            base_addr: exported.base as *mut c_void,
        };
        let attr = fi::fi_mr_attr_v1_20 {
            mem: fi::fi_mr_attr_mem { dmabuf: &dmabuf },
            iov_count: 1,
            access: fi::FI_SEND | fi::FI_RECV | fi::FI_WRITE | fi::FI_REMOTE_WRITE,
            offset: 0,
            requested_key: key,
            context: ptr::null_mut(),
            auth_key_size: 0,
            auth_key: ptr::null_mut(),
            iface: fi::FI_HMEM_CUDA,
            device: cuda_device as u64,
            hmem_data: ptr::null_mut(),
            page_size: 0,
            base_mr: ptr::null(),
            sub_mr_cnt: 0,
        };
        let mut mr = ptr::null_mut();
        // SAFETY: the domain is open with FI_HMEM and API >= 1.20 (the caller checked), so the
        // provider reads the 1.20 layout and, with FI_MR_DMABUF, the dma-buf through the union;
        // attr, dmabuf and the descriptor live across the call; the caller keeps the memory
        // allocated while registered.
        let rc = unsafe {
            ((*(*self.domain).mr).regattr)(
                &mut (*self.domain).fid,
                (&attr as *const fi::fi_mr_attr_v1_20).cast(),
                fi::FI_MR_DMABUF,
                &mut mr,
            )
        };
        // The registration holds its own reference to the dma-buf.
        drop(exported);
        check(self.lib, "fi_mr_regattr(FI_MR_DMABUF)", rc as isize)?;
        Ok(Mr { raw: mr })
    }

    /// Closes a registered region.
    pub fn close_mr(&mut self, mr: Mr) -> Result<()> {
        // SAFETY: mr.raw is a live MR of this domain; it is consumed so it is closed once.
        let rc = unsafe { ((*(*mr.raw).fid.ops).close)(&mut (*mr.raw).fid) };
        check(self.lib, "fi_close(mr)", rc as isize)
    }

    fn post_result(&self, call: &'static str, rc: isize) -> Result<Posted> {
        match rc {
            0 => Ok(Posted::Yes),
            rc if rc == -fi::FI_EAGAIN => Ok(Posted::Again),
            rc => Err(Error::Fabric {
                call,
                code: rc,
                message: self.lib.error_string(rc),
            }),
        }
    }

    /// Posts an RMA write, with remote CQ data when `data` is given. With `delivered` the
    /// completion is `FI_DELIVERY_COMPLETE`: it is reported only once the target has placed
    /// the bytes (checked on tcp, net, shm and udp with a stopped target); without it the
    /// provider's default, which on tcp and shm means only that the source may be reused.
    /// Zero-byte writes where the provider loses their delivery completion
    /// ([`DomainAttrs::zero_byte_delivery_lost`]) take the default: nothing is there to deliver.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and registered (with `desc`) until the completion for
    /// `ctx` is read; `ctx` must point to a context block of at least 64 bytes that stays valid
    /// until then; `raddr`/`key` must be valid for the peer (the provider cannot be trusted to
    /// reject bad ones cleanly).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: fi::fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
        delivered: bool,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        if delivered && !(len == 0 && self.attrs.zero_byte_delivery_lost) {
            let iov = libc::iovec {
                iov_base: buf as *mut c_void,
                iov_len: len,
            };
            let mut desc = desc;
            let rma_iov = fi::fi_rma_iov {
                addr: raddr,
                len,
                key,
            };
            let msg = fi::fi_msg_rma {
                msg_iov: &iov,
                desc: &mut desc,
                iov_count: 1,
                addr: dest,
                rma_iov: &rma_iov,
                rma_iov_count: 1,
                context: ctx,
                data: data.unwrap_or(0),
            };
            let mut flags = fi::FI_COMPLETION | fi::FI_DELIVERY_COMPLETE;
            if data.is_some() {
                flags |= fi::FI_REMOTE_CQ_DATA;
            }
            // SAFETY: the endpoint is enabled; msg and what it points to live across the call
            // (the provider copies the descriptors); the caller upholds the buffer and
            // context contracts.
            let rc = unsafe { ((*(*self.ep).rma).writemsg)(self.ep, &msg, flags) };
            return self.post_result("fi_writemsg", rc);
        }
        // SAFETY: the endpoint is enabled; the caller upholds the buffer and context contracts.
        let rc = unsafe {
            let rma = &*(*self.ep).rma;
            match data {
                Some(d) => {
                    (rma.writedata)(self.ep, buf.cast(), len, desc, d, dest, raddr, key, ctx)
                }
                None => (rma.write)(self.ep, buf.cast(), len, desc, dest, raddr, key, ctx),
            }
        };
        self.post_result("fi_write", rc)
    }

    /// Writes a small buffer (at most `attrs.inject_size` bytes) without a local completion:
    /// the buffer may be reused as soon as this returns `Posted::Yes`.
    ///
    /// # Safety
    /// `buf..buf+len` must be readable for the duration of the call; `raddr`/`key` as for
    /// [`Self::post_write`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn inject_write(
        &mut self,
        buf: *const u8,
        len: usize,
        dest: fi::fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
    ) -> Result<Posted> {
        // SAFETY: the endpoint is enabled; the caller upholds the buffer contract.
        let rc = unsafe {
            let rma = &*(*self.ep).rma;
            match data {
                Some(d) => (rma.injectdata)(self.ep, buf.cast(), len, d, dest, raddr, key),
                None => (rma.inject)(self.ep, buf.cast(), len, dest, raddr, key),
            }
        };
        self.post_result("fi_inject_write", rc)
    }

    /// Posts a message send.
    ///
    /// # Safety
    /// As for [`Self::post_write`], for the local buffer and context.
    pub unsafe fn post_send(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: fi::fi_addr_t,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        // SAFETY: the endpoint is enabled; the caller upholds the buffer and context contracts.
        let rc = unsafe { ((*(*self.ep).msg).send)(self.ep, buf.cast(), len, desc, dest, ctx) };
        self.post_result("fi_send", rc)
    }

    /// Posts a receive buffer for messages from any peer.
    ///
    /// # Safety
    /// As for [`Self::post_write`], for the receive buffer and context.
    pub unsafe fn post_recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        // SAFETY: the endpoint is enabled; the caller upholds the buffer and context contracts.
        let rc = unsafe {
            ((*(*self.ep).msg).recv)(self.ep, buf.cast(), len, desc, fi::FI_ADDR_UNSPEC, ctx)
        };
        self.post_result("fi_recv", rc)
    }

    /// Reads up to `out.len()` completions; drives the provider's progress.
    ///
    /// Returns the number read. A failed completion is returned as `Err(CqError)` on its own.
    pub fn poll(&mut self, out: &mut [fi::fi_cq_data_entry]) -> Result<usize, CqError> {
        // SAFETY: cq is open; out has room for out.len() entries of the CQ's DATA format.
        let rc = unsafe { ((*(*self.cq).ops).read)(self.cq, out.as_mut_ptr().cast(), out.len()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        if rc == -fi::FI_EAGAIN {
            return Ok(0);
        }
        if rc == -fi::FI_EAVAIL {
            // SAFETY: an all-zero fi_cq_err_entry is valid (null pointers, zero sizes).
            let mut e: fi::fi_cq_err_entry = unsafe { std::mem::zeroed() };
            // SAFETY: cq is open and e is a valid, writable error entry.
            let n = unsafe { ((*(*self.cq).ops).readerr)(self.cq, &mut e, 0) };
            if n == 1 {
                // SAFETY: strerror of this CQ takes the provider errno and the err_data it gave.
                let prov = unsafe {
                    let p = ((*(*self.cq).ops).strerror)(
                        self.cq,
                        e.prov_errno,
                        e.err_data,
                        ptr::null_mut(),
                        0,
                    );
                    cstr_or_empty(p)
                };
                return Err(CqError {
                    op_context: e.op_context,
                    err: e.err,
                    message: format!("{} ({prov})", self.lib.error_string(e.err as isize)),
                });
            }
            return Ok(0);
        }
        Err(CqError {
            op_context: ptr::null_mut(),
            err: rc as i32,
            message: format!("fi_cq_read: {}", self.lib.error_string(rc)),
        })
    }
}

impl Drop for FabricDomain {
    fn drop(&mut self) {
        // SAFETY: each object is closed at most once, endpoint before the AV and CQ it is bound to,
        // then domain, then fabric; null pointers (a failed open) are skipped.
        unsafe {
            for f in [
                self.ep as *mut fi::fid,
                self.av as *mut fi::fid,
                self.cq as *mut fi::fid,
                self.domain as *mut fi::fid,
                self.fabric as *mut fi::fid,
            ] {
                if !f.is_null() {
                    ((*(*f).ops).close)(f);
                }
            }
            (self.lib.freeinfo)(self.info);
        }
    }
}
