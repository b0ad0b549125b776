//! Connection setup between two RC endpoints: the message they exchange out of band, and a pure
//! state machine that survives lost, repeated, reordered and stale messages and peer restarts.
//!
//! # Protocol
//! Each side owns two QPs per peer (a *data* QP whose receives come from the write-with-immediate
//! SRQ, and a *message* QP on the message SRQ). An *attempt* is one set of local parameters:
//! an `epoch` (strictly increasing per side: it starts from the caller's value, e.g. the process
//! start time in ns, and grows by one for every new attempt), a random `nonce`, and random first
//! PSNs for both QPs. Every message carries the sender's current attempt and an *echo*: the
//! attempt of the receiver that the sender's QPs are connected to (0 when none).
//!
//! * A side sends `Hello` until the peer echoes its current attempt, with backoff, and gives up
//!   after [`HandshakeConfig::give_up_after`].
//! * On a message it may use (see below) it connects its QPs to the sender's attempt
//!   ([`Action::Connect`]); it answers every `Hello`: with `Ack` once the peer has confirmed us,
//!   else with its own `Hello`. Answers to a repeated `Hello` are identical, and a repeat never
//!   connects twice.
//! * A message from an attempt older than the newest one seen from that peer is stale and
//!   ignored. A message from a *newer* attempt than the one our QPs are connected to means the
//!   peer restarted or reset: [`Action::Teardown`], a new attempt of ours, then connect.
//! * A side connects only to a message whose echo is 0 or its own current attempt: a peer that
//!   echoes one of our dead attempts has its QPs tied to it, and is sent our `Hello` instead,
//!   which makes it reset.
//! * A local QP failure ([`Handshake::local_failure`]) tears down and starts a new attempt. The
//!   peer, still connected to our old attempt, sees a newer epoch and resets too, so both sides
//!   meet on fresh PSNs.
//! * A side is established only when its QPs are connected to the peer's attempt *and* the
//!   peer has echoed its current attempt, which the peer does only once connected to it; so
//!   nothing is posted until both QPs point at each other's current attempts.
//!
//! Everything is driven by `(now, input)` and returns a [`Step`]: actions for the caller to
//! carry out in order, and events describing what happened. Tests run two machines over a
//! simulated channel that drops, repeats and reorders messages, with restarts and QP failures.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::gid::{Gid, LinkLayer};
use crate::qp::{
    self, LocalPath, Mtu, QpConfig, RemoteQp, RtrAttrs, RtsAttrs, PSN_MODULUS, QPN_MAX,
};

/// Bytes of an encoded [`Message`].
pub const MESSAGE_LEN: usize = 80;
/// Wire format version.
pub const VERSION: u8 = 1;
const MAGIC: [u8; 4] = *b"STVH";

/// What a message asks of its receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// "Here are my parameters; answer me."
    Hello,
    /// "I have connected to your current attempt; nothing more is needed."
    Ack,
}

/// One QP of an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lane {
    pub qpn: u32,
    /// The first PSN this QP sends with (the peer's receive PSN).
    pub psn: u32,
}

/// One side's attempt: everything the other side needs to connect to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub epoch: u64,
    pub nonce: u64,
    pub data: Lane,
    pub msg: Lane,
    pub lid: u16,
    pub gid: Gid,
    pub mtu: Mtu,
    pub link_layer: LinkLayer,
}

impl Params {
    fn remote(&self, lane: Lane) -> RemoteQp {
        RemoteQp {
            qpn: lane.qpn,
            psn: lane.psn,
            lid: self.lid,
            gid: self.gid,
            mtu: self.mtu,
        }
    }
}

/// A handshake message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub from: Params,
    /// Epoch of the receiver's attempt the sender is connected to; 0 when none.
    pub echo_epoch: u64,
    /// Nonce of that attempt; 0 when none.
    pub echo_nonce: u64,
}

fn decode_err(why: impl Into<String>) -> Error {
    Error::Decode {
        what: "handshake message",
        why: why.into(),
    }
}

