import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worldpm_lite.cli import main
from worldpm_lite.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = [
    {"id": "m1", "messages": [{"role": "user", "content": "Tips for better sleep?"},
                              {"role": "assistant", "content": "Keep a fixed schedule."}]},
    {"prompt": "Tips for better sleep?", "chosen": "Keep a fixed schedule.", "rejected": "idk lol"},
    {"id": 3, "prompt": [{"role": "user", "content": "Tips for better sleep?"}],
     "responses": ["idk lol", "Keep a fixed schedule.", "Avoid screens."]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_all_formats_in_order(tmp_path, small_dir):
    inp = write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(small_dir), "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["id"] == "m1" and rows[2]["id"] == 3 and "id" not in rows[1]
    scorer = Scorer.from_pretrained(small_dir)
    fixed = scorer.compare("Tips for better sleep?", "Keep a fixed schedule.", "idk lol")
    assert rows[0]["score"] == pytest.approx(fixed.score_a, abs=1e-5)
    assert rows[1]["chosen_score"] == pytest.approx(fixed.score_a, abs=1e-5)
    assert rows[1]["rejected_score"] == pytest.approx(fixed.score_b, abs=1e-5)
    assert rows[1]["preferred"] == ("chosen" if fixed.score_a >= fixed.score_b else "rejected")
    assert rows[2]["scores"][1] == pytest.approx(fixed.score_a, abs=1e-5)
    assert rows[2]["preferred"] == max(range(3), key=rows[2]["scores"].__getitem__)


def test_score_to_stdout(tmp_path, small_dir, capsys):
    import torch

    inp = write_jsonl(tmp_path / "in.jsonl", REQUESTS[:1])
    assert main(["score", "--model", str(small_dir), "--input", str(inp)]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)) == {"id", "score"}
    # --device defaults to auto and the first line says what it resolved to
    first = captured.err.splitlines()[0]
    assert first.startswith("device: ") and (torch.cuda.is_available() or first == "device: cpu (no GPU visible)")


def test_bad_line_fails_without_output(tmp_path, small_dir, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(REQUESTS[0]) + "\n" + '{"prompt": "q", "chosen": 1, "rejected": "b"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(small_dir), "--input", str(inp), "--output", str(out)]) == 2
    assert re.search(r"in.jsonl:2: chosen: expected a string", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [inp]


def test_too_long_conversation_fails_or_truncates(tmp_path, small_dir, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "word " * 300, "responses": ["a"]}])
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(small_dir), "--input", str(inp), "--output", str(out)]) == 2
    assert "reads at most 96" in capsys.readouterr().err and not out.exists()
    assert main(["score", "--model", str(small_dir), "--input", str(inp), "--output", str(out), "--truncate"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", REQUESTS[:1])
    assert main(["score", "--model", str(tmp_path / "nope"), "--input", str(inp)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_selfcheck_small_model_prints_scores(small_dir, capsys):
    assert main(["selfcheck", "--model", str(small_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"README pair scores: \[-?\d+\.\d+, -?\d+\.\d+\]", out) and "not WorldPM-72B-shaped" in out


def test_published_check_for_72b():
    from worldpm_lite.reference import PUBLISHED_72B, matches_published

    assert matches_published(PUBLISHED_72B, 0.06)[0]
    assert matches_published([0.66, -1.60], 0.06)[0]  # bf16 noise on other hardware
    assert not matches_published([0.75, -1.64], 0.06)[0]  # a different model
    assert not matches_published([-1.64, 0.63], 5.0)[0]  # order flipped: never a pass


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "worldpm_lite", "score", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and '"chosen"' in res.stdout and "--truncate" in res.stdout


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(python3 -m venv .*)\n```", readme)
    assert len(blocks) == 2 and blocks[0].endswith("worldpm-lite demo") and "pytest" in blocks[1]
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()


def test_kernels_and_quantize_are_not_top_level():
    import worldpm_lite.kernels
    import worldpm_lite.quantize

    assert Path(worldpm_lite.kernels.__file__).parent.name == "kernels"
    assert Path(worldpm_lite.quantize.__file__).parent.name == "quantize"
    res = subprocess.run([sys.executable, "-c", "import quantize"], capture_output=True, text=True, cwd="/")
    assert res.returncode != 0
    # run from the repository's root (python -m puts it first on sys.path), `kernels` is PyPI's package
    # that transformers imports, not a folder of ours
    root = Path(__file__).parents[1]
    res = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], capture_output=True,
                         text=True, cwd=root)
    assert str(root / "kernels") not in res.stdout + res.stderr
