//! The fd-passing protocol with ordinary descriptors (memfds) standing in for CUDA's exports:
//! frames, token checks, `SCM_RIGHTS` between threads and between processes, timeouts, peer
//! death, malformed requests.

use super::*;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};

const T: Duration = Duration::from_secs(5);
const ROLE: &str = "STOLON_VMM_SHARE_CHILD";

fn unique(tag: &str) -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "@stolon-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A memfd of `size` bytes whose content is `fill` repeated.
fn memfd(size: u64, fill: u8) -> OwnedFd {
    // SAFETY: plain memfd_create; owned at once.
    let fd = unsafe { libc::memfd_create(c"stolon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all_at(&vec![fill; size as usize], 0).unwrap();
    f.into()
}

/// A region of `sizes.len()` memfds, allocation i filled with byte `i + 1`.
fn region(token: [u8; 16], sizes: &[u64], offset: u64) -> SharedRegion {
    let fds: Vec<OwnedFd> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| memfd(s, i as u8 + 1))
        .collect();
    SharedRegion {
        token,
        layout: Layout {
            sizes: sizes.to_vec(),
            offset,
        },
        exporter: Box::new(move |i| {
            fds[i]
                .try_clone()
                .map_err(|e| Error::Cuda(format!("dup: {e}")))
        }),
    }
}

/// Fetches and checks that allocation i arrived with its size and content.
fn fetch_checked(name: &str, region: u64, token: [u8; 16]) -> Result<Lease> {
    fetch(name, region, token, T, |i, size, fd| {
        let f = std::fs::File::from(fd);
        assert_eq!(f.metadata().unwrap().len(), size, "allocation {i}");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, size - 1).unwrap();
        assert_eq!(b[0], i as u8 + 1, "content of allocation {i}");
        Ok(())
    })
}

