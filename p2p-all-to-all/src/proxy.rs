//! The host proxy: carries the all-to-all's traffic to ranks on other nodes through a
//! [`TransferEngine`].
//!
//! The kernels do not know whether a peer is on their node. For a peer on another node, its
//! entry in the peer table points at this rank's *staging area* for that peer (laid out like
//! the peer's receive area for one source) and at words of a host *mailbox* the GPU maps: the
//! kernels store their flags (`dispatch done`, `combine done`, `release`) in the mailbox's
//! out-words and wait on its in-words. The proxy (one thread per all-to-all) watches the
//! out-words, writes the staged bytes into the peer's receive area with the engine, and tells
//! the peer what to expect with a small header; the peer's proxy counts the immediates the
//! header announces, then stores the flag into its own in-word, which releases its kernel.
//!
//! Nothing relies on order: a header says how many immediates its data produced, and the
//! receiver stores the flag only once every one of them has been counted. Release notices
//! (two per step, odd then even) use one header slot per parity, so a later notice that lands
//! first is never overwritten by an earlier one.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fabric_lib::{MemDesc, MemoryRegion, TransferEngine};

use crate::{Error, Result};

/// Mailbox words per peer (8 keeps every peer's words in one 64-byte line).
pub const MAILBOX_WORDS: usize = 8;
/// Index of the word the kernels store "dispatch to this peer done" in (`step << 32 | tokens`).
pub const OUT_DFLAG: usize = 0;
/// "Combine to this peer done" (`step`).
pub const OUT_CFLAG: usize = 1;
/// Release notice to this peer.
pub const OUT_REL: usize = 2;
/// Where the proxy stores "dispatch from this peer landed".
pub const IN_DFLAG: usize = 3;
/// "Combine from this peer landed".
pub const IN_CFLAG: usize = 4;
/// The peer's release notices.
pub const IN_REL: usize = 5;

/// Bytes of one header: the flag value and the immediates its data produced.
pub const HEADER_BYTES: usize = 16;
/// Header kinds: dispatch, combine, release (odd), release (even).
pub const HEADER_KINDS: usize = 4;
const KIND_D: usize = 0;
const KIND_C: usize = 1;
const KIND_R: usize = 2;

/// Byte sizes and offsets the proxy needs (all ranks share them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyLayout {
    /// Ranks in the group.
    pub world: usize,
    /// Tokens per source a receive area holds.
    pub max_tokens: usize,
    /// One receive slot.
    pub slot_bytes: usize,
    /// One routing entry.
    pub meta_bytes: usize,
    /// One source's per-expert counts.
    pub ecount_bytes: usize,
    /// Offset of the slots in a receive area.
    pub rx_data: usize,
    /// Offset of the routing entries in a receive area.
    pub rx_meta: usize,
    /// Offset of the counts in a receive area.
    pub rx_ecount: usize,
}

const fn round256(v: usize) -> usize {
    v.div_ceil(256) * 256
}

impl ProxyLayout {
    /// Bytes of one peer's part of the staging area.
    pub fn tx_stride(&self) -> usize {
        round256(self.max_tokens * self.slot_bytes)
            + round256(self.max_tokens * self.meta_bytes)
            + round256(self.ecount_bytes)
    }

    /// Offsets of (slots, entries, counts) of peer `p`'s part of the staging area.
    pub fn tx_parts(&self, p: usize) -> (usize, usize, usize) {
        let base = p * self.tx_stride();
        let meta = base + round256(self.max_tokens * self.slot_bytes);
        (
            base,
            meta,
            meta + round256(self.max_tokens * self.meta_bytes),
        )
    }

    /// Size of the staging area (a part for every rank; only remote ones are used).
    pub fn tx_total(&self) -> usize {
        self.world * self.tx_stride()
    }

    /// Offsets of (slots, entries, counts) of source `src`'s part of a receive area.
    pub fn rx_parts(&self, src: usize) -> (usize, usize, usize) {
        (
            self.rx_data + src * self.max_tokens * self.slot_bytes,
            self.rx_meta + src * self.max_tokens * self.meta_bytes,
            self.rx_ecount + src * self.ecount_bytes,
        )
    }

    /// Size of a header area: one header per kind and source.
    pub fn headers_total(&self) -> usize {
        HEADER_KINDS * self.world * HEADER_BYTES
    }

    /// Offset of the header of `kind` from `src`.
    pub fn header_at(&self, kind: usize, src: usize) -> usize {
        (kind * self.world + src) * HEADER_BYTES
    }
}

/// The immediate of data (`header` false) or headers of `kind` from `src`; `instance`
/// separates all-to-alls sharing one engine.
pub fn imm_for(instance: u8, kind: usize, header: bool, src: usize) -> u32 {
    let code = kind as u32 + if header { 4 } else { 0 };
    (0xA2 << 24) | (u32::from(instance) << 16) | (code << 8) | src as u32
}

