//! The all-to-all's host proxy between two engines: over libfabric's `tcp;ofi_rxm` on loopback,
//! and over the engine's reordering test double (`fabric_lib::reorder`, which delivers and
//! completes operations out of posting order, so headers routinely land before their data —
//! an order the real loopback transport cannot be made to produce).
//!
//! Two ranks on different "nodes". What the GPU kernels would do is played by the test: it
//! fills a rank's staging area and stores the kernels' out-flags into the mailbox; the proxies
//! must land the bytes in the peer's receive area at the source's offsets and store the in-flags
//! only after every immediate the header announced was counted. Host memory stands in for the
//! GPU memory the kernels use (the proxy moves whatever the engine registered); the kernels
//! themselves are tested on GPUs. Skipped with a message when libfabric is missing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_lib::{EngineConfig, MemoryRegion, TransferEngine};
use p2p_all_to_all::proxy::{
    imm_for, Proxy, ProxyLayout, ProxyLocal, ProxyPeer, IN_CFLAG, IN_DFLAG, IN_REL, MAILBOX_WORDS,
    OUT_CFLAG, OUT_DFLAG, OUT_REL,
};
use p2p_all_to_all::Config;

struct Rank {
    engine: Arc<TransferEngine>,
    rx: MemoryRegion,
    tx: MemoryRegion,
    headers_out: MemoryRegion,
    headers_in: MemoryRegion,
    mailbox: Box<[u64]>,
    /// What `dispatch_send` stores for the proxy: each token's destination ranks.
    masks: Box<[u64]>,
}

fn config(world: usize) -> Config {
    let mut c = Config::new(0, world, 8, 2, 16, 64);
    c.ranks_per_node = world / 2;
    c
}

fn layout(world: usize) -> ProxyLayout {
    let l = config(world).layout().unwrap();
    ProxyLayout {
        world,
        max_tokens: 16,
        slot_bytes: l.slot_bytes,
        meta_bytes: l.meta_bytes,
        ecount_bytes: l.experts_per_rank * 4,
        rx_data: l.rx_data,
        rx_meta: l.rx_meta,
        rx_ecount: l.rx_ecount,
    }
}

fn rank(rx_len: usize, l: &ProxyLayout, cfg: EngineConfig) -> Option<Rank> {
    if cfg.domains[0].provider != fabric_lib::reorder::PROVIDER
        && !fabric_lib::sys::libfabric::is_present()
    {
        eprintln!("SKIP: libfabric not present");
        return None;
    }
    let engine = Arc::new(TransferEngine::new(cfg).unwrap());
    let reg = |n: usize| {
        engine
            .register_buffer(vec![0u8; n].into_boxed_slice())
            .unwrap()
    };
    Some(Rank {
        rx: reg(rx_len),
        tx: reg(l.tx_total()),
        headers_out: reg(l.headers_total()),
        headers_in: reg(l.headers_total()),
        mailbox: vec![0u64; l.world * MAILBOX_WORDS].into_boxed_slice(),
        masks: vec![0u64; l.max_tokens].into_boxed_slice(),
        engine,
    })
}

fn proxy(r: &mut Rank, me: usize, peers: &[(usize, &Rank)], l: ProxyLayout) -> Proxy {
    let local = ProxyLocal {
        rank: me,
        tx: r.tx.clone(),
        headers_out: r.headers_out.clone(),
        headers_in: r.headers_in.clone(),
        mailbox: r.mailbox.as_mut_ptr(),
        masks: r.masks.as_ptr(),
    };
    let peers = peers
        .iter()
        .map(|&(rank, peer)| ProxyPeer {
            rank,
            rx: peer.rx.descriptor().clone(),
            headers: peer.headers_in.descriptor().clone(),
        })
        .collect();
    Proxy::new(r.engine.clone(), l, 7, local, peers)
}

