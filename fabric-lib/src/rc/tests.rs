//! The `verbs-rc` integration under the worker, tested against the in-memory device double
//! (`double.rs`: **not hardware**; it stands in for a ConnectX port that no machine here has).
//! What these tests show: handshake routing over the UDP side channel between engines, on-demand
//! connection, retries when handshake datagrams are lost, reconnection after a QP failure and
//! after a peer restarts, giving up on a peer that never answers, completion-to-transfer mapping
//! (including failures held until drained), and the mapping of device errors to engine errors.
//! What they cannot show: anything about a real NIC (see the README's support matrix).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use stolon_verbs::Error as VError;

use super::double::{self, Faults};
use super::*;
use crate::engine::{EngineConfig, MemoryRegion, TransferEngine};
use crate::shard::{PagedSpec, ScatterItem};

const T: Duration = Duration::from_secs(10);

fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        provider: double::PROVIDER.into(),
        interface: Some(name.into()),
        node: Some("127.0.0.1".into()),
        hmem: false,
    }
}

fn engine(name: &str, domains: usize) -> TransferEngine {
    let mut cfg = EngineConfig::new(double::PROVIDER, domains);
    cfg.domains = (0..domains).map(|_| spec(name)).collect();
    cfg.min_shard_bytes = 64 << 10;
    cfg.max_op_bytes = Some(32 << 10);
    cfg.spin = Duration::from_millis(1);
    TransferEngine::new(cfg).unwrap()
}

fn bytes(r: &MemoryRegion) -> &[u8] {
    // SAFETY: the region owns its boxed buffer; tests read it only after the transfers that
    // write it completed.
    unsafe { std::slice::from_raw_parts(r.ptr() as *const u8, r.len() as usize) }
}