/// This rank's side.
pub struct ProxyLocal {
    /// This rank.
    pub rank: usize,
    /// Staging area (device memory on a GPU; any registered memory in tests).
    pub tx: MemoryRegion,
    /// Where headers are composed before they are written (host memory, `headers_total`).
    pub headers_out: MemoryRegion,
    /// Where peers' headers land (host memory, `headers_total`).
    pub headers_in: MemoryRegion,
    /// The mailbox: `world x MAILBOX_WORDS` u64 words of host memory the GPU maps.
    pub mailbox: *mut u64,
}

// SAFETY: the mailbox is plain host memory that outlives the proxy (its owner joins the proxy
// thread before freeing it); every access is volatile.
unsafe impl Send for ProxyLocal {}

/// What this rank knows of a peer on another node.
#[derive(Debug, Clone)]
pub struct ProxyPeer {
    /// The peer's rank.
    pub rank: usize,
    /// The peer's receive area.
    pub rx: MemDesc,
    /// The peer's header area.
    pub headers: MemDesc,
}

#[derive(Default, Clone, Copy)]
struct PeerState {
    last_out: [u64; 3],
    pending: [Option<(u64, u64)>; 2],
}

/// One all-to-all's proxy. [`Proxy::poll`] does one round of work without blocking; a thread
/// calls it in a loop ([`Proxy::spawn`]).
pub struct Proxy {
    engine: Arc<TransferEngine>,
    layout: ProxyLayout,
    instance: u8,
    local: ProxyLocal,
    peers: Vec<ProxyPeer>,
    state: Vec<PeerState>,
    in_flight: Vec<fabric_lib::Transfer>,
    error: Option<String>,
}

impl Proxy {
    /// A proxy for `local`'s rank serving `peers` (the ranks on other nodes).
    pub fn new(
        engine: Arc<TransferEngine>,
        layout: ProxyLayout,
        instance: u8,
        local: ProxyLocal,
        peers: Vec<ProxyPeer>,
    ) -> Proxy {
        let state = vec![PeerState::default(); peers.len()];
        Proxy {
            engine,
            layout,
            instance,
            local,
            peers,
            state,
            in_flight: Vec::new(),
            error: None,
        }
    }

    fn word(&self, peer: usize, which: usize) -> *mut u64 {
        debug_assert!(peer < self.layout.world && which < MAILBOX_WORDS);
        // SAFETY: the mailbox holds world x MAILBOX_WORDS words (ProxyLocal's contract).
        unsafe { self.local.mailbox.add(peer * MAILBOX_WORDS + which) }
    }

    fn load(&self, peer: usize, which: usize) -> u64 {
        // SAFETY: a valid, aligned mailbox word (see `word`); the GPU stores it concurrently,
        // hence volatile; the fence orders the staged bytes the kernel wrote before its flag.
        let v = unsafe { self.word(peer, which).read_volatile() };
        fence(Ordering::Acquire);
        v
    }

    fn store(&self, peer: usize, which: usize, v: u64) {
        fence(Ordering::Release);
        // SAFETY: as in `load`; the GPU polls this word.
        unsafe { self.word(peer, which).write_volatile(v) };
    }

    fn header_in(&self, kind: usize, src: usize) -> (u64, u64) {
        let at = self.local.headers_in.ptr() + self.layout.header_at(kind, src);
        // SAFETY: headers_in is `headers_total` bytes of registered host memory; the header was
        // counted (its immediate arrived), so its bytes are in place.
        unsafe {
            let p = at as *const u64;
            (p.read_volatile(), p.add(1).read_volatile())
        }
    }

    fn write(
        &mut self,
        src: &MemoryRegion,
        src_off: usize,
        dst: &MemDesc,
        dst_off: usize,
        len: usize,
        imm: u32,
    ) -> Result<usize> {
        let t = self
            .engine
            .write(
                src,
                src_off as u64,
                dst,
                dst_off as u64,
                len as u64,
                Some(imm),
                None,
                None,
            )
            .map_err(|e| Error::Proxy(format!("write to a peer failed to start: {e}")))?;
        let n = t.imm_count();
        self.in_flight.push(t);
        Ok(n)
    }

    /// Writes the bytes of `parts` ((tx offset, rx offset, len) each) and then the header
    /// announcing `value` and their immediates.
    fn send(
        &mut self,
        i: usize,
        kind: usize,
        value: u64,
        parts: &[(usize, usize, usize)],
    ) -> Result<()> {
        let me = self.local.rank;
        let peer = self.peers[i].clone();
        let data_imm = imm_for(self.instance, kind.min(KIND_R), false, me);
        let tx = self.local.tx.clone();
        let mut count = 0usize;
        for &(from, to, len) in parts {
            if len > 0 {
                count += self.write(&tx, from, &peer.rx, to, len, data_imm)?;
            }
        }
        let slot = self.layout.header_at(kind, peer.rank);
        let at = self.local.headers_out.ptr() + slot;
        // SAFETY: headers_out is `headers_total` bytes of host memory owned by this proxy; the
        // slot of (kind, peer) is only rewritten for a later step, after the peer used this one.
        unsafe {
            let p = at as *mut u64;
            p.write_volatile(value);
            p.add(1).write_volatile(count as u64);
        }
        let hdr_imm = imm_for(self.instance, kind, true, me);
        let headers_out = self.local.headers_out.clone();
        let dst_off = self.layout.header_at(kind, me);
        self.write(
            &headers_out,
            slot,
            &peer.headers,
            dst_off,
            HEADER_BYTES,
            hdr_imm,
        )?;
        Ok(())
    }

