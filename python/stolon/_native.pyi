"""Type stubs for the native module (checked against the built module by mypy.stubtest)."""

from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union, final

from typing_extensions import Buffer, Self, disjoint_base

__all__ = [
    "Address",
    "GpuFlag",
    "HostCounter",
    "PreparedTransfer",
    "cuda_info",
    "MemoryDescriptor",
    "MoeAllToAll",
    "MemoryRegion",
    "TransferEngine",
    "TransferFuture",
    "libfabric_info",
    "list_providers",
    "_error_classes",
]

def _error_classes() -> List[str]:
    """Names of every stolon.errors class the native module raises."""

@final
class Address:
    @staticmethod
    def from_bytes(data: Buffer) -> Address: ...
    @staticmethod
    def from_text(text: str) -> Address: ...
    def to_bytes(self) -> bytes: ...
    def to_text(self) -> str: ...
    def __bytes__(self) -> bytes: ...
    @property
    def providers(self) -> List[str]: ...
    @property
    def engine_id(self) -> int: ...
    def __reduce__(self) -> Tuple[Any, Tuple[bytes]]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class MemoryDescriptor:
    @staticmethod
    def from_bytes(data: Buffer) -> MemoryDescriptor: ...
    @staticmethod
    def from_text(text: str) -> MemoryDescriptor: ...
    def to_bytes(self) -> bytes: ...
    def to_text(self) -> str: ...
    def __bytes__(self) -> bytes: ...
    @property
    def length(self) -> int: ...
    @property
    def staged(self) -> bool: ...
    @property
    def address(self) -> Address: ...
    def __reduce__(self) -> Tuple[Any, Tuple[bytes]]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class MemoryRegion:
    @property
    def descriptor(self) -> MemoryDescriptor: ...
    @property
    def ptr(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def revoked(self) -> bool: ...
    @property
    def nvlink_note(self) -> Optional[str]: ...
    @property
    def memory(self) -> str: ...
    def __len__(self) -> int: ...

@final
class TransferFuture:
    def wait(self, timeout: Optional[float] = None) -> None: ...
    def done(self) -> bool: ...
    def exception(self) -> Optional[BaseException]: ...
    def add_done_callback(self, callback: Callable[[Optional[BaseException]], object]) -> None: ...
    @property
    def imm_counts(self) -> List[int]: ...
    @property
    def imm_count(self) -> int: ...

@final
class GpuFlag:
    def __new__(cls, device: int) -> GpuFlag: ...
    @staticmethod
    def available() -> bool: ...
    @property
    def value(self) -> int: ...
    def set(self, value: int) -> None: ...
    @property
    def device_ptr(self) -> int: ...
    @property
    def device(self) -> int: ...
    def wait_on_stream(self, value: int, stream: int = 0) -> None: ...

@final
class HostCounter:
    def __new__(cls, device: Optional[int] = None, value: int = 0) -> HostCounter: ...
    @property
    def value(self) -> int: ...
    def set(self, value: int) -> None: ...
    def add(self, delta: int = 1) -> int: ...
    @property
    def host_ptr(self) -> int: ...
    @property
    def device_ptr(self) -> int: ...
    @property
    def device(self) -> Optional[int]: ...
    def write_from_stream(self, value: int, stream: int = 0) -> None: ...
    def wait_on_stream(self, value: int, stream: int = 0) -> None: ...

@final
class MoeAllToAll:
    def __new__(
        cls,
        *,
        device: int,
        rank: int,
        world: int,
        num_experts: int,
        topk: int,
        max_tokens: int,
        hidden: int,
        dispatch_elem_bytes: int,
        scales_per_token: int,
        combine_dtype: str,
        ranks_per_node: Optional[int] = None,
        capacity: Optional[int] = None,
        timeout: float = 10.0,
        engine: Optional[TransferEngine] = None,
    ) -> MoeAllToAll: ...
    @staticmethod
    def kernel_builds() -> List[Dict[str, Any]]: ...
    @staticmethod
    def selected_kernels(driver: Optional[str] = None) -> str: ...
    def handle(self) -> bytes: ...
    def connect(self, handles: List[bytes]) -> None: ...
    def dispatch_send(
        self,
        stream: int,
        x: int,
        x_stride: int,
        scales: int,
        s_stride: int,
        idx: int,
        idx64: bool,
        idx_stride: int,
        weights: int,
        w_stride: int,
        num_tokens: Optional[int],
        num_tokens_ptr: int,
    ) -> None: ...
    def dispatch_recv(
        self, stream: int, out_x: int, out_s: int, counts: int, offsets: int
    ) -> None: ...
    def dispatch(
        self,
        stream: int,
        x: int,
        x_stride: int,
        scales: int,
        s_stride: int,
        idx: int,
        idx64: bool,
        idx_stride: int,
        weights: int,
        w_stride: int,
        num_tokens: Optional[int],
        num_tokens_ptr: int,
        out_x: int,
        out_s: int,
        counts: int,
        offsets: int,
        overlap: Optional[bool],
    ) -> bool: ...
    def overlaps_by_default(self) -> bool: ...
    def combine_send(self, stream: int, y: int, y_stride: int) -> None: ...
    def combine_recv(self, stream: int, out: int, out_stride: int, accumulate: bool) -> None: ...
    def combine(
        self,
        stream: int,
        y: int,
        y_stride: int,
        out: int,
        out_stride: int,
        accumulate: bool,
        overlap: Optional[bool],
    ) -> bool: ...
    def synchronize(self, stream: int, timeout: float) -> None: ...
    def check(self) -> None: ...
    def steps(self) -> List[int]: ...
    def progress(self) -> List[int]: ...
    def layout(self) -> Dict[str, int]: ...
    def release_peers(self, timeout: float) -> bool: ...
    def close(self) -> None: ...

@final
class PreparedTransfer:
    @property
    def imm_counts(self) -> List[int]: ...
    @property
    def imm_count(self) -> int: ...
    @property
    def used(self) -> bool: ...

_ScatterItem = Tuple[MemoryDescriptor, int, int, int]

# What a transfer's success means: "delivered" (the default: every byte is in the
# destination's memory) or "local" (only that the source may be reused).
_Completion = Literal["delivered", "local"]

@disjoint_base
class TransferEngine:
    """One domain group driven by one worker thread.

    ``min_shard_bytes``: a single write is split over the domains only into shards of at least
    this many bytes; it must be >= 65536 (64 KiB), else ConfigError. ``max_op_bytes``: the
    largest single operation (default: the providers' limit), >= 4096. ``domains``: 1-16.
    Integer arguments out of range for their type raise InvalidArgumentError.
    """

    def __new__(
        cls,
        provider: str = "tcp",
        domains: Optional[int] = None,
        *,
        interfaces: Optional[Sequence[str]] = None,
        nodes: Optional[Sequence[str]] = None,
        timeout: float = 30.0,
        min_shard_bytes: int = 1048576,
        max_op_bytes: Optional[int] = None,
        recv_buffers: int = 64,
        send_buffers: int = 64,
        max_message_bytes: int = 65536,
        worker_cpu: Optional[int] = None,
        spin_us: int = 20000,
        max_sleep_us: int = 500,
        cuda_device: Optional[int] = None,
        nvlink: bool = True,
        completion: _Completion = "delivered",
        revoke_timeout: float = 5.0,
    ) -> TransferEngine: ...
    @property
    def address(self) -> Address: ...
    @property
    def num_domains(self) -> int: ...
    @property
    def stopped(self) -> bool: ...
    def domain_info(self) -> List[Dict[str, Any]]: ...
    def register_ptr(
        self, ptr: int, length: int, owner: Optional[object] = None
    ) -> MemoryRegion: ...
    def register_gpu_ptr(
        self, ptr: int, length: int, owner: Optional[object] = None
    ) -> MemoryRegion: ...
    def register_staged_host_ptr(
        self, ptr: int, length: int, owner: Optional[object] = None
    ) -> MemoryRegion: ...
    def unregister(self, region: MemoryRegion) -> None: ...
    def write(
        self,
        src: MemoryRegion,
        src_offset: int,
        dst: MemoryDescriptor,
        dst_offset: int,
        length: int,
        imm: Optional[int] = None,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> TransferFuture: ...
    def prepare_write(
        self,
        src: MemoryRegion,
        src_offset: int,
        dst: MemoryDescriptor,
        dst_offset: int,
        length: int,
        imm: Optional[int] = None,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> PreparedTransfer: ...
    def prepare_paged(
        self,
        src: MemoryRegion,
        dst: MemoryDescriptor,
        page_bytes: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        *,
        src_stride: Optional[int] = None,
        dst_stride: Optional[int] = None,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: Optional[int] = None,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> PreparedTransfer: ...
    def submit(self, prepared: PreparedTransfer) -> TransferFuture: ...
    def watch(
        self,
        counter: HostCounter,
        steps: Sequence[PreparedTransfer] = ...,
        callback: Optional[Callable[[int, int], object]] = None,
    ) -> Tuple[int, List[TransferFuture]]: ...
    def unwatch(self, watch_id: int) -> None: ...
    def expect_imm_flag(
        self,
        imm: int,
        count: int,
        counter: Union[HostCounter, GpuFlag],
        value: int = 1,
        timeout: Optional[float] = None,
    ) -> None: ...
    def write_imm(
        self,
        peer: Address,
        imm: int,
        *,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> TransferFuture: ...
    def write_paged(
        self,
        src: MemoryRegion,
        dst: MemoryDescriptor,
        page_bytes: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        *,
        src_stride: Optional[int] = None,
        dst_stride: Optional[int] = None,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: Optional[int] = None,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> TransferFuture: ...
    def scatter(
        self,
        src: MemoryRegion,
        items: Sequence[_ScatterItem],
        imm: Optional[int] = None,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        timeout: Optional[float] = None,
        completion: Optional[_Completion] = None,
    ) -> TransferFuture: ...
    def send(
        self, peer: Address, data: bytes, *, timeout: Optional[float] = None
    ) -> TransferFuture: ...
    def recv(self, timeout: Optional[float] = None) -> bytes: ...
    def on_message(self, callback: Optional[Callable[[bytes], object]] = None) -> None: ...
    def barrier(
        self, peers: Sequence[Address], imm: int, timeout: Optional[float] = None
    ) -> None: ...
    def imm_count(self, imm: int) -> int: ...
    def wait_imm(self, imm: int, count: int, timeout: Optional[float] = None) -> None: ...
    def expect_imm(
        self,
        imm: int,
        count: int,
        callback: Callable[[Optional[BaseException]], object],
        timeout: Optional[float] = None,
    ) -> None: ...
    def imm_count_write(
        self,
        length: int,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        staged: bool = False,
    ) -> int: ...
    def imm_count_paged(self, pages: int, page_bytes: int, *, staged: bool = False) -> int: ...
    def imm_count_scatter_item(
        self,
        length: int,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
        staged: bool = False,
    ) -> int: ...
    def trigger_write(
        self,
        imm: int,
        times: int,
        src: MemoryRegion,
        src_offset: int,
        dst: MemoryDescriptor,
        dst_offset: int,
        length: int,
        reply_imm: Optional[int] = None,
    ) -> None: ...
    def stats(self) -> List[Dict[str, int]]: ...
    def nvlink_stats(self) -> Dict[str, int]: ...
    def path(self, src: MemoryRegion, dst: MemoryDescriptor) -> str: ...
    def imm_count_for(
        self,
        src: MemoryRegion,
        dst: MemoryDescriptor,
        length: int,
        *,
        sharding: Optional[str] = None,
        pin_domain: Optional[int] = None,
    ) -> int: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, _t: Any = None, _v: Any = None, _tb: Any = None) -> None: ...

def libfabric_info() -> Dict[str, Any]: ...
def cuda_info() -> Dict[str, Any]: ...
def list_providers(provider: Optional[str] = None) -> List[Dict[str, Any]]: ...
