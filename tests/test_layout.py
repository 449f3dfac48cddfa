"""The package's shape, as ARCHITECTURE.md describes it: no import cycle (imports inside functions
count), imports only downward by layer, kernels that import nothing of the package, no private name
imported from another module, a command line whose --help needs no torch, one exit code per kind of
failure, and one route table that the README agrees with."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from worldpm_lite import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worldpm_lite"

# ARCHITECTURE.md's layers: a module imports from its own layer or below, never above.
LAYERS = {
    0: ("errors", "options", "reference", "kernels", "checkpoint", "chat", "data", "devices", "hub"),
    1: ("quantize", "model", "qlinear", "packing", "offload"),
    2: ("scorer", "plan", "offload_plan", "stream", "blocks", "fidelity", "tiny", "instrument"),
    3: ("serve", "ray", "trl", "cli", "demo", "__main__"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported package module, names taken from it, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "worldpm_lite"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "worldpm_lite":
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            out.append((target, names, node.lineno))
            out += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in known]  # submodules
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _, _ in imports(name, path, known) if t in known and t != name}
            for name, path in mods.items()}


def layer(name: str) -> int:
    first = name.split(".")[1] if "." in name else ""
    return next(k for k, names in LAYERS.items() if first in names or first == "")


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walk above on a package that has one (a module importing its importer inside a function)."""
    pkg = tmp_path / "worldpm_lite"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="worldpm_lite.a -> worldpm_lite.b -> worldpm_lite.a"):
        test_no_import_cycles()


def test_imports_go_down_the_layers():
    every = {name for names in LAYERS.values() for name in names}
    mods = modules()
    unknown = sorted(n for n in mods if "." in n and n.split(".")[1] not in every)
    assert not unknown, f"modules without a layer in ARCHITECTURE.md (add them to LAYERS): {unknown}"
    up = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, targets in graph().items()
          for b in targets if layer(b) > layer(a)]
    assert not up, "imports against the layers: " + "; ".join(up)


def test_kernels_import_nothing_of_the_package():
    mods = modules()
    for name, path in mods.items():
        if name.startswith("worldpm_lite.kernels"):
            outside = [t for t, _, _ in imports(name, path, set(mods)) if not t.startswith("worldpm_lite.kernels")]
            assert not outside, f"{path.name} imports {outside}"


def test_no_private_name_is_imported_from_another_module():
    mods = modules()
    found = []
    for name, path in mods.items():
        for target, names, line in imports(name, path, set(mods)):
            found += [f"{path.relative_to(ROOT)}:{line}: {n} from {target}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
                   for a in node.names}
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                  and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, "private names used across modules: " + "; ".join(found)


def python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter in the repository's root (nothing imported yet), its output kept."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_help_answers_without_torch():
    code = ("import sys\n"
            "from worldpm_lite.cli import build_parser\n"
            "build_parser().format_help()  # every command's flags are added here\n"
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'ray', 'numpy') if m in sys.modules))\n")
    res = python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "worldpm_lite", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and all(c.__name__.rsplit(".", 1)[-1].replace("_", "-") in res.stdout
                                       for c in cli.COMMANDS)


def test_bad_input_is_one_line_and_a_bug_is_a_traceback(monkeypatch, tmp_path, capsys):
    """Exit 2 and one line for the package's own errors (InputError); a bug is not one of them: main
    lets it through, and the process shows its traceback and exits 1."""
    from worldpm_lite.cli import plan

    assert cli.main(["plan", "--model", str(tmp_path / "nope"), "--gpus", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldpm-lite: error: ") and err.count("\n") == 1 and "Traceback" not in err

    def bug(args):
        raise ValueError("a bug inside torch")  # not an InputError

    monkeypatch.setattr(plan, "run", bug)
    with pytest.raises(ValueError, match="a bug inside torch"):
        cli.main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB"])
    code = ("import sys\nfrom worldpm_lite import cli\nfrom worldpm_lite.cli import plan\n"
            "def bug(args):\n    raise ValueError('a bug inside torch')\n"
            "plan.run = bug\n"
            "sys.exit(cli.main(['plan', '--model', 'worldpm-72b', '--gpus', '24GiB']))\n")
    res = python(code)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ValueError: a bug inside torch" in res.stderr


def test_the_readme_lists_every_route():
    from worldpm_lite.serve.routes import ROUTES

    readme = (ROOT / "README.md").read_text()
    missing = [r.path for r in ROUTES if f"`{r.method} {r.path}`" not in readme and f"{r.path}`" not in readme]
    assert not missing, f"README.md does not list {missing}"


def test_the_public_import_paths_of_the_readme_work():
    """`from worldpm_lite import Scorer` (the package loads it lazily) and worldpm_lite.trl.WorldPMReward."""
    code = ("import sys, worldpm_lite\nassert 'torch' not in sys.modules\n"
            "from worldpm_lite import Scorer\nfrom worldpm_lite.scorer import Scorer as S\n"
            "from worldpm_lite.trl import WorldPMReward\n"
            "assert Scorer is S and callable(Scorer.from_pretrained) and callable(WorldPMReward)\n")
    res = python(code)
    assert res.returncode == 0, res.stderr
