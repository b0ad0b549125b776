//! Two engines in one process over real libfabric providers on loopback.
//! Needs libfabric; skipped with a message when it cannot be loaded.

use std::time::Duration;

use fabric_lib::{
    EngineConfig, Error, MemoryRegion, PagedSpec, ScatterItem, Sharding, TransferEngine,
};

const T: Duration = Duration::from_secs(10);

fn engines(provider: &str, n: usize) -> Option<(TransferEngine, TransferEngine)> {
    if !fabric_lib::sys::libfabric::is_present() {
        eprintln!("SKIP: libfabric not present");
        return None;
    }
    let mut cfg = EngineConfig::loopback(provider, n);
    cfg.min_shard_bytes = 64 << 10;
    Some((
        TransferEngine::new(cfg.clone()).unwrap(),
        TransferEngine::new(cfg).unwrap(),
    ))
}

fn pattern(len: usize, seed: u8) -> Box<[u8]> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn bytes(r: &MemoryRegion) -> &[u8] {
    // SAFETY: the region owns its boxed buffer; tests read it only after transfers completed.
    unsafe { std::slice::from_raw_parts(r.ptr() as *const u8, r.len() as usize) }
}

/// Compares without printing megabytes on failure.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} of {}", got.len());
    }
}

fn roundtrip(provider: &str, n: usize) {
    let Some((a, b)) = engines(provider, n) else {
        return;
    };
    let len = 3 << 20;
    let src = a.register_buffer(pattern(len, 1)).unwrap();
    let dst = b
        .register_buffer(vec![0u8; len + 100].into_boxed_slice())
        .unwrap();
    let desc = fabric_lib::MemDesc::from_bytes(&dst.descriptor().to_bytes()).unwrap();
    let t = a
        .write(&src, 5, &desc, 100, (len - 5) as u64, Some(9), None, None)
        .unwrap();
    t.wait(T).unwrap();
    let expect = a.imm_count_write((len - 5) as u64, None, false) as u64;
    assert_eq!(t.imm_count() as u64, expect);
    if n > 1 {
        assert_eq!(expect, n as u64, "a 3 MiB write is split over every domain");
    }
    b.imm_counter().wait(9, expect, T).unwrap();
    assert_same(
        &bytes(&dst)[100..100 + len - 5],
        &bytes(&src)[5..],
        provider,
    );
    assert!(bytes(&dst)[100 + len - 5..].iter().all(|&x| x == 0));
    assert!(bytes(&dst)[..100].iter().all(|&x| x == 0));
    let sent: u64 = a.stats().iter().map(|s| s.bytes_written).sum();
    assert_eq!(sent, (len - 5) as u64);
    let imms: u64 = b.stats().iter().map(|s| s.imms_received).sum();
    assert_eq!(imms, expect);
}

#[test]
fn tcp_single_write_one_domain() {
    roundtrip("tcp", 1);
}

#[test]
fn tcp_single_write_three_domains() {
    roundtrip("tcp", 3);
}

#[test]
fn shm_single_write_two_domains() {
    roundtrip("shm", 2);
}

#[test]
fn paged_scatter_imm_barrier_and_messages() {
    let Some((a, b)) = engines("tcp", 2) else {
        return;
    };
    let page = 4096;
    let src = a.register_buffer(pattern(page * 16, 3)).unwrap();
    let dst = b
        .register_buffer(vec![0u8; page * 32].into_boxed_slice())
        .unwrap();
    let spec = PagedSpec {
        page_bytes: page as u64,
        src_pages: vec![0, 5, 7, 15],
        dst_pages: vec![31, 0, 2, 9],
        src_stride: page as u64,
        dst_stride: page as u64,
        src_offset: 0,
        dst_offset: 0,
    };
    let t = a
        .write_paged(&src, dst.descriptor(), &spec, Some(77), None, None)
        .unwrap();
    t.wait(T).unwrap();
    b.imm_counter()
        .wait(77, a.imm_count_paged(4, page as u64, false) as u64, T)
        .unwrap();
    for (s, d) in spec.src_pages.iter().zip(&spec.dst_pages) {
        let (s, d) = (*s as usize * page, *d as usize * page);
        assert_same(&bytes(&dst)[d..d + page], &bytes(&src)[s..s + page], "page");
    }

    // Scatter to two regions of b.
    let dst2 = b
        .register_buffer(vec![0u8; 1000].into_boxed_slice())
        .unwrap();
    let items = [
        ScatterItem {
            dst: 0,
            src_off: 10,
            dst_off: 20,
            len: 30,
        },
        ScatterItem {
            dst: 1,
            src_off: 0,
            dst_off: 0,
            len: 1000,
        },
    ];
    let t = a
        .scatter(
            &src,
            &[dst.descriptor(), dst2.descriptor()],
            &items,
            Some(5),
            None,
            None,
        )
        .unwrap();
    t.wait(T).unwrap();
    b.imm_counter().wait(5, 2, T).unwrap();
    assert_same(&bytes(&dst)[20..50], &bytes(&src)[10..40], "scatter 0");
    assert_same(bytes(&dst2), &bytes(&src)[..1000], "scatter 1");

    // Immediate-only writes and a barrier.
    a.write_imm(b.address(), 1234, None)
        .unwrap()
        .wait(T)
        .unwrap();
    b.imm_counter().wait(1234, 1, T).unwrap();
    let peers = vec![a.address().clone(), b.address().clone()];
    std::thread::scope(|s| {
        let h = s.spawn(|| b.barrier(&peers, 99, T));
        a.barrier(&peers, 99, T).unwrap();
        h.join().unwrap().unwrap();
    });

    // Messages both ways.
    a.send(b.address(), b"hello", None)
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(b.recv(T).unwrap(), b"hello");
    b.send(a.address(), &[1u8; 60000], None)
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(a.recv(T).unwrap(), vec![1u8; 60000]);
    assert!(matches!(
        a.send(b.address(), &[0u8; 70000], None),
        Err(Error::MessageTooLarge { .. })
    ));
}