impl Message {
    /// Little-endian bytes with a CRC32 trailer:
    ///
    /// | off | field |
    /// |----:|-------|
    /// | 0 | magic `STVH` |
    /// | 4 | version, kind, link layer, MTU (one byte each) |
    /// | 8 | epoch, nonce, echo epoch, echo nonce (u64 each) |
    /// | 40 | data QPN, data PSN, message QPN, message PSN (u32 each) |
    /// | 56 | LID (u16), reserved (u16) |
    /// | 60 | GID (16 bytes, network order) |
    /// | 76 | CRC32 of bytes 0..76 |
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut b = [0u8; MESSAGE_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = match self.kind {
            Kind::Hello => 1,
            Kind::Ack => 2,
        };
        b[6] = self.from.link_layer.to_sys();
        b[7] = self.from.mtu.to_sys() as u8;
        b[8..16].copy_from_slice(&self.from.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.from.nonce.to_le_bytes());
        b[24..32].copy_from_slice(&self.echo_epoch.to_le_bytes());
        b[32..40].copy_from_slice(&self.echo_nonce.to_le_bytes());
        b[40..44].copy_from_slice(&self.from.data.qpn.to_le_bytes());
        b[44..48].copy_from_slice(&self.from.data.psn.to_le_bytes());
        b[48..52].copy_from_slice(&self.from.msg.qpn.to_le_bytes());
        b[52..56].copy_from_slice(&self.from.msg.psn.to_le_bytes());
        b[56..58].copy_from_slice(&self.from.lid.to_le_bytes());
        b[60..76].copy_from_slice(&self.from.gid.0);
        let crc = crc32fast::hash(&b[..76]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks untrusted bytes.
    ///
    /// # Errors
    /// [`Error::Decode`] for a wrong length, magic, version, CRC, or a field out of range.
    pub fn decode(b: &[u8]) -> Result<Message> {
        if b.len() != MESSAGE_LEN {
            return Err(decode_err(format!(
                "{} bytes, expected {MESSAGE_LEN}",
                b.len()
            )));
        }
        if b[0..4] != MAGIC {
            return Err(decode_err("bad magic (not a stolon verbs handshake)"));
        }
        if b[4] != VERSION {
            return Err(decode_err(format!(
                "version {} (this build speaks {VERSION})",
                b[4]
            )));
        }
        let crc = u32::from_le_bytes(b[76..80].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[..76]) {
            return Err(decode_err("CRC mismatch"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let kind = match b[5] {
            1 => Kind::Hello,
            2 => Kind::Ack,
            k => return Err(decode_err(format!("unknown kind {k}"))),
        };
        let link_layer = match b[6] {
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            l => return Err(decode_err(format!("unknown link layer {l}"))),
        };
        let mtu =
            Mtu::from_sys(b[7] as u32).ok_or_else(|| decode_err(format!("MTU code {}", b[7])))?;
        let lane = |o: usize| -> Result<Lane> {
            let (qpn, psn) = (u32_at(o), u32_at(o + 4));
            if qpn > QPN_MAX || psn >= PSN_MODULUS {
                return Err(decode_err(format!(
                    "QPN {qpn:#x} / PSN {psn:#x} exceed 24 bits"
                )));
            }
            Ok(Lane { qpn, psn })
        };
        let from = Params {
            epoch: u64_at(8),
            nonce: u64_at(16),
            data: lane(40)?,
            msg: lane(48)?,
            lid: u16::from_le_bytes([b[56], b[57]]),
            gid: Gid(b[60..76].try_into().expect("16 bytes")),
            mtu,
            link_layer,
        };
        if from.epoch == 0 || from.nonce == 0 {
            return Err(decode_err("epoch and nonce must be non-zero"));
        }
        Ok(Message {
            kind,
            from,
            echo_epoch: u64_at(24),
            echo_nonce: u64_at(32),
        })
    }
}

/// A small deterministic generator (SplitMix64) for nonces, PSNs and jitter; seeded from the OS
/// by the domain and from a constant in tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A random 24-bit PSN.
    pub fn psn(&mut self) -> u32 {
        (self.next_u64() >> 40) as u32 & (PSN_MODULUS - 1)
    }

    fn nonzero(&mut self) -> u64 {
        loop {
            let v = self.next_u64();
            if v != 0 {
                return v;
            }
        }
    }
}

/// A seed from the OS (`getrandom`), falling back to the clock and process id.
pub fn os_seed() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is 8 writable bytes; getrandom writes at most that many.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(buf);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

/// A first epoch that grows across process restarts: nanoseconds since the Unix epoch.
pub fn initial_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Timers of the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// First retransmission interval of an unanswered `Hello`.
    pub retry_initial: Duration,
    /// The interval doubles up to this.
    pub retry_max: Duration,
    /// An attempt with no confirmation after this long gives up.
    pub give_up_after: Duration,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            give_up_after: Duration::from_secs(30),
        }
    }
}

/// What does not change between attempts: our QPNs and port addressing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalStatic {
    pub data_qpn: u32,
    pub msg_qpn: u32,
    pub lid: u16,
    pub gid: Gid,
    pub mtu: Mtu,
    pub link_layer: LinkLayer,
}

/// Where a handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Nothing sent or received yet.
    Idle,
    /// An attempt is running.
    Connecting,
    /// Our QPs are connected to the peer's current attempt and the peer confirmed ours.
    Established,
    /// Gave up; [`Handshake::start`] or a `Hello` from the peer starts over.
    Failed,
}

/// Why an attempt began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptReason {
    /// [`Handshake::start`], or the first message from the peer.
    Start,
    /// The peer came back with a newer attempt.
    PeerRestarted,
    /// Our QP failed.
    LocalFailure,
    /// A `Hello` arrived after we had given up.
    Revived,
}

/// Why the QPs must be torn down (moved to ERR, in-flight work failed, back to INIT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeardownReason {
    PeerRestarted {
        old_epoch: u64,
        new_epoch: u64,
    },
    LocalFailure(String),
    /// The handshake gave up with the QPs connected to an unconfirmed peer attempt.
    GaveUp,
}

impl std::fmt::Display for TeardownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TeardownReason::PeerRestarted {
                old_epoch,
                new_epoch,
            } => {
                write!(f, "peer restarted (epoch {old_epoch} -> {new_epoch})")
            }
            TeardownReason::LocalFailure(why) => write!(f, "local QP failure: {why}"),
            TeardownReason::GaveUp => f.write_str("handshake gave up"),
        }
    }
}

