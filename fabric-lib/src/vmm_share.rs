//! Handing CUDA VMM memory to writers on the same host: file descriptors over a Unix socket.
//!
//! Memory from the VMM API (`cuMemCreate` + `cuMemMap`, PyTorch's `expandable_segments`) has no
//! CUDA IPC handle. Its owner can export each physical allocation as a POSIX file descriptor, but
//! a descriptor number means nothing in another process: it has to travel with `SCM_RIGHTS` over
//! a Unix socket. This module is that exchange, with no CUDA in it (the owner supplies an
//! exporter per region, the writer a callback per received descriptor), so all of it is tested
//! with ordinary file descriptors.
//!
//! Protocol, on an `AF_UNIX` `SOCK_SEQPACKET` socket (message boundaries kept, EOF on close):
//!
//! 1. The writer connects and sends one [`Request`]: region id and the region's token (from the
//!    memory descriptor, so only holders of the descriptor get the memory).
//! 2. The owner answers with one [`Reply`]: a status, and for `Ok` the number of allocations, the
//!    region's offset in the first one and their total size.
//! 3. For `Ok`, [`ChunkFrame`]s follow, in address order, each carrying the sizes of up to
//!    [`FDS_PER_FRAME`] allocations and as many descriptors (`SCM_RIGHTS`).
//! 4. The connection then stays open as a *lease*: the owner closes it when the region is
//!    unregistered or the engine stops, and the kernel closes it when the owner dies. The writer
//!    sees EOF ([`Lease::is_gone`]) and unmaps. Anything else the writer sends is a protocol
//!    error and ends the lease.
//!
//! Every wait has a deadline; a request that does not arrive in time, a malformed frame, a bad
//! token or an unknown region ends the connection (after a reply saying why, where one fits).
//! No special process capabilities are needed (no `pidfd_getfd`, no ptrace).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Protocol version carried in every frame.
pub const PROTO_VERSION: u8 = 1;
const REQ_MAGIC: &[u8; 4] = b"STvq";
const REPLY_MAGIC: &[u8; 4] = b"STvr";
const CHUNK_MAGIC: &[u8; 4] = b"STvc";
/// Descriptors sent in one frame (the kernel takes at most 253 per message).
pub const FDS_PER_FRAME: usize = 32;
/// Largest frame either side reads.
const MAX_FRAME: usize = 1024;
/// Longest reply message.
const MAX_MESSAGE: usize = 512;
/// Most allocations one region may span (as in the descriptor).
const MAX_CHUNKS: u64 = crate::desc::MAX_VMM_CHUNKS;

fn proto_err(why: impl Into<String>) -> Error {
    Error::Decode {
        what: "VMM share frame",
        why: why.into(),
    }
}

fn os_err(what: &str) -> Error {
    Error::TransferFailed(format!(
        "VMM share socket: {what}: {}",
        std::io::Error::last_os_error()
    ))
}

/// A writer's request for a region's allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub region: u64,
    pub token: [u8; 16],
}

impl Request {
    /// Encoded size.
    pub const LEN: usize = 4 + 1 + 8 + 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(REQ_MAGIC);
        b[4] = PROTO_VERSION;
        b[5..13].copy_from_slice(&self.region.to_le_bytes());
        b[13..].copy_from_slice(&self.token);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != Self::LEN {
            return Err(proto_err(format!(
                "request of {} bytes (expected {})",
                b.len(),
                Self::LEN
            )));
        }
        check_head(b, REQ_MAGIC)?;
        Ok(Request {
            region: u64::from_le_bytes(b[5..13].try_into().unwrap()),
            token: b[13..].try_into().unwrap(),
        })
    }
}

fn check_head(b: &[u8], magic: &[u8; 4]) -> Result<()> {
    if b.len() < 5 || &b[..4] != magic {
        return Err(proto_err("wrong magic bytes"));
    }
    if b[4] != PROTO_VERSION {
        return Err(proto_err(format!(
            "protocol version {} (this build speaks {PROTO_VERSION})",
            b[4]
        )));
    }
    Ok(())
}

