//! Pure planning: how a transfer becomes libfabric operations spread over a domain group.
//!
//! Every write-like transfer is expanded into [`OpPlan`]s. Each op is posted on one local domain
//! and, when the transfer has an immediate, carries it; so the receiver sees exactly one
//! immediate per op. The count depends only on the transfer's shape and the group's parameters,
//! never on timing, which is what lets [`ShardParams::imm_count_single`] and friends tell a sender
//! in advance how many immediates the receiver must expect.

use crate::error::{Error, Result};

/// How a transfer's bytes are spread over the domains of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharding {
    /// Large single writes are split evenly over all domains; small ones, pages and scatter
    /// destinations rotate over the domains.
    #[default]
    RoundRobin,
    /// Everything goes through one domain.
    Pinned(usize),
}

/// Parameters of a domain group that planning depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardParams {
    /// Domains in the group (1..=16).
    pub domains: usize,
    /// A single write is split only into shards of at least this many bytes (>= 64 KiB).
    pub min_shard: u64,
    /// Largest single operation; longer shards are cut (the providers' max_msg_size).
    pub max_op: u64,
}

/// Bytes of alignment for shard boundaries inside a split write.
pub const SHARD_ALIGN: u64 = 4096;
/// Smallest allowed `min_shard`; makes the aligned even split cover every shard.
pub const MIN_SHARD_FLOOR: u64 = 64 * 1024;

/// One operation of a planned transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpPlan {
    /// Local domain index.
    pub domain: usize,
    /// Index of the destination (scatter); 0 otherwise.
    pub dst: usize,
    pub src_off: u64,
    pub dst_off: u64,
    pub len: u64,
}

/// A paged write: page `src_pages[i]` of the source goes to page `dst_pages[i]` of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSpec {
    pub page_bytes: u64,
    pub src_pages: Vec<u32>,
    pub dst_pages: Vec<u32>,
    pub src_stride: u64,
    pub dst_stride: u64,
    pub src_offset: u64,
    pub dst_offset: u64,
}

impl PagedSpec {
    /// Checks list lengths and page/stride sizes; returns the (src, dst) byte extents touched.
    pub fn extents(&self) -> Result<(u64, u64)> {
        if self.src_pages.len() != self.dst_pages.len() {
            return Err(Error::InvalidArgument(format!(
                "{} source pages but {} destination pages",
                self.src_pages.len(),
                self.dst_pages.len()
            )));
        }
        if self.page_bytes > self.src_stride.max(1) && self.src_pages.len() > 1
            || self.page_bytes > self.dst_stride.max(1) && self.dst_pages.len() > 1
        {
            return Err(Error::InvalidArgument(format!(
                "page of {} bytes is larger than its stride ({} / {})",
                self.page_bytes, self.src_stride, self.dst_stride
            )));
        }
        let extent = |pages: &[u32], stride: u64, offset: u64| -> Result<u64> {
            match pages.iter().max() {
                None => Ok(0),
                Some(&m) => (m as u64)
                    .checked_mul(stride)
                    .and_then(|x| x.checked_add(offset))
                    .and_then(|x| x.checked_add(self.page_bytes))
                    .ok_or_else(|| Error::OutOfBounds("page extent overflows".into())),
            }
        };
        Ok((
            extent(&self.src_pages, self.src_stride, self.src_offset)?,
            extent(&self.dst_pages, self.dst_stride, self.dst_offset)?,
        ))
    }
}

/// One destination of a scatter: `len` bytes from `src_off` to `dst_off` of destination `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScatterItem {
    pub dst: usize,
    pub src_off: u64,
    pub dst_off: u64,
    pub len: u64,
}

impl ShardParams {
    /// Validates the parameters.
    pub fn new(domains: usize, min_shard: u64, max_op: u64) -> Result<Self> {
        if domains == 0 || domains > crate::desc::MAX_DOMAINS {
            return Err(Error::Config(format!("{domains} domains (must be 1..=16)")));
        }
        if min_shard < MIN_SHARD_FLOOR {
            return Err(Error::Config(format!(
                "min_shard_bytes={min_shard} is below the minimum of {MIN_SHARD_FLOOR} (64 KiB)"
            )));
        }
        if max_op < SHARD_ALIGN {
            return Err(Error::Config(format!(
                "max_op_bytes={max_op} is below the minimum of {SHARD_ALIGN}"
            )));
        }
        Ok(ShardParams {
            domains,
            min_shard,
            max_op: max_op - max_op % SHARD_ALIGN,
        })
    }

