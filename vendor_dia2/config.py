"""Dia2 configuration: the published `config.json` layout, its defaults, and our presets.

`config.json` has four blocks (`data`, `model`, `runtime`, `assets`); see DIA2_SPEC.md §2.
Keys without a default are required, and every problem found is reported at once, by key.
"""

from __future__ import annotations

import enum
import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

# The frame clock is Mimi's: 24 kHz audio in frames of 1920 samples (80 ms), 12.5 a second.
SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1_920
FRAME_RATE = SAMPLE_RATE / FRAME_SAMPLES
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
# Size of the sampler's candidate table: the largest top-k any request may ask for.
MAX_TOP_K = 256


class Kernels(enum.StrEnum):
    """How the depformer runs: torch ops (eager or compiled), or the fused Triton kernels (CUDA)."""

    TORCH = "torch"
    TRITON = "triton"


class Weights(enum.StrEnum):
    """The depformer projections' number format: bf16, or fp8 (e4m3, one scale per row; Triton only)."""

    BF16 = "bf16"
    FP8 = "fp8"


class Sampler(enum.StrEnum):
    """How each draw (CFG, top-k, the draw) runs: auto (the fused kernel with the Triton kernels,
    torch elsewhere), torch (sorted candidates), triton (one fused kernel a draw, CUDA). The same
    tokens either way."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class PrefixBoundaryName(enum.StrEnum):
    """How a turn continues a voice prefix (`runtime.PrefixBoundary`; docs/parity.md P5-P6)."""

    UPSTREAM = "upstream"  # as the published runtime: repeat the last prefix position, sample its delayed tail
    CLEAN = "clean"  # continue after the prefix, teacher-forcing the known codes


ACTIVATIONS = ("silu", "linear", "gelu", "relu")


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class DataConfig:
    channels: int
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int
    text_pad_token_id: int
    text_new_word_token_id: int
    action_pad_token_id: int
    action_new_word_token_id: int
    text_zero_token_id: int = 7
    audio_pad_token_id: int | None = None  # default A - 1
    audio_bos_token_id: int | None = None  # default A - 2
    delay_pattern: tuple[int, ...] = ()
    first_word_min_start: int = 0
    max_pad: int = 0
    second_stream_ahead: int = 0
    tokenizer_path: str | None = None

    @property
    def num_codebooks(self) -> int:
        return self.channels - 2

    @property
    def audio_pad(self) -> int:
        return self.audio_vocab_size - 1 if self.audio_pad_token_id is None else self.audio_pad_token_id

    @property
    def audio_bos(self) -> int:
        return self.audio_vocab_size - 2 if self.audio_bos_token_id is None else self.audio_bos_token_id

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern, default=0)


@dataclass(frozen=True)
class TransformerConfig:
    n_layer: int
    n_embd: int
    n_hidden: int
    gqa_query_heads: int
    kv_heads: int
    gqa_head_dim: int
    low_rank_dim: int | None = None
    # depformer-only keys (ignored for the decoder)
    apply_rope: bool = True
    text_embedding: bool = True
    mlp_activations: tuple[str, str] = ("silu", "linear")


@dataclass(frozen=True)
class ModelConfig:
    decoder: TransformerConfig
    depformer: TransformerConfig
    decoder_mlp_activations: tuple[str, str] = ("silu", "linear")
    dropout: float = 0.0
    rope_min_timescale: float = 1.0
    rope_max_timescale: float = 10000.0
    normalization_layer_epsilon: float = 1e-5


@dataclass(frozen=True)
class RuntimeConfig:
    weights_schedule: tuple[int, ...]
    max_context_steps: int = 1500


@dataclass(frozen=True)
class AssetsConfig:
    tokenizer: str | None = None
    mimi: str | None = None


@dataclass(frozen=True)
class Dia2Config:
    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    assets: AssetsConfig = field(default_factory=AssetsConfig)

    @property
    def num_stages(self) -> int:
        return self.data.num_codebooks - 1

    @property
    def num_weight_sets(self) -> int:
        return max(self.runtime.weights_schedule) + 1

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "Dia2Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config.json not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> "Dia2Config":
        problems: list[str] = []
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        data = _read_block(raw, "data", DataConfig, problems, _DATA_TYPES)
        model = _read_model(raw.get("model"), problems)
        runtime_raw = raw.get("runtime")
        if not isinstance(runtime_raw, dict):
            problems.append("runtime: block is required and must be an object")
            runtime_raw = {}
        assets = _read_block(raw, "assets", AssetsConfig, problems, _ASSETS_TYPES, optional=True)
        if problems:
            raise ConfigError(_format(source, problems))
        stages = data.num_codebooks - 1
        schedule = runtime_raw.get("weights_schedule", list(range(stages)))
        max_ctx = runtime_raw.get("max_context_steps", 1500)
        if not _is_int_list(schedule):
            problems.append("runtime.weights_schedule: must be a list of integers")
        elif len(schedule) != stages:
            problems.append(f"runtime.weights_schedule: needs {stages} entries (one per depformer stage), found {len(schedule)}")
        elif min(schedule) < 0:
            problems.append("runtime.weights_schedule: ids must be >= 0")
        if not _is_int(max_ctx) or max_ctx <= 0:
            problems.append("runtime.max_context_steps: must be a positive integer")
        # The cross-field checks still run when only the runtime block is wrong (a valid placeholder
        # stands in for it), so e.g. a short weights_schedule and a short delay_pattern are both reported.
        if problems:
            runtime = RuntimeConfig(tuple(range(max(stages, 0))))
        else:
            runtime = RuntimeConfig(tuple(schedule), max_ctx)
        cfg = cls(data=data, model=model, runtime=runtime, assets=assets)
        problems.extend(cfg._consistency_problems())
        if problems:
            raise ConfigError(_format(source, problems))
        return cfg

    def _consistency_problems(self) -> list[str]:
        d, dec, dep = self.data, self.model.decoder, self.model.depformer
        out = []
        if d.channels < 3:
            out.append(f"data.channels: must be at least 3 (2 text + audio), found {d.channels}")
        if len(d.delay_pattern) != d.num_codebooks:
            out.append(f"data.delay_pattern: needs {d.num_codebooks} entries (channels - 2), found {len(d.delay_pattern)}")
        if any(x < 0 for x in d.delay_pattern):
            out.append("data.delay_pattern: delays must be >= 0")
        if d.audio_vocab_size < 3:
            out.append("data.audio_vocab_size: must be at least 3")
        if d.action_vocab_size < 2:
            out.append("data.action_vocab_size: must be at least 2 (pad, new_word)")
        for key in ("text_pad_token_id", "text_new_word_token_id", "text_zero_token_id"):
            if not 0 <= getattr(d, key) < d.text_vocab_size:
                out.append(f"data.{key}: {getattr(d, key)} is outside the text vocab [0, {d.text_vocab_size})")
        for name, block in (("decoder", dec), ("depformer", dep)):
            if block.gqa_query_heads % block.kv_heads:
                out.append(f"model.{name}: gqa_query_heads ({block.gqa_query_heads}) must be a multiple of kv_heads ({block.kv_heads})")
            if block.gqa_head_dim % 2:
                out.append(f"model.{name}.gqa_head_dim: must be even for RoPE")
        if dep.kv_heads != dep.gqa_query_heads:
            out.append("model.depformer: kv_heads must equal gqa_query_heads (in_proj yields q, k, v with the same heads)")
        for acts, where in ((self.model.decoder_mlp_activations, "model.linear.mlp_activations"),
                            (dep.mlp_activations, "model.depformer.mlp_activations")):
            if len(acts) != 2 or any(a not in ACTIVATIONS for a in acts):
                out.append(f"{where}: two of {ACTIVATIONS} expected, found {list(acts)}")
        return out

    # -- writing ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.data).items() if v is not None}
        dec = {k: v for k, v in asdict(self.model.decoder).items()
               if k in _DECODER_KEYS and v is not None}
        dep = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.model.depformer).items() if v is not None}
        return {
            "data": data,
            "model": {
                "decoder": dec,
                "depformer": dep,
                "linear": {"mlp_activations": list(self.model.decoder_mlp_activations)},
                "dropout": self.model.dropout,
                "rope_min_timescale": self.model.rope_min_timescale,
                "rope_max_timescale": self.model.rope_max_timescale,
                "normalization_layer_epsilon": self.model.normalization_layer_epsilon,
            },
            "runtime": {"weights_schedule": list(self.runtime.weights_schedule),
                        "max_context_steps": self.runtime.max_context_steps},
            "assets": {k: v for k, v in asdict(self.assets).items() if v is not None},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# -- presets -----------------------------------------------------------------------------------

def _preset(dec_layers: int, dec: tuple[int, ...], dep: tuple[int, ...], dep_layers: int, vocab: int,
            delays: tuple[int, ...], schedule: tuple[int, ...], ahead: int, ids: tuple[int, int, int],
            mimi: str) -> Dia2Config:
    pad, new_word, zero = ids
    return Dia2Config(
        data=DataConfig(channels=34, text_vocab_size=vocab, audio_vocab_size=2050, action_vocab_size=2,
                        text_pad_token_id=pad, text_new_word_token_id=new_word, text_zero_token_id=zero,
                        action_pad_token_id=0, action_new_word_token_id=1,
                        audio_pad_token_id=2049, audio_bos_token_id=2048,
                        delay_pattern=delays, second_stream_ahead=ahead),
        model=ModelConfig(
            decoder=TransformerConfig(dec_layers, *dec),
            depformer=TransformerConfig(dep_layers, *dep),
        ),
        runtime=RuntimeConfig(weights_schedule=schedule, max_context_steps=1500),
        assets=AssetsConfig(mimi=mimi),
    )


# Random checkpoints name a random Mimi (`random-small` keeps CPU tests fast): their codes are not
# speech anyway, and nothing is downloaded.
# Full-size shapes are ASSUMPTIONS (DIA2_SPEC.md §13): the published configs were not readable here.
# The 128k text vocab of 1b/2b is likewise assumed; their tokenizer is our small one, so only the
# embedding rows beyond it go unused.
_DIA2_DELAYS = (16,) + (18,) * 31
_BIG_DEC = (2048, 8192, 16, 4, 128)
_BIG_DEP = (1024, 4096, 16, 16, 64)

PRESETS: dict[str, Dia2Config] = {
    "tiny": _preset(2, (64, 128, 4, 2, 16), (32, 64, 2, 2, 16), 2, 512, (2,) + (3,) * 31,
                    tuple(i // 2 for i in range(31)), 2, (0, 3, 7), "random-small"),
    "1b": _preset(18, _BIG_DEC, _BIG_DEP, 4, 128_256, _DIA2_DELAYS, tuple(range(31)), 2, (0, 3, 7), "random"),
    "2b": _preset(24, _BIG_DEC, _BIG_DEP, 4, 128_256, _DIA2_DELAYS, tuple(range(31)), 2, (0, 3, 7), "random"),
}


def preset(name: str) -> Dia2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# -- helpers -----------------------------------------------------------------------------------

_DECODER_KEYS = ("n_layer", "n_embd", "n_hidden", "gqa_query_heads", "kv_heads", "gqa_head_dim", "low_rank_dim")
_INT = "int"
_DATA_TYPES = {
    "channels": _INT, "text_vocab_size": _INT, "audio_vocab_size": _INT, "action_vocab_size": _INT,
    "text_pad_token_id": _INT, "text_new_word_token_id": _INT, "action_pad_token_id": _INT,
    "action_new_word_token_id": _INT, "text_zero_token_id": _INT, "audio_pad_token_id": _INT,
    "audio_bos_token_id": _INT, "delay_pattern": "int_list", "first_word_min_start": _INT,
    "max_pad": _INT, "second_stream_ahead": _INT, "tokenizer_path": "str",
}
_ASSETS_TYPES = {"tokenizer": "str", "mimi": "str"}
_TRANSFORMER_TYPES = {
    "n_layer": _INT, "n_embd": _INT, "n_hidden": _INT, "gqa_query_heads": _INT, "kv_heads": _INT,
    "gqa_head_dim": _INT, "low_rank_dim": _INT, "apply_rope": "bool", "text_embedding": "bool",
    "mlp_activations": "str_list",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _type_ok(v: Any, kind: str) -> bool:
    if v is None:
        return True
    return {
        _INT: _is_int, "bool": lambda x: isinstance(x, bool), "str": lambda x: isinstance(x, str),
        "int_list": _is_int_list,
        "str_list": lambda x: isinstance(x, list) and all(isinstance(s, str) for s in x),
        "num": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    }[kind](v)


def _check_fields(raw: dict, where: str, cls: type, types: dict[str, str], problems: list[str]) -> dict | None:
    required = [f for f, spec in cls.__dataclass_fields__.items()
                if spec.default is spec.default_factory is MISSING and f in types]
    out: dict[str, Any] = {}
    ok = True
    for key in required:
        if key not in raw or raw[key] is None:
            problems.append(f"{where}.{key}: required key is missing")
            ok = False
    for key, value in raw.items():
        if key not in types:
            continue  # unknown keys are tolerated: newer checkpoints may add some
        if not _type_ok(value, types[key]):
            problems.append(f"{where}.{key}: expected {types[key]}, found {value!r}")
            ok = False
            continue
        if _is_int(value) and value < 0:
            problems.append(f"{where}.{key}: must be >= 0, found {value}")
            ok = False
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    return out if ok else None


def _read_block(raw: dict, name: str, cls: type, problems: list[str], types: dict[str, str], optional: bool = False):
    block = raw.get(name)
    if block is None and optional:
        return cls()
    if not isinstance(block, dict):
        problems.append(f"{name}: block is required and must be an object")
        return None
    fields = _check_fields(block, name, cls, types, problems)
    return cls(**fields) if fields is not None else None


def _read_model(block: Any, problems: list[str]) -> ModelConfig | None:
    if not isinstance(block, dict):
        problems.append("model: block is required and must be an object")
        return None
    parts = {}
    for name in ("decoder", "depformer"):
        sub = block.get(name)
        if not isinstance(sub, dict):
            problems.append(f"model.{name}: block is required and must be an object")
            continue
        fields = _check_fields(sub, f"model.{name}", TransformerConfig, _TRANSFORMER_TYPES, problems)
        if fields is not None:
            for key in ("n_layer", "n_embd", "n_hidden", "gqa_query_heads", "kv_heads", "gqa_head_dim"):
                if fields.get(key) == 0:
                    problems.append(f"model.{name}.{key}: must be positive")
            parts[name] = TransformerConfig(**fields)
    linear = block.get("linear") or {}
    acts = linear.get("mlp_activations", ["silu", "linear"]) if isinstance(linear, dict) else None
    if not (isinstance(acts, list) and all(isinstance(a, str) for a in acts)):
        problems.append("model.linear.mlp_activations: must be a list of two activation names")
        acts = ["silu", "linear"]
    scalars = {}
    for key, default in (("dropout", 0.0), ("rope_min_timescale", 1.0), ("rope_max_timescale", 10000.0),
                         ("normalization_layer_epsilon", 1e-5)):
        value = block.get(key, default)
        if not _type_ok(value, "num") or value is None:
            problems.append(f"model.{key}: expected a number, found {value!r}")
            value = default
        scalars[key] = float(value)
    if len(parts) != 2:
        return None
    return ModelConfig(decoder=parts["decoder"], depformer=parts["depformer"],
                       decoder_mlp_activations=tuple(acts), **scalars)


def _format(source: str, problems: list[str]) -> str:
    return f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
