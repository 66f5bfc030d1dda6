"""vendor_dia2: a from-scratch runtime for Dia2 checkpoints in the published format (pure torch)."""

from .api import Dia2, GenerationResult
from .config import PRESETS, ConfigError, Dia2Config
from .checkpoint import CheckpointError
from .runtime import FrameStepper, SamplingParams

__all__ = ["Dia2", "GenerationResult", "Dia2Config", "ConfigError", "CheckpointError", "FrameStepper",
           "SamplingParams", "PRESETS"]
