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
//! Only what the peer needs crosses the network: `dispatch_send` stores each token's destination
//! ranks in host-mapped memory, and the proxy writes the slots of the tokens routed to the peer
//! (as runs of consecutive slots, one scatter), every routing entry (the peer's kernel reads them
//! all; they are small), the counts, and a bitmap of the routed tokens into the peer's header
//! area. The peer's proxy keeps that bitmap and sends back, in the combine, only those slots.
//! At EP64 a token reaches about 12% of the ranks, so this is most of the bytes.
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

    /// Bytes of one route bitmap: bit `t` says token `t` of a dispatch went to the receiver.
    pub fn route_bytes(&self) -> usize {
        self.max_tokens.div_ceil(64) * 8
    }

    /// Size of a header area: one header per kind and source, then one route bitmap per source.
    pub fn headers_total(&self) -> usize {
        HEADER_KINDS * self.world * HEADER_BYTES + self.world * self.route_bytes()
    }

    /// Offset of the route bitmap from `src` (in a sender's area: the one composed for `src`).
    pub fn routes_at(&self, src: usize) -> usize {
        HEADER_KINDS * self.world * HEADER_BYTES + src * self.route_bytes()
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
    /// `max_tokens` u64 words of host memory the GPU maps: `dispatch_send` stores each
    /// token's destination ranks (bit r: rank r) before its flags.
    pub masks: *const u64,
}

// SAFETY: the mailbox and the masks are plain host memory that outlive the proxy (their owner
// joins the proxy thread before freeing them); every access is volatile.
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
    /// Per peer: the route bitmap of its last dispatch here (which of its tokens came to this
    /// rank, so which slots the combine sends back), copied when that dispatch landed.
    routed_in: Vec<Vec<u64>>,
    in_flight: Vec<fabric_lib::Transfer>,
    error: Option<String>,
}

