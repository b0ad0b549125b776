//! The handshake: this rank's [`Handle`] bytes, and [`AllToAll::connect`], which maps the
//! peers' receive areas and writes the peer table the kernels read.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fabric_lib::MemDesc;

use super::params::PeerEntry;
use super::AllToAll;
use crate::proxy::{self, Proxy, ProxyLocal, ProxyPeer, OUT_CFLAG, OUT_DFLAG, OUT_REL};
use crate::{rank_sharing_gpu, Error, Handle, Result, PEER_BYTES};

impl AllToAll {
    /// The bytes peers need to map this rank's receive area ([`Handle`]).
    ///
    /// # Errors
    /// A CUDA error exporting the IPC handle.
    pub fn handle(&self) -> Result<Vec<u8>> {
        let ipc = stolon_cuda::IpcMemHandle::of_buffer(self.rx())?;
        Ok(Handle {
            rank: self.cfg.rank,
            world: self.cfg.world,
            fingerprint: self.cfg.fingerprint(),
            pid: std::process::id(),
            nonce: self.nonce,
            ipc: *ipc.as_bytes(),
            rx_desc: self
                .remote
                .as_ref()
                .map(|r| r.rx_region.descriptor().to_bytes())
                .unwrap_or_default(),
            headers_desc: self
                .remote
                .as_ref()
                .map(|r| r.headers_in.descriptor().to_bytes())
                .unwrap_or_default(),
            gpu: self.ctx.device().pci_bus_id()?,
        }
        .to_bytes())
    }

