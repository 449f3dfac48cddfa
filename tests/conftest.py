import os

import torch

# Triton kernels run in its interpreter when there is no GPU. Read when a kernel is defined, so it
# must be set before any test imports worldpm_lite.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import SMALL, add_tokenizer, random_state

from worldpm_lite.checkpoint import write_checkpoint
from worldpm_lite.tiny import cached_tokenizer_dir, tiny_model_dir


@pytest.fixture(scope="session")
def tokenizer_dir():
    return cached_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def small_state():
    return random_state(SMALL)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory, small_state):
    """A random small WorldPM checkpoint (fp32, two shards) with the Qwen tokenizer."""
    out = tmp_path_factory.mktemp("ckpt") / "small"
    write_checkpoint(out, SMALL, small_state, max_shard_bytes=40 << 20)
    return add_tokenizer(out)


CI_NOTES = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[CI_NOTES] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What the instrument measured this run (the small model's quality, the gate metrics), so the
    CI log shows it even when every test passes quietly."""
    notes = config.stash.get(CI_NOTES, [])
    if notes:
        terminalreporter.section("small-model instrument")
        for line in notes:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ci_notes(request):
    """Lines for the end-of-run summary."""
    return request.config.stash[CI_NOTES]


@pytest.fixture(scope="session")
def tiny_dir():
    """The trained small model (built once per cache, about 3 minutes)."""
    return tiny_model_dir(0)


@pytest.fixture(scope="session")
def tiny_heldout(tiny_dir):
    """The small model's held-out preference pairs (rebuilding them takes about 10 s)."""
    from worldpm_lite.tiny import heldout_pairs

    return heldout_pairs(tiny_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole run: starting one costs about 5 s.

    Ray starts its workers at nice 15. Beside any other busy process (another test run, a CI
    neighbour) they then get a few percent of a core, and a 10 s test took many minutes, so
    this cluster's workers run at the same priority as the test itself."""
    import ray  # the [ray] extra, part of [test]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_niceness": 0})
    yield
    ray.shutdown()
