"""offload.py's CUDA runtime on the CPU, over a fake torch.cuda: each call's streams and events, the
ring buffers marked for the side stream, and the drain on close and on drop."""

import gc

import pytest
import torch
from test_offload import STREAMED, FakeCuda, run_ring

from worldpm_lite.offload import CpuRuntime, CudaRuntime, Offload
from worldpm_lite.scorer import Scorer


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


def test_dropping_a_scorer_drains_its_stream(tiny_dir, monkeypatch):
    drained = []
    monkeypatch.setattr(CpuRuntime, "drain", lambda self: drained.append(self))
    scorer = Scorer.from_pretrained(tiny_dir, device="cpu", token_budget=64, offload=Offload((1, 2)))
    scorer.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    runtime = scorer.model.streamer.runtime
    del scorer
    gc.collect()
    assert drained == [runtime]