    /// Maps every peer's receive area from the handles of all ranks (index = rank, this rank's
    /// own included) and writes the peer table. Called once.
    ///
    /// # Errors
    /// [`Error::Handshake`] when the handles disagree (world, config, ranks), when a peer is on
    /// another node (the proxy path is not configured), a CUDA error opening a mapping.
    pub fn connect(&mut self, handles: &[Vec<u8>]) -> Result<()> {
        if self.connected {
            return Err(Error::InvalidArgument(
                "connect() was already called".to_string(),
            ));
        }
        let world = self.cfg.world;
        if handles.len() != world {
            return Err(Error::Handshake(format!(
                "{} handles for a world of {world}",
                handles.len()
            )));
        }
        let decoded = handles
            .iter()
            .map(|b| Handle::from_bytes(b))
            .collect::<Result<Vec<_>>>()?;
        for (r, h) in decoded.iter().enumerate() {
            if h.rank != r || h.world != world {
                return Err(Error::Handshake(format!(
                    "handle {r} is from rank {} of a world of {} (expected rank {r} of {world})",
                    h.rank, h.world
                )));
            }
            if h.fingerprint != self.cfg.fingerprint() {
                return Err(Error::Handshake(format!(
                    "rank {r} was built with a different config (experts, top-k, hidden, \
                     dtypes, max_tokens, capacity or grouping differ)"
                )));
            }
        }
        let me = self.cfg.rank;
        if let Some(r) = rank_sharing_gpu(me, &decoded, |r| {
            self.cfg.node_of(r) == self.cfg.node_of(me)
        }) {
            return Err(Error::Handshake(format!(
                "ranks {me} and {r} are separate processes on one GPU ({}): the kernels wait \
                 on each other's flags while two processes' kernels only take turns on a GPU; \
                 give every rank its own GPU (ranks of one process may share one)",
                decoded[me].gpu
            )));
        }
        let mut bases = vec![0u64; world];
        for (r, h) in decoded.iter().enumerate() {
            if r == me {
                bases[r] = self.rx().ptr();
                continue;
            }
            if self.cfg.node_of(r) != self.cfg.node_of(me) {
                continue; // reached through the proxy (below)
            }
            let handle = stolon_cuda::IpcMemHandle::from_bytes(&h.ipc)?;
            let mapping = handle.open(&self.ctx).map_err(|e| {
                Error::Handshake(format!(
                    "cannot map rank {r}'s receive area through CUDA IPC (pid {}; is it on this \
                     host and on a GPU with peer access to this one?): {e}",
                    h.pid
                ))
            })?;
            let mut seen = [0u8; 8];
            // SAFETY: the mapping covers the peer's whole receive area, whose first 8 bytes
            // (rx_nonce) are readable device memory; `seen` is 8 writable bytes.
            unsafe {
                stolon_cuda::memory::copy_dtoh(
                    &self.ctx,
                    seen.as_mut_ptr(),
                    mapping.ptr() + self.layout.rx_nonce as u64,
                    8,
                )?
            };
            if u64::from_le_bytes(seen) != h.nonce {
                return Err(Error::Handshake(format!(
                    "CUDA IPC mapped rank {r}'s receive area, but not the one it exported (a \
                     stale mapping of memory it freed): its nonce differs"
                )));
            }
            bases[r] = mapping.ptr();
            self.mappings.push(mapping);
        }
        let l = &self.layout;
        let c = &self.cfg;
        let mine = self.rx().ptr();
        let slot_region = (c.max_tokens * l.slot_bytes) as u64;
        let meta_region = (c.max_tokens * l.meta_bytes) as u64;
        let ecount_region = (l.experts_per_rank * 4) as u64;
        let chunk_region = (l.max_chunks * 8) as u64;
        let (me64, off) = (me as u64, |b: u64, o: usize| b + o as u64);
        let table: Vec<PeerEntry> = (0..world)
            .map(|p| {
                let b = bases[p];
                let p64 = p as u64;
                PeerEntry {
                    data: off(b, l.rx_data) + me64 * slot_region,
                    meta: off(b, l.rx_meta) + me64 * meta_region,
                    ecount: off(b, l.rx_ecount) + me64 * ecount_region,
                    dflag: off(b, l.rx_dflag) + me64 * 8,
                    cflag: off(b, l.rx_cflag) + me64 * 8,
                    rel: off(b, l.rx_rel) + me64 * 8,
                    rx_data: off(mine, l.rx_data) + p64 * slot_region,
                    rx_meta: off(mine, l.rx_meta) + p64 * meta_region,
                    rx_ecount: off(mine, l.rx_ecount) + p64 * ecount_region,
                    rx_dflag: off(mine, l.rx_dflag) + p64 * 8,
                    rx_cflag: off(mine, l.rx_cflag) + p64 * 8,
                    rel_in: off(mine, l.rx_rel) + p64 * 8,
                    cntflag: off(b, l.rx_cntflag) + me64 * 8,
                    chunk: off(b, l.rx_chunk) + me64 * chunk_region,
                    rx_cntflag: off(mine, l.rx_cntflag) + p64 * 8,
                    rx_chunk: off(mine, l.rx_chunk) + p64 * chunk_region,
                }
            })
            .collect();
        // Ranks on other nodes: the kernels write into the staging area and the mailbox, and
        // wait on the mailbox; the proxy carries the rest.
        let mut table = table;
        let mut proxy_peers = Vec::new();
        if let Some(rm) = &self.remote {
            let tx = rm.tx.ptr();
            for (p, h) in decoded.iter().enumerate() {
                if self.cfg.node_of(p) == self.cfg.node_of(me) {
                    continue;
                }
                let (d, m, e) = rm.playout.tx_parts(p);
                let entry = &mut table[p];
                entry.data = tx + d as u64;
                entry.meta = tx + m as u64;
                entry.ecount = tx + e as u64;
                entry.dflag = rm.mailbox_word(p, OUT_DFLAG);
                entry.cflag = rm.mailbox_word(p, OUT_CFLAG);
                entry.rel = rm.mailbox_word(p, OUT_REL);
                entry.rx_dflag = rm.mailbox_word(p, proxy::IN_DFLAG);
                entry.rx_cflag = rm.mailbox_word(p, proxy::IN_CFLAG);
                entry.rel_in = rm.mailbox_word(p, proxy::IN_REL);
                // dispatch_send stores the counts flag just before the dispatch flag, with the
                // same value: both go to the one mailbox word the proxy watches. Chunk flags
                // belong to the overlapped dispatch, which needs every peer on this node.
                entry.cntflag = entry.dflag;
                entry.rx_cntflag = entry.rx_dflag;
                entry.chunk = 0;
                entry.rx_chunk = 0;
                let desc = |b: &[u8], what: &str| {
                    MemDesc::from_bytes(b).map_err(|e| {
                        Error::Handshake(format!(
                            "rank {p} is on another node but sent no usable {what} descriptor \
                             (was it given an engine?): {e}"
                        ))
                    })
                };
                proxy_peers.push(ProxyPeer {
                    rank: p,
                    rx: desc(&h.rx_desc, "receive area")?,
                    headers: desc(&h.headers_desc, "header area")?,
                });
            }
        }
        // SAFETY: PeerEntry is repr(C) plain data; the slice covers exactly the table.
        let bytes =
            unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), world * PEER_BYTES) };
        self.local.copy_from_host(l.peers, bytes)?;
        if let Some(rm) = &mut self.remote {
            // Every rank derives the same instance number from the handles (their nonces), so
            // two all-to-alls on one engine use different immediates.
            let instance = decoded
                .iter()
                .fold(0u8, |a, h| a ^ (h.nonce as u8) ^ ((h.nonce >> 8) as u8));
            let local = ProxyLocal {
                rank: me,
                tx: rm.tx_region.clone(),
                headers_out: rm.headers_out.clone(),
                headers_in: rm.headers_in.clone(),
                mailbox: rm.mailbox.host_ptr().cast::<u64>(),
                // SAFETY: the masks lie inside the mailbox buffer (allocated with them).
                masks: unsafe { rm.mailbox.host_ptr().add(rm.masks_offset()) }.cast::<u64>(),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let p = Proxy::new(rm.engine.clone(), rm.playout, instance, local, proxy_peers);
            rm.proxy = Some((stop.clone(), p.spawn(stop)));
        }
        self.connected = true;
        Ok(())
    }
}