/// Connect both QPs (INIT → RTR → RTS) to the peer's attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub remote: Params,
    /// Our send PSN on the data QP.
    pub local_data_psn: u32,
    /// Our send PSN on the message QP.
    pub local_msg_psn: u32,
}

/// The `ibv_modify_qp` attributes of a [`Connect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectAttrs {
    pub data: (RtrAttrs, RtsAttrs),
    pub msg: (RtrAttrs, RtsAttrs),
}

impl Connect {
    /// The RTR and RTS attributes of both QPs.
    ///
    /// # Errors
    /// As for [`qp::rtr_attrs`] and [`qp::rts_attrs`].
    pub fn attrs(&self, cfg: &QpConfig, local: &LocalPath) -> Result<ConnectAttrs> {
        let r = &self.remote;
        Ok(ConnectAttrs {
            data: (
                qp::rtr_attrs(cfg, local, &r.remote(r.data))?,
                qp::rts_attrs(cfg, self.local_data_psn)?,
            ),
            msg: (
                qp::rtr_attrs(cfg, local, &r.remote(r.msg))?,
                qp::rts_attrs(cfg, self.local_msg_psn)?,
            ),
        })
    }
}

/// Something the caller must do, in order.
#[derive(Clone, Debug)]
pub enum Action {
    /// Deliver this message to the peer (out of band).
    Send(Message),
    /// Move both QPs to ERR, fail what was in flight, and bring them back to INIT.
    Teardown(TeardownReason),
    /// Connect both QPs.
    Connect(Connect),
    /// Both sides are connected: sends may be posted.
    Established,
    /// Stop trying; fail whatever waits for this peer.
    GiveUp(Error),
}

/// What happened, for logs, counters and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    AttemptStarted {
        epoch: u64,
        reason: AttemptReason,
    },
    Sent {
        kind: Kind,
    },
    Retransmit {
        count: u32,
    },
    Connected {
        peer_epoch: u64,
    },
    /// The peer echoed our current attempt.
    Confirmed,
    Established {
        epoch: u64,
        peer_epoch: u64,
    },
    /// A repeat of a message from the attempt we are connected to.
    Duplicate {
        kind: Kind,
    },
    /// A message from an attempt older than the newest seen from the peer.
    Stale {
        epoch: u64,
        newest: u64,
    },
    /// The peer is connected to one of our dead attempts.
    OldEcho {
        echo_epoch: u64,
    },
    /// Same epoch as the attempt we are connected to, different contents.
    Conflict {
        epoch: u64,
    },
    PeerRestarted {
        old_epoch: u64,
        new_epoch: u64,
    },
    LocalFailure,
    Malformed(String),
    Incompatible(String),
    GaveUp,
    /// A message that needs no action arrived while failed.
    Ignored,
}

/// The output of one input.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub actions: Vec<Action>,
    pub events: Vec<Event>,
}

/// The handshake with one peer.
#[derive(Clone, Debug)]
pub struct Handshake {
    cfg: HandshakeConfig,
    local: LocalStatic,
    rng: Rng,
    phase: Phase,
    epoch: u64,
    nonce: u64,
    data_psn: u32,
    msg_psn: u32,
    attempt_started: Option<Instant>,
    /// The peer attempt our QPs are connected to.
    peer: Option<Params>,
    /// The peer echoed our current attempt.
    confirmed: bool,
    /// Newest peer epoch seen.
    newest: u64,
    next_send: Option<Instant>,
    backoff: Duration,
    sent_hellos: u32,
}