/// Runs `(first, count)` of consecutive set bits among the first `n` bits of `bits`.
pub fn runs(bits: &[u64], n: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for t in 0..n {
        if bits[t / 64] >> (t % 64) & 1 == 1 {
            match out.last_mut() {
                Some((first, count)) if *first + *count == t => *count += 1,
                _ => out.push((t, 1)),
            }
        }
    }
    out
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
        let routed_in = vec![vec![0u64; layout.route_bytes() / 8]; peers.len()];
        Proxy {
            engine,
            layout,
            instance,
            local,
            peers,
            state,
            routed_in,
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

    fn copy_routes_in(&mut self, i: usize, src: usize) {
        let at = self.local.headers_in.ptr() + self.layout.routes_at(src);
        let bits = &mut self.routed_in[i];
        for (k, b) in bits.iter_mut().enumerate() {
            // SAFETY: headers_in is `headers_total` bytes of registered host memory; the
            // bitmap's immediate was counted with the dispatch's, so its bytes are in place.
            *b = unsafe { (at as *const u64).add(k).read_volatile() };
        }
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

    /// The bitmap of this step's tokens (`ntok`) that went to `rank`, from the GPU-written
    /// masks, composed in `headers_out` at the rank's route slot.
    fn compose_routes(&mut self, rank: usize, ntok: usize) -> Vec<u64> {
        let words = self.layout.route_bytes() / 8;
        let mut bits = vec![0u64; words];
        for (t, w) in (0..ntok.min(self.layout.max_tokens)).map(|t| (t, t / 64)) {
            // SAFETY: `masks` holds max_tokens words (ProxyLocal's contract); the kernel stored
            // them before the flag this call follows (read with acquire in `load`).
            let m = unsafe { self.local.masks.add(t).read_volatile() };
            bits[w] |= (m >> rank & 1) << (t % 64);
        }
        let at = self.local.headers_out.ptr() + self.layout.routes_at(rank);
        // SAFETY: headers_out is `headers_total` bytes of host memory owned by this proxy; the
        // slot is only rewritten for a later step, after the peer used this one.
        unsafe {
            let p = at as *mut u64;
            for (k, &b) in bits.iter().enumerate() {
                p.add(k).write_volatile(b);
            }
        }
        bits
    }

    /// Writes the slots of `runs` (tokens `first..first + count`) from this rank's staging
    /// part for peer `i` into this rank's slots of the peer's receive area, as one scatter; its
    /// immediates.
    fn write_runs(&mut self, i: usize, runs: &[(usize, usize)], imm: u32) -> Result<usize> {
        if runs.is_empty() {
            return Ok(0);
        }
        let (from, _, _) = self.layout.tx_parts(self.peers[i].rank);
        let (to, _, _) = self.layout.rx_parts(self.local.rank);
        let sb = self.layout.slot_bytes as u64;
        let items: Vec<fabric_lib::ScatterItem> = runs
            .iter()
            .map(|&(first, count)| fabric_lib::ScatterItem {
                dst: 0,
                src_off: from as u64 + first as u64 * sb,
                dst_off: to as u64 + first as u64 * sb,
                len: count as u64 * sb,
            })
            .collect();
        let dst = self.peers[i].rx.clone();
        let t = self
            .engine
            .scatter(&self.local.tx, &[&dst], &items, Some(imm), None, None)
            .map_err(|e| Error::Proxy(format!("write to a peer failed to start: {e}")))?;
        let n = t.imm_count();
        self.in_flight.push(t);
        Ok(n)
    }

    /// Writes the slots of `runs`, the bytes of `parts` ((tx offset, rx offset, len) each), with
    /// `routes` this rank's route bitmap for the peer, and then the header announcing `value`
    /// and their immediates.
    fn send(
        &mut self,
        i: usize,
        kind: usize,
        value: u64,
        runs: &[(usize, usize)],
        parts: &[(usize, usize, usize)],
        routes: bool,
    ) -> Result<()> {
        let me = self.local.rank;
        let peer = self.peers[i].clone();
        let data_imm = imm_for(self.instance, kind.min(KIND_R), false, me);
        let tx = self.local.tx.clone();
        let mut count = self.write_runs(i, runs, data_imm)?;
        for &(from, to, len) in parts {
            if len > 0 {
                count += self.write(&tx, from, &peer.rx, to, len, data_imm)?;
            }
        }
        if routes {
            let headers_out = self.local.headers_out.clone();
            count += self.write(
                &headers_out,
                self.layout.routes_at(peer.rank),
                &peer.headers,
                self.layout.routes_at(me),
                self.layout.route_bytes(),
                data_imm,
            )?;
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
            let (_, tx_meta, tx_ecount) = l.tx_parts(p);
            let (_, rx_meta, rx_ecount) = l.rx_parts(me);
            // Outbound: dispatch, combine, release.
            let d = self.load(p, OUT_DFLAG);
            if d != self.state[i].last_out[0] {
                self.state[i].last_out[0] = d;
                let ntok = (d & 0xffff_ffff) as usize;
                // Only the slots of tokens routed to the peer (the kernel staged only those);
                // every routing entry (the peer's kernel reads them all), the counts, and the
                // route bitmap (which slots the peer's combine sends back).
                let bits = self.compose_routes(p, ntok);
                let parts = [
                    (tx_meta, rx_meta, ntok * l.meta_bytes),
                    (tx_ecount, rx_ecount, l.ecount_bytes),
                ];
                let r = runs(&bits, ntok);
                self.send(i, KIND_D, d, &r, &parts, true)?;
            }
            let c = self.load(p, OUT_CFLAG);
            if c != self.state[i].last_out[1] {
                self.state[i].last_out[1] = c;
                // The slots of the peer's tokens that came here (as its dispatch said).
                let ntok = (self.load(p, IN_DFLAG) & 0xffff_ffff) as usize;
                let r = runs(&self.routed_in[i], ntok);
                self.send(i, KIND_C, c, &r, &[], false)?;
            }
            let r = self.load(p, OUT_REL);
            if r != self.state[i].last_out[2] {
                self.state[i].last_out[2] = r;
                self.send(i, KIND_R + (r as usize + 1) % 2, r, &[], &[], false)?;
            }
            // Inbound: a header, then the immediates it announced.
            let engine = self.engine.clone();
            let counter = engine.imm_counter();
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
                        if k == KIND_D {
                            // Kept until the combine of this step goes back: the peer rewrites
                            // the bitmap only for its next dispatch, which needs this rank's
                            // release notice, which comes after this rank's combine.
                            self.copy_routes_in(i, p);
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_of_routed_tokens() {
        assert_eq!(runs(&[0b1011_0110], 8), vec![(1, 2), (4, 2), (7, 1)]);
        assert_eq!(runs(&[0b1011_0110], 3), vec![(1, 2)]);
        assert_eq!(runs(&[0], 64), vec![]);
        assert_eq!(runs(&[u64::MAX, 1], 65), vec![(0, 65)]);
        assert_eq!(runs(&[u64::MAX, 1], 0), vec![]);
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set_bits(bits in proptest::collection::vec(any::<u64>(), 1..4),
                                          cut in 0usize..256) {
            let n = cut.min(bits.len() * 64);
            let r = runs(&bits, n);
            let mut covered = vec![false; n];
            let mut last_end = None;
            for &(first, count) in &r {
                prop_assert!(count > 0 && first + count <= n);
                // Maximal runs: a gap separates neighbours.
                if let Some(e) = last_end {
                    prop_assert!(first > e);
                }
                last_end = Some(first + count);
                for c in &mut covered[first..first + count] {
                    *c = true;
                }
            }
            for (t, &c) in covered.iter().enumerate() {
                prop_assert_eq!(c, bits[t / 64] >> (t % 64) & 1 == 1);
            }
        }
    }
}