    /// One round: forwards every new out-flag, and stores every in-flag whose data has landed.
    /// Never blocks.
    ///
    /// # Errors
    /// [`Error::Proxy`] when a write could not start or one that started failed.
    pub fn poll(&mut self) -> Result<()> {
        let l = self.layout;
        let me = self.local.rank;
        for i in 0..self.peers.len() {
            let p = self.peers[i].rank;
            let (tx_data, tx_meta, tx_ecount) = l.tx_parts(p);
            let (rx_data, rx_meta, rx_ecount) = l.rx_parts(me);
            // Outbound: dispatch, combine, release.
            let d = self.load(p, OUT_DFLAG);
            if d != self.state[i].last_out[0] {
                self.state[i].last_out[0] = d;
                let ntok = (d & 0xffff_ffff) as usize;
                let parts = [
                    (tx_data, rx_data, ntok * l.slot_bytes),
                    (tx_meta, rx_meta, ntok * l.meta_bytes),
                    (tx_ecount, rx_ecount, l.ecount_bytes),
                ];
                self.send(i, KIND_D, d, &parts)?;
            }
            let c = self.load(p, OUT_CFLAG);
            if c != self.state[i].last_out[1] {
                self.state[i].last_out[1] = c;
                // The slots of the peer's tokens that came here (as its dispatch said).
                let ntok = (self.load(p, IN_DFLAG) & 0xffff_ffff) as usize;
                self.send(i, KIND_C, c, &[(tx_data, rx_data, ntok * l.slot_bytes)])?;
            }
            let r = self.load(p, OUT_REL);
            if r != self.state[i].last_out[2] {
                self.state[i].last_out[2] = r;
                self.send(i, KIND_R + (r as usize + 1) % 2, r, &[])?;
            }
            // Inbound: a header, then the immediates it announced.
            let counter = self.engine.imm_counter();
            for (k, word) in [(KIND_D, IN_DFLAG), (KIND_C, IN_CFLAG)] {
                if self.state[i].pending[k].is_none() {
                    let hdr = imm_for(self.instance, k, true, p);
                    if counter.count(hdr) >= 1 {
                        counter
                            .wait(hdr, 1, Duration::ZERO)
                            .map_err(|e| Error::Proxy(e.to_string()))?;
                        self.state[i].pending[k] = Some(self.header_in(k, p));
                    }
                }
                if let Some((value, count)) = self.state[i].pending[k] {
                    let data = imm_for(self.instance, k, false, p);
                    if counter.count(data) >= count {
                        if count > 0 {
                            counter
                                .wait(data, count, Duration::ZERO)
                                .map_err(|e| Error::Proxy(e.to_string()))?;
                        }
                        self.state[i].pending[k] = None;
                        self.store(p, word, value);
                    }
                }
            }
            for k in [KIND_R, KIND_R + 1] {
                let hdr = imm_for(self.instance, k, true, p);
                let n = counter.count(hdr);
                if n > 0 {
                    counter
                        .wait(hdr, n, Duration::ZERO)
                        .map_err(|e| Error::Proxy(e.to_string()))?;
                    let (value, _) = self.header_in(k, p);
                    if value > self.load(p, IN_REL) {
                        self.store(p, IN_REL, value);
                    }
                }
            }
        }
        // Sender side: surface failures, forget finished writes.
        let mut failed = None;
        self.in_flight.retain(|t| match t.result() {
            None => true,
            Some(Ok(())) => false,
            Some(Err(e)) => {
                failed.get_or_insert(e.to_string());
                false
            }
        });
        if let Some(e) = failed {
            return Err(Error::Proxy(format!("a write to a peer failed: {e}")));
        }
        Ok(())
    }

    /// The first error the proxy met, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Runs [`Proxy::poll`] on a thread until `stop` is set; an error stops the thread and is
    /// returned by the handle.
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Proxy> {
        std::thread::Builder::new()
            .name("stolon-a2a-proxy".into())
            .spawn(move || {
                let mut idle = 0u32;
                while !stop.load(Ordering::Acquire) {
                    let before = self.in_flight.len();
                    if let Err(e) = self.poll() {
                        self.error = Some(e.to_string());
                        break;
                    }
                    // Spin while there is traffic, then nap briefly.
                    if self.in_flight.len() != before {
                        idle = 0;
                    } else {
                        idle = idle.saturating_add(1);
                    }
                    if idle > 10_000 {
                        std::thread::sleep(Duration::from_micros(20));
                    } else {
                        std::hint::spin_loop();
                    }
                }
                self
            })
            .expect("spawn the proxy thread")
    }
}
