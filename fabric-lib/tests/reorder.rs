//! Property tests through the reordering test double (`fabric_lib::reorder`): random transfers
//! of every kind land byte-exact with exact immediate counts although the double delivers and
//! completes operations out of posting order.

use std::time::Duration;

use fabric_lib::{EngineConfig, MemoryRegion, PagedSpec, ScatterItem, TransferEngine};
use proptest::prelude::*;

const T: Duration = Duration::from_secs(20);
const SRC: usize = 1 << 20;
const DST: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Single {
        src: usize,
        len: usize,
    },
    Paged {
        page: usize,
        pairs: Vec<(u32, u32)>,
    },
    Scatter {
        items: Vec<(usize, usize, usize, usize)>,
    },
    ImmOnly,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..SRC, 0..DST, 0usize..300_000).prop_map(|(s, d, l)| {
            let len = l.min(SRC - s).min(DST - d);
            Op::Single { src: s, len }
        }),
        (
            1usize..8192,
            proptest::collection::vec((0u32..100, 0u32..100), 0..20)
        )
            .prop_map(|(page, pairs)| Op::Paged { page, pairs }),
        proptest::collection::vec(
            (0usize..2, 0..SRC - 4096, 0..DST - 4096, 0usize..4096),
            1..6
        )
        .prop_map(|items| Op::Scatter { items }),
        Just(Op::ImmOnly),
    ]
}

fn engine(domains: usize, seed: u64) -> TransferEngine {
    let mut cfg = EngineConfig::new(fabric_lib::reorder::PROVIDER, domains);
    for d in &mut cfg.domains {
        d.interface = Some(seed.to_string());
    }
    cfg.min_shard_bytes = 64 << 10;
    cfg.max_op_bytes = Some(48 << 10);
    TransferEngine::new(cfg).unwrap()
}

fn bytes(r: &MemoryRegion) -> &[u8] {
    // SAFETY: the region owns its boxed buffer; it is only read after all transfers completed.
    unsafe { std::slice::from_raw_parts(r.ptr() as *const u8, r.len() as usize) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn everything_lands_exactly_in_any_order(
        domains in 1usize..=4, seed in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(), 1..12),
    ) {
        let a = engine(domains, seed);
        let b = engine(domains, seed.wrapping_add(1));
        let src_img: Vec<u8> = (0..SRC).map(|i| (i * 7 + 3) as u8).collect();
        let src = a.register_buffer(src_img.clone().into_boxed_slice()).unwrap();
        let dsts = [
            b.register_buffer(vec![0u8; DST].into_boxed_slice()).unwrap(),
            b.register_buffer(vec![0u8; DST].into_boxed_slice()).unwrap(),
        ];
        let mut want = [vec![0u8; DST], vec![0u8; DST]];
        let mut expected = std::collections::HashMap::<u32, u64>::new();
        let mut futures = Vec::new();
        // Each op writes to a distinct area of the destinations (op k owns stripe k) so the
        // expected image does not depend on which of two overlapping writes landed last.
        for (k, op) in ops.iter().enumerate() {
            let imm = 1000 + k as u32;
            let stripe = DST / 16;
            let base = (k % 16) * stripe;
            let t = match op {
                Op::Single { src: s, len, .. } => {
                    let len = (*len).min(stripe);
                    let s = (*s).min(SRC - len);
                    want[0][base..base + len].copy_from_slice(&src_img[s..s + len]);
                    a.write(&src, s as u64, dsts[0].descriptor(), base as u64, len as u64, Some(imm), None, None).unwrap()
                }
                Op::Paged { page, pairs } => {
                    // Destination pages inside the stripe, distinct.
                    let per = (stripe / page).max(1) as u32;
                    let mut seen = std::collections::HashSet::new();
                    let pairs: Vec<(u32, u32)> = pairs.iter().map(|&(s, d)| (s, d % per))
                        .filter(|&(_, d)| seen.insert(d) && (d as usize + 1) * page <= stripe).collect();
                    let spec = PagedSpec {
                        page_bytes: *page as u64,
                        src_pages: pairs.iter().map(|p| p.0).collect(),
                        dst_pages: pairs.iter().map(|p| p.1).collect(),
                        src_stride: *page as u64,
                        dst_stride: *page as u64,
                        src_offset: 0,
                        dst_offset: base as u64,
                    };
                    for &(sp, dp) in &pairs {
                        let (so, d0) = (sp as usize * page, base + dp as usize * page);
                        want[0][d0..d0 + page].copy_from_slice(&src_img[so..so + page]);
                    }
                    a.write_paged(&src, dsts[0].descriptor(), &spec, Some(imm), None, None).unwrap()
                }
                Op::Scatter { items } => {
                    // Item j gets its own slot of the stripe on its destination.
                    let slot = stripe / items.len();
                    let its: Vec<ScatterItem> = items.iter().enumerate().map(|(j, &(d, s, _, l))| {
                        let l = l.min(slot);
                        let off = base + j * slot;
                        want[d][off..off + l].copy_from_slice(&src_img[s..s + l]);
                        ScatterItem { dst: d, src_off: s as u64, dst_off: off as u64, len: l as u64 }
                    }).collect();
                    a.scatter(&src, &[dsts[0].descriptor(), dsts[1].descriptor()], &its, Some(imm), None, None).unwrap()
                }
                Op::ImmOnly => a.write_imm(b.address(), imm, None).unwrap(),
            };
            *expected.entry(imm).or_default() += t.imm_count() as u64;
            futures.push(t);
        }
        for t in &futures {
            t.wait(T).unwrap();
        }
        for (&imm, &n) in &expected {
            b.imm_counter().wait(imm, n, T).unwrap();
            prop_assert_eq!(b.imm_counter().count(imm), 0, "extra immediates for {}", imm);
        }
        for (k, d) in dsts.iter().enumerate() {
            let got = bytes(d);
            if let Some(i) = got.iter().zip(&want[k]).position(|(x, y)| x != y) {
                prop_assert!(false, "destination {} differs first at byte {}", k, i);
            }
        }
    }
}