fn wait_gone(l: &Lease) -> bool {
    let end = Instant::now() + T;
    while Instant::now() < end {
        if l.is_gone() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn frames_round_trip_and_reject_garbage() {
    let r = Request {
        region: 0x1234_5678_9abc,
        token: [9; 16],
    };
    assert_eq!(Request::decode(&r.encode()).unwrap(), r);
    let mut b = r.encode();
    b[0] ^= 1;
    assert!(Request::decode(&b).is_err());
    let mut b = r.encode();
    b[4] = PROTO_VERSION + 1;
    assert!(
        matches!(Request::decode(&b), Err(Error::Decode { why, .. }) if why.contains("version"))
    );
    assert!(Request::decode(&r.encode()[..Request::LEN - 1]).is_err());

    let ok = Reply {
        status: Status::Ok,
        chunks: 3,
        offset: 10,
        span: 300,
        message: String::new(),
    };
    assert_eq!(Reply::decode(&ok.encode()).unwrap(), ok);
    let e = Reply::error(Status::BadToken, "x".repeat(10_000));
    let d = Reply::decode(&e.encode()).unwrap();
    assert_eq!((d.status, d.message.len()), (Status::BadToken, MAX_MESSAGE));
    for bad in [
        Reply {
            chunks: 0,
            ..ok.clone()
        },
        Reply {
            offset: 300,
            ..ok.clone()
        },
        Reply {
            chunks: MAX_CHUNKS + 1,
            ..ok.clone()
        },
    ] {
        assert!(Reply::decode(&bad.encode()).is_err(), "{bad:?}");
    }
    let mut b = ok.encode();
    b[5] = 77;
    assert!(Reply::decode(&b).is_err());

    let c = ChunkFrame {
        first: 64,
        sizes: vec![1 << 21; FDS_PER_FRAME],
    };
    assert_eq!(ChunkFrame::decode(&c.encode()).unwrap(), c);
    let mut b = c.encode();
    b.pop();
    assert!(ChunkFrame::decode(&b).is_err());
    let over = ChunkFrame {
        first: 0,
        sizes: vec![1; FDS_PER_FRAME + 1],
    };
    assert!(ChunkFrame::decode(&over.encode()).is_err());
    assert!(ChunkFrame::decode(
        &ChunkFrame {
            first: 0,
            sizes: vec![]
        }
        .encode()
    )
    .is_err());
}

#[test]
fn socket_names_abstract_and_path() {
    assert!(sockaddr("@").is_err());
    assert!(sockaddr("").is_err());
    assert!(sockaddr(&"x".repeat(108)).is_err());
    assert!(sockaddr(&format!("@{}", "x".repeat(107))).is_err());
    assert!(sockaddr(&format!("@{}", "x".repeat(106))).is_ok());
    assert!(sockaddr("a\0b").is_err());
    let t1 = random_token();
    assert_ne!(t1, random_token());
    assert!(token_eq(&t1, &t1.clone()) && !token_eq(&t1, &[0; 16]));
}

#[test]
fn descriptors_pass_between_threads_in_batches_and_revocation_ends_the_lease() {
    for name in [
        unique("thr"),
        std::env::temp_dir()
            .join(format!("stolon-vmm-test-{}.sock", std::process::id()))
            .to_string_lossy()
            .into_owned(),
    ] {
        let server = FdServer::bind(&name, T).unwrap();
        let tok = random_token();
        // More allocations than fit one frame, of different sizes.
        let sizes: Vec<u64> = (0..FDS_PER_FRAME as u64 * 2 + 5)
            .map(|i| 4096 * (1 + i % 3))
            .collect();
        server.add(7, region(tok, &sizes, 100));
        server.add(8, region(tok, &[8192], 0));
        let l = std::thread::scope(|s| s.spawn(|| fetch_checked(&name, 7, tok)).join().unwrap())
            .unwrap();
        assert_eq!(l.layout.sizes, sizes);
        assert_eq!(l.layout.offset, 100);
        let l8 = fetch_checked(&name, 8, tok).unwrap();
        assert!(!l.is_gone() && !l8.is_gone());
        // Revoking 7 ends its lease only, and it cannot be fetched again.
        server.revoke(7);
        assert!(wait_gone(&l));
        assert!(!l8.is_gone());
        let e = fetch_checked(&name, 7, tok).unwrap_err();
        assert!(e.to_string().contains("UnknownRegion"), "{e}");
        // Stopping the server ends every lease; the path is removed.
        drop(server);
        assert!(wait_gone(&l8));
        let e = fetch_checked(&name, 8, tok).unwrap_err();
        assert!(
            matches!(e, Error::TransferFailed(ref m) if m.contains("cannot reach")),
            "{e}"
        );
        if !name.starts_with('@') {
            assert!(!std::path::Path::new(&name).exists());
        }
    }
}

#[test]
fn a_wrong_token_or_region_is_refused_and_the_server_keeps_serving() {
    let name = unique("tok");
    let server = FdServer::bind(&name, T).unwrap();
    let tok = random_token();
    server.add(1, region(tok, &[4096, 4096], 5));
    let mut bad = tok;
    bad[15] ^= 1;
    let e = fetch_checked(&name, 1, bad).unwrap_err();
    assert!(e.to_string().contains("BadToken"), "{e}");
    let e = fetch_checked(&name, 2, tok).unwrap_err();
    assert!(e.to_string().contains("UnknownRegion"), "{e}");
    assert_eq!(fetch_checked(&name, 1, tok).unwrap().layout.span(), 8192);
}

#[test]
fn export_failures_and_callback_errors_are_reported() {
    let name = unique("exp");
    let server = FdServer::bind(&name, T).unwrap();
    let tok = random_token();
    let mut r = region(tok, &[4096; 40], 0);
    let inner = r.exporter;
    r.exporter = Box::new(move |i| {
        if i == 35 {
            Err(Error::Cuda("not shareable".into()))
        } else {
            inner(i)
        }
    });
    server.add(1, r);
    // The failure is in the second batch: the writer sees a refusal, not a hang.
    let e = fetch_checked(&name, 1, tok).unwrap_err();
    assert!(
        e.to_string().contains("ExportFailed") && e.to_string().contains("not shareable"),
        "{e}"
    );
    server.add(2, region(tok, &[4096; 3], 0));
    let e = fetch(&name, 2, tok, T, |i, _, _| {
        if i == 1 {
            Err(Error::Cuda("map failed".into()))
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("map failed"), "{e}");
    // The server is still there for others.
    assert!(fetch_checked(&name, 2, tok).is_ok());
}

/// A raw client: connects and returns the socket.
fn raw_connect(name: &str) -> OwnedFd {
    let (addr, len) = sockaddr(name).unwrap();
    let s = seqpacket().unwrap();
    // SAFETY: valid address for our socket.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    s
}

#[test]
fn malformed_requests_get_a_reply_and_lose_the_connection() {
    let name = unique("mal");
    let server = FdServer::bind(&name, T).unwrap();
    let tok = random_token();
    server.add(1, region(tok, &[4096], 0));
    let deadline = || Instant::now() + T;
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (b"hello".to_vec(), false),
        (vec![0u8; Request::LEN], false),
        (
            {
                let mut b = Request {
                    region: 1,
                    token: tok,
                }
                .encode();
                b[4] = 9;
                b.to_vec()
            },
            false,
        ),
        (vec![0u8; 900], false),
        // A good request with a descriptor attached is refused too.
        (
            Request {
                region: 1,
                token: tok,
            }
            .encode()
            .to_vec(),
            true,
        ),
    ];
    for (bytes, with_fd) in cases {
        let s = raw_connect(&name);
        let extra = memfd(1, 0);
        let fds: Vec<BorrowedFd<'_>> = if with_fd { vec![extra.as_fd()] } else { vec![] };
        send_frame(s.as_fd(), &bytes, &fds, deadline(), T).unwrap();
        let f = recv_frame(s.as_fd(), deadline(), T)
            .unwrap()
            .expect("a reply");
        let r = Reply::decode(&f.data).unwrap();
        assert_eq!(r.status, Status::Malformed, "{bytes:?}: {r:?}");
        assert!(
            recv_frame(s.as_fd(), deadline(), T).unwrap().is_none(),
            "closed after"
        );
    }
    // A leaseholder that talks after its lease began loses it.
    let s = raw_connect(&name);
    let req = Request {
        region: 1,
        token: tok,
    }
    .encode();
    send_frame(s.as_fd(), &req, &[], deadline(), T).unwrap();
    let head = recv_frame(s.as_fd(), deadline(), T).unwrap().unwrap();
    assert_eq!(Reply::decode(&head.data).unwrap().status, Status::Ok);
    let chunk = recv_frame(s.as_fd(), deadline(), T).unwrap().unwrap();
    assert_eq!(chunk.fds.len(), 1);
    send_frame(s.as_fd(), b"more", &[], deadline(), T).unwrap();
    assert!(recv_frame(s.as_fd(), deadline(), T).unwrap().is_none());
    // And the server still serves.
    assert!(fetch_checked(&name, 1, tok).is_ok());
}

#[test]
fn a_silent_client_is_dropped_after_the_timeout() {
    let name = unique("silent");
    let short = Duration::from_millis(300);
    let _server = FdServer::bind(&name, short).unwrap();
    let s = raw_connect(&name);
    let t0 = Instant::now();
    assert!(recv_frame(s.as_fd(), Instant::now() + T, T)
        .unwrap()
        .is_none());
    let took = t0.elapsed();
    assert!(took >= short && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn an_owner_that_never_answers_times_out() {
    // A socket that listens but never accepts: connect succeeds (backlog), no reply comes.
    let name = unique("mute");
    let (addr, len) = sockaddr(&name).unwrap();
    let l = seqpacket().unwrap();
    // SAFETY: valid address for our socket.
    unsafe {
        assert_eq!(
            libc::bind(
                l.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len
            ),
            0
        );
        assert_eq!(libc::listen(l.as_raw_fd(), 4), 0);
    }
    let t0 = Instant::now();
    let short = Duration::from_millis(300);
    let e = fetch(&name, 1, [0; 16], short, |_, _, _| Ok(())).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn an_owner_that_closes_mid_reply_is_an_error() {
    let name = unique("half");
    let (addr, len) = sockaddr(&name).unwrap();
    let l = seqpacket().unwrap();
    // SAFETY: valid address for our socket.
    unsafe {
        assert_eq!(
            libc::bind(
                l.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len
            ),
            0
        );
        assert_eq!(libc::listen(l.as_raw_fd(), 4), 0);
    }
    let owner = std::thread::spawn(move || {
        let deadline = Instant::now() + T;
        assert!(wait_fd(l.as_fd(), libc::POLLIN, deadline).unwrap() != 0);
        // SAFETY: accept on our listener.
        let c = unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
        // SAFETY: fresh descriptor.
        let c = unsafe { OwnedFd::from_raw_fd(c) };
        let _ = recv_frame(c.as_fd(), deadline, T).unwrap();
        let head = Reply {
            status: Status::Ok,
            chunks: 2,
            offset: 0,
            span: 8192,
            message: String::new(),
        };
        send_frame(c.as_fd(), &head.encode(), &[], deadline, T).unwrap();
        let fd = memfd(4096, 1);
        let f = ChunkFrame {
            first: 0,
            sizes: vec![4096],
        };
        send_frame(c.as_fd(), &f.encode(), &[fd.as_fd()], deadline, T).unwrap();
        // ... and dies before the second allocation.
    });
    let mut got = 0;
    let e = fetch(&name, 1, [0; 16], T, |_, _, _| {
        got += 1;
        Ok(())
    })
    .unwrap_err();
    owner.join().unwrap();
    assert_eq!(got, 1);
    assert!(
        matches!(e, Error::TransferFailed(ref m) if m.contains("after 1 of 2")),
        "{e}"
    );
}

/// Child role for the cross-process tests: serves one region until killed (or 60 s).
#[test]
fn child_server_role() {
    let Ok(name) = std::env::var(ROLE) else {
        return;
    };
    let server = FdServer::bind(&name, T).unwrap();
    let tok = [0x5a; 16];
    server.add(3, region(tok, &[4096, 8192, 4096], 17));
    let mut out = std::io::stdout();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    // Exit when the parent closes our stdin (or after a minute).
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b);
    drop(server);
}

fn spawn_child(name: &str) -> std::process::Child {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vmm_share::tests::child_server_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = c.stdout.take().unwrap();
    let mut seen = String::new();
    let mut b = [0u8; 256];
    while !seen.contains("READY") {
        let n = out.read(&mut b).unwrap();
        assert!(n > 0, "child exited early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&b[..n]));
    }
    // Keep draining, so the child's test harness can report without a broken pipe.
    std::thread::spawn(move || while matches!(out.read(&mut b), Ok(n) if n > 0) {});
    c
}

#[test]
fn descriptors_pass_between_processes_and_a_dead_owner_ends_the_lease() {
    let name = unique("proc");
    let mut child = spawn_child(&name);
    let l = fetch_checked(&name, 3, [0x5a; 16]).unwrap();
    assert_eq!(
        l.layout,
        Layout {
            sizes: vec![4096, 8192, 4096],
            offset: 17
        }
    );
    assert!(!l.is_gone());
    // The owner dies without any goodbye: the kernel closes its end.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(wait_gone(&l));
    let e = fetch_checked(&name, 3, [0x5a; 16]).unwrap_err();
    assert!(
        matches!(e, Error::TransferFailed(ref m) if m.contains("owner gone")),
        "{e}"
    );
}

#[test]
fn an_owner_that_stops_cleanly_ends_the_lease() {
    let name = unique("stop");
    let mut child = spawn_child(&name);
    let l = fetch_checked(&name, 3, [0x5a; 16]).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(wait_gone(&l));
}
