// MoE dispatch and combine between the GPUs of one host (and, through a host proxy, beyond).
//
// Four kernels, each one phase of a step, queued in this order on one stream per rank:
//
//   dispatch_send  every token is written once to every rank that holds one of its top-k
//                  experts (peer memory mapped through CUDA IPC, or a local staging area the
//                  host proxy forwards), with its routing (local expert, weight, position).
//   dispatch_recv  waits for every source rank's flag, packs the received tokens expert by
//                  expert into one contiguous output (rows of expert e start at offsets[e]).
//   combine_send   for every received token, the weighted sum of its local experts' outputs
//                  is written back into the source rank's receive area (the same memory the
//                  dispatch used: the buffers are shared between the two halves).
//   combine_recv   waits for every rank's flag and sums the partial results of each token.
//
// Nothing depends on the order in which writes land: a receiver learns that a source's data
// is complete from a 64-bit flag the source stores with release semantics after a system-wide
// fence. The step number lives in device memory (one counter per phase, advanced by the last
// block of each launch), so a CUDA graph of the four phases replays without new arguments.
// Reuse of the shared receive area is guarded by release notices: before writing into peer
// p's area, a rank waits until p has finished reading what was there (release values 2n-1
// after p's dispatch_recv of step n, 2n after its combine_recv).
//
// Every wait has a deadline (globaltimer); a timeout is recorded in host-mapped memory and the
// kernel finishes without touching the data it waited for.
//
// The source is split by concern, into one translation unit (the kernels share device helpers
// in an anonymous namespace, and the host loads every kernel from one fatbin):
//
//   common.cuh    constants, error codes, the Peer/State/Error/Params layouts the host
//                 mirrors, flags, waits with deadlines, phase bookkeeping, routing metadata
//   dispatch.cuh  dispatch_send, dispatch_recv and the overlapped moe_dispatch_count +
//                 moe_dispatch_fused, with the helpers only the dispatch uses
//   combine.cuh   combine_send, combine_recv and the overlapped moe_combine_fused, for bf16,
//                 f16 and f32

#include "common.cuh"
#include "dispatch.cuh"
#include "combine.cuh"
