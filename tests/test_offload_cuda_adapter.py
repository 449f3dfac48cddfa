"""offload.py's CUDA calls on the CPU: CudaRuntime over a fake torch.cuda (each call's streams and
events, the ring buffers marked for the side stream, the drain on close and on drop) and pinning over a
fake torch.cuda.cudart() (portable registration layer by layer, a failure read, cleared, logged once and
streamed from pageable memory, never torch's pinned allocator)."""

import gc
import logging
from mmap import PAGESIZE

import pytest
import torch
from test_offload import STREAMED, FakeCuda, run_ring

from worldpm_lite import offload
from worldpm_lite.offload import CpuRuntime, CudaHost, CudaRuntime, HostLayers, LayerStream, host_bytes
from worldpm_lite.offload_plan import stream_plan
from worldpm_lite.options import Offload
from worldpm_lite.plan import GIB, WORLDPM_72B
from worldpm_lite.scorer import Scorer

OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation


class FakeCudart:
    """torch.cuda.cudart() as pinning uses it, over a host that can page-lock `lockable` bytes: a
    registration past that fails with cudaErrorMemoryAllocation, which stays the runtime's last error
    until cudaGetLastError reads it. Every call is logged."""

    def __init__(self, lockable=1 << 40, log=None):
        self.lockable, self.log = lockable, [] if log is None else log
        self.locked, self.last_error = {}, 0

    def cudaError(self, err):  # the binding's names
        return err

    def cudaHostRegister(self, ptr, size, flags):
        self.log.append(("cudaHostRegister", ptr, size, flags))
        if sum(self.locked.values()) + size > self.lockable:
            self.last_error = OUT_OF_MEMORY
            return OUT_OF_MEMORY
        self.locked[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        self.log.append(("cudaHostUnregister", ptr))
        del self.locked[ptr]
        return 0

    def cudaGetLastError(self):
        self.log.append(("cudaGetLastError",))
        err, self.last_error = self.last_error, 0
        return err

    def cudaGetErrorString(self, err):
        return {OUT_OF_MEMORY: "out of memory"}.get(err, f"error {err}")


class OldCudart(FakeCudart):
    """The binding as torch ships it: no cudaGetLastError."""

    cudaGetLastError = None


class OtherRuntime(FakeCudart):
    """A cudaGetLastError of another CUDA runtime than the one that failed: it has no error to read."""

    def cudaGetLastError(self):  # the binding's names
        return 0


@pytest.fixture
def cudart(monkeypatch):
    """torch.cuda.cudart() is a FakeCudart (set `.lockable`), and torch's pinned allocator refuses to run."""
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)

    def pin_memory(self, *args, **kwargs):
        raise AssertionError("Tensor.pin_memory called: a power-of-two pinned copy of the host layers")

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return fake


def template():
    return torch.nn.Sequential(torch.nn.Linear(4, 4))


def registered(cudart):
    return [c for c in cudart.log if c[0] == "cudaHostRegister"]


def test_cuda_runtime_is_one_torch_cuda_call_per_ordering():
    cuda = FakeCuda()
    with cuda.queued():
        rt = CudaRuntime(torch.device("cuda:1"), cuda=cuda)
        assert cuda.log == [("new stream", "cuda:1")]
        after, done, e = rt.event(), rt.event(), rt.event()
        dst, src, buf = torch.zeros(4), torch.arange(4.0), torch.zeros(8)
        rt.copy(dst, src, after, done)  # on the side stream: wait for `after`, copy, then record `done`
        assert cuda.log[1:] == [("wait", "side", after.id), ("copy", "side", dst.data_ptr(), True),
                                ("record", "side", done.id)]
        assert torch.equal(dst, src) and cuda.current is cuda.compute
        del cuda.log[1:]
        rt.copy(dst, src, None, done)  # a slot never used before waits for nothing
        rt.wait(e)  # the compute stream (the layers' device's current stream) waits
        rt.record(e)  # and records
        rt.copy_target(buf)  # the side stream writes buf: the allocator must know
        rt.drain()
    assert cuda.log[1:] == [("copy", "side", dst.data_ptr(), True), ("record", "side", done.id),
                            ("wait", "compute", e.id), ("record", "compute", e.id),
                            ("record_stream", buf.data_ptr(), "side"), ("synchronize", "side")]
    assert cuda.devices == [torch.device("cuda:1")] * 2  # cuda:1's current stream, not the current device's