    fn domain_for(&self, sharding: Sharding, rotation: usize, k: usize) -> Result<usize> {
        match sharding {
            Sharding::RoundRobin => Ok((rotation + k) % self.domains),
            Sharding::Pinned(d) if d < self.domains => Ok(d),
            Sharding::Pinned(d) => Err(Error::InvalidArgument(format!(
                "pinned to domain {d} but the group has {}",
                self.domains
            ))),
        }
    }

    /// Cuts one shard into operations of at most `max_op` bytes (a 0-byte shard is one op).
    fn push_ops(&self, out: &mut Vec<OpPlan>, op: OpPlan) {
        if op.len <= self.max_op {
            out.push(op);
            return;
        }
        let mut done = 0;
        while done < op.len {
            let len = (op.len - done).min(self.max_op);
            out.push(OpPlan {
                src_off: op.src_off + done,
                dst_off: op.dst_off + done,
                len,
                ..op
            });
            done += len;
        }
    }

    fn ops_for_len(&self, len: u64) -> usize {
        if len == 0 {
            1
        } else {
            len.div_ceil(self.max_op) as usize
        }
    }

    /// How many shards a single write of `len` bytes is split into.
    fn shard_count(&self, sharding: Sharding, len: u64) -> usize {
        match sharding {
            Sharding::Pinned(_) => 1,
            Sharding::RoundRobin => {
                if len >= 2 * self.min_shard {
                    (len / self.min_shard).min(self.domains as u64) as usize
                } else {
                    1
                }
            }
        }
    }

    /// Plans a single write of `len` bytes.
    pub fn plan_single(
        &self,
        sharding: Sharding,
        rotation: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    ) -> Result<Vec<OpPlan>> {
        let n = self.shard_count(sharding, len);
        let mut out = Vec::with_capacity(n);
        if n == 1 {
            let domain = self.domain_for(sharding, rotation, 0)?;
            self.push_ops(
                &mut out,
                OpPlan {
                    domain,
                    dst: 0,
                    src_off,
                    dst_off,
                    len,
                },
            );
            return Ok(out);
        }
        let piece = len.div_ceil(n as u64).next_multiple_of(SHARD_ALIGN);
        let mut done = 0;
        for k in 0..n {
            let this = piece.min(len - done);
            let domain = self.domain_for(sharding, rotation, k)?;
            let op = OpPlan {
                domain,
                dst: 0,
                src_off: src_off + done,
                dst_off: dst_off + done,
                len: this,
            };
            self.push_ops(&mut out, op);
            done += this;
        }
        debug_assert_eq!(done, len);
        Ok(out)
    }

    /// Immediates the receiver gets for a single write of `len` bytes (with an immediate).
    pub fn imm_count_single(&self, sharding: Sharding, len: u64) -> usize {
        let n = self.shard_count(sharding, len);
        if n == 1 {
            return self.ops_for_len(len);
        }
        let piece = len.div_ceil(n as u64).next_multiple_of(SHARD_ALIGN);
        let mut done = 0;
        let mut count = 0;
        for _ in 0..n {
            let this = piece.min(len - done);
            count += self.ops_for_len(this);
            done += this;
        }
        count
    }

    /// Plans a paged write: one op per page (more for pages over `max_op`), pages rotate over
    /// the domains.
    pub fn plan_paged(
        &self,
        sharding: Sharding,
        rotation: usize,
        spec: &PagedSpec,
    ) -> Result<Vec<OpPlan>> {
        spec.extents()?;
        let mut out = Vec::with_capacity(spec.src_pages.len());
        for (k, (&s, &d)) in spec.src_pages.iter().zip(&spec.dst_pages).enumerate() {
            let op = OpPlan {
                domain: self.domain_for(sharding, rotation, k)?,
                dst: 0,
                src_off: spec.src_offset + s as u64 * spec.src_stride,
                dst_off: spec.dst_offset + d as u64 * spec.dst_stride,
                len: spec.page_bytes,
            };
            self.push_ops(&mut out, op);
        }
        Ok(out)
    }

