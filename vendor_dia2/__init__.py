"""vendor_dia2: a from-scratch runtime for Dia2 checkpoints in the published format (pure torch).

The names below load on first use, so light modules (`vendor_dia2.config`: the frame clock and
the checkpoint's config) can be imported without torch, e.g. by a protocol client.
"""

import importlib

_EXPORTS = {"Dia2": "api", "GenerationResult": "api", "Dia2Config": "config", "ConfigError": "config",
            "PRESETS": "config", "CheckpointError": "checkpoint", "FrameStepper": "runtime",
            "SamplingParams": "runtime"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vendor_dia2' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
