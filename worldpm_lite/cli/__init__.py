"""worldpm-lite command line: one module per command, each with its flags (`add`) and its `run`.

A new command is a module here with those two functions, listed in COMMANDS. Nothing here imports
torch at module level: `worldpm-lite --help` and each command's `--help` answer without it.

Exit codes: 0 done; 1 a check failed (selfcheck, plan) or a bug (its traceback is shown); 2 the
input is wrong (an errors.InputError: one line naming the file, the field and what was expected);
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from . import demo, fidelity, make_tiny, plan, quantize, score, selfcheck, serve

COMMANDS = (score, serve, selfcheck, quantize, fidelity, plan, make_tiny, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldpm-lite",
        description="Run the WorldPM-72B preference model (and checkpoints of its architecture) on the hardware "
                    "you have. A score says how much humans would prefer the final assistant reply.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except InputError as e:
        print(f"worldpm-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("worldpm-lite: interrupted", file=sys.stderr)
        return 130
