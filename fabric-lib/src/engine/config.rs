//! How to build an engine: [`EngineConfig`] and the provider predicates.

use std::time::Duration;

pub use crate::domain_types::is_socket_provider;
use crate::domain_types::DomainSpec;
use crate::shard::Sharding;
use crate::transfer::Completion;

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The domains of the group (1..=16; 1-4 NICs per GPU in practice).
    pub domains: Vec<DomainSpec>,
    /// Default spreading of transfers over the domains.
    pub sharding: Sharding,
    /// A single write is split over domains only into shards of at least this many bytes.
    pub min_shard_bytes: u64,
    /// Largest single libfabric operation (defaults to the smallest provider max_msg_size,
    /// capped at 1 GiB).
    pub max_op_bytes: Option<u64>,
    /// Default deadline of a transfer.
    pub timeout: Duration,
    /// Receive buffers posted per domain for messages.
    pub recv_buffers: usize,
    /// Send buffers shared by all domains.
    pub send_buffers: usize,
    /// Largest message for send/recv.
    pub max_message_bytes: usize,
    /// Pin the worker thread to this CPU.
    pub worker_cpu: Option<usize>,
    /// How long an idle worker keeps spinning before it starts to sleep.
    pub spin: Duration,
    /// Longest sleep of an idle worker between polls of its completion queues.
    pub max_sleep: Duration,
    /// CUDA device whose memory this engine moves (GPU registration and staging); None for a
    /// host-only engine.
    pub cuda_device: Option<usize>,
    /// With `cuda_device`: accept and make NVLink (CUDA IPC) writes between processes of this
    /// host. Off, GPU memory always moves through staging over the fabric.
    pub nvlink: bool,
    /// What a transfer's success means unless the call says otherwise.
    pub completion: Completion,
    /// How long unregistering a region waits for the peers holding a lease on it to stop
    /// writing (a peer that does not answer by then is presumed dead and the region is closed).
    pub revoke_timeout: Duration,
}

impl EngineConfig {
    /// `n` domains of `provider` on its default interface, with default settings.
    pub fn new(provider: &str, n: usize) -> Self {
        EngineConfig {
            domains: (0..n).map(|_| DomainSpec::new(provider)).collect(),
            sharding: Sharding::RoundRobin,
            min_shard_bytes: 1 << 20,
            max_op_bytes: None,
            timeout: Duration::from_secs(30),
            recv_buffers: 64,
            send_buffers: 64,
            max_message_bytes: 64 << 10,
            worker_cpu: None,
            spin: Duration::from_millis(20),
            max_sleep: Duration::from_micros(500),
            cuda_device: None,
            nvlink: true,
            completion: Completion::Delivered,
            revoke_timeout: Duration::from_secs(5),
        }
    }
}

impl EngineConfig {
    /// Like [`EngineConfig::new`], but socket providers (tcp, net, udp) bind to 127.0.0.1, so
    /// every byte stays on the loopback interface (tests, benchmarks, the demo).
    pub fn loopback(provider: &str, n: usize) -> Self {
        let mut cfg = EngineConfig::new(provider, n);
        if is_socket_provider(provider) {
            for d in &mut cfg.domains {
                d.node = Some("127.0.0.1".into());
            }
        }
        cfg
    }
}
