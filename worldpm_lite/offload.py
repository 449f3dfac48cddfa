"""Decoder layers streamed from host memory behind compute, for a GPU too small to hold them all.

The streamed layers' tensors live in ONE host allocation, laid out layer by layer (every layer of a
WorldPM has the same tensors, so one layout and a fixed stride), pinned by registering it with CUDA
as it is: torch's pinned allocator rounds each allocation up to a power of two (a 34 GiB request
would take 64 GiB) and pinning tensor by tensor or lazily is slow. On the GPU a ring of K static
buffers, each one layer long, holds the layers in flight; K copies of the layer module read views
of them, so nothing is allocated per layer.

A side stream copies streamed layer n + K - 1 while layer n computes. Two events per ring slot order
the work without the host waiting on anything: compute of a layer waits for the slot's `copied`
event, and the copy that refills the slot waits for its `done` event, recorded after the layer's
kernels on the compute stream. The copies follow the streamed layers in cyclic order (a pass ends
where the next one starts); a layer asked for out of that order (after a pass that failed midway)
is copied on demand, so the order is a prefetch guess, never a correctness assumption.

The ring buffers are allocated on the compute stream and written by the side stream, so each is
marked as used by the side stream (record_stream): freed, its memory is not reused before the copies
queued there are done. The prefetch leaves one or two copies in flight after every pass; close()
waits for them, and runs by itself when the LayerStream is dropped, so dropping a model never frees
memory a copy still reads or writes.

The runtime (streams, events, copies) is an object of its own: CUDA on a GPU, plain synchronous
copies on the CPU (the tests run the real executor there, host tier and compute tier both the CPU).
The CUDA runtime maps each of its calls onto one or two torch.cuda calls, and the tests run it over a
fake torch.cuda that logs what each stream queues, then replay that log as a GPU would to check both
orderings.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes: every tensor of a layer starts at a multiple (CUDA's own allocation alignment)


@dataclass(frozen=True)
class Offload:
    """Which decoder layers stream (the rest stay resident) and how many ring buffers they pass through."""

    streamed: tuple[int, ...]
    ring: int = 2

    def __post_init__(self):
        if self.ring < 1:
            raise ValueError(f"offload ring: expected at least 1 buffer, found {self.ring}")
        if len(set(self.streamed)) != len(self.streamed) or any(i < 0 for i in self.streamed):
            raise ValueError(f"offload streamed layers: expected distinct layer indices, found {self.streamed}")


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


def pin(t: torch.Tensor) -> torch.Tensor:
    """Page-lock t's memory where it lies (cudaHostRegister: exact size, no power-of-two rounding);
    unregistered when t is freed. Falls back to a pinned copy if registration fails."""
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:
        return t.pin_memory()
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class HostLayers:
    """The streamed layers' tensors in one host allocation: layer j of `count` at j x stride."""

    def __init__(self, template: nn.Module, count: int, pinned: bool):
        self.layout, self.stride = layer_layout(template)
        data = torch.empty(count * self.stride, dtype=torch.uint8)
        self.data = pin(data) if pinned else data
        self.count = count

    def layer(self, j: int) -> torch.Tensor:
        return self.data[j * self.stride: (j + 1) * self.stride]

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
    is one or two calls of `cuda` (torch.cuda; a fake in the tests), nothing more, so what the tests replay is
    what gets queued."""

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
        self._drain = weakref.finalize(self, self.runtime.drain)  # holds the runtime, not self: dropping self runs it
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
        return (f"{len(self.streamed)} layers streamed from {'pinned ' if self.host.data.is_pinned() else ''}host "
                f"memory ({size}) through a ring of {len(self.buffers)} buffers of {self.host.stride / 2**20:.1f} MiB")
