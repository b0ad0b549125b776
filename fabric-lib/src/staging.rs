//! Staging GPU memory through registered host buffers, for providers that cannot touch GPU
//! memory (tcp, udp, shm in this libfabric build).
//!
//! The protocol never relies on order:
//! - GPU source, host destination: the sender copies a chunk into one of its registered send
//!   buffers (device-to-host), then posts an ordinary RMA write (with the immediate) from there.
//! - Any source, GPU destination: a chunk travels as one message whose 48-byte header names the
//!   destination region, offset, length and immediate (and the writer's token for the owner's
//!   `Landed` answer, which completes a delivered write). The receiver copies it host-to-device
//!   from the receive buffer and counts the immediate only after that copy has finished, so an
//!   immediate never announces bytes that are not yet in GPU memory.
//!
//! Every chunk is at most `max_message_bytes` and carries the immediate, so a staged transfer of
//! `n` bytes produces `ceil(n / max_message_bytes)` immediates per shard (see
//! `ShardParams::imm_count_single_chunked`).

use std::sync::Arc;

use crate::error::{Error, Result};

/// Bytes reserved at the start of every message buffer.
pub(crate) const HEADER: usize = 48;
/// Message kinds (first u32 of the header).
pub(crate) const KIND_USER: u32 = 0;
pub(crate) const KIND_STAGED: u32 = 1;
/// Worker-to-worker control (leases, revocation, landed staged chunks: `crate::lease`).
pub(crate) const KIND_CTRL: u32 = 2;

/// The header of a message buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u32,
    pub imm: Option<u32>,
    pub len: u32,
    pub region: u64,
    pub offset: u64,
    /// Staged chunks: the writer's engine id and its token for the `Landed` answer (0: the
    /// writer wants none).
    pub writer: u64,
    pub token: u64,
}

impl Header {
    /// A message of `len` body bytes of `kind` (user or control).
    pub(crate) fn message(kind: u32, len: usize) -> Self {
        Header {
            kind,
            imm: None,
            len: len as u32,
            region: 0,
            offset: 0,
            writer: 0,
            token: 0,
        }
    }

    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[4..8].copy_from_slice(&(self.imm.is_some() as u32).to_le_bytes());
        out[8..12].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.region.to_le_bytes());
        out[24..32].copy_from_slice(&self.offset.to_le_bytes());
        out[32..40].copy_from_slice(&self.writer.to_le_bytes());
        out[40..48].copy_from_slice(&self.token.to_le_bytes());
    }

    /// Decodes a received header; `received` is the message length reported by the provider
    /// (0 when it does not report one).
    pub(crate) fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < HEADER {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let imm = match u32_at(4) {
            0 => None,
            1 => Some(u32_at(8)),
            _ => return None,
        };
        Some(Header {
            kind: u32_at(0),
            imm,
            len: u32_at(12),
            region: u64_at(16),
            offset: u64_at(24),
            writer: u64_at(32),
            token: u64_at(40),
        })
    }
}

/// Where staged copies are done.
pub(crate) enum Copier {
    /// Plain memcpy: "staged" host regions (tests of the protocol on machines without a GPU).
    Host,
    /// CUDA copies on the worker's own streams, taken in turn. Copies are independent (each has
    /// its own event, nothing relies on their order), so several streams let copies to
    /// different peers, and the launch gaps between copies, overlap.
    Cuda {
        ctx: Arc<stolon_cuda::Context>,
        streams: Vec<stolon_cuda::Stream>,
        next: std::sync::atomic::AtomicUsize,
        /// Events of finished copies, reused: creating and destroying one per copy cost about
        /// as much as the copy call itself for small copies.
        spare: std::sync::Mutex<Vec<stolon_cuda::Event>>,
    },
}

/// Most events a copier keeps for reuse (more in flight at once are created and dropped).
const SPARE_EVENTS: usize = 1024;