/// The owner's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// No such region (never registered, or unregistered since).
    UnknownRegion = 1,
    /// The token does not match the region's.
    BadToken = 2,
    /// The request could not be decoded.
    Malformed = 3,
    /// The owner could not export the memory (the message says why).
    ExportFailed = 4,
}

impl Status {
    fn from_u8(x: u8) -> Result<Self> {
        Ok(match x {
            0 => Status::Ok,
            1 => Status::UnknownRegion,
            2 => Status::BadToken,
            3 => Status::Malformed,
            4 => Status::ExportFailed,
            _ => return Err(proto_err(format!("unknown status {x}"))),
        })
    }
}

/// Layout of a shared region: the allocations covering it, in address order, and where the
/// region starts in the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Size of each allocation (mapping) in bytes.
    pub sizes: Vec<u64>,
    /// Offset of the region's first byte in the first allocation.
    pub offset: u64,
}

impl Layout {
    /// Total size of the allocations.
    pub fn span(&self) -> u64 {
        self.sizes.iter().sum()
    }
}

/// Reply header: status, and for `Ok` the layout's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub chunks: u64,
    pub offset: u64,
    pub span: u64,
    pub message: String,
}

impl Reply {
    const HEAD: usize = 4 + 1 + 1 + 8 + 8 + 8;

    fn error(status: Status, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut n = MAX_MESSAGE;
            while !message.is_char_boundary(n) {
                n -= 1;
            }
            message.truncate(n);
        }
        Reply {
            status,
            chunks: 0,
            offset: 0,
            span: 0,
            message,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::HEAD + self.message.len());
        b.extend_from_slice(REPLY_MAGIC);
        b.push(PROTO_VERSION);
        b.push(self.status as u8);
        b.extend_from_slice(&self.chunks.to_le_bytes());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&self.span.to_le_bytes());
        b.extend_from_slice(self.message.as_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_head(b, REPLY_MAGIC)?;
        if b.len() < Self::HEAD || b.len() > Self::HEAD + MAX_MESSAGE {
            return Err(proto_err(format!("reply of {} bytes", b.len())));
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let r = Reply {
            status: Status::from_u8(b[5])?,
            chunks: u(6),
            offset: u(14),
            span: u(22),
            message: String::from_utf8_lossy(&b[Self::HEAD..]).into_owned(),
        };
        if r.status == Status::Ok && (r.chunks == 0 || r.chunks > MAX_CHUNKS || r.offset >= r.span)
        {
            return Err(proto_err(format!(
                "layout of {} allocations, offset {} of {}",
                r.chunks, r.offset, r.span
            )));
        }
        Ok(r)
    }
}

/// Sizes of allocations `first..first + sizes.len()`; the frame carries one descriptor each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFrame {
    pub first: u64,
    pub sizes: Vec<u64>,
}

impl ChunkFrame {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(14 + 8 * self.sizes.len());
        b.extend_from_slice(CHUNK_MAGIC);
        b.push(PROTO_VERSION);
        b.extend_from_slice(&self.first.to_le_bytes());
        b.push(self.sizes.len() as u8);
        for s in &self.sizes {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_head(b, CHUNK_MAGIC)?;
        if b.len() < 14 {
            return Err(proto_err("short chunk frame"));
        }
        let first = u64::from_le_bytes(b[5..13].try_into().unwrap());
        let n = b[13] as usize;
        if n == 0 || n > FDS_PER_FRAME || b.len() != 14 + 8 * n {
            return Err(proto_err(format!(
                "chunk frame of {} bytes for {n} allocations",
                b.len()
            )));
        }
        let sizes = (0..n)
            .map(|i| u64::from_le_bytes(b[14 + 8 * i..22 + 8 * i].try_into().unwrap()))
            .collect();
        Ok(ChunkFrame { first, sizes })
    }
}

/// A fresh random token (from the kernel's generator).
pub fn random_token() -> [u8; 16] {
    let mut t = [0u8; 16];
    let mut got = 0;
    while got < t.len() {
        // SAFETY: writes at most the remaining bytes of `t`.
        let n = unsafe { libc::getrandom(t[got..].as_mut_ptr().cast(), t.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No getrandom (very old kernels): fall back to hashed time and pid.
            use std::hash::{BuildHasher, Hasher};
            for (i, c) in t.chunks_mut(8).enumerate() {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_usize(i);
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos(),
                );
                c.copy_from_slice(&h.finish().to_le_bytes());
            }
            break;
        }
    }
    t
}