#[test]
fn bad_requests_are_rejected_before_posting() {
    let Some((a, b)) = engines("tcp", 1) else {
        return;
    };
    let src = a.register_buffer(pattern(100, 0)).unwrap();
    let dst = b
        .register_buffer(vec![0u8; 100].into_boxed_slice())
        .unwrap();
    let d = dst.descriptor();
    assert!(matches!(
        a.write(&src, 50, d, 0, 51, None, None, None),
        Err(Error::OutOfBounds(_))
    ));
    assert!(matches!(
        a.write(&src, 0, d, 60, 41, None, None, None),
        Err(Error::OutOfBounds(_))
    ));
    assert!(matches!(
        a.write(&src, 0, d, 0, 10, None, Some(Sharding::Pinned(3)), None),
        Err(Error::InvalidArgument(_))
    ));
    // A region of another engine.
    assert!(matches!(
        b.write(&src, 0, d, 0, 10, None, None, None),
        Err(Error::Unregistered(_))
    ));
    a.unregister(&src).unwrap();
    assert!(matches!(
        a.write(&src, 0, d, 0, 10, None, None, None),
        Err(Error::Unregistered(_))
    ));
    // Nothing landed.
    std::thread::sleep(Duration::from_millis(50));
    assert!(bytes(&dst).iter().all(|&x| x == 0));
    assert_eq!(b.stats()[0].imms_received, 0);
    // A descriptor of a shm engine cannot be reached over tcp.
    if let Ok(c) = TransferEngine::new(EngineConfig::loopback("shm", 1)) {
        let r = c.register_buffer(vec![0u8; 10].into_boxed_slice()).unwrap();
        let src2 = a.register_buffer(pattern(10, 0)).unwrap();
        assert!(matches!(
            a.write(&src2, 0, r.descriptor(), 0, 10, None, None, None),
            Err(Error::DomainMismatch(_))
        ));
    }
}

#[test]
fn stop_fails_waiters_and_in_flight_transfers() {
    let Some((a, b)) = engines("tcp", 1) else {
        return;
    };
    let b2 = std::sync::Arc::new(b);
    let b3 = b2.clone();
    let h = std::thread::spawn(move || b3.imm_counter().wait(1, 1, Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(50));
    b2.stop();
    assert!(matches!(h.join().unwrap(), Err(Error::Stopped)));
    assert!(matches!(
        b2.recv(Duration::from_secs(1)),
        Err(Error::Stopped)
    ));
    a.stop();
    let r = a.register_buffer(vec![0u8; 10].into_boxed_slice());
    assert!(matches!(r, Err(Error::Stopped)));
}

#[test]
fn a_watched_counter_releases_prepared_transfers_step_by_step() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let Some((a, b)) = engines("tcp", 2) else {
        return;
    };
    let layers = 4usize;
    let page = 8192usize;
    let src = a.register_buffer(pattern(layers * page, 9)).unwrap();
    let dst = b
        .register_buffer(vec![0u8; layers * page].into_boxed_slice())
        .unwrap();
    let steps: Vec<_> = (0..layers)
        .map(|l| {
            a.prepare_write(
                &src,
                (l * page) as u64,
                dst.descriptor(),
                (l * page) as u64,
                page as u64,
                Some(100 + l as u32),
                None,
                None,
            )
            .unwrap()
        })
        .collect();
    let counter = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let ptr = Arc::as_ptr(&counter) as usize;
    // SAFETY: the AtomicU64 is 8-byte aligned and kept alive by the owner Arc passed along.
    let (_id, handles) = unsafe {
        a.watch(
            ptr,
            Some(Box::new(counter.clone())),
            Some(Box::new(move |o, n| seen2.lock().unwrap().push((o, n)))),
            steps,
        )
    }
    .unwrap();
    assert_eq!(handles.len(), layers);
    for (l, h) in handles.iter().enumerate() {
        // Nothing of layer l has been written before the counter says so.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!h.is_done(), "step {l} ran early");
        assert_eq!(b.imm_counter().count(100 + l as u32), 0);
        counter.fetch_add(1, Ordering::Release);
        h.wait(T).unwrap();
        b.imm_counter()
            .wait(100 + l as u32, h.imm_count() as u64, T)
            .unwrap();
        assert_same(
            &bytes(&dst)[l * page..(l + 1) * page],
            &bytes(&src)[l * page..(l + 1) * page],
            "layer",
        );
    }
    std::thread::sleep(Duration::from_millis(20));
    let s = seen.lock().unwrap().clone();
    assert_eq!(
        s,
        (0..layers as u64).map(|i| (i, i + 1)).collect::<Vec<_>>()
    );
}