fn zero(r: &MemoryRegion) {
    // SAFETY: as above; no transfer into the region is in flight.
    unsafe { std::ptr::write_bytes(r.ptr() as *mut u8, 0, r.len() as usize) }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn every_transfer_kind_lands_over_the_double() {
    let a = engine("kinds-a", 2);
    let b = engine("kinds-b", 2);
    let n = 256 << 10;
    let src = a.register_buffer(pattern(n, 1).into_boxed_slice()).unwrap();
    let dst = b.register_buffer(vec![0u8; n].into_boxed_slice()).unwrap();

    // A sharded single write: several ops over both domains, each with the immediate.
    a.write(
        &src,
        0,
        dst.descriptor(),
        0,
        n as u64,
        Some(7),
        None,
        Some(T),
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let expect = a.imm_count_write(n as u64, None, false) as u64;
    assert!(expect > 2, "the write was sharded into {expect} ops");
    b.imm_counter().wait(7, expect, T).unwrap();
    assert_eq!(bytes(&dst), bytes(&src));

    // Paged.
    zero(&dst);
    let spec = PagedSpec {
        page_bytes: 4096,
        src_pages: vec![0, 5, 9, 2],
        dst_pages: vec![3, 1, 0, 7],
        src_stride: 4096,
        dst_stride: 4096,
        src_offset: 0,
        dst_offset: 0,
    };
    a.write_paged(&src, dst.descriptor(), &spec, Some(8), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    b.imm_counter()
        .wait(8, a.imm_count_paged(4, 4096, false) as u64, T)
        .unwrap();
    for (s, d) in spec.src_pages.iter().zip(&spec.dst_pages) {
        let (s, d) = (*s as usize * 4096, *d as usize * 4096);
        assert_eq!(bytes(&dst)[d..d + 4096], bytes(&src)[s..s + 4096]);
    }

    // Scatter to two regions.
    let dst2 = b.register_buffer(vec![0u8; n].into_boxed_slice()).unwrap();
    let items = [
        ScatterItem {
            dst: 0,
            src_off: 100,
            dst_off: 5000,
            len: 3000,
        },
        ScatterItem {
            dst: 1,
            src_off: 9000,
            dst_off: 0,
            len: 70_000,
        },
    ];
    let t = a
        .scatter(
            &src,
            &[dst.descriptor(), dst2.descriptor()],
            &items,
            Some(9),
            None,
            Some(T),
        )
        .unwrap();
    t.wait(T).unwrap();
    b.imm_counter().wait(9, t.imm_count() as u64, T).unwrap();
    assert_eq!(bytes(&dst)[5000..8000], bytes(&src)[100..3100]);
    assert_eq!(bytes(&dst2)[..70_000], bytes(&src)[9000..79_000]);

    // Send / recv both ways (the receiver connects back on its own: B never added A).
    a.send(b.address(), b"hello over RC", Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(b.recv(T).unwrap(), b"hello over RC");
    b.send(a.address(), &pattern(60_000, 3), Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(a.recv(T).unwrap(), pattern(60_000, 3));

    // Barrier (immediate-only writes into the scratch region).
    let addrs = [a.address().clone(), b.address().clone()];
    let (a2, addrs2) = (std::sync::Arc::new(a), addrs.clone());
    let a3 = a2.clone();
    let h = std::thread::spawn(move || a3.barrier(&addrs2, 77, T));
    b.barrier(&addrs, 77, T).unwrap();
    h.join().unwrap().unwrap();
}

#[test]
fn writes_to_a_peer_not_yet_connected_wait_and_then_land() {
    // Below the engine: two adapters over the double, polled by hand.
    let mut a = RcDomain::with_device(
        &spec("direct-a"),
        Box::new(double::MemDevice::open(&spec("direct-a"), 4096).unwrap()),
    )
    .unwrap();
    let mut b = RcDomain::with_device(
        &spec("direct-b"),
        Box::new(double::MemDevice::open(&spec("direct-b"), 4096).unwrap()),
    )
    .unwrap();
    let src = pattern(1000, 9);
    let mut dst = vec![0u8; 1000];
    // SAFETY: both buffers outlive the domains' use of them (the test ends after completion).
    let (smr, dmr) = unsafe {
        (
            a.register(src.as_ptr(), src.len()).unwrap(),
            b.register(dst.as_mut_ptr(), dst.len()).unwrap(),
        )
    };
    let peer = a.insert_addr(b.name()).unwrap();
    assert!(
        a.insert_addr(a.name().to_vec().as_slice()).is_err(),
        "no loopback QPs"
    );
    let ctx = 0x1234usize as *mut c_void;
    // SAFETY: src is registered as smr and outlives the op; the key and range are dmr's.
    let posted = unsafe {
        a.post_write(
            src.as_ptr(),
            1000,
            smr.lkey as usize as *mut c_void,
            peer,
            dst.as_ptr() as u64,
            dmr.rkey as u64,
            Some(42),
            ctx,
        )
    }
    .unwrap();
    assert!(matches!(posted, Posted::Yes), "accepted while connecting");
    assert_eq!(a.peers[peer as usize].backlog.len(), 1);
    let mut out: Vec<fi_cq_data_entry> = (0..8).map(|_| entry(0, 0, 0, 0)).collect();
    let (mut done, mut imm) = (false, false);
    let deadline = Instant::now() + T;
    while !(done && imm) && Instant::now() < deadline {
        let n = a.poll(&mut out).unwrap();
        for e in &out[..n] {
            assert_eq!(e.op_context, ctx);
            assert_eq!(e.flags, fi::FI_RMA | fi::FI_WRITE);
            done = true;
        }
        let n = b.poll(&mut out).unwrap();
        for e in &out[..n] {
            assert_ne!(e.flags & fi::FI_REMOTE_CQ_DATA, 0);
            assert_eq!(e.data, 42);
            imm = true;
        }
    }
    assert!(done && imm, "write completed and its immediate arrived");
    assert_eq!(dst, src);
    assert_eq!(a.stats.established, 1);
    assert_eq!(b.stats.established, 1);
    assert!(a.stats.datagrams_sent >= 1 && b.stats.datagrams_received >= 1);

    // A datagram for another instance (a process that had this port before) is dropped, and
    // so is garbage.
    let stale = wire::Datagram {
        to_instance: b.me.instance ^ 1,
        from: a.me,
        message: [0; stolon_verbs::handshake::MESSAGE_LEN],
    };
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&stale.encode(), b.me.addr).unwrap();
    s.send_to(b"not a datagram", b.me.addr).unwrap();
    let before = b.stats.datagrams_dropped;
    let deadline = Instant::now() + T;
    while b.stats.datagrams_dropped < before + 2 && Instant::now() < deadline {
        b.poll(&mut out).unwrap();
    }
    assert_eq!(b.stats.datagrams_dropped, before + 2);
    assert_eq!(b.stats.resets, 0, "a stale datagram resets nothing");
    drop((smr, dmr));
}

#[test]
fn lost_handshake_datagrams_are_retried() {
    double::set_faults(
        "lossy-a",
        Faults {
            lose_datagrams: 3,
            ..Faults::default()
        },
    );
    let a = engine("lossy-a", 1);
    let b = engine("lossy-b", 1);
    let src = a
        .register_buffer(pattern(4096, 5).into_boxed_slice())
        .unwrap();
    let dst = b
        .register_buffer(vec![0u8; 4096].into_boxed_slice())
        .unwrap();
    let t0 = Instant::now();
    a.write(&src, 0, dst.descriptor(), 0, 4096, Some(1), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    b.imm_counter().wait(1, 1, T).unwrap();
    assert_eq!(bytes(&dst), bytes(&src));
    // Three lost Hellos cost at least the first retry intervals (20 + 40 + 80 ms).
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn a_qp_failure_fails_its_transfer_then_both_sides_reconnect() {
    let a = engine("qpfail-a", 1);
    let b = engine("qpfail-b", 1);
    let src = a
        .register_buffer(pattern(8192, 2).into_boxed_slice())
        .unwrap();
    let dst = b
        .register_buffer(vec![0u8; 8192].into_boxed_slice())
        .unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 4096, Some(3), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    double::set_faults(
        "qpfail-a",
        Faults {
            fail_writes: 1,
            ..Faults::default()
        },
    );
    let err = a
        .write(&src, 0, dst.descriptor(), 0, 4096, Some(3), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(
        matches!(&err, Error::TransferFailed(m) if m.contains("peer unreachable")),
        "{err}"
    );
    // The next write reconnects (A starts a new attempt; B sees a newer epoch and resets).
    a.write(
        &src,
        4096,
        dst.descriptor(),
        4096,
        4096,
        Some(3),
        None,
        Some(T),
    )
    .unwrap()
    .wait(T)
    .unwrap();
    b.imm_counter().wait(3, 2, T).unwrap();
    assert_eq!(bytes(&dst)[4096..], bytes(&src)[4096..]);
}

#[test]
fn a_restarted_peer_is_a_new_peer_and_the_old_one_fails() {
    let a = engine("restart-a", 1);
    let b = engine("restart-b", 1);
    let src = a
        .register_buffer(pattern(4096, 4).into_boxed_slice())
        .unwrap();
    let dst = b
        .register_buffer(vec![0u8; 4096].into_boxed_slice())
        .unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 4096, Some(5), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    let old = dst.descriptor().clone();
    drop(dst);
    b.stop();
    drop(b);
    // Writes to the dead instance fail with a typed engine error, within the transfer timeout.
    let err = a
        .write(&src, 0, &old, 0, 4096, Some(5), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(matches!(err, Error::TransferFailed(_)), "{err}");
    // The restarted peer (new address) is reached both ways.
    let b2 = engine("restart-b", 1);
    let dst2 = b2
        .register_buffer(vec![0u8; 4096].into_boxed_slice())
        .unwrap();
    a.write(&src, 0, dst2.descriptor(), 0, 4096, Some(6), None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    b2.imm_counter().wait(6, 1, T).unwrap();
    assert_eq!(bytes(&dst2), bytes(&src));
    b2.send(a.address(), b"back", Some(T))
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(a.recv(T).unwrap(), b"back");
}

#[test]
fn a_peer_that_never_answers_makes_waiting_ops_fail_when_the_handshake_gives_up() {
    double::set_faults(
        "silent-a",
        Faults {
            lose_datagrams: u32::MAX,
            ..Faults::default()
        },
    );
    let a = engine("silent-a", 1);
    let b = engine("silent-b", 1);
    let src = a.register_buffer(vec![1u8; 64].into_boxed_slice()).unwrap();
    let dst = b.register_buffer(vec![0u8; 64].into_boxed_slice()).unwrap();
    let t0 = Instant::now();
    let err = a
        .write(&src, 0, dst.descriptor(), 0, 64, None, None, Some(T))
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(
        matches!(&err, Error::TransferFailed(m) if m.contains("handshake unanswered")),
        "{err}"
    );
    let give_up = double::handshake_config().give_up_after;
    assert!(
        t0.elapsed() >= give_up && t0.elapsed() < T,
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn device_errors_map_to_engine_errors() {
    let e = engine_error(VError::NoDevices {
        detail: "none here".into(),
    });
    assert!(
        matches!(&e, Error::RdmaUnavailable(m) if m.contains("none here")),
        "{e}"
    );
    assert!(matches!(
        engine_error(VError::NoActivePort { found: vec![] }),
        Error::RdmaUnavailable(_)
    ));
    assert!(matches!(
        engine_error(VError::Config("x".into())),
        Error::Config(_)
    ));
    let e = engine_error(VError::verbs("ibv_reg_mr", libc::ENOMEM));
    assert!(
        matches!(&e, Error::Fabric { call: "ibv_reg_mr", code, .. } if *code == -(libc::ENOMEM as isize)),
        "{e}"
    );
    let e = engine_error(VError::RemoteAccess {
        qp_num: 7,
        vendor_err: 0,
    });
    assert!(
        matches!(&e, Error::TransferFailed(m) if m.contains("remote access")),
        "{e}"
    );
    assert!(matches!(
        engine_error(VError::Timeout(T)),
        Error::Timeout(_)
    ));
    assert_eq!(
        completion_errno(&VError::PeerUnreachable {
            qp_num: 1,
            vendor_err: 0
        }),
        libc::EHOSTUNREACH
    );
    assert_eq!(
        completion_errno(&VError::ConnectionReset {
            peer: 1,
            reason: String::new()
        }),
        libc::ECONNRESET
    );
}

#[test]
fn a_failure_is_reported_to_the_worker_only_after_it_drained() {
    let mut d = RcDomain::with_device(
        &spec("drain"),
        Box::new(double::MemDevice::open(&spec("drain"), 4096).unwrap()),
    )
    .unwrap();
    let id = TransferId {
        slot: 1,
        generation: 0,
    };
    d.inflight.insert(
        id,
        InFlight {
            ops: vec![(0x40, 8)],
            send: false,
            held: None,
        },
    );
    let mut ev = vec![DomainEvent::Finished(stolon_verbs::completion::Finished {
        id,
        peer: 0,
        result: Err(VError::PeerUnreachable {
            qp_num: 1,
            vendor_err: 0,
        }),
        drained: false,
    })];
    d.handle_events(&mut ev, Instant::now());
    assert!(
        d.errors.is_empty() && d.ready.is_empty(),
        "held until drained"
    );
    let mut ev = vec![DomainEvent::Drained(id)];
    d.handle_events(&mut ev, Instant::now());
    let e = d.errors.pop_front().expect("reported once drained");
    assert_eq!(e.op_context as usize, 0x40);
    assert_eq!(e.err, libc::EHOSTUNREACH);
    assert!(e.message.contains("peer unreachable"), "{}", e.message);
    // A transfer the adapter never recorded (cancelled before posting) is ignored.
    let mut ev = vec![DomainEvent::Finished(stolon_verbs::completion::Finished {
        id: TransferId {
            slot: 9,
            generation: 0,
        },
        peer: 0,
        result: Ok(()),
        drained: true,
    })];
    d.handle_events(&mut ev, Instant::now());
    assert!(d.ready.is_empty() && d.errors.is_empty());
}

// ---------------------------------------------------------------------------------------------
// GPU memory: dma-buf first, then registration by address. "GPU memory" is host memory here and
// the exporter a stand-in: what is tested is the choice, the fallbacks and the descriptor's life.

#[test]
fn gpu_registration_prefers_dmabuf_only_when_every_side_supports_it() {
    for rdma_core_dmabuf in [false, true] {
        for cuda_dmabuf in [false, true] {
            for dmabuf_allowed in [false, true] {
                let order = gpu_registration_order(GpuRegSupport {
                    rdma_core_dmabuf,
                    cuda_dmabuf,
                    dmabuf_allowed,
                });
                let all = rdma_core_dmabuf && cuda_dmabuf && dmabuf_allowed;
                let want = if all {
                    vec![GpuReg::DmaBuf, GpuReg::Peermem]
                } else {
                    vec![GpuReg::Peermem]
                };
                assert_eq!(order, want);
            }
        }
    }
    assert!(dmabuf_allowed_by_env(None));
    assert!(dmabuf_allowed_by_env(Some("1")));
    for off in ["0", "false", "off", "no", " 0 "] {
        assert!(!dmabuf_allowed_by_env(Some(off)), "{off}");
    }
}

/// Exports a pipe's write end as the "dma-buf" and keeps the read end, so a test can tell
/// whether every copy of the exported descriptor was closed (the read end then sees EOF).
struct PipeExporter {
    supported: bool,
    fail: bool,
    read_ends: std::sync::Arc<std::sync::Mutex<Vec<OwnedFd>>>,
}

impl GpuExporter for PipeExporter {
    fn dmabuf_supported(&self, _device: usize) -> bool {
        self.supported
    }

    fn export(&self, _device: usize, ptr: u64, _len: usize) -> Result<(OwnedFd, u64), String> {
        if self.fail {
            return Err("cuMemGetHandleForAddressRange failed: CUDA_ERROR_INVALID_VALUE".into());
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors were just created and are owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        self.read_ends.lock().unwrap().push(r);
        Ok((w, ptr % 4096))
    }
}

fn all_write_ends_closed(read: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reads at most one byte into `b` from a non-blocking pipe.
    let n = unsafe { libc::read(read.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    n == 0 // EOF; -1 (EAGAIN) while a write end is open
}

struct GpuCase {
    dom: RcDomain,
    exports: std::sync::Arc<std::sync::Mutex<Vec<OwnedFd>>>,
    mem: Vec<u8>,
}

fn gpu_case(name: &str, faults: Faults, supported: bool, fail: bool) -> GpuCase {
    double::set_faults(name, faults);
    let s = spec(name);
    let dev = double::MemDevice::open(&s, 4096).unwrap();
    let mut dom = RcDomain::with_device(&s, Box::new(dev)).unwrap();
    let exports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    dom.set_gpu_exporter(Box::new(PipeExporter {
        supported,
        fail,
        read_ends: exports.clone(),
    }));
    GpuCase {
        dom,
        exports,
        mem: vec![0u8; 3 * 4096],
    }
}

use std::os::fd::FromRawFd;

#[test]
fn gpu_memory_registers_from_a_dmabuf_and_the_descriptor_is_closed() {
    let mut c = gpu_case("gpu-dmabuf", Faults::default(), true, false);
    let ptr = c.mem.as_ptr() as u64 + 100;
    // SAFETY: c.mem outlives the registration (dropped below first).
    let mr = unsafe { c.dom.register_hmem(ptr, 5000, 0) }.unwrap();
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (1, 0));
    let exports = c.exports.lock().unwrap();
    assert_eq!(exports.len(), 1);
    assert!(
        all_write_ends_closed(&exports[0]),
        "the dma-buf fd was left open"
    );
    drop(mr);
}

#[test]
fn gpu_memory_falls_back_to_peermem_without_dmabuf_support() {
    // libibverbs without ibv_reg_dmabuf_mr: CUDA is not even asked to export.
    let no_verbs = Faults {
        no_dmabuf: true,
        ..Default::default()
    };
    let mut c = gpu_case("gpu-no-verbs-dmabuf", no_verbs, true, false);
    // SAFETY: c.mem outlives the registration.
    let mr = unsafe { c.dom.register_hmem(c.mem.as_ptr() as u64, 4096, 0) }.unwrap();
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (0, 1));
    assert!(c.exports.lock().unwrap().is_empty());
    drop(mr);

    // The GPU (or driver) cannot export.
    let mut c = gpu_case("gpu-no-cuda-dmabuf", Faults::default(), false, false);
    // SAFETY: as above.
    let mr = unsafe { c.dom.register_hmem(c.mem.as_ptr() as u64, 4096, 0) }.unwrap();
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (0, 1));
    assert!(c.exports.lock().unwrap().is_empty());
    drop(mr);

    // The export itself fails (a range CUDA will not export).
    let mut c = gpu_case("gpu-export-fails", Faults::default(), true, true);
    // SAFETY: as above.
    let mr = unsafe { c.dom.register_hmem(c.mem.as_ptr() as u64, 4096, 0) }.unwrap();
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (0, 1));
    drop(mr);

    // The kernel refuses the dma-buf: peermem, and the exported descriptor is still closed.
    let refuse = Faults {
        refuse_dmabuf: true,
        ..Default::default()
    };
    let mut c = gpu_case("gpu-kernel-refuses", refuse, true, false);
    // SAFETY: as above.
    let mr = unsafe { c.dom.register_hmem(c.mem.as_ptr() as u64, 4096, 0) }.unwrap();
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (0, 1));
    let exports = c.exports.lock().unwrap();
    assert_eq!(exports.len(), 1);
    assert!(all_write_ends_closed(&exports[0]));
    drop(mr);
}

#[test]
fn gpu_registration_that_fails_every_way_is_a_typed_error_naming_each() {
    let f = Faults {
        refuse_dmabuf: true,
        no_peermem: true,
        ..Default::default()
    };
    let mut c = gpu_case("gpu-nothing-works", f, true, false);
    // SAFETY: nothing is registered.
    let e = unsafe { c.dom.register_hmem(c.mem.as_ptr() as u64, 4096, 0) }
        .err()
        .expect("no way works");
    match e {
        Error::Fabric {
            call,
            code,
            message,
        } => {
            assert_eq!(call, "ibv_reg_mr");
            assert_eq!(code, -(libc::EFAULT as isize));
            assert!(
                message.contains("DmaBuf") && message.contains("ibv_reg_dmabuf_mr"),
                "{message}"
            );
            assert!(message.contains("Peermem"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((c.dom.stats.gpu_dmabuf, c.dom.stats.gpu_peermem), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Chained writes with selective signalling: ops accepted between two polls go out to each peer
// as one chain; completions map back to every op exactly once.

struct Pair {
    a: RcDomain,
    b: RcDomain,
    to_b: fi_addr_t,
    src: Vec<u8>,
    dst: Vec<u8>,
    src_mr: RcMr,
    dst_mr: RcMr,
    a_name: String,
}

fn pair(a_name: &str, b_name: &str) -> Pair {
    double::set_faults(a_name, Faults::default());
    let open = |n: &str| {
        let s = spec(n);
        let dev = double::MemDevice::open(&s, 4096).unwrap();
        RcDomain::with_device(&s, Box::new(dev)).unwrap()
    };
    let (mut a, mut b) = (open(a_name), open(b_name));
    let to_b = a.insert_addr(b.name()).unwrap();
    let src = pattern(64 << 10, 3);
    let dst = vec![0u8; 64 << 10];
    // SAFETY: both buffers outlive the registrations (fields dropped in declaration order is
    // not relied on: the registrations only name the memory, the double reads it while
    // delivering, which happens only inside polls below).
    let src_mr = unsafe { a.register(src.as_ptr(), src.len()) }.unwrap();
    // SAFETY: as above.
    let dst_mr = unsafe { b.register(dst.as_ptr(), dst.len()) }.unwrap();
    Pair {
        a,
        b,
        to_b,
        src,
        dst,
        src_mr,
        dst_mr,
        a_name: a_name.into(),
    }
}

impl Pair {
    /// Posts write `i` (bytes `i*64..i*64+64`, immediate `100 + i`) with context `1 + i`.
    fn post(&mut self, i: usize) -> Posted {
        let off = i * 64;
        // SAFETY: src/dst are registered and outlive every poll of this pair.
        unsafe {
            self.a.post_write(
                self.src.as_ptr().add(off),
                64,
                self.src_mr.lkey as usize as *mut c_void,
                self.to_b,
                self.dst.as_ptr() as u64 + off as u64,
                self.dst_mr.rkey as u64,
                Some(100 + i as u64),
                (1 + i) as *mut c_void,
            )
        }
        .unwrap()
    }

    /// Polls both sides until `a` reported `n` completions (successes and failures), returning
    /// (contexts that succeeded, contexts that failed, immediates `b` saw).
    fn run(&mut self, n: usize) -> (Vec<usize>, Vec<usize>, Vec<u64>) {
        let (mut ok, mut failed, mut imms) = (Vec::new(), Vec::new(), Vec::new());
        let mut out: Vec<fi_cq_data_entry> = (0..16).map(|_| entry(0, 0, 0, 0)).collect();
        let deadline = Instant::now() + T;
        while ok.len() + failed.len() < n {
            assert!(Instant::now() < deadline, "stuck: {ok:?} {failed:?}");
            loop {
                match self.a.poll(&mut out) {
                    Ok(0) => break,
                    Ok(k) => ok.extend(out[..k].iter().map(|e| e.op_context as usize)),
                    Err(e) => failed.push(e.op_context as usize),
                }
            }
            if let Ok(k) = self.b.poll(&mut out) {
                imms.extend(out[..k].iter().map(|e| e.data));
            }
        }
        // Let b drain what landed.
        for _ in 0..10 {
            if let Ok(k) = self.b.poll(&mut out) {
                imms.extend(out[..k].iter().map(|e| e.data));
            }
        }
        ok.sort_unstable();
        failed.sort_unstable();
        imms.sort_unstable();
        (ok, failed, imms)
    }

    fn connect(&mut self) {
        // One write establishes the connection (and is itself a chain of one).
        assert_eq!(self.post(0), Posted::Yes);
        let (ok, failed, _) = self.run(1);
        assert_eq!((ok, failed), (vec![1], vec![]));
    }
}

#[test]
fn ops_posted_together_go_out_as_chains_and_complete_exactly_once() {
    let mut p = pair("chain-a", "chain-b");
    p.connect();
    let before = double::stats("chain-a");
    // Ten writes accepted before the next poll: the send queue (8 deep) takes a chain of 8,
    // the other 2 wait for the completions and go out as a second chain.
    for i in 0..10 {
        assert_eq!(p.post(i), Posted::Yes);
    }
    let (ok, failed, imms) = p.run(10);
    assert_eq!(ok, (1..=10).collect::<Vec<_>>(), "every op exactly once");
    assert!(failed.is_empty());
    assert_eq!(imms, (100..110).collect::<Vec<_>>(), "one immediate per op");
    assert_eq!(&p.dst[..640], &p.src[..640]);
    let s = double::stats("chain-a");
    assert_eq!(s.chains - before.chains, 2);
    assert_eq!(s.write_wrs - before.write_wrs, 10);
    // Chain of 8 signals WRs 4 and 8; the chain of 2 its last: 3 completions for 10 ops.
    assert_eq!(s.signalled_cqes - before.signalled_cqes, 3);
    assert_eq!(s.error_cqes, 0);
    // Nothing is left over.
    let (ok, failed, _) = p.run(0);
    assert!(ok.is_empty() && failed.is_empty());
}

#[test]
fn an_error_in_the_middle_of_a_chain_fails_every_op_of_that_chain_once() {
    let mut p = pair("chain-err-a", "chain-err-b");
    p.connect();
    double::set_faults(
        &p.a_name,
        Faults {
            fail_chain_at: Some(3),
            ..Default::default()
        },
    );
    for i in 0..6 {
        assert_eq!(p.post(i), Posted::Yes);
    }
    let (ok, failed, imms) = p.run(6);
    assert!(ok.is_empty(), "{ok:?}");
    assert_eq!(
        failed,
        (1..=6).collect::<Vec<_>>(),
        "each op of the chain fails once"
    );
    // WRs before the failing one landed (RC order), the rest did not.
    assert_eq!(imms, vec![100, 101, 102]);
    assert_eq!(double::stats(&p.a_name).error_cqes, 1);
    // The connection comes back and later chains succeed.
    for i in 6..9 {
        assert_eq!(p.post(i), Posted::Yes);
    }
    let (ok, failed, _) = p.run(3);
    assert_eq!((ok, failed), (vec![7, 8, 9], vec![]));
}

#[test]
fn a_full_backlog_says_again_and_a_full_send_queue_holds_the_rest() {
    let mut p = pair("chain-full-a", "chain-full-b");
    p.connect();
    p.a.backlog_cap = 12;
    for i in 0..12 {
        assert_eq!(p.post(i), Posted::Yes);
    }
    // Past the backlog the worker keeps the op (its own back-pressure queue).
    assert_eq!(p.post(12), Posted::Again);
    let before = double::stats(&p.a_name);
    let (ok, failed, imms) = p.run(12);
    assert_eq!(ok, (1..=12).collect::<Vec<_>>());
    assert!(failed.is_empty());
    assert_eq!(imms.len(), 12);
    let s = double::stats(&p.a_name);
    // Never more WRs in flight than the queue holds: 8, then the other 4.
    assert_eq!(s.chains - before.chains, 2);
    assert_eq!(s.signalled_cqes - before.signalled_cqes, 2 + 1);
    assert_eq!(p.post(12), Posted::Yes);
    let (ok, _, _) = p.run(1);
    assert_eq!(ok, vec![13]);
}

#[test]
fn the_chained_run_stops_at_a_send_and_at_the_chain_limit() {
    let w = |ctx| Deferred::Write {
        seg: WriteSeg {
            local_addr: 0,
            lkey: 0,
            remote_addr: 0,
            rkey: 0,
            len: 0,
        },
        imm: None,
        ctx,
    };
    let send = Deferred::Send {
        buf: 0,
        len: 0,
        ctx: 99,
    };
    let q: VecDeque<Deferred> = [w(1), w(2), send, w(3)].into_iter().collect();
    let ctxs = |v: Vec<Deferred>| v.iter().map(Deferred::ctx).collect::<Vec<_>>();
    assert_eq!(ctxs(chain_prefix(&q, 64)), vec![1, 2]);
    assert_eq!(ctxs(chain_prefix(&q, 1)), vec![1]);
    let q: VecDeque<Deferred> = [send, w(1)].into_iter().collect();
    assert!(chain_prefix(&q, 64).is_empty());
    let q: VecDeque<Deferred> = (0..100).map(w).collect();
    assert_eq!(chain_prefix(&q, MAX_CHAIN).len(), MAX_CHAIN);
}
