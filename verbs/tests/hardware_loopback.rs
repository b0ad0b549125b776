//! Two domains on one RDMA port talking to each other: handshake, paged write with immediate,
//! message, peer restart. Needs a device with an active port (a ConnectX NIC, or Soft-RoCE:
//! `rdma link add rxe0 type rxe netdev eth0`), so it is ignored by default:
//!
//! ```text
//! cargo test -p stolon-verbs --test hardware_loopback -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use stolon_verbs::domain::{open_device, DomainConfig, DomainEvent, PeerId, VerbsDomain};
use stolon_verbs::wr::WriteSeg;

const A: PeerId = 0;
const B: PeerId = 1;

/// Moves handshake bytes between the two domains and polls both until `done` holds.
fn pump(
    a: &mut VerbsDomain,
    b: &mut VerbsDomain,
    seen: &mut Vec<(PeerId, DomainEvent)>,
    mut pending: Vec<(PeerId, DomainEvent)>,
    done: impl Fn(&[(PeerId, DomainEvent)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = Instant::now();
        assert!(now < deadline, "timed out; events so far: {seen:#?}");
        // (who reported it, event)
        let mut next = Vec::new();
        for (who, ev) in pending.drain(..) {
            if let DomainEvent::SendHandshake { bytes, .. } = &ev {
                let out = if who == A {
                    b.on_handshake(A, bytes, now).unwrap()
                } else {
                    a.on_handshake(B, bytes, now).unwrap()
                };
                let other = if who == A { B } else { A };
                next.extend(out.into_iter().map(|e| (other, e)));
            }
            seen.push((who, ev));
        }
        let mut out = a.tick(now);
        a.poll(now, &mut out).unwrap();
        next.extend(out.into_iter().map(|e| (A, e)));
        let mut out = b.tick(now);
        b.poll(now, &mut out).unwrap();
        next.extend(out.into_iter().map(|e| (B, e)));
        pending = next;
        if pending.is_empty() && done(seen) {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn established(seen: &[(PeerId, DomainEvent)], who: PeerId) -> bool {
    seen.iter()
        .any(|(w, e)| *w == who && matches!(e, DomainEvent::Established { .. }))
}

#[test]
#[ignore = "needs an RDMA device with an active port (ConnectX or Soft-RoCE)"]
fn loopback_paged_write_message_and_restart() {
    let mut a = open_device(DomainConfig::default()).expect("open A");
    let mut b = open_device(DomainConfig::default()).expect("open B");
    eprintln!(
        "device {:?} port {:?} gid {:?}",
        a.device().name,
        a.port().port,
        a.gid()
    );
    let mut seen = Vec::new();
    let start = a
        .connect(B, Instant::now())
        .unwrap()
        .into_iter()
        .map(|e| (A, e))
        .collect();
    pump(&mut a, &mut b, &mut seen, start, |s| {
        established(s, A) && established(s, B)
    });

    // 16 pages of 4 KiB, written to the peer in reverse page order (a scatter on both sides).
    let page = 4096usize;
    let mut src: Vec<u8> = (0..16 * page).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; 16 * page];
    // SAFETY: both buffers outlive their regions (dropped at the end of the test, after the
    // regions).
    let src_mr = unsafe { a.register(src.as_mut_ptr(), src.len(), false) }.unwrap();
    // SAFETY: as above.
    let dst_mr = unsafe { b.register(dst.as_mut_ptr(), dst.len(), true) }.unwrap();
    let segs: Vec<WriteSeg> = (0..16)
        .map(|i| WriteSeg {
            local_addr: src_mr.addr() + (i * page) as u64,
            lkey: src_mr.lkey(),
            remote_addr: dst_mr.addr() + ((15 - i) * page) as u64,
            rkey: dst_mr.rkey(),
            len: page as u64,
        })
        .collect();
    let plan = a.plan(&segs).unwrap();
    let expect_imm = a.imm_count(&plan);
    let id = a.begin_write(B, &plan).unwrap();
    let mut from = 0;
    let mut events = Vec::new();
    while from < plan.wrs.len() {
        // SAFETY: src and dst stay registered and untouched until the transfer finishes.
        from += unsafe {
            a.post_write(
                B,
                id,
                &plan,
                from,
                Some(0xabcd),
                Instant::now(),
                &mut events,
            )
        }
        .unwrap();
        a.poll(Instant::now(), &mut events).unwrap();
    }
    let pending = events.into_iter().map(|e| (A, e)).collect();
    pump(&mut a, &mut b, &mut seen, pending, |s| {
        let done = s
            .iter()
            .any(|(w, e)| *w == A && matches!(e, DomainEvent::Finished(f) if f.id == id));
        let imms = s
            .iter()
            .filter(|(w, e)| *w == B && matches!(e, DomainEvent::Imm { imm: 0xabcd, .. }))
            .count();
        done && imms == expect_imm
    });
    for (w, e) in &seen {
        if let DomainEvent::Finished(f) = e {
            assert!(*w == A && f.result.is_ok(), "{f:?}");
        }
    }
    for i in 0..16 {
        assert_eq!(
            dst[(15 - i) * page..(16 - i) * page],
            src[i * page..(i + 1) * page],
            "page {i}"
        );
    }

    // A message with an immediate.
    let mut out = Vec::new();
    a.send_message(B, b"hello over RC", Some(7), Instant::now(), &mut out)
        .unwrap()
        .unwrap();
    let pending = out.into_iter().map(|e| (A, e)).collect();
    pump(&mut a, &mut b, &mut seen, pending, |s| {
        s.iter().any(|(w, e)| {
            *w == B
                && matches!(e, DomainEvent::Message { data, imm: Some(7), .. } if data == b"hello over RC")
        })
    });

    // B restarts: A tears down and reconnects.
    drop(dst_mr);
    drop(b);
    let mut b = open_device(DomainConfig::default()).expect("reopen B");
    seen.clear();
    let start = b
        .connect(A, Instant::now())
        .unwrap()
        .into_iter()
        .map(|e| (B, e))
        .collect();
    pump(&mut a, &mut b, &mut seen, start, |s| {
        established(s, B)
            && s.iter()
                .any(|(w, e)| *w == A && matches!(e, DomainEvent::ConnectionReset { .. }))
            && established(s, A)
    });
    drop(src_mr);
    drop(src);
}