/// Compares tokens without an early exit.
fn token_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------------
// Sockets

/// `sockaddr_un` for `name`: `@name` is in the abstract namespace, anything else a path.
fn sockaddr(name: &str) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, skip) = match name.strip_prefix('@') {
        Some(rest) => (rest.as_bytes(), 1),
        None => (name.as_bytes(), 0),
    };
    if bytes.is_empty() || bytes.len() + skip >= a.sun_path.len() || bytes.contains(&0) {
        return Err(Error::Config(format!("bad VMM socket name {name:?}")));
    }
    for (i, &c) in bytes.iter().enumerate() {
        a.sun_path[skip + i] = c as libc::c_char;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    // Abstract names are exactly as long as given; paths end with their NUL.
    let len = base + skip + bytes.len() + (1 - skip);
    Ok((a, len as libc::socklen_t))
}

fn seqpacket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(os_err("socket"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` has one of `events` or the deadline passes; returns the revents (0 on
/// timeout).
fn wait_fd(fd: BorrowedFd<'_>, events: libc::c_short, deadline: Instant) -> Result<libc::c_short> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_err("poll"));
        }
        if n > 0 || left.is_zero() {
            return Ok(p.revents);
        }
    }
}

/// Sends one frame with `fds` attached, waiting for buffer space until `deadline`.
fn send_frame(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let space = if raw.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is pure arithmetic.
        unsafe { libc::CMSG_SPACE(fd_bytes as u32) as usize }
    };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, aligned for cmsghdr, and holds one header
        // with room for `raw` (CMSG_SPACE of its size).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    loop {
        // SAFETY: msg points at live buffers (data, iov, cbuf) for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == data.len() {
                Ok(())
            } else {
                Err(Error::TransferFailed("VMM share socket: short send".into()))
            };
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                let r = wait_fd(sock, libc::POLLOUT, deadline)?;
                if r == 0 {
                    return Err(Error::Timeout(timeout));
                }
            }
            _ => return Err(os_err("sendmsg")),
        }
    }
}

/// One received frame: its bytes, and the descriptors that came with it (owned, close-on-exec).
#[derive(Debug)]
struct Frame {
    data: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Receives one frame, waiting until `deadline`. `Ok(None)` is EOF (the other side closed).
fn recv_frame(sock: BorrowedFd<'_>, deadline: Instant, timeout: Duration) -> Result<Option<Frame>> {
    let mut data = vec![0u8; MAX_FRAME];
    // Room for more descriptors than a frame may carry, so an oversized batch is seen (and
    // closed) rather than truncated.
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE((4 * 2 * FDS_PER_FRAME) as u32) as usize };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg points at live buffers of the sizes given.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    let r = wait_fd(sock, libc::POLLIN, deadline)?;
                    if r == 0 {
                        return Err(Error::Timeout(timeout));
                    }
                    continue;
                }
                Some(libc::ECONNRESET) => return Ok(None),
                _ => return Err(os_err("recvmsg")),
            }
        }
        // Take ownership of every descriptor first, so none leaks whatever happens next.
        let mut fds = Vec::new();
        // SAFETY: the kernel filled msg_control with well-formed cmsgs up to msg_controllen;
        // SCM_RIGHTS data is an array of ints, each a fresh descriptor now ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c) as *const RawFd;
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(proto_err("oversized frame or too many descriptors"));
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        data.truncate(n as usize);
        return Ok(Some(Frame { data, fds }));
    }
}

// ---------------------------------------------------------------------------------------------
// Owner side

/// Exports allocation `i` of a region as a descriptor (the owner's CUDA call, or a test double).
pub type Exporter = Box<dyn Fn(usize) -> Result<OwnedFd> + Send + Sync>;

/// A region the server hands out.
pub struct SharedRegion {
    pub token: [u8; 16],
    pub layout: Layout,
    pub exporter: Exporter,
}

enum ConnState {
    /// Connected; the request must arrive by the deadline.
    AwaitRequest(Instant),
    /// The region was handed out; the connection is its lease.
    Leased(u64),
}

struct Conn {
    sock: OwnedFd,
    state: ConnState,
}

struct ServerShared {
    regions: Mutex<HashMap<u64, Arc<SharedRegion>>>,
    /// Regions revoked since the server thread last looked (their leases are closed).
    revoked: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

/// The owner's socket: hands out registered regions' allocations and keeps one lease per
/// writer and region. A thread of its own polls it; dropping the server closes every lease.
pub struct FdServer {
    name: String,
    shared: Arc<ServerShared>,
    /// Written to wake the thread (revocations, stop).
    wake: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl FdServer {
    /// Binds `name` (`@name`: abstract namespace; otherwise a path, removed again on drop) and
    /// starts serving. `timeout` bounds every wait on a writer: the request's arrival, and each
    /// frame of the reply.
    pub fn bind(name: &str, timeout: Duration) -> Result<Self> {
        let (addr, len) = sockaddr(name)?;
        let sock = seqpacket()?;
        // SAFETY: addr/len describe a valid sockaddr_un; sock is ours.
        if unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        } != 0
        {
            return Err(Error::Config(format!(
                "cannot bind VMM socket {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: a bound socket of ours.
        if unsafe { libc::listen(sock.as_raw_fd(), 64) } != 0 {
            return Err(os_err("listen"));
        }
        // SAFETY: plain eventfd(2), owned from here on.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(os_err("eventfd"));
        }
        // SAFETY: fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let shared = Arc::new(ServerShared {
            regions: Mutex::new(HashMap::new()),
            revoked: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let wake2 = wake
            .try_clone()
            .map_err(|e| Error::Config(format!("dup: {e}")))?;
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stolon-vmm-share".into())
            .spawn(move || serve(sock, wake2, s2, timeout))
            .map_err(|e| Error::Config(format!("cannot spawn VMM share thread: {e}")))?;
        Ok(FdServer {
            name: name.to_string(),
            shared,
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The socket's name, as writers connect to it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts handing out `region`.
    pub fn add(&self, region: u64, r: SharedRegion) {
        self.shared
            .regions
            .lock()
            .unwrap()
            .insert(region, Arc::new(r));
    }

    /// Stops handing out `region` and ends its leases (writers unmap it).
    pub fn revoke(&self, region: u64) {
        if self
            .shared
            .regions
            .lock()
            .unwrap()
            .remove(&region)
            .is_some()
        {
            self.shared.revoked.lock().unwrap().push(region);
            self.poke();
        }
    }

    fn poke(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl FdServer {
    /// Stops serving: every lease ends, the socket closes (and a path is removed). Idempotent;
    /// later [`FdServer::add`]s are never served.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.poke();
        let t = self.thread.lock().unwrap().take();
        if let Some(t) = t {
            let _ = t.join();
            if !self.name.starts_with('@') {
                let _ = std::fs::remove_file(&self.name);
            }
        }
    }
}

impl Drop for FdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(listener: OwnedFd, wake: OwnedFd, shared: Arc<ServerShared>, timeout: Duration) {
    let mut conns: Vec<Conn> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let mut pfds = Vec::with_capacity(2 + conns.len());
        for fd in [&wake, &listener] {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for c in &conns {
            pfds.push(libc::pollfd {
                fd: c.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Wake at least every 100 ms to expire silent connections.
        // SAFETY: pfds is a valid array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!(
                "stolon: VMM share server: poll: {}",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if pfds[0].revents != 0 {
            let mut b = [0u8; 8];
            // SAFETY: an 8-byte read from our eventfd.
            let _ = unsafe { libc::read(wake.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        }
        // Revoked regions: end their leases.
        let revoked = std::mem::take(&mut *shared.revoked.lock().unwrap());
        let ready: Vec<bool> = pfds[2..].iter().map(|p| p.revents != 0).collect();
        let now = Instant::now();
        let mut keep = Vec::with_capacity(conns.len());
        for (c, ready) in conns.into_iter().zip(ready) {
            match c.state {
                ConnState::Leased(r) if revoked.contains(&r) => {}
                // Anything from a leaseholder (data or EOF) ends the lease.
                ConnState::Leased(_) if ready => {}
                ConnState::Leased(_) => keep.push(c),
                ConnState::AwaitRequest(_) if ready => {
                    if let Some(c) = answer(c, &shared, timeout) {
                        keep.push(c);
                    }
                }
                ConnState::AwaitRequest(deadline) if now >= deadline => {}
                ConnState::AwaitRequest(_) => keep.push(c),
            }
        }
        conns = keep;
        if pfds[1].revents != 0 {
            loop {
                // SAFETY: accept4 on our listening socket; the result is owned at once.
                let fd = unsafe {
                    libc::accept4(
                        listener.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                if fd < 0 {
                    break;
                }
                conns.push(Conn {
                    // SAFETY: a fresh descriptor from accept4.
                    sock: unsafe { OwnedFd::from_raw_fd(fd) },
                    state: ConnState::AwaitRequest(Instant::now() + timeout),
                });
            }
        }
    }
}

/// Reads and answers the request on `c`; returns the connection as a lease, or None when it
/// is done with (refused, malformed, EOF, or failed mid-reply).
fn answer(c: Conn, shared: &ServerShared, timeout: Duration) -> Option<Conn> {
    let deadline = Instant::now() + timeout;
    let sock = c.sock.as_fd();
    let frame = match recv_frame(sock, deadline, timeout) {
        Ok(Some(f)) => f,
        _ => return None,
    };
    let reply_err = |status, msg: String| {
        let _ = send_frame(
            sock,
            &Reply::error(status, msg).encode(),
            &[],
            deadline,
            timeout,
        );
        None
    };
    if !frame.fds.is_empty() {
        return reply_err(Status::Malformed, "a request carries no descriptors".into());
    }
    let req = match Request::decode(&frame.data) {
        Ok(r) => r,
        Err(e) => return reply_err(Status::Malformed, e.to_string()),
    };
    let region = shared.regions.lock().unwrap().get(&req.region).cloned();
    let Some(region) = region else {
        return reply_err(
            Status::UnknownRegion,
            format!("region {} is not shared (unregistered?)", req.region),
        );
    };
    if !token_eq(&region.token, &req.token) {
        return reply_err(
            Status::BadToken,
            format!("wrong token for region {}", req.region),
        );
    }
    let layout = &region.layout;
    if layout.sizes.is_empty() || layout.offset >= layout.span() {
        return reply_err(
            Status::ExportFailed,
            format!("region {} has an empty layout", req.region),
        );
    }
    let head = Reply {
        status: Status::Ok,
        chunks: layout.sizes.len() as u64,
        offset: layout.offset,
        span: layout.span(),
        message: String::new(),
    };
    // Export one batch at a time, so a large region never holds many descriptors open here.
    for (b, sizes) in layout.sizes.chunks(FDS_PER_FRAME).enumerate() {
        let first = b * FDS_PER_FRAME;
        let mut fds = Vec::with_capacity(sizes.len());
        for i in first..first + sizes.len() {
            match (region.exporter)(i) {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    return reply_err(
                        Status::ExportFailed,
                        format!("allocation {i} of region {}: {e}", req.region),
                    )
                }
            }
        }
        if b == 0 && send_frame(sock, &head.encode(), &[], deadline, timeout).is_err() {
            return None;
        }
        let frame = ChunkFrame {
            first: first as u64,
            sizes: sizes.to_vec(),
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        if send_frame(sock, &frame.encode(), &borrowed, deadline, timeout).is_err() {
            return None;
        }
    }
    Some(Conn {
        state: ConnState::Leased(req.region),
        ..c
    })
}

// ---------------------------------------------------------------------------------------------
// Writer side

/// A writer's hold on a region: the connection the owner closes when the region goes away.
#[derive(Debug)]
pub struct Lease {
    sock: OwnedFd,
    /// The region's layout as the owner sent it.
    pub layout: Layout,
}

impl Lease {
    /// Whether the owner ended the lease (region unregistered, engine stopped, process dead).
    /// Does not block.
    pub fn is_gone(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n != 0
    }
}

/// Connects to the owner's socket `name` and asks for `region`. Each allocation arrives as
/// `on_chunk(index, size, fd)` in address order (the callback maps it; the descriptor may be
/// closed once it returns). Returns the lease. The whole exchange must finish within `timeout`.
///
/// # Errors
/// [`Error::Timeout`] when the owner does not answer in time; [`Error::TransferFailed`] when
/// it cannot be reached (dead owner), refuses (unknown region, bad token, export failure) or
/// closes mid-reply; [`Error::Decode`] for a malformed reply; whatever `on_chunk` returns.
pub fn fetch(
    name: &str,
    region: u64,
    token: [u8; 16],
    timeout: Duration,
    mut on_chunk: impl FnMut(usize, u64, OwnedFd) -> Result<()>,
) -> Result<Lease> {
    let deadline = Instant::now() + timeout;
    let (addr, len) = sockaddr(name)?;
    let sock = seqpacket()?;
    // SAFETY: addr/len describe a valid sockaddr_un; sock is ours.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // A full backlog: wait for room.
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                if wait_fd(sock.as_fd(), libc::POLLOUT, deadline)? == 0 {
                    return Err(Error::Timeout(timeout));
                }
            }
            _ => {
                return Err(Error::TransferFailed(format!(
                    "cannot reach the owner's VMM socket {name} (owner gone?): {e}"
                )))
            }
        }
    }
    let gone = |what: &str| {
        Error::TransferFailed(format!(
            "the owner's VMM socket {name} closed {what} (owner gone?)"
        ))
    };
    let req = Request { region, token };
    send_frame(sock.as_fd(), &req.encode(), &[], deadline, timeout).map_err(|e| match e {
        Error::Timeout(_) => e,
        _ => gone("before the request"),
    })?;
    let Some(f) = recv_frame(sock.as_fd(), deadline, timeout)? else {
        return Err(gone("before replying"));
    };
    if !f.fds.is_empty() {
        return Err(proto_err("descriptors attached to the reply header"));
    }
    let refused = |r: &Reply| {
        Error::TransferFailed(format!(
            "the owner refused VMM region {region} ({:?}): {}",
            r.status, r.message
        ))
    };
    let reply = Reply::decode(&f.data)?;
    if reply.status != Status::Ok {
        return Err(refused(&reply));
    }
    let mut sizes = Vec::with_capacity(reply.chunks.min(1 << 16) as usize);
    while (sizes.len() as u64) < reply.chunks {
        let Some(f) = recv_frame(sock.as_fd(), deadline, timeout)? else {
            return Err(gone(&format!(
                "after {} of {} allocations",
                sizes.len(),
                reply.chunks
            )));
        };
        // An export that fails mid-way is reported by a reply in place of the next batch.
        if f.data.starts_with(REPLY_MAGIC) {
            let r = Reply::decode(&f.data)?;
            return Err(if r.status == Status::Ok {
                proto_err("a second reply header")
            } else {
                refused(&r)
            });
        }
        let frame = ChunkFrame::decode(&f.data)?;
        if frame.first != sizes.len() as u64
            || frame.sizes.len() != f.fds.len()
            || sizes.len() as u64 + frame.sizes.len() as u64 > reply.chunks
            || frame.sizes.contains(&0)
        {
            return Err(proto_err(format!(
                "chunk frame for allocations {}..+{} with {} descriptors, expected {} next of {}",
                frame.first,
                frame.sizes.len(),
                f.fds.len(),
                sizes.len(),
                reply.chunks
            )));
        }
        for (size, fd) in frame.sizes.into_iter().zip(f.fds) {
            on_chunk(sizes.len(), size, fd)?;
            sizes.push(size);
        }
    }
    let layout = Layout {
        sizes,
        offset: reply.offset,
    };
    if layout.span() != reply.span {
        return Err(proto_err(format!(
            "allocations add up to {} bytes, the reply said {}",
            layout.span(),
            reply.span
        )));
    }
    Ok(Lease { sock, layout })
}

#[cfg(test)]
mod tests;