/// Streams a CUDA copier uses: `$STOLON_COPY_STREAMS` (1..=16), else 4.
fn copy_streams() -> usize {
    std::env::var("STOLON_COPY_STREAMS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=16).contains(n))
        .unwrap_or(4)
}

/// A copy in flight.
pub(crate) enum Ticket {
    Done,
    Cuda(stolon_cuda::Event),
}

impl Ticket {
    pub(crate) fn is_done(&self) -> Result<bool> {
        match self {
            Ticket::Done => Ok(true),
            Ticket::Cuda(e) => e.query().map_err(cuda_err),
        }
    }
}

pub(crate) fn cuda_err(e: stolon_cuda::Error) -> Error {
    Error::CudaDriver(e)
}

/// Memory a staged copy reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mem {
    Host(usize),
    Gpu(u64),
}

impl Copier {
    pub(crate) fn cuda(device: usize) -> Result<Self> {
        let dev = stolon_cuda::Device::get(device).map_err(cuda_err)?;
        let ctx = dev.primary_context().map_err(cuda_err)?;
        let streams = (0..copy_streams())
            .map(|_| stolon_cuda::Stream::new(&ctx).map_err(cuda_err))
            .collect::<Result<Vec<_>>>()?;
        Ok(Copier::Cuda {
            ctx,
            streams,
            next: std::sync::atomic::AtomicUsize::new(0),
            spare: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Takes back the ticket of a finished copy (its event is reused by a later copy).
    pub(crate) fn recycle(&self, ticket: Ticket) {
        if let (Copier::Cuda { spare, .. }, Ticket::Cuda(ev)) = (self, ticket) {
            let mut spare = spare.lock().unwrap();
            if spare.len() < SPARE_EVENTS {
                spare.push(ev);
            }
        }
    }

    /// Copies `len` bytes from `src` to `dst`, asynchronously where the copier can.
    ///
    /// # Safety
    /// Both ranges must be valid for `len` bytes until the returned ticket is done.
    pub(crate) unsafe fn copy(&self, dst: Mem, src: Mem, len: usize) -> Result<Ticket> {
        match (self, dst, src) {
            (_, Mem::Host(d), Mem::Host(s)) => {
                // SAFETY: the caller promises both host ranges.
                unsafe { std::ptr::copy(s as *const u8, d as *mut u8, len) };
                Ok(Ticket::Done)
            }
            (
                Copier::Cuda {
                    ctx,
                    streams,
                    next,
                    spare,
                },
                dst,
                src,
            ) => {
                let turn = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let stream = &streams[turn % streams.len()];
                // SAFETY: the caller promises both ranges until the ticket (an event recorded
                // after the copy on the same stream) is done.
                unsafe {
                    match (dst, src) {
                        (Mem::Gpu(d), Mem::Host(s)) => {
                            stolon_cuda::memory::copy_htod_async(stream, d, s as *const u8, len)
                        }
                        (Mem::Host(d), Mem::Gpu(s)) => {
                            stolon_cuda::memory::copy_dtoh_async(stream, d as *mut u8, s, len)
                        }
                        (Mem::Gpu(d), Mem::Gpu(s)) => {
                            stolon_cuda::memory::copy_dtod_async(stream, d, s, len)
                        }
                        (Mem::Host(_), Mem::Host(_)) => unreachable!(),
                    }
                }
                .map_err(cuda_err)?;
                let reused = spare.lock().unwrap().pop();
                let ev = match reused {
                    Some(ev) => ev,
                    None => stolon_cuda::Event::new(ctx).map_err(cuda_err)?,
                };
                // Re-recording an event makes it track this copy (a reused event's earlier
                // copy had finished: only done tickets are recycled).
                ev.record(stream).map_err(cuda_err)?;
                Ok(Ticket::Cuda(ev))
            }
            (Copier::Host, _, _) => Err(Error::Cuda(
                "GPU memory in an engine opened without cuda_device".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let h = Header {
            kind: KIND_STAGED,
            imm: Some(7),
            len: 100,
            region: 3,
            offset: 1 << 40,
            writer: 0xfeed_beef_0000_0001,
            token: u64::MAX - 1,
        };
        let mut b = [0u8; HEADER];
        h.encode(&mut b);
        assert_eq!(Header::decode(&b), Some(h));
        let u = Header::message(KIND_USER, 5);
        u.encode(&mut b);
        assert_eq!(Header::decode(&b), Some(u));
        b[4] = 9;
        assert_eq!(Header::decode(&b), None);
        assert_eq!(Header::decode(&b[..10]), None);
    }
}