impl Handshake {
    /// A handshake in [`Phase::Idle`]. `initial_epoch` must grow across restarts of this process
    /// ([`initial_epoch`]); `seed` feeds nonces and PSNs ([`os_seed`]).
    pub fn new(cfg: HandshakeConfig, local: LocalStatic, initial_epoch: u64, seed: u64) -> Self {
        Handshake {
            backoff: cfg.retry_initial,
            cfg,
            local,
            rng: Rng::new(seed),
            phase: Phase::Idle,
            epoch: initial_epoch.max(1) - 1,
            nonce: 0,
            data_psn: 0,
            msg_psn: 0,
            attempt_started: None,
            peer: None,
            confirmed: false,
            newest: 0,
            next_send: None,
            sent_hellos: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The peer attempt our QPs are connected to.
    pub fn peer(&self) -> Option<&Params> {
        self.peer.as_ref()
    }

    /// Our current attempt (meaningful once started).
    pub fn params(&self) -> Params {
        Params {
            epoch: self.epoch,
            nonce: self.nonce,
            data: Lane {
                qpn: self.local.data_qpn,
                psn: self.data_psn,
            },
            msg: Lane {
                qpn: self.local.msg_qpn,
                psn: self.msg_psn,
            },
            lid: self.local.lid,
            gid: self.local.gid,
            mtu: self.local.mtu,
            link_layer: self.local.link_layer,
        }
    }

    /// When [`Self::on_tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.phase != Phase::Connecting {
            return None;
        }
        let give_up = self.attempt_started.map(|t| t + self.cfg.give_up_after);
        match (self.next_send, give_up) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn new_attempt(&mut self, now: Instant, reason: AttemptReason, step: &mut Step) {
        self.epoch += 1;
        self.nonce = self.rng.nonzero();
        self.data_psn = self.rng.psn();
        self.msg_psn = self.rng.psn();
        self.peer = None;
        self.confirmed = false;
        self.phase = Phase::Connecting;
        self.attempt_started = Some(now);
        self.backoff = self.cfg.retry_initial;
        self.sent_hellos = 0;
        self.next_send = Some(now);
        step.events.push(Event::AttemptStarted {
            epoch: self.epoch,
            reason,
        });
    }

    fn send(&mut self, kind: Kind, now: Instant, step: &mut Step) {
        let (echo_epoch, echo_nonce) = self.peer.map_or((0, 0), |p| (p.epoch, p.nonce));
        step.actions.push(Action::Send(Message {
            kind,
            from: self.params(),
            echo_epoch,
            echo_nonce,
        }));
        step.events.push(Event::Sent { kind });
        if kind == Kind::Hello {
            self.sent_hellos += 1;
            let jitter = self
                .backoff
                .mul_f64((self.rng.next_u64() % 25) as f64 / 100.0);
            self.next_send = Some(now + self.backoff + jitter);
            self.backoff = (self.backoff * 2).min(self.cfg.retry_max);
        }
    }

    /// Our answer: `Ack` once the peer has confirmed us, else `Hello`.
    fn reply(&mut self, now: Instant, step: &mut Step) {
        let kind = if self.confirmed {
            Kind::Ack
        } else {
            Kind::Hello
        };
        self.send(kind, now, step);
    }

    fn give_up(&mut self, error: Error, step: &mut Step) {
        if self.peer.take().is_some() {
            step.actions.push(Action::Teardown(TeardownReason::GaveUp));
        }
        self.confirmed = false;
        self.phase = Phase::Failed;
        self.next_send = None;
        step.events.push(Event::GaveUp);
        step.actions.push(Action::GiveUp(error));
    }

    /// Starts connecting (active side). Does nothing while connecting or connected.
    pub fn start(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        let reason = match self.phase {
            Phase::Connecting | Phase::Established => return step,
            Phase::Idle => AttemptReason::Start,
            Phase::Failed => AttemptReason::Revived,
        };
        self.new_attempt(now, reason, &mut step);
        self.send(Kind::Hello, now, &mut step);
        step
    }

    /// Retransmits and gives up as time passes.
    pub fn on_tick(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        if self.phase != Phase::Connecting {
            return step;
        }
        let started = self.attempt_started.unwrap_or(now);
        let waited = now.saturating_duration_since(started);
        if waited >= self.cfg.give_up_after {
            let attempts = self.sent_hellos;
            self.give_up(Error::HandshakeTimeout { attempts, waited }, &mut step);
            return step;
        }
        if self.next_send.is_some_and(|t| t <= now) {
            step.events.push(Event::Retransmit {
                count: self.sent_hellos,
            });
            self.send(Kind::Hello, now, &mut step);
        }
        step
    }

    /// Our QPs failed (an error completion, a fatal async event): tear down and start over.
    pub fn local_failure(&mut self, now: Instant, why: &str) -> Step {
        let mut step = Step::default();
        if matches!(self.phase, Phase::Idle | Phase::Failed) {
            step.events.push(Event::Ignored);
            return step;
        }
        step.events.push(Event::LocalFailure);
        step.actions
            .push(Action::Teardown(TeardownReason::LocalFailure(
                why.to_string(),
            )));
        self.new_attempt(now, AttemptReason::LocalFailure, &mut step);
        self.send(Kind::Hello, now, &mut step);
        step
    }

    /// Handles received bytes; malformed input is reported as an event and otherwise ignored.
    pub fn on_bytes(&mut self, now: Instant, bytes: &[u8]) -> Step {
        match Message::decode(bytes) {
            Ok(m) => self.on_message(now, &m),
            Err(e) => Step {
                actions: Vec::new(),
                events: vec![Event::Malformed(e.to_string())],
            },
        }
    }

    /// Handles one message from the peer.
    pub fn on_message(&mut self, now: Instant, m: &Message) -> Step {
        let mut step = Step::default();
        if m.from.link_layer != self.local.link_layer {
            let why = format!(
                "peer port is {}, ours is {}",
                m.from.link_layer.name(),
                self.local.link_layer.name()
            );
            step.events.push(Event::Incompatible(why.clone()));
            if self.phase != Phase::Established {
                self.give_up(Error::Incompatible(why), &mut step);
            }
            return step;
        }
        let e = m.from.epoch;
        if e < self.newest {
            step.events.push(Event::Stale {
                epoch: e,
                newest: self.newest,
            });
            return step;
        }
        self.newest = e;
        match self.phase {
            Phase::Failed if m.kind == Kind::Hello => {
                self.new_attempt(now, AttemptReason::Revived, &mut step)
            }
            Phase::Failed => {
                step.events.push(Event::Ignored);
                return step;
            }
            Phase::Idle => self.new_attempt(now, AttemptReason::Start, &mut step),
            Phase::Connecting | Phase::Established => {}
        }
        if let Some(p) = self.peer {
            if e == p.epoch {
                if m.from != p {
                    step.events.push(Event::Conflict { epoch: e });
                    return step;
                }
                step.events.push(Event::Duplicate { kind: m.kind });
            } else {
                step.events.push(Event::PeerRestarted {
                    old_epoch: p.epoch,
                    new_epoch: e,
                });
                step.actions
                    .push(Action::Teardown(TeardownReason::PeerRestarted {
                        old_epoch: p.epoch,
                        new_epoch: e,
                    }));
                self.new_attempt(now, AttemptReason::PeerRestarted, &mut step);
            }
        }
        let echoes_us = m.echo_epoch == self.epoch && m.echo_nonce == self.nonce;
        if self.peer.is_none() {
            if m.echo_epoch != 0 && !echoes_us {
                step.events.push(Event::OldEcho {
                    echo_epoch: m.echo_epoch,
                });
                self.send(Kind::Hello, now, &mut step);
                return step;
            }
            self.peer = Some(m.from);
            step.actions.push(Action::Connect(Connect {
                remote: m.from,
                local_data_psn: self.data_psn,
                local_msg_psn: self.msg_psn,
            }));
            step.events.push(Event::Connected { peer_epoch: e });
        }
        if echoes_us && !self.confirmed {
            self.confirmed = true;
            step.events.push(Event::Confirmed);
        }
        // Answer a Hello; and announce a new attempt that has not been sent yet.
        if m.kind == Kind::Hello || (!self.confirmed && self.sent_hellos == 0) {
            self.reply(now, &mut step);
        }
        if self.confirmed && self.phase != Phase::Established {
            self.phase = Phase::Established;
            self.next_send = None;
            let peer_epoch = self.peer.map_or(0, |p| p.epoch);
            step.events.push(Event::Established {
                epoch: self.epoch,
                peer_epoch,
            });
            step.actions.push(Action::Established);
        }
        step
    }
}

/// The addresses a domain hands the handshake for its port, for logs.
pub fn describe(p: &Params) -> String {
    let addr = match p.link_layer {
        LinkLayer::InfiniBand => format!("LID {:#x}", p.lid),
        LinkLayer::Ethernet => match p.gid.ip() {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => v6.to_string(),
        },
    };
    format!(
        "{addr} data QPN {:#x} msg QPN {:#x} MTU {} epoch {}",
        p.data.qpn,
        p.msg.qpn,
        p.mtu.bytes(),
        p.epoch
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn local(qpn: u32, ip: u8) -> LocalStatic {
        LocalStatic {
            data_qpn: qpn,
            msg_qpn: qpn + 1,
            lid: 0,
            gid: Gid::from_ip(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, ip))),
            mtu: Mtu::M4096,
            link_layer: LinkLayer::Ethernet,
        }
    }