def test_ring_buffers_are_marked_for_the_side_stream_and_close_drains():
    log, stream = run_ring(STREAMED, 2, [STREAMED])
    marks = [k for k, op in enumerate(log) if op[0] == "record_stream"]
    assert [log[k] for k in marks] == [("record_stream", b.data_ptr(), "side") for b in stream.buffers]
    assert max(marks) < min(k for k, op in enumerate(log) if op[0] == "copy")
    assert log[-1][0] == "record"  # a pass leaves the next pass's first copies queued
    n = len(log)
    stream.close()
    stream.close()  # idempotent
    assert log[n:] == [("synchronize", "side")]
    with pytest.raises(RuntimeError, match="asked for after close"), stream.layer(0):
        pass


def test_dropping_the_stream_drains_it_and_the_host_memory_is_unpinned_after(cudart):
    cuda = FakeCuda()
    cudart.log = cuda.log  # one log for both: their order
    host = HostLayers(template(), len(STREAMED), pinned=True)
    log, stream = run_ring(STREAMED, 2, [STREAMED[:3]], cuda=cuda, host=host)  # a pass that stopped midway
    assert log[-1][0] == "record" and stream.runtime.drain in host.before_release
    pinned = [c[1] for c in registered(cudart)]
    n = len(log)
    del stream
    assert log[n:] == [("synchronize", "side")]
    del host
    assert log[n + 1:] == [("synchronize", "side")] + [("cudaHostUnregister", p) for p in pinned]
    assert not cudart.locked


def test_unpinning_drains_whatever_reads_the_memory_first(cudart):
    host = HostLayers(template(), 2, pinned=True)
    host.before_release.append(lambda: cudart.log.append(("drained",)))
    del host
    gc.collect()
    assert [op[0] for op in cudart.log][-3:] == ["drained", "cudaHostUnregister", "cudaHostUnregister"]


def test_dropping_a_scorer_drains_its_stream(tiny_dir, monkeypatch):
    drained = []
    monkeypatch.setattr(CpuRuntime, "drain", lambda self: drained.append(self))
    scorer = Scorer.from_pretrained(tiny_dir, device="cpu", token_budget=64, offload=Offload((1, 2)))
    scorer.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    runtime = scorer.model.streamer.runtime
    del scorer
    gc.collect()
    assert drained == [runtime]


def test_pinning_registers_each_layer_portable_where_it_lies_and_unregisters_when_freed(cudart):
    host = HostLayers(template(), 3, pinned=True)
    calls = registered(cudart)
    assert calls and all(flags & 1 for *_, flags in calls)  # cudaHostRegisterPortable: every GPU sees it pinned
    assert calls[0][1] == host.data.data_ptr() and sum(size for _, _, size, _ in calls) == host.data.numel()
    assert all(a[1] + a[2] == b[1] for a, b in zip(calls, calls[1:]))  # back to back, over the one allocation
    assert all(p % PAGESIZE == size % PAGESIZE == 0 for _, p, size, _ in calls)  # whole pages: none shared by two
    for j in range(3):  # each layer's bytes lie in one registration (none straddles two)
        start = host.layer(j).data_ptr()
        assert any(p <= start and start + host.stride <= p + size for _, p, size, _ in calls)
    assert host.pinned == 3 and not any(op[0] == "cudaGetLastError" for op in cudart.log)
    del host
    assert [op[1] for op in cudart.log if op[0] == "cudaHostUnregister"] == [c[1] for c in calls]