/// The staging protocol (the path GPU destinations take over providers without GPU support),
/// run with a staged host region: bytes land only through the receiver's copy-out step, and
/// every immediate is counted after its chunk is in place.
#[test]
fn staged_destinations_receive_every_kind_of_write() {
    let Some((a, b)) = engines("tcp", 2) else {
        return;
    };
    let len = (3 << 20) + 777;
    let src = a.register_buffer(pattern(len, 4)).unwrap();
    let mem = vec![0u8; len + 8192].into_boxed_slice();
    let (ptr, mlen) = (mem.as_ptr() as usize, mem.len() as u64);
    // SAFETY: the boxed slice is kept by the region and does not move.
    let dst = unsafe { b.register_staged_host(ptr, mlen, Some(Box::new(mem))) }.unwrap();
    let desc = fabric_lib::MemDesc::from_bytes(&dst.descriptor().to_bytes()).unwrap();
    assert!(desc.gpu.is_some());
    // A large single write: sharded over both domains, chunked at max_message_bytes.
    let t = a
        .write(&src, 0, &desc, 100, len as u64, Some(11), None, None)
        .unwrap();
    t.wait(T).unwrap();
    let n = a.imm_count_write(len as u64, None, true);
    assert_eq!(t.imm_count(), n);
    assert!(n >= len / (64 << 10), "chunked into message-sized pieces");
    b.imm_counter().wait(11, n as u64, T).unwrap();
    assert_eq!(b.imm_counter().count(11), 0);
    assert_same(&bytes(&dst)[100..100 + len], bytes(&src), "staged single");
    // Paged and scatter into the staged region.
    let spec = PagedSpec {
        page_bytes: 4096,
        src_pages: vec![3, 0, 7],
        dst_pages: vec![0, 1, 2],
        src_stride: 4096,
        dst_stride: 4096,
        src_offset: 0,
        dst_offset: (len + 100) as u64 - 3 * 4096,
    };
    let t = a
        .write_paged(&src, &desc, &spec, Some(12), None, None)
        .unwrap();
    t.wait(T).unwrap();
    assert_eq!(t.imm_count(), a.imm_count_paged(3, 4096, true));
    b.imm_counter().wait(12, t.imm_count() as u64, T).unwrap();
    let base = len + 100 - 3 * 4096;
    for (i, sp) in [3usize, 0, 7].iter().enumerate() {
        assert_same(
            &bytes(&dst)[base + i * 4096..base + (i + 1) * 4096],
            &bytes(&src)[sp * 4096..(sp + 1) * 4096],
            "staged page",
        );
    }
    // Bytes outside every written range are untouched.
    assert!(bytes(&dst)[..100].iter().all(|&x| x == 0));
    assert!(bytes(&dst)[len + 100..].iter().all(|&x| x == 0));
    // Out of range is refused before anything is sent.
    assert!(matches!(
        a.write(&src, 0, &desc, mlen - 10, 11, Some(13), None, None),
        Err(Error::OutOfBounds(_))
    ));
}

#[test]
fn choosing_the_ibverbs_backend_without_a_device_says_what_was_found() {
    let Err(e) = TransferEngine::new(EngineConfig::new("ibverbs", 1)) else {
        panic!("an RDMA device is present: run verbs/tests/hardware_loopback.rs instead");
    };
    let msg = e.to_string();
    // The typed error of the verbs-rc backend (see tests/verbs_no_device.rs).
    assert!(matches!(e, Error::RdmaUnavailable(_)), "{msg}");
    assert!(msg.contains("ibverbs"), "{msg}");
    eprintln!("{msg}");
}