    fn sent(step: &Step) -> Vec<Message> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    fn connects(step: &Step) -> Vec<Connect> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::Connect(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    fn has(step: &Step, f: impl Fn(&Action) -> bool) -> bool {
        step.actions.iter().any(f)
    }

    #[test]
    fn message_round_trip_and_corruption() {
        let mut a = Handshake::new(HandshakeConfig::default(), local(0x100, 1), 7, 1);
        let m = sent(&a.start(Instant::now()))[0];
        let bytes = m.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), m);
        for i in 0..MESSAGE_LEN {
            let mut b = bytes;
            b[i] ^= 0x01;
            assert!(Message::decode(&b).is_err(), "flipped byte {i} accepted");
        }
        assert!(Message::decode(&bytes[..79]).is_err());
        let mut v2 = bytes;
        v2[4] = 2;
        let crc = crc32fast::hash(&v2[..76]);
        v2[76..].copy_from_slice(&crc.to_le_bytes());
        let err = Message::decode(&v2).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        let step = a.on_bytes(Instant::now(), b"garbage");
        assert!(matches!(step.events[..], [Event::Malformed(_)]));
    }

    #[test]
    fn happy_path_with_attrs() {
        let t0 = Instant::now();
        let mut a = Handshake::new(HandshakeConfig::default(), local(0x100, 1), 10, 1);
        let mut b = Handshake::new(HandshakeConfig::default(), local(0x200, 2), 20, 2);
        let hello = sent(&a.start(t0))[0];
        assert_eq!((hello.kind, hello.echo_epoch), (Kind::Hello, 0));
        let sb = b.on_message(t0, &hello);
        let cb = connects(&sb);
        assert_eq!(cb.len(), 1);
        assert_eq!(cb[0].remote, a.params());
        let reply = sent(&sb);
        assert_eq!(reply.len(), 1);
        assert_eq!(
            reply[0].kind,
            Kind::Hello,
            "B is not confirmed yet: it asks back"
        );
        assert_eq!(
            (reply[0].echo_epoch, reply[0].echo_nonce),
            (a.params().epoch, a.params().nonce)
        );
        let sa = a.on_message(t0, &reply[0]);
        assert!(has(&sa, |x| matches!(x, Action::Connect(_))));
        assert!(has(&sa, |x| matches!(x, Action::Established)));
        assert_eq!(a.phase(), Phase::Established);
        let ack = sent(&sa)[0];
        assert_eq!(ack.kind, Kind::Ack);
        let sb = b.on_message(t0, &ack);
        assert!(has(&sb, |x| matches!(x, Action::Established)));
        assert!(sent(&sb).is_empty(), "an Ack is not answered");
        // The connect attributes match the other side's PSNs and QPNs.
        let attrs = connects(&sa)[0]
            .attrs(
                &QpConfig::default(),
                &LocalPath {
                    link_layer: LinkLayer::Ethernet,
                    active_mtu: Mtu::M4096,
                    sgid_index: 3,
                    use_grh: true,
                },
            )
            .unwrap();
        let bp = b.params();
        assert_eq!(attrs.data.0 .0.attr.dest_qp_num, bp.data.qpn);
        assert_eq!(attrs.data.0 .0.attr.rq_psn, bp.data.psn);
        assert_eq!(attrs.msg.0 .0.attr.dest_qp_num, bp.msg.qpn);
        assert_eq!(attrs.data.1 .0.attr.sq_psn, a.params().data.psn);
        assert_eq!(cb[0].local_data_psn, bp.data.psn);
    }

    #[test]
    fn lost_hello_is_retransmitted_with_backoff_then_gives_up() {
        let t0 = Instant::now();
        let cfg = HandshakeConfig {
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
            give_up_after: Duration::from_millis(500),
        };
        let mut a = Handshake::new(cfg, local(1, 1), 5, 3);
        assert_eq!(sent(&a.start(t0)).len(), 1);
        assert!(sent(&a.on_tick(t0 + Duration::from_millis(5))).is_empty());
        let mut sends = 1;
        let mut t = t0;
        let mut last_gap = Duration::ZERO;
        let mut prev = t0;
        loop {
            t += Duration::from_millis(1);
            let s = a.on_tick(t);
            if has(&s, |x| matches!(x, Action::GiveUp(_))) {
                let Some(Action::GiveUp(e)) = s.actions.last() else {
                    unreachable!()
                };
                assert!(matches!(e, Error::HandshakeTimeout { .. }), "{e}");
                break;
            }
            if !sent(&s).is_empty() {
                sends += 1;
                last_gap = t - prev;
                prev = t;
            }
        }
        assert!(t >= t0 + Duration::from_millis(500));
        assert!(last_gap >= Duration::from_millis(40) && last_gap <= Duration::from_millis(51));
        assert!((10..20).contains(&sends), "{sends}");
        assert_eq!(a.phase(), Phase::Failed);
        assert!(a.next_deadline().is_none());
        // A later Hello from the peer revives it.
        let mut b = Handshake::new(HandshakeConfig::default(), local(2, 2), 9, 4);
        let s = a.on_message(t, &sent(&b.start(t))[0]);
        assert!(s.events.contains(&Event::AttemptStarted {
            epoch: 6,
            reason: AttemptReason::Revived
        }));
        assert!(has(&s, |x| matches!(x, Action::Connect(_))));
    }

    #[test]
    fn duplicate_hello_is_answered_identically_and_connects_once() {
        let t0 = Instant::now();
        let mut a = Handshake::new(HandshakeConfig::default(), local(1, 1), 10, 1);
        let mut b = Handshake::new(HandshakeConfig::default(), local(2, 2), 20, 2);
        let hello = sent(&a.start(t0))[0];
        let first = b.on_message(t0, &hello);
        let again = b.on_message(t0, &hello);
        assert_eq!(connects(&first).len(), 1);
        assert!(connects(&again).is_empty());
        assert!(again
            .events
            .contains(&Event::Duplicate { kind: Kind::Hello }));
        assert_eq!(sent(&first), sent(&again));
        // Once established, repeats get the same Ack every time.
        let sa = a.on_message(t0, &sent(&first)[0]);
        b.on_message(t0, &sent(&sa)[0]);
        assert_eq!(b.phase(), Phase::Established);
        let r1 = sent(&b.on_message(t0, &hello));
        let r2 = sent(&b.on_message(t0, &hello));
        assert_eq!(r1, r2);
        assert_eq!(r1[0].kind, Kind::Ack);
    }

    fn establish(a: &mut Handshake, b: &mut Handshake, t: Instant) {
        let mut queue: Vec<(bool, Message)> =
            sent(&a.start(t)).into_iter().map(|m| (true, m)).collect();
        while let Some((to_b, m)) = queue.pop() {
            let s = if to_b {
                b.on_message(t, &m)
            } else {
                a.on_message(t, &m)
            };
            queue.extend(sent(&s).into_iter().map(|m| (!to_b, m)));
        }
        assert_eq!(
            (a.phase(), b.phase()),
            (Phase::Established, Phase::Established)
        );
    }

    #[test]
    fn peer_restart_tears_down_and_reconnects_and_old_messages_are_stale() {
        let t0 = Instant::now();
        let mut a = Handshake::new(HandshakeConfig::default(), local(1, 1), 10, 1);
        let mut b = Handshake::new(HandshakeConfig::default(), local(2, 2), 20, 2);
        establish(&mut a, &mut b, t0);
        let old_b = b.params();
        let old_hello_from_b = Message {
            kind: Kind::Hello,
            from: old_b,
            echo_epoch: a.params().epoch,
            echo_nonce: a.params().nonce,
        };
        // B restarts: new process, newer epoch, new QPNs.
        let mut b2 = Handshake::new(HandshakeConfig::default(), local(7, 2), 1000, 9);
        let hello = sent(&b2.start(t0))[0];
        let s = a.on_message(t0, &hello);
        assert!(matches!(
            s.actions[0],
            Action::Teardown(TeardownReason::PeerRestarted {
                old_epoch: 20,
                new_epoch: 1000
            })
        ));
        assert!(matches!(s.actions[1], Action::Connect(c) if c.remote == b2.params()));
        assert_eq!(a.params().epoch, 11, "A started a new attempt");
        // A delayed message from the old B is now stale.
        let s = a.on_message(t0, &old_hello_from_b);
        assert_eq!(
            s.events,
            vec![Event::Stale {
                epoch: 20,
                newest: 1000
            }]
        );
        assert!(s.actions.is_empty());
        // Finish: B2 gets A's answer.
        let reply = sent(&a.on_message(t0, &hello))[0];
        let s = b2.on_message(t0, &reply);
        assert!(has(&s, |x| matches!(x, Action::Connect(_))));
        let s = a.on_message(t0, &sent(&s)[0]);
        assert_eq!(a.phase(), Phase::Established);
        assert!(sent(&s).iter().all(|m| m.kind == Kind::Ack));
        for m in sent(&s) {
            b2.on_message(t0, &m);
        }
        assert_eq!(b2.phase(), Phase::Established);
        assert_eq!(a.peer(), Some(&b2.params()));
        assert_eq!(b2.peer(), Some(&a.params()));
    }

    #[test]
    fn local_failure_resets_both_sides() {
        let t0 = Instant::now();
        let mut a = Handshake::new(HandshakeConfig::default(), local(1, 1), 10, 1);
        let mut b = Handshake::new(HandshakeConfig::default(), local(2, 2), 20, 2);
        establish(&mut a, &mut b, t0);
        let b_first = Message {
            kind: Kind::Hello,
            from: b.params(),
            echo_epoch: 0,
            echo_nonce: 0,
        };
        let s = a.local_failure(t0, "IBV_WC_RETRY_EXC_ERR");
        assert!(matches!(
            s.actions[0],
            Action::Teardown(TeardownReason::LocalFailure(_))
        ));
        let hello = sent(&s)[0];
        assert_eq!(hello.echo_epoch, 0);
        // A repeat of B's very first Hello reconnects A to B's attempt, which is tied to A's
        // dead one; B never confirms it, so A does not become established on it.
        let s = a.on_message(t0, &b_first);
        assert_eq!(connects(&s).len(), 1);
        assert_ne!(a.phase(), Phase::Established);
        // B sees A's new attempt, resets, and they meet again.
        let s = b.on_message(t0, &hello);
        assert!(matches!(s.actions[0], Action::Teardown(_)));
        let mut queue: Vec<(bool, Message)> = sent(&s).into_iter().map(|m| (false, m)).collect();
        while let Some((to_b, m)) = queue.pop() {
            let s = if to_b {
                b.on_message(t0, &m)
            } else {
                a.on_message(t0, &m)
            };
            queue.extend(sent(&s).into_iter().map(|m| (!to_b, m)));
        }
        assert_eq!(
            (a.phase(), b.phase()),
            (Phase::Established, Phase::Established)
        );
        assert_eq!(a.peer(), Some(&b.params()));
        assert_eq!(b.peer(), Some(&a.params()));
    }

    #[test]
    fn incompatible_link_layers_give_up() {
        let t0 = Instant::now();
        let mut a = Handshake::new(HandshakeConfig::default(), local(1, 1), 10, 1);
        let ib = LocalStatic {
            link_layer: LinkLayer::InfiniBand,
            lid: 5,
            ..local(2, 2)
        };
        let mut b = Handshake::new(HandshakeConfig::default(), ib, 20, 2);
        let s = a.on_message(t0, &sent(&b.start(t0))[0]);
        assert!(matches!(
            s.actions[..],
            [Action::GiveUp(Error::Incompatible(_))]
        ));
        assert_eq!(a.phase(), Phase::Failed);
    }

    // --- Two machines over a lossy, repeating, reordering channel. ---

    #[derive(Clone, Debug)]
    enum Op {
        /// Deliver the in-flight message at this (wrapped) index.
        Deliver(usize),
        /// Deliver it and keep a copy in flight.
        Duplicate(usize),
        Drop(usize),
        /// Let time pass on both sides.
        Tick(u16),
        Start(bool),
        Restart(bool),
        LocalFailure(bool),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Deliver),
            2 => any::<usize>().prop_map(Op::Duplicate),
            2 => any::<usize>().prop_map(Op::Drop),
            3 => (1u16..400).prop_map(Op::Tick),
            1 => any::<bool>().prop_map(Op::Start),
            1 => any::<bool>().prop_map(Op::Restart),
            1 => any::<bool>().prop_map(Op::LocalFailure),
        ]
    }

    /// One side plus what its QPs are connected to, as a provider would see it.
    struct Node {
        hs: Handshake,
        qp_peer: Option<Params>,
        established: bool,
        incarnation: u64,
        teardowns: u32,
    }

    impl Node {
        fn new(id: u32, incarnation: u64, seed: u64) -> Node {
            let cfg = HandshakeConfig {
                retry_initial: Duration::from_millis(10),
                retry_max: Duration::from_millis(80),
                give_up_after: Duration::from_secs(3600),
            };
            let qpn = id * 0x1000 + incarnation as u32 * 4;
            let epoch = 1 + incarnation * 1_000_000 + id as u64 * 100_000;
            Node {
                hs: Handshake::new(cfg, local(qpn, id as u8), epoch, seed ^ incarnation),
                qp_peer: None,
                established: false,
                incarnation,
                teardowns: 0,
            }
        }

        /// Carries out a step the way the domain does; returns the messages to send.
        fn apply(&mut self, step: Step) -> Vec<Message> {
            let mut out = Vec::new();
            for a in step.actions {
                match a {
                    Action::Send(m) => out.push(m),
                    Action::Teardown(_) => {
                        self.qp_peer = None;
                        self.established = false;
                        self.teardowns += 1;
                    }
                    Action::Connect(c) => {
                        assert!(self.qp_peer.is_none(), "connect without teardown");
                        assert_eq!(c.local_data_psn, self.hs.params().data.psn);
                        self.qp_peer = Some(c.remote);
                    }
                    Action::Established => {
                        assert!(self.qp_peer.is_some());
                        self.established = true;
                    }
                    Action::GiveUp(e) => panic!("gave up: {e}"),
                }
            }
            out
        }
    }

    struct Sim {
        nodes: [Node; 2],
        /// (to, bytes)
        wire: Vec<(usize, [u8; MESSAGE_LEN])>,
        now: Instant,
    }

    impl Sim {
        fn send(&mut self, from: usize, msgs: Vec<Message>) {
            for m in msgs {
                self.wire.push((1 - from, m.encode()));
            }
        }

        fn deliver(&mut self, i: usize) {
            let (to, bytes) = self.wire.remove(i);
            let step = self.nodes[to].hs.on_bytes(self.now, &bytes);
            let out = self.nodes[to].apply(step);
            self.send(to, out);
        }

        fn tick(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
            for n in 0..2 {
                let step = self.nodes[n].hs.on_tick(self.now);
                let out = self.nodes[n].apply(step);
                self.send(n, out);
            }
        }

        fn run(&mut self, op: &Op, seed: u64) {
            let n = self.wire.len();
            match *op {
                Op::Deliver(i) if n > 0 => self.deliver(i % n),
                Op::Duplicate(i) if n > 0 => {
                    let copy = self.wire[i % n];
                    self.wire.push(copy);
                    self.deliver(i % n);
                }
                Op::Drop(i) if n > 0 => {
                    self.wire.remove(i % n);
                }
                Op::Tick(ms) => self.tick(ms as u64),
                Op::Start(b) => {
                    let s = self.nodes[b as usize].hs.start(self.now);
                    let out = self.nodes[b as usize].apply(s);
                    self.send(b as usize, out);
                }
                Op::Restart(b) => {
                    let i = b as usize;
                    let inc = self.nodes[i].incarnation + 1;
                    self.nodes[i] = Node::new(i as u32 + 1, inc, seed);
                    let s = self.nodes[i].hs.start(self.now);
                    let out = self.nodes[i].apply(s);
                    self.send(i, out);
                }
                Op::LocalFailure(b) => {
                    let i = b as usize;
                    let s = self.nodes[i].hs.local_failure(self.now, "test");
                    let out = self.nodes[i].apply(s);
                    self.send(i, out);
                }
                _ => {}
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Whatever the channel did before (drops, repeats, reordering, restarts, QP failures),
        /// once it delivers reliably again (in any order) both sides end up established, each
        /// with its QPs connected to the other's *current* attempt, with matching PSNs.
        #[test]
        fn converges_after_any_fault_history(
            ops in proptest::collection::vec(arb_op(), 0..60),
            order in proptest::collection::vec(any::<usize>(), 200),
            seed in any::<u64>(),
        ) {
            let mut sim = Sim {
                nodes: [Node::new(1, 0, seed), Node::new(2, 0, seed.rotate_left(7))],
                wire: Vec::new(),
                now: Instant::now(),
            };
            sim.run(&Op::Start(false), seed);
            for op in &ops {
                sim.run(op, seed);
            }
            // Fair channel from here on: deliver in scrambled order, let timers run.
            let mut k = 0;
            for round in 0..400 {
                if sim.nodes.iter().all(|n| n.established) && sim.wire.is_empty() {
                    break;
                }
                while !sim.wire.is_empty() {
                    let i = order[k % order.len()] % sim.wire.len();
                    k += 1;
                    sim.deliver(i);
                    prop_assert!(k < 20_000, "message storm");
                }
                if sim.nodes.iter().any(|n| !n.established) {
                    sim.tick(100);
                }
                prop_assert!(round < 399, "did not converge");
            }
            let [a, b] = &sim.nodes;
            prop_assert!(a.established && b.established);
            prop_assert_eq!(a.qp_peer, Some(b.hs.params()));
            prop_assert_eq!(b.qp_peer, Some(a.hs.params()));
            prop_assert_eq!(a.hs.peer(), Some(&b.hs.params()));
            prop_assert_eq!(b.hs.peer(), Some(&a.hs.params()));
        }
    }
}
