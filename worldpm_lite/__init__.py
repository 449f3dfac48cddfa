"""worldpm-lite: WorldPM-72B preference scores on the hardware people have.

    from worldpm_lite import Scorer

The names below are imported on first use, so that importing the package (the command line's
`--help`, say) does not import torch.
"""

import importlib

__version__ = "0.1.0"
_PUBLIC = {"Scorer": "scorer", "Comparison": "scorer", "Ranking": "scorer", "Checkpoint": "checkpoint",
           "CheckpointError": "checkpoint", "WorldPMConfig": "checkpoint", "RuntimeOptions": "options",
           "InputError": "errors"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