// The region owns a boxed buffer the engine writes into behind any Rust borrow; the test reads
// and fills it only while no write to that part is in flight.
#[allow(clippy::mut_from_ref)]
fn bytes_mut(r: &MemoryRegion) -> &mut [u8] {
    // SAFETY: the test owns the buffer; the proxy only reads staged bytes after their flag.
    unsafe { std::slice::from_raw_parts_mut(r.ptr() as *mut u8, r.len() as usize) }
}

fn mailbox(r: &Rank, peer: usize, which: usize) -> *mut u64 {
    r.mailbox[peer * MAILBOX_WORDS + which..].as_ptr() as *mut u64
}

fn wait_word(r: &Rank, peer: usize, which: usize, want: u64) {
    let start = Instant::now();
    // SAFETY: a word of the rank's mailbox, stored by its proxy thread.
    while unsafe { mailbox(r, peer, which).read_volatile() } != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mailbox word {which} of peer {peer} never became {want:#x}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[test]
fn dispatch_combine_and_release_cross_nodes_over_tcp() {
    cross_nodes(|| EngineConfig::loopback("tcp", 1));
}

#[test]
fn dispatch_combine_and_release_cross_nodes_in_any_order() {
    let before = fabric_lib::reorder::reordered_deliveries();
    for seed in 0..8u64 {
        cross_nodes(|| {
            let mut cfg = EngineConfig::new(fabric_lib::reorder::PROVIDER, 2);
            for d in &mut cfg.domains {
                d.interface = Some(seed.to_string());
            }
            cfg.min_shard_bytes = 64 << 10;
            cfg.max_op_bytes = Some(4096); // several operations per write, delivered shuffled
            cfg
        });
    }
    assert!(
        fabric_lib::reorder::reordered_deliveries() > before,
        "the double never delivered out of order"
    );
}

/// Slot `t` of `rx` equals slot `t` of `tx` where `routed(t)`, and was never written (still
/// `UNTOUCHED`) elsewhere.
fn check_slots(
    rx: &[u8],
    tx: &[u8],
    ntok: usize,
    sb: usize,
    routed: &dyn Fn(usize) -> bool,
    what: &str,
) {
    for t in 0..ntok {
        let got = &rx[t * sb..(t + 1) * sb];
        if routed(t) {
            assert_eq!(got, &tx[t * sb..(t + 1) * sb], "{what}: slot {t}");
        } else {
            assert!(
                got.iter().all(|&v| v == UNTOUCHED),
                "{what}: slot {t} was sent"
            );
        }
    }
}

const UNTOUCHED: u8 = 0xEE;

fn cross_nodes(engine_cfg: impl Fn() -> EngineConfig) {
    let l = layout(2);
    let rx_len = config(2).layout().unwrap().rx_total;
    let (Some(mut a), Some(mut b)) = (
        rank(rx_len, &l, engine_cfg()),
        rank(rx_len, &l, engine_cfg()),
    ) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pa = proxy(&mut a, 0, &[(1, &b)], l).spawn(stop.clone());
    let pb = proxy(&mut b, 1, &[(0, &a)], l).spawn(stop.clone());

    for step in 1..=3u64 {
        // Rank 0's "dispatch_send" staged its tokens for rank 1 (the slots of the tokens routed
        // there: step 1 every third token is not, step 2 none is, step 3 all are), the entries
        // and counts of all, stored each token's mask, then its flag. Only routed slots may
        // travel, and the combine brings back exactly those.
        let ntok = 5 + step as usize;
        let routed = |t: usize| match step {
            1 => t % 3 != 0,
            2 => false,
            _ => true,
        };
        for t in 0..ntok {
            // SAFETY: the masks the proxy reads after the flag below; no proxy reads them now.
            let m = unsafe { &mut *(a.masks.as_ptr() as *mut u64).add(t) };
            *m = 1 | (u64::from(routed(t)) << 1);
        }
        let (rxd, rxm, rxe) = l.rx_parts(0);
        bytes_mut(&b.rx)[rxd..rxd + ntok * l.slot_bytes].fill(UNTOUCHED);
        let (txd, txm, txe) = l.tx_parts(1);
        let tx = bytes_mut(&a.tx);
        for (i, v) in tx[txd..txd + ntok * l.slot_bytes].iter_mut().enumerate() {
            *v = (i as u64 * 7 + step) as u8;
        }
        for (i, v) in tx[txm..txm + ntok * l.meta_bytes].iter_mut().enumerate() {
            *v = (i as u64 * 3 + step) as u8;
        }
        tx[txe..txe + l.ecount_bytes].fill(step as u8);
        let flag = (step << 32) | ntok as u64;
        // SAFETY: the kernels' out-word, read by the proxy thread.
        unsafe { mailbox(&a, 1, OUT_DFLAG).write_volatile(flag) };
        wait_word(&b, 0, IN_DFLAG, flag);
        let rx = bytes_mut(&b.rx);
        let sb = l.slot_bytes;
        let what = format!("step {step} dispatch");
        check_slots(&rx[rxd..], &tx[txd..], ntok, sb, &routed, &what);
        assert_eq!(
            &rx[rxm..rxm + ntok * l.meta_bytes],
            &tx[txm..txm + ntok * l.meta_bytes]
        );
        assert_eq!(
            &rx[rxe..rxe + l.ecount_bytes],
            &tx[txe..txe + l.ecount_bytes]
        );
        // Nothing of source 1's part of rank 1's own area was touched.
        let (own, _, _) = l.rx_parts(1);
        assert!(rx[own..own + l.slot_bytes].iter().all(|&v| v == 0));

        // Rank 1's "combine_send" staged results for rank 0's tokens that came to it.
        let (rxd0, _, _) = l.rx_parts(1);
        bytes_mut(&a.rx)[rxd0..rxd0 + ntok * sb].fill(UNTOUCHED);
        let (txd1, _, _) = l.tx_parts(0);
        let tx1 = bytes_mut(&b.tx);
        for (i, v) in tx1[txd1..txd1 + ntok * l.slot_bytes].iter_mut().enumerate() {
            *v = (i as u64 * 11 + step) as u8;
        }
        // SAFETY: as above.
        unsafe { mailbox(&b, 0, OUT_CFLAG).write_volatile(step) };
        wait_word(&a, 1, IN_CFLAG, step);
        let rx0 = bytes_mut(&a.rx);
        let what = format!("step {step} combine");
        check_slots(&rx0[rxd0..], &tx1[txd1..], ntok, sb, &routed, &what);

        // Release notices, odd then even; the peer's in-word ends at the larger.
        for r in [2 * step - 1, 2 * step] {
            // SAFETY: as above.
            unsafe { mailbox(&b, 0, OUT_REL).write_volatile(r) };
        }
        wait_word(&a, 1, IN_REL, 2 * step);
    }
    stop.store(true, Ordering::Release);
    let (pa, pb) = (pa.join().unwrap(), pb.join().unwrap());
    assert_eq!(pa.error(), None);
    assert_eq!(pb.error(), None);
    // Every announced immediate was consumed: none left over on either side.
    for (eng, src) in [(&a.engine, 1usize), (&b.engine, 0usize)] {
        for kind in 0..4 {
            for header in [false, true] {
                assert_eq!(eng.imm_counter().count(imm_for(7, kind, header, src)), 0);
            }
        }
    }
}

fn set_masks(r: &Rank, ntok: usize, mask: impl Fn(usize) -> u64) {
    for t in 0..ntok {
        // SAFETY: the masks the proxy reads only after the flag that follows.
        unsafe {
            (r.masks.as_ptr() as *mut u64)
                .add(t)
                .write_volatile(mask(t))
        };
    }
}

fn stage(r: &Rank, l: &ProxyLayout, peer: usize, ntok: usize, seed: u8) {
    let (txd, txm, txe) = l.tx_parts(peer);
    let tx = bytes_mut(&r.tx);
    for (i, v) in tx[txd..txd + ntok * l.slot_bytes].iter_mut().enumerate() {
        *v = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    tx[txm..txm + ntok * l.meta_bytes].fill(seed);
    tx[txe..txe + l.ecount_bytes].fill(seed);
}

/// Four ranks on two nodes (0, 1 | 2, 3): rank 0's proxy serves two remote peers at once. Each
/// gets exactly the slots of the tokens routed to it (from one set of masks), and each sends
/// back, in the combine, only those.
#[test]
fn each_remote_peer_gets_and_returns_only_its_own_tokens() {
    let l = layout(4);
    let rx_len = config(4).layout().unwrap().rx_total;
    let cfg = || EngineConfig::loopback("tcp", 1);
    let (Some(mut a), Some(mut c), Some(mut d)) = (
        rank(rx_len, &l, cfg()),
        rank(rx_len, &l, cfg()),
        rank(rx_len, &l, cfg()),
    ) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let pa = proxy(&mut a, 0, &[(2, &c), (3, &d)], l).spawn(stop.clone());
    let pc = proxy(&mut c, 2, &[(0, &a)], l).spawn(stop.clone());
    let pd = proxy(&mut d, 3, &[(0, &a)], l).spawn(stop.clone());
    let ntok = 12;
    let to = |rank: usize, t: usize| match rank {
        2 => t % 2 == 0,
        _ => t % 3 == 0,
    };
    set_masks(&a, ntok, |t| {
        1 | (u64::from(to(2, t)) << 2) | (u64::from(to(3, t)) << 3)
    });
    let sb = l.slot_bytes;
    let (rxd0, _, _) = l.rx_parts(0);
    for (peer, r) in [(2, &c), (3, &d)] {
        bytes_mut(&r.rx)[rxd0..rxd0 + ntok * sb].fill(UNTOUCHED);
        stage(&a, &l, peer, ntok, 40 + peer as u8);
    }
    let flag = (1u64 << 32) | ntok as u64;
    for peer in [2, 3] {
        // SAFETY: the kernels' out-word, read by the proxy thread.
        unsafe { mailbox(&a, peer, OUT_DFLAG).write_volatile(flag) };
    }
    for (peer, r) in [(2usize, &c), (3, &d)] {
        wait_word(r, 0, IN_DFLAG, flag);
        let (txd, _, _) = l.tx_parts(peer);
        let what = format!("dispatch to rank {peer}");
        check_slots(
            &bytes_mut(&r.rx)[rxd0..],
            &bytes_mut(&a.tx)[txd..],
            ntok,
            sb,
            &|t| to(peer, t),
            &what,
        );
    }
    // Combine: ranks 2 and 3 send back results for rank 0's tokens that came to them.
    for (peer, r) in [(2usize, &c), (3, &d)] {
        let (rxd, _, _) = l.rx_parts(peer);
        bytes_mut(&a.rx)[rxd..rxd + ntok * sb].fill(UNTOUCHED);
        stage(r, &l, 0, ntok, 90 + peer as u8);
        // SAFETY: as above.
        unsafe { mailbox(r, 0, OUT_CFLAG).write_volatile(1) };
    }
    for (peer, r) in [(2usize, &c), (3, &d)] {
        wait_word(&a, peer, IN_CFLAG, 1);
        let (rxd, _, _) = l.rx_parts(peer);
        let (txd, _, _) = l.tx_parts(0);
        let what = format!("combine from rank {peer}");
        check_slots(
            &bytes_mut(&a.rx)[rxd..],
            &bytes_mut(&r.tx)[txd..],
            ntok,
            sb,
            &|t| to(peer, t),
            &what,
        );
    }
    stop.store(true, Ordering::Release);
    for p in [pa, pc, pd] {
        assert_eq!(p.join().unwrap().error(), None);
    }
}
