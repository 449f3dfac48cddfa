"""Decoder layers streamed from host memory behind compute, for a GPU too small to hold them all.

The streamed layers' tensors live in ONE host allocation, laid out layer by layer (every layer of a
WorldPM has the same tensors, so one layout and a fixed pitch), pinned by registering it with CUDA
where it lies: torch's pinned allocator rounds each allocation up to a power of two (a 34 GiB request
would take 64 GiB) and briefly holds a second copy, and pinning tensor by tensor or lazily is slow. On
the GPU a ring of K static buffers, each one layer long, holds the layers in flight; K copies of the
layer module read views of them, so nothing is allocated per layer.

Pinning registers one layer's pages per cudaHostRegister call, portable (pinned for every GPU's
context, not only the current device's: a model on cuda:1 sees it pinned too). Each layer's slice
starts on a page of its own, so no two calls share a page and a layer registers or fails alone. A
failed call leaves its error as the CUDA runtime's last error, which the next kernel launch would
report as its own: it is read and cleared at once (cudaGetLastError, which must read back the error
the call returned, else pinning stops with an error saying so), and the failures are logged in one
line. A layer that could not be pinned stays where it is, pageable: CUDA copies pageable memory
correctly (it stages the copy through its own small pinned buffers, and the host waits until the
source is staged), just slower and without overlapping the host. So the fallback needs no host memory
beyond the allocation the plan counts (offload_plan.StreamPlan.host_needed) and never a second copy.

A side stream copies streamed layer n + K - 1 while layer n computes. Two events per ring slot order
the work without the host waiting on anything: compute of a layer waits for the slot's `copied`
event, and the copy that refills the slot waits for its `done` event, recorded after the layer's
kernels on the compute stream. The copies follow the streamed layers in cyclic order (a pass ends
where the next one starts); a layer asked for out of that order (after a pass that failed midway)
is copied on demand, so the order is a prefetch guess, never a correctness assumption.

The ring buffers are allocated on the compute stream and written by the side stream, so each is
marked as used by the side stream (record_stream): freed, its memory is not reused before the copies
queued there are done. The prefetch leaves one or two copies in flight after every pass; close()
waits for them, and runs by itself when the LayerStream is dropped and before the host allocation is
unregistered, so dropping a model never frees memory a copy still reads or writes.

The runtime (streams, events, copies) is an object of its own: CUDA on a GPU, plain synchronous
copies on the CPU (the tests run the real executor there, host tier and compute tier both the CPU).
The CUDA runtime maps each of its calls onto one or two torch.cuda calls, and the tests run it over a
fake torch.cuda that logs what each stream queues, then replay that log as a GPU would to check both
orderings. Pinning's CUDA calls go through an adapter of their own (CudaHost) for the same reason.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import mmap
import weakref

import torch
from torch import nn

ALIGN = 256  # bytes: every tensor of a layer starts at a multiple (CUDA's own allocation alignment)
PORTABLE = 1  # cudaHostRegisterPortable: pinned for every GPU's context, not only the current device's

log = logging.getLogger(__name__)


def spread(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` of `num_layers` layers, spread evenly: each streamed layer then has resident layers'
    compute in front of it to hide its copy behind."""
    count = max(0, min(count, num_layers))
    return tuple((j * num_layers) // count for j in range(count))


def layer_layout(layer: nn.Module) -> tuple[list[tuple[str, int, torch.Size, torch.dtype]], int]:
    """Where each tensor of a decoder layer (a module on any device, meta included) sits in a flat byte
    buffer: (name, byte offset, shape, dtype) in state-dict order, and the layer's stride in bytes."""
    layout, offset = [], 0
    for name, t in layer.state_dict(keep_vars=True).items():
        layout.append((name, offset, t.shape, t.dtype))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return layout, offset


def views(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """The tensors of one layer as views of `flat` (uint8, one layer long)."""
    return {name: flat[off: off + shape.numel() * dtype.itemsize].view(dtype).view(shape)
            for name, off, shape, dtype in layout}


def assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make module's parameters and buffers these tensors (views), in place of whatever they were."""
    for name, t in tensors.items():
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        if attr in parent._parameters:
            parent._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            parent._buffers[attr] = t


def host_pitch(stride: int, page: int = mmap.PAGESIZE) -> int:
    """Bytes from one streamed layer to the next in the host allocation: the layer's stride rounded up to
    a page (this machine's), so each layer's pages are its own and it registers (or fails to) alone."""
    return -(-stride // page) * page


def host_bytes(count: int, stride: int, page: int = mmap.PAGESIZE) -> int:
    """The host allocation of `count` streamed layers of `stride` bytes, as the plan counts it: their
    pitches and one page more, to start the first on a page."""
    return count * host_pitch(stride, page) + page


def loaded_cuda_get_last_error(maps: str = "/proc/self/maps"):
    """cudaGetLastError of the libcudart this process has loaded (torch's: torch.cuda.cudart() binds no
    such call), or None where `maps` lists none, or several (which one torch calls is then unknown)."""
    try:
        with open(maps) as f:
            paths = {parts[5].strip() for parts in (line.split(maxsplit=5) for line in f)
                     if len(parts) == 6 and "libcudart" in parts[5].rsplit("/", 1)[-1]}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    try:
        return ctypes.CDLL(paths.pop()).cudaGetLastError
    except (OSError, AttributeError):  # gone since it was mapped, or not a CUDA runtime after all
        return None


class CudaHost:
    """The CUDA runtime calls that pin host memory, through torch's libcudart binding (torch.cuda.cudart();
    a fake in the tests). Each returns a cudaError_t, read as an int (0: success)."""

    def __init__(self, cudart=None, get_last_error=None):
        self.cudart = torch.cuda.cudart() if cudart is None else cudart
        self._get_last_error = get_last_error

    def register(self, ptr: int, size: int) -> int:
        return int(self.cudart.cudaHostRegister(ptr, size, PORTABLE))

    def unregister(self, ptr: int) -> int:
        return int(self.cudart.cudaHostUnregister(ptr))

    def clear_error(self, err: int) -> bool:
        """Read and reset the runtime's last error, which the failed call that returned `err` leaves behind
        for the next kernel launch to report as its own. False when this process has no cudaGetLastError
        to call, or the one it has read another error (then it is not the runtime torch calls)."""
        if self._get_last_error is None:
            self._get_last_error = getattr(self.cudart, "cudaGetLastError", None) or loaded_cuda_get_last_error()
        return self._get_last_error is not None and int(self._get_last_error()) == err

    def name(self, err: int) -> str:
        return f"{self.cudart.cudaGetErrorString(self.cudart.cudaError(err))} (cudaError {err})"


def pin(t: torch.Tensor, chunk: int, cuda: CudaHost, before_release: list) -> int:
    """Page-lock t's memory where it lies, one `chunk` of bytes (a streamed layer's pages) per
    cudaHostRegister call: exact sizes, portable, no copy. A chunk that fails stays pageable (the module
    docstring says why that is safe); each failure is read and cleared, and all are logged in one line.
    What was registered is unregistered when t is freed, after the calls in `before_release` (the drains
    of the copies that read t) ran. Returns how many chunks are pinned."""
    pinned, failed = [], []
    release = weakref.finalize(t, unpin, cuda, pinned, before_release)
    base, size = t.data_ptr(), t.numel() * t.element_size()
    for start in range(0, size, chunk):
        err = cuda.register(base + start, min(chunk, size - start))
        if err == 0:
            pinned.append(base + start)
            continue
        if not cuda.clear_error(err):
            release()  # what was pinned so far, at once: the caller gets no tensor to free
            raise RuntimeError(f"pinning host memory: cudaHostRegister failed with {cuda.name(err)}, and the error "
                               "it leaves cannot be cleared: expected cudaGetLastError in torch.cuda.cudart() or "
                               "in the one libcudart this process loaded, reading that error back. Stopping here "
                               "rather than let the next kernel launch report it as its own")
        failed.append(err)
    if failed:
        log.warning("pinning %d streamed layers (%.2f GiB of host memory): cudaHostRegister failed for %d of them "
                    "(%s); those copy from pageable memory, staged by CUDA with the host waiting for each: slower, "
                    "and no extra host memory", -(-size // chunk), size / 2**30, len(failed),
                    ", ".join(sorted({cuda.name(err) for err in failed})))
    return len(pinned)


def unpin(cuda: CudaHost, ptrs: list[int], before_release: list) -> None:
    """Unregister what `pin` registered, once every copy that may still read it is drained (a finalizer:
    it logs what fails rather than raise)."""
    for drain in before_release:
        drain()
    failed = [err for err in (cuda.unregister(ptr) for ptr in ptrs) if err]
    if failed:
        cleared = cuda.clear_error(failed[-1])
        log.warning("unpinning streamed layers: cudaHostUnregister failed for %d of %d chunks (%s)%s", len(failed),
                    len(ptrs), cuda.name(failed[0]), "" if cleared else "; the error it leaves could not be cleared")


class HostLayers:
    """The streamed layers' tensors in one host allocation: layer j of `count` at j x pitch."""

    def __init__(self, template: nn.Module, count: int, pinned: bool, cuda: CudaHost | None = None):
        self.layout, self.stride = layer_layout(template)
        self.pitch = host_pitch(self.stride)
        raw = torch.empty(host_bytes(count, self.stride), dtype=torch.uint8)
        start = -raw.data_ptr() % mmap.PAGESIZE
        self.data = raw[start: start + count * self.pitch]
        self.count = count
        self.before_release: list = []  # drains of the copies reading this memory (LayerStream adds its own)
        self.pinned = pin(self.data, self.pitch, cuda or CudaHost(), self.before_release) if pinned else 0

    def layer(self, j: int) -> torch.Tensor:
        return self.data[j * self.pitch: j * self.pitch + self.stride]

    def put(self, j: int, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of streamed layer j (already in its final dtype) into its place."""
        views(self.layer(j), self.layout)[name].copy_(tensor)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class CpuRuntime:
    """Synchronous copies and no-op events: the CPU runs one thing at a time."""

    def event(self):
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, done) -> None:
        dst.copy_(src)

    def wait(self, event) -> None:
        pass

    def record(self, event) -> None:
        pass

    def copy_target(self, buf: torch.Tensor) -> None:
        pass

    def drain(self) -> None:
        pass


class CudaRuntime:
    """A side stream for the copies; events on both streams; the host never waits but in drain. Each call
    is one or two calls of `cuda` (torch.cuda; a fake in the tests), nothing more, so what the tests
    replay is what gets queued."""

    def __init__(self, device: torch.device, cuda=None):
        self.cuda = torch.cuda if cuda is None else cuda
        self.device = device
        self.stream = self.cuda.Stream(device)

    def event(self):
        return self.cuda.Event()

    def copy(self, dst, src, after, done) -> None:
        """dst <- src on the side stream, after `after` (None: right away), then `done` recorded there."""
        with self.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)

    def wait(self, event) -> None:
        """What the compute stream queues next runs after `event`."""
        self.cuda.current_stream(self.device).wait_event(event)

    def record(self, event) -> None:
        """`event` marks what the compute stream queued so far."""
        event.record(self.cuda.current_stream(self.device))

    def copy_target(self, buf: torch.Tensor) -> None:
        """buf (allocated on the compute stream) is written by the side stream: once freed, the caching
        allocator must not hand its memory out before the side stream's queued work is done."""
        buf.record_stream(self.stream)

    def drain(self) -> None:
        """Wait, on the host, for every copy queued so far."""
        self.stream.synchronize()


class LayerStream:
    """The ring: K GPU buffers, K layer modules reading views of them, and the prefetch order."""

    def __init__(self, host: HostLayers, template: nn.Module, streamed: tuple[int, ...], ring: int,
                 device: torch.device, runtime=None):
        self.host, self.streamed, self.device = host, tuple(streamed), torch.device(device)
        self.position = {layer: j for j, layer in enumerate(self.streamed)}
        self.runtime = runtime or (CudaRuntime(self.device) if self.device.type == "cuda" else CpuRuntime())
        ring = min(ring, len(self.streamed))  # more slots than streamed layers would hold nothing
        self.buffers = [torch.empty(host.stride, dtype=torch.uint8, device=self.device) for _ in range(ring)]
        for buf in self.buffers:
            self.runtime.copy_target(buf)
        self.modules = []
        for buf in self.buffers:
            module = copy.deepcopy(template)
            assign(module, views(buf, host.layout))
            self.modules.append(module)
        self.holds: list[int | None] = [None] * ring  # the layer each slot holds (or is being filled with)
        self.copied = [self.runtime.event() for _ in range(ring)]
        self.done: list = [None] * ring  # recorded after a slot's layer computed; None: never used yet
        self._done_events = [self.runtime.event() for _ in range(ring)]
        self.next_slot = 0
        self.closed = False
        # the drain holds the runtime, not self: dropping the stream runs it, before the host memory is unpinned
        self._drain = weakref.finalize(self, self.runtime.drain)
        host.before_release.append(self.runtime.drain)
        for j in range(ring):  # the first K layers start copying now
            self._fill(j, self.streamed[j])

    def _fill(self, slot: int, layer: int) -> None:
        self.runtime.copy(self.buffers[slot], self.host.layer(self.position[layer]), self.done[slot],
                          self.copied[slot])
        self.holds[slot] = layer

    @contextlib.contextmanager
    def layer(self, i: int):
        """The module of streamed layer i, once its copy is ordered before what the caller queues."""
        if self.closed:
            raise RuntimeError(f"streamed layer {i} asked for after close(): expected none (the stream is drained)")
        if i in self.holds:
            slot = self.holds.index(i)
        else:  # out of the prefetch order (a pass that stopped midway): copy it now
            slot = self.next_slot
            self._fill(slot, i)
        self.next_slot = (slot + 1) % len(self.buffers)
        self.runtime.wait(self.copied[slot])
        try:
            yield self.modules[slot]
        finally:
            self.done[slot] = self._done_events[slot]
            self.runtime.record(self.done[slot])
            k, m = len(self.buffers), len(self.streamed)
            if m > k:  # refill the slot with the layer K places ahead, in cyclic order
                self._fill(slot, self.streamed[(self.position[i] + k) % m])

    def close(self) -> None:
        """Wait for every copy in flight (each pass leaves the next pass's first copies queued), so the
        host memory they read and the buffers they write may be freed. Idempotent; also runs when the
        stream is dropped."""
        self.closed = True
        self._drain()

    def describe(self) -> str:
        size = self.host.nbytes
        size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        pinned = self.host.pinned
        where = ("pinned host memory" if pinned == self.host.count else "host memory" if not pinned else
                 f"host memory ({pinned} of {self.host.count} layers pinned, the rest pageable)")
        return (f"{len(self.streamed)} layers streamed from {where} ({size}) through a ring of "
                f"{len(self.buffers)} buffers of {self.host.stride / 2**20:.1f} MiB")