#[test]
fn the_double_really_reorders() {
    let a = engine(2, 7);
    let b = engine(2, 8);
    let src = a
        .register_buffer(vec![1u8; 1 << 20].into_boxed_slice())
        .unwrap();
    let dst = b
        .register_buffer(vec![0u8; 1 << 20].into_boxed_slice())
        .unwrap();
    let before = fabric_lib::reorder::reordered_deliveries();
    let pages: Vec<u32> = (0..200).collect();
    let spec = PagedSpec {
        page_bytes: 4096,
        src_pages: pages.clone(),
        dst_pages: pages,
        src_stride: 4096,
        dst_stride: 4096,
        src_offset: 0,
        dst_offset: 0,
    };
    a.write_paged(&src, dst.descriptor(), &spec, Some(5), None, None)
        .unwrap()
        .wait(T)
        .unwrap();
    b.imm_counter().wait(5, 200, T).unwrap();
    assert!(fabric_lib::reorder::reordered_deliveries() - before > 50);
    assert!(bytes(&dst)[..200 * 4096].iter().all(|&x| x == 1));
}

#[test]
fn a_bad_key_is_refused_by_the_owner_and_a_dead_peer_times_out() {
    let a = engine(1, 1);
    let b = engine(1, 2);
    let src = a
        .register_buffer(vec![1u8; 4096].into_boxed_slice())
        .unwrap();
    let dst = b
        .register_buffer(vec![0u8; 4096].into_boxed_slice())
        .unwrap();
    let mut desc = dst.descriptor().clone();
    desc.keys[0] += 1000;
    let r = a
        .write(&src, 0, &desc, 0, 100, Some(1), None, None)
        .unwrap()
        .wait(T);
    // The owner compares the descriptor with its registration before anything is posted.
    assert!(matches!(r, Err(fabric_lib::Error::Rejected(_))), "{r:?}");
    assert!(bytes(&dst).iter().all(|&x| x == 0));
    let desc = dst.descriptor().clone();
    drop(dst);
    b.stop();
    drop(b);
    let r = a.write(&src, 0, &desc, 0, 100, Some(1), None, None);
    // The peer is gone: either it cannot be added or the write fails; never a hang.
    if let Ok(t) = r {
        assert!(t.wait(T).is_err());
    }
    // The engine still works for others.
    let c = engine(1, 3);
    let dst = c
        .register_buffer(vec![0u8; 4096].into_boxed_slice())
        .unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 4096, Some(2), None, None)
        .unwrap()
        .wait(T)
        .unwrap();
    c.imm_counter().wait(2, 1, T).unwrap();
    assert!(bytes(&dst).iter().all(|&x| x == 1));
}
