"""worldpm-lite: WorldPM-72B preference scores on the hardware people have."""

from .checkpoint import Checkpoint, CheckpointError, WorldPMConfig
from .scorer import Comparison, Ranking, Scorer

__all__ = ["Checkpoint", "CheckpointError", "Comparison", "Ranking", "Scorer", "WorldPMConfig"]
__version__ = "0.1.0"