    /// Immediates the receiver gets for a paged write.
    pub fn imm_count_paged(&self, pages: usize, page_bytes: u64) -> usize {
        pages * self.ops_for_len(page_bytes)
    }

    /// Plans a scatter: destination `i` of the list goes through domain `(rotation + i) % n`.
    pub fn plan_scatter(
        &self,
        sharding: Sharding,
        rotation: usize,
        items: &[ScatterItem],
    ) -> Result<Vec<OpPlan>> {
        let mut out = Vec::with_capacity(items.len());
        for (k, it) in items.iter().enumerate() {
            // Destination k starts on domain (rotation + k), so peers spread over the NICs; an
            // item large enough to shard is also split over the domains like a single write.
            for mut op in
                self.plan_single(sharding, rotation + k, it.src_off, it.dst_off, it.len)?
            {
                op.dst = it.dst;
                out.push(op);
            }
        }
        Ok(out)
    }

    /// Immediates one scatter destination receives for an item of `len` bytes.
    pub fn imm_count_scatter_item(&self, sharding: Sharding, len: u64) -> usize {
        self.imm_count_single(sharding, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> impl Strategy<Value = ShardParams> {
        (1usize..=4, 16u64..=4096, 1u64..=1 << 20)
            .prop_map(|(d, m, x)| ShardParams::new(d, m * 4096, x * 4096).unwrap())
    }

    /// Every byte of [0, len) covered once, in order of offsets, src and dst in step.
    fn assert_exact_cover(ops: &[OpPlan], src: u64, dst: u64, len: u64) {
        let mut v: Vec<_> = ops.to_vec();
        v.sort_by_key(|o| o.src_off);
        let mut at = src;
        for o in &v {
            assert_eq!(o.src_off, at, "gap or overlap at {at}");
            assert_eq!(o.dst_off - dst, o.src_off - src);
            at += o.len;
        }
        assert_eq!(at, src + len);
    }

    proptest! {
        #[test]
        fn single_covers_every_byte_once(p in params(), rot in 0usize..8, len in 0u64..1 << 34,
                                         src in 0u64..1 << 20, dst in 0u64..1 << 20) {
            let ops = p.plan_single(Sharding::RoundRobin, rot, src, dst, len).unwrap();
            assert_exact_cover(&ops, src, dst, len);
            prop_assert_eq!(ops.len(), p.imm_count_single(Sharding::RoundRobin, len));
            for o in &ops {
                prop_assert!(o.len <= p.max_op);
                prop_assert!(o.domain < p.domains);
            }
        }

        #[test]
        fn large_writes_use_every_domain_evenly(d in 1usize..=4, len in 1u64 << 24..1 << 33) {
            let p = ShardParams::new(d, 1 << 20, 1 << 40).unwrap();
            let ops = p.plan_single(Sharding::RoundRobin, 3, 0, 0, len).unwrap();
            prop_assert_eq!(ops.len(), d);
            let mut per = vec![0u64; d];
            for o in &ops { per[o.domain] += o.len; }
            let max = *per.iter().max().unwrap();
            let min = *per.iter().min().unwrap();
            prop_assert!(max - min <= SHARD_ALIGN * d as u64, "{:?}", per);
        }

        #[test]
        fn pinned_stays_on_its_domain(p in params(), len in 0u64..1 << 30) {
            let pin = p.domains - 1;
            let ops = p.plan_single(Sharding::Pinned(pin), 0, 0, 0, len).unwrap();
            prop_assert!(ops.iter().all(|o| o.domain == pin));
            assert_exact_cover(&ops, 0, 0, len);
            prop_assert_eq!(ops.len(), p.imm_count_single(Sharding::Pinned(pin), len));
        }

        #[test]
        fn paged_expands_each_page(p in params(), pages in proptest::collection::vec((0u32..64, 0u32..64), 0..40),
                                   page_bytes in 1u64..1 << 16, extra in 0u64..4096) {
            let spec = PagedSpec {
                page_bytes,
                src_pages: pages.iter().map(|x| x.0).collect(),
                dst_pages: pages.iter().map(|x| x.1).collect(),
                src_stride: page_bytes + extra,
                dst_stride: page_bytes,
                src_offset: 7,
                dst_offset: 3,
            };
            let ops = p.plan_paged(Sharding::RoundRobin, 1, &spec).unwrap();
            prop_assert_eq!(ops.len(), p.imm_count_paged(pages.len(), page_bytes));
            let total: u64 = ops.iter().map(|o| o.len).sum();
            prop_assert_eq!(total, page_bytes * pages.len() as u64);
            for o in &ops {
                let k = (o.dst_off - 3) / page_bytes;
                prop_assert!(pages.iter().any(|x| x.1 as u64 == k));
            }
        }
    }

    #[test]
    fn over_4gib_splits_exactly() {
        let p = ShardParams::new(3, 1 << 20, 1 << 30).unwrap();
        let len = (5u64 << 30) + 12345;
        let ops = p.plan_single(Sharding::RoundRobin, 0, 0, 0, len).unwrap();
        assert_exact_cover(&ops, 0, 0, len);
        assert!(ops.iter().all(|o| o.len <= 1 << 30));
        assert_eq!(ops.len(), p.imm_count_single(Sharding::RoundRobin, len));
        let per: Vec<u64> = (0..3)
            .map(|d| ops.iter().filter(|o| o.domain == d).map(|o| o.len).sum())
            .collect();
        assert_eq!(per.iter().sum::<u64>(), len);
    }

    #[test]
    fn small_writes_rotate() {
        let p = ShardParams::new(3, 1 << 20, 1 << 30).unwrap();
        let doms: Vec<usize> = (0..6)
            .map(|r| p.plan_single(Sharding::RoundRobin, r, 0, 0, 4096).unwrap()[0].domain)
            .collect();
        assert_eq!(doms, vec![0, 1, 2, 0, 1, 2]);
        let zero = p.plan_single(Sharding::RoundRobin, 0, 0, 0, 0).unwrap();
        assert_eq!(zero.len(), 1);
        assert_eq!(p.imm_count_single(Sharding::RoundRobin, 0), 1);
    }

    #[test]
    fn scatter_spreads_destinations() {
        let p = ShardParams::new(2, 1 << 20, 1 << 20).unwrap();
        let items: Vec<_> = (0..4)
            .map(|i| ScatterItem {
                dst: i,
                src_off: i as u64 * 10,
                dst_off: 0,
                len: 10,
            })
            .collect();
        let ops = p.plan_scatter(Sharding::RoundRobin, 0, &items).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.domain).collect::<Vec<_>>(),
            vec![0, 1, 0, 1]
        );
        let big = [ScatterItem {
            dst: 0,
            src_off: 0,
            dst_off: 0,
            len: (3 << 20) + 1,
        }];
        assert_eq!(
            p.plan_scatter(Sharding::RoundRobin, 0, &big).unwrap().len(),
            4
        );
        assert_eq!(
            p.imm_count_scatter_item(Sharding::RoundRobin, (3 << 20) + 1),
            4
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = ShardParams::new(2, 1 << 20, 1 << 20).unwrap();
        assert!(p.plan_single(Sharding::Pinned(2), 0, 0, 0, 10).is_err());
        let spec = PagedSpec {
            page_bytes: 10,
            src_pages: vec![1, 2],
            dst_pages: vec![1],
            src_stride: 10,
            dst_stride: 10,
            src_offset: 0,
            dst_offset: 0,
        };
        assert!(p.plan_paged(Sharding::RoundRobin, 0, &spec).is_err());
        assert!(ShardParams::new(0, 1 << 20, 1 << 20).is_err());
        assert!(ShardParams::new(17, 1 << 20, 1 << 20).is_err());
    }
}