@pytest.mark.parametrize("lockable_layers", [2, 0])
def test_a_failed_registration_is_cleared_logged_once_and_streams_pageable(cudart, caplog, lockable_layers):
    t = template()
    layer_pages = -(-offload.layer_layout(t)[1] // PAGESIZE) * PAGESIZE
    cudart.lockable = lockable_layers * layer_pages  # the host cannot lock all three layers (or any)
    with caplog.at_level(logging.WARNING, logger="worldpm_lite.offload"):
        host = HostLayers(t, 3, pinned=True)
    assert cudart.last_error == 0  # read and cleared, right after each failure
    failed = [k for k, op in enumerate(cudart.log) if op[0] == "cudaHostRegister" and op[1] not in cudart.locked]
    assert len(failed) == 3 - lockable_layers and all(cudart.log[k + 1] == ("cudaGetLastError",) for k in failed)
    records = [r for r in caplog.records if r.name == "worldpm_lite.offload"]
    assert len(records) == 1, [r.getMessage() for r in records]  # one line, however many layers failed
    record = records[0]
    assert f"failed for {3 - lockable_layers} of them (out of memory (cudaError 2))" in record.getMessage()
    assert "pageable" in record.getMessage() and host.pinned == lockable_layers
    for j in range(3):
        host.put(j, "0.weight", torch.full((4, 4), float(j)))
        host.put(j, "0.bias", torch.zeros(4))
    stream = LayerStream(host, t, (0, 1, 2), 2, torch.device("cpu"))  # every layer still streams, pinned or not
    for i in (0, 1, 2, 0):
        with stream.layer(i) as module:
            assert module[0].weight[0, 0].item() == i
    where = f"({lockable_layers} of 3 layers pinned, the rest pageable)" if lockable_layers else "from host memory ("
    assert where in stream.describe()
    pinned = list(cudart.locked)
    del stream, host
    assert [op[1] for op in cudart.log if op[0] == "cudaHostUnregister"] == pinned


def test_a_failure_that_cannot_be_cleared_stops_and_undoes_the_pinning(monkeypatch):
    fake = OldCudart(lockable=1)  # the first layer fails
    monkeypatch.setattr(offload, "loaded_cuda_get_last_error", lambda: None)
    with pytest.raises(RuntimeError, match="expected cudaGetLastError in torch.cuda.cudart"):
        HostLayers(template(), 2, pinned=True, cuda=CudaHost(fake))
    fake = OldCudart(lockable=HostLayers(template(), 1, pinned=False).pitch)  # the second layer fails
    with pytest.raises(RuntimeError, match="out of memory") as caught:
        HostLayers(template(), 2, pinned=True, cuda=CudaHost(fake))
    assert caught.tb is not None and not fake.locked  # unpinned at once, not when the error's frames are freed
    with pytest.raises(RuntimeError, match="reading that error back"):
        HostLayers(template(), 2, pinned=True, cuda=CudaHost(OtherRuntime(lockable=0)))


def test_the_loaded_cuda_runtime_is_found_in_the_process_maps(tmp_path):
    find = offload.loaded_cuda_get_last_error
    maps = tmp_path / "maps"
    line = "7f00-7f01 r-xp 00000000 08:01 42   {}\n"
    maps.write_text(line.format("/usr/lib/libc.so.6"))
    assert find(str(maps)) is None  # no CUDA runtime loaded
    maps.write_text(line.format("/a/libcudart.so.12") + line.format("/b/libcudart.so.11.0"))
    assert find(str(maps)) is None  # two: which one torch calls is unknown
    maps.write_text(line.format(tmp_path / "libcudart.so.12"))
    assert find(str(maps)) is None  # gone since it was mapped
    assert find(str(tmp_path / "no-maps")) is None


def test_the_plan_counts_the_host_allocation_as_made():
    host = HostLayers(template(), 3, pinned=False)
    assert host.data.untyped_storage().nbytes() == host_bytes(3, host.stride)
    from worldpm_lite.checkpoint import GPTQSpec
    from worldpm_lite.model import meta_model

    p = stream_plan(meta_model(WORLDPM_72B, GPTQSpec(4, 128)), 24 * GIB, 8 * GIB)
    padding = p.pinned - len(p.streamed) * p.layer_bytes  # each layer's pages its own, and one page to align
    assert p.pinned == host_bytes(len(p.streamed), p.layer_bytes) and 0 < padding <= (len(p.streamed) + 1) * PAGESIZE
    assert p.host_needed == p.pinned + p.embed_bytes + GIB and "needing no more" in p.refusal("72b")
