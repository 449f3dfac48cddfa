import json
import shutil

import pytest
import torch
from helpers import SMALL
from safetensors.torch import save_file

from worldpm_lite.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, write_checkpoint


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_reads_sharded_checkpoint(small_dir, small_state):
    ckpt = Checkpoint(small_dir)
    assert (small_dir / INDEX_FILE).exists()
    assert len({v for v in ckpt.weight_map.values()}) >= 2
    assert ckpt.config == SMALL
    for name in ("model.layers.1.mlp.down_proj.weight", "score.2.bias"):
        assert torch.equal(ckpt.tensor(name), small_state[name])


def test_single_file_and_remote_code_config_and_lm_head_ignored(tmp_path, small_state):
    out = write_checkpoint(tmp_path / "m", SMALL, small_state | {"lm_head.weight": torch.zeros(4, 128)},
                           extra_config={"architectures": ["Qwen2ForRewardModel"],
                                         "auto_map": {"AutoModel": "modeling_worldpm.Qwen2ForRewardModel"}})
    (out / "modeling_worldpm.py").write_text("raise SystemExit('checkpoint code must never run')\n")
    ckpt = Checkpoint(out)
    assert "lm_head.weight" not in ckpt.weight_map
    assert ckpt.config.hidden_size == 128


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_index(d, fn):
    idx = json.loads((d / INDEX_FILE).read_text())
    fn(idx["weight_map"])
    (d / INDEX_FILE).write_text(json.dumps(idx))


def test_missing_config_field(tmp_path, small_dir):
    d = copy_ckpt(small_dir, tmp_path / "c")
    edit_config(d, num_hidden_layers=None)
    with pytest.raises(CheckpointError, match=r"config.json: missing field 'num_hidden_layers'"):
        Checkpoint(d)


def test_missing_config_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        Checkpoint(tmp_path / "empty")


def test_missing_shard(tmp_path, small_dir):
    d = copy_ckpt(small_dir, tmp_path / "c")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002.safetensors' is missing"):
        Checkpoint(d)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_path_leaving_directory(tmp_path, small_dir, bad):
    d = copy_ckpt(small_dir, tmp_path / "c")
    edit_index(d, lambda wm: wm.__setitem__("model.norm.weight", bad))
    with pytest.raises(CheckpointError, match="leaves the model directory"):
        Checkpoint(d)


def test_index_names_absent_tensor(tmp_path, small_dir):
    d = copy_ckpt(small_dir, tmp_path / "c")
    def move(wm):
        other = next(s for s in set(wm.values()) if s != wm["model.norm.weight"])
        wm["model.norm.weight"] = other
    edit_index(d, move)
    with pytest.raises(CheckpointError, match=r"names tensor 'model.norm.weight'.*does not contain it"):
        Checkpoint(d)


def test_shape_contradicts_config(tmp_path, small_state):
    bad = dict(small_state)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(255, 128)
    out = write_checkpoint(tmp_path / "m", SMALL, bad)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \[255, 128\], "
                                              r"config.json implies \[256, 128\]"):
        Checkpoint(out)


def test_config_contradicts_tensors(tmp_path, small_dir):
    d = copy_ckpt(small_dir, tmp_path / "c")
    edit_config(d, intermediate_size=512)
    with pytest.raises(CheckpointError, match="config.json implies"):
        Checkpoint(d)


def test_missing_head(tmp_path, small_state):
    out = write_checkpoint(tmp_path / "m", SMALL, {k: v for k, v in small_state.items() if not k.startswith("score")})
    with pytest.raises(CheckpointError, match=r"reward head.*score.0.weight.*missing"):
        Checkpoint(out)


def test_missing_layer_tensor(tmp_path, small_state):
    out = write_checkpoint(tmp_path / "m", SMALL,
                           {k: v for k, v in small_state.items() if k != "model.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.k_proj.bias' missing"):
        Checkpoint(out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_head(tmp_path, small_state, value):
    bad = dict(small_state)
    bad["score.0.weight"] = small_state["score.0.weight"].clone()
    bad["score.0.weight"][3, 5] = value
    out = write_checkpoint(tmp_path / "m", SMALL, bad)
    with pytest.raises(CheckpointError, match=r"'score.0.weight' has non-finite values"):
        Checkpoint(out)


def test_unsupported_dtype(tmp_path, small_state):
    out = write_checkpoint(tmp_path / "m", SMALL, small_state)
    tensors = dict(small_state)
    tensors["model.norm.weight"] = torch.ones(128, dtype=torch.int8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has dtype I8; supported: F32, F16, BF16"):
        Checkpoint(out)


def test_unexpected_tensor(tmp_path, small_state):
    out = write_checkpoint(tmp_path / "m", SMALL, small_state | {"model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        Checkpoint(out)


def test_write_refuses_existing_and_leaves_nothing_on_failure(tmp_path, small_state):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "exists", SMALL, small_state)
    with pytest.raises(AttributeError):
        write_checkpoint(tmp_path / "broken", SMALL, {"x": "not a tensor"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
