//! A **test double**, not a transport: an in-process "fabric" that delivers operations in a
//! deliberately scrambled order.
//!
//! The software providers on one link never reorder remote CQ data (see shared/LIBFABRIC.md), so
//! the engine's order-independence cannot be proven on them alone. This double sits below the
//! domain group in place of a libfabric endpoint (provider name `reorder`, the interface field is
//! the RNG seed). Engines in the same process reach each other through a process-wide registry.
//! Each poll delivers a random subset of the operations in flight, picked from anywhere in the
//! queue (so later posts routinely land before earlier ones), and reports completions in a
//! shuffled order. Writes really copy bytes into the target's registered memory, with the same
//! bounds and key checks a NIC would do; a bad key or range becomes an error completion.
//!
//! What is deterministic: given the same sequence of posts and polls and the same seed, the
//! choices are the same. Thread timing between two engines still varies from run to run.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::domain_types::{CqError, DomainAttrs, DomainSpec, Posted};
use crate::error::{Error, Result};
use crate::sys::libfabric::{self as fi, fi_addr_t, fi_cq_data_entry};

/// Provider name that selects this double.
pub const PROVIDER: &str = "reorder";
const NAME_TAG: &[u8; 7] = b"REORDER";

#[derive(Clone, Copy)]
struct Entry {
    ctx: usize,
    flags: u64,
    len: usize,
    data: u64,
}

struct Endpoint {
    /// key -> (address, length)
    mrs: Mutex<HashMap<u64, (usize, usize)>>,
    /// Completions caused here by peers (immediates, received messages).
    inbox: Mutex<Vec<Entry>>,
    /// Posted receive buffers: (address, length, context).
    recvs: Mutex<VecDeque<(usize, usize, usize)>>,
}

fn registry() -> &'static Mutex<HashMap<u64, Weak<Endpoint>>> {
    static R: OnceLock<Mutex<HashMap<u64, Weak<Endpoint>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

enum OpKind {
    Write {
        src: usize,
        len: usize,
        raddr: u64,
        key: u64,
        data: Option<u64>,
    },
    Send {
        src: usize,
        len: usize,
    },
}

struct InFlight {
    target: Arc<Endpoint>,
    op: OpKind,
    ctx: usize,
    seq: u64,
}

static REORDERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Deliveries so far (process-wide) of an op while an op posted earlier on the same domain was
/// still in flight: evidence that the double did reorder.
pub fn reordered_deliveries() -> u64 {
    REORDERED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A registration on the double.
pub struct LoopMr {
    pub key: u64,
}

/// One endpoint of the reordering double.
pub struct ReorderDomain {
    id: u64,
    ep: Arc<Endpoint>,
    name: Vec<u8>,
    pub attrs: DomainAttrs,
    peers: Vec<Option<Arc<Endpoint>>>,
    inflight: Vec<InFlight>,
    ready: Vec<Entry>,
    errors: VecDeque<CqError>,
    rng: u64,
    next_key: u64,
    seq: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Queue depth the double advertises; posts beyond it get "again", like a full NIC queue.
const DEPTH: usize = 256;

impl ReorderDomain {
    pub(crate) fn open(spec: &DomainSpec) -> Result<Self> {
        let seed = match &spec.interface {
            None => 1,
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| Error::Config(format!("reorder seed {s:?} is not a number")))?,
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ep = Arc::new(Endpoint {
            mrs: Mutex::new(HashMap::new()),
            inbox: Mutex::new(Vec::new()),
            recvs: Mutex::new(VecDeque::new()),
        });
        registry().lock().unwrap().insert(id, Arc::downgrade(&ep));
        let mut name = NAME_TAG.to_vec();
        name.extend_from_slice(&id.to_le_bytes());
        Ok(ReorderDomain {
            id,
            ep,
            name,
            attrs: DomainAttrs {
                provider: PROVIDER.to_string(),
                fabric: "in-process".into(),
                domain: format!("seed {seed}"),
                virt_addr: false,
                prov_key: false,
                mr_local: false,
                max_msg_size: usize::MAX,
                inject_size: 0,
                tx_size: DEPTH,
                rx_size: DEPTH,
                cq_data_size: 8,
                use_inject: false,
                hmem: false,
                wait_fd: false,
                zero_byte_delivery_lost: false,
            },
            peers: Vec::new(),
            inflight: Vec::new(),
            ready: Vec::new(),
            errors: VecDeque::new(),
            rng: seed ^ id.rotate_left(32),
            next_key: 1,
            seq: 0,
        })
    }

    pub(crate) fn name(&self) -> &[u8] {
        &self.name
    }

    pub(crate) fn insert_addr(&mut self, name: &[u8]) -> Result<fi_addr_t> {
        let bad = || Error::Fabric {
            call: "reorder av_insert",
            code: -(libc::EINVAL as isize),
            message: "not a reorder-double address".into(),
        };
        if name.len() != 15 || &name[..7] != NAME_TAG {
            return Err(bad());
        }
        let id = u64::from_le_bytes(name[7..].try_into().unwrap());
        let ep = registry()
            .lock()
            .unwrap()
            .get(&id)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Fabric {
                call: "reorder av_insert",
                code: -(libc::EHOSTUNREACH as isize),
                message: format!("reorder endpoint {id} is gone"),
            })?;
        self.peers.push(Some(ep));
        Ok((self.peers.len() - 1) as fi_addr_t)
    }

    pub(crate) fn remove_addr(&mut self, addr: fi_addr_t) {
        if let Some(p) = self.peers.get_mut(addr as usize) {
            *p = None;
        }
    }

    /// # Safety
    /// The memory must stay valid until [`Self::close_mr`].
    pub(crate) unsafe fn register(
        &mut self,
        ptr: *const u8,
        len: usize,
        key: u64,
    ) -> Result<LoopMr> {
        let _ = key;
        let key = self.next_key;
        self.next_key += 1;
        self.ep.mrs.lock().unwrap().insert(key, (ptr as usize, len));
        Ok(LoopMr { key })
    }

    pub(crate) fn close_mr(&mut self, mr: LoopMr) {
        self.ep.mrs.lock().unwrap().remove(&mr.key);
    }

    fn target(&self, dest: fi_addr_t) -> Result<Arc<Endpoint>> {
        self.peers
            .get(dest as usize)
            .cloned()
            .flatten()
            .ok_or_else(|| Error::Fabric {
                call: "reorder post",
                code: -(libc::EINVAL as isize),
                message: format!("unknown destination {dest}"),
            })
    }

    /// # Safety
    /// `buf..buf+len` must stay valid until the completion for `ctx` is read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post_write(
        &mut self,
        buf: *const u8,
        len: usize,
        dest: fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        if self.inflight.len() >= DEPTH {
            return Ok(Posted::Again);
        }
        let target = self.target(dest)?;
        let op = OpKind::Write {
            src: buf as usize,
            len,
            raddr,
            key,
            data,
        };
        self.seq += 1;
        self.inflight.push(InFlight {
            target,
            op,
            ctx: ctx as usize,
            seq: self.seq,
        });
        Ok(Posted::Yes)
    }

    /// # Safety
    /// As for [`Self::post_write`].
    pub(crate) unsafe fn post_send(
        &mut self,
        buf: *const u8,
        len: usize,
        dest: fi_addr_t,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        if self.inflight.len() >= DEPTH {
            return Ok(Posted::Again);
        }
        let target = self.target(dest)?;
        self.seq += 1;
        let op = OpKind::Send {
            src: buf as usize,
            len,
        };
        self.inflight.push(InFlight {
            target,
            op,
            ctx: ctx as usize,
            seq: self.seq,
        });
        Ok(Posted::Yes)
    }

    /// # Safety
    /// The buffer must stay valid until its completion is read.
    pub(crate) unsafe fn post_recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        self.ep
            .recvs
            .lock()
            .unwrap()
            .push_back((buf as usize, len, ctx as usize));
        Ok(Posted::Yes)
    }

    /// Executes one op; returns false if it must stay in flight (no receive buffer yet).
    fn deliver(&mut self, f: &InFlight) -> bool {
        match f.op {
            OpKind::Write {
                src,
                len,
                raddr,
                key,
                data,
            } => {
                let mrs = f.target.mrs.lock().unwrap();
                let ok = mrs.get(&key).and_then(|&(base, mlen)| {
                    let end = (raddr as usize).checked_add(len)?;
                    (end <= mlen).then_some(base + raddr as usize)
                });
                match ok {
                    Some(dst) => {
                        if len > 0 {
                            // SAFETY: src is a registered local buffer kept alive by its transfer
                            // until this op completes; dst..dst+len lies inside a registered
                            // target region (bounds checked above) whose registration cannot be
                            // closed while we hold its table lock.
                            unsafe {
                                std::ptr::copy(src as *const u8, dst as *mut u8, len);
                            }
                        }
                        drop(mrs);
                        if let Some(d) = data {
                            f.target.inbox.lock().unwrap().push(Entry {
                                ctx: 0,
                                flags: fi::FI_RMA | fi::FI_REMOTE_WRITE | fi::FI_REMOTE_CQ_DATA,
                                len,
                                data: d,
                            });
                        }
                        self.ready.push(Entry { ctx: f.ctx, flags: fi::FI_RMA | fi::FI_WRITE, len, data: 0 });
                    }
                    None => self.errors.push_back(CqError {
                        op_context: f.ctx as *mut c_void,
                        err: libc::EACCES,
                        message: format!("reorder double: remote access error (key {key}, offset {raddr}, {len} bytes)"),
                    }),
                }
                true
            }
            OpKind::Send { src, len } => {
                let Some((buf, blen, rctx)) = f.target.recvs.lock().unwrap().pop_front() else {
                    return false;
                };
                let n = len.min(blen);
                // SAFETY: src is the sender's registered buffer, alive until this completes; buf
                // is a posted receive buffer of blen >= n bytes owned by the target's worker.
                unsafe { std::ptr::copy(src as *const u8, buf as *mut u8, n) };
                f.target.inbox.lock().unwrap().push(Entry {
                    ctx: rctx,
                    flags: fi::FI_MSG | fi::FI_RECV,
                    len: n,
                    data: 0,
                });
                self.ready.push(Entry {
                    ctx: f.ctx,
                    flags: fi::FI_MSG | fi::FI_SEND,
                    len,
                    data: 0,
                });
                true
            }
        }
    }

    pub(crate) fn poll(&mut self, out: &mut [fi_cq_data_entry]) -> Result<usize, CqError> {
        // Deliver a random number of ops, each picked from a random position.
        if !self.inflight.is_empty() {
            let k = 1 + (splitmix(&mut self.rng) as usize) % self.inflight.len().min(8);
            for _ in 0..k {
                if self.inflight.is_empty() {
                    break;
                }
                let i = (splitmix(&mut self.rng) as usize) % self.inflight.len();
                let f = self.inflight.swap_remove(i);
                if !self.deliver(&f) {
                    self.inflight.push(f);
                } else if self.inflight.iter().any(|o| o.seq < f.seq) {
                    REORDERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        if let Some(e) = self.errors.pop_front() {
            return Err(e);
        }
        self.ready.append(&mut self.ep.inbox.lock().unwrap());
        // Report a shuffled subset.
        let n = self.ready.len().min(out.len());
        for slot in out.iter_mut().take(n) {
            let i = (splitmix(&mut self.rng) as usize) % self.ready.len();
            let e = self.ready.swap_remove(i);
            *slot = fi_cq_data_entry {
                op_context: e.ctx as *mut c_void,
                flags: e.flags,
                len: e.len,
                buf: std::ptr::null_mut(),
                data: e.data,
            };
        }
        Ok(n)
    }
}

impl Drop for ReorderDomain {
    fn drop(&mut self) {
        registry().lock().unwrap().remove(&self.id);
        self.ep.mrs.lock().unwrap().clear();
        self.ep.recvs.lock().unwrap().clear();
    }
}

// SAFETY: the raw addresses held are plain integers; the domain is used by one worker thread.
unsafe impl Send for ReorderDomain {}
