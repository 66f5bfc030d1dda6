"""Server configuration in one place: every setting is a CLI flag with an environment variable
(`DIA2_<NAME>`) as its default, so containers can be configured either way.

`ServerConfig` is the only home of defaults. The engine's settings (`EngineConfig`), the
connection limits (`Limits`) and the voice settings are built from it (`engine_config`,
`Limits.from_config`, `voice_settings`), never copied. Strings that name a choice are enums,
parsed once here at the edge.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
import re
from dataclasses import dataclass, field

from vendor_dia2.config import Kernels, PrefixBoundaryName, Sampler, Weights

from dia2stream.wire.protocol import CFG_SCALE_RANGE, MAX_MESSAGE_BYTES, MAX_TEXT_CHARS, SEED_RANGE, VOICE_NAME_RE

MIN_COMMAND_BYTES = 1024  # the smallest --max-command-bytes (limits.Limits refuses less)


class CompileMode(enum.StrEnum):
    """A switch decided by the device when `auto`: torch.compile inside the frame's CUDA graphs (on
    with CUDA), programmatic dependent launch between Triton kernels (on for Hopper and later), one
    step in flight (on where the device runs apart from the host: CUDA, the simulated GPU), the
    batched depformer's attention in one Triton launch (on where the Triton depformer runs)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @property
    def forced(self) -> bool | None:
        """The runtime's switch for this mode: None (auto: the device decides), True or False."""
        return None if self is CompileMode.AUTO else self is CompileMode.ON


class KernelChoice(enum.StrEnum):
    """The depformer kernels asked for: `auto` picks Triton where it can run (CUDA with triton)."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class GpuTilings(enum.StrEnum):
    """The Triton kernels' tile table (vendor_dia2/kernels.py GPU_TILINGS): auto picks the GPU's own."""

    AUTO = "auto"
    H100 = "H100"
    H200 = "H200"


class Switch(enum.StrEnum):
    ON = "on"
    OFF = "off"


class LogLevel(enum.StrEnum):
    """`--log-level`: a name `logging` knows, in any case."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"

    @classmethod
    def _missing_(cls, value):
        return cls.__members__.get(value.upper()) if isinstance(value, str) else None


class Dtype(enum.StrEnum):
    """`--dtype`: the names the model loader takes (vendor_dia2/api.py `_parse_dtype`)."""

    BF16 = "bf16"
    BFLOAT16 = "bfloat16"
    FP32 = "fp32"
    FLOAT32 = "float32"
    FP16 = "fp16"
    FLOAT16 = "float16"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    checkpoint: str | None = None  # None: the published model on a GPU, tiny on CPU (checkpoint_for)
    device: str | None = None
    dtype: str | None = None
    mimi: str | None = None
    simulate_gpu: str | None = None
    max_lead_ms: float = 1000.0
    seed: int = 0
    cfg_scale: float = 2.0
    context_frames: int | None = None
    threads: int | None = None
    compile: CompileMode = CompileMode.AUTO
    compile_max_calls: int | None = None
    kernels: KernelChoice = KernelChoice.AUTO
    weights: Weights = Weights.BF16
    sampler: Sampler = Sampler.AUTO  # the fused draw with the Triton kernels: faster at every batch size (run 39)
    pdl: CompileMode = CompileMode.AUTO  # programmatic dependent launch between Triton kernels
    persistent_stage: Switch = Switch.OFF  # each Triton depformer stage in one launch; off until measured faster
    compile_dynamic: Switch = Switch.OFF  # every shape dynamic from torch.compile's first compile: cold start
    graphed_swaps: Switch = Switch.ON  # slot moves as one CUDA graph replay each (with CUDA graphs): run 22
    decode_attention: CompileMode = CompileMode.OFF  # the decoder's attention over filled slots (Triton); off: run 21
    # the torch depformer's attention (batched rows) as one Triton launch a layer: auto = with the Triton depformer
    batched_stage_attention: CompileMode = CompileMode.AUTO
    gpu_tilings: GpuTilings = GpuTilings.AUTO  # the Triton kernels' tile table: the GPU's own, or a named model's
    log_level: str = "INFO"
    voice_dir: str | None = None
    voice_cache: str | None = None
    compile_cache: str | None = None
    max_voice_seconds: float = 30.0
    max_user_turn_seconds: float = 30.0
    whisper_model: str = "turbo"
    voices: tuple[str, ...] = ()  # NAME=PATH[,TRANSCRIPT], preloaded at start-up
    max_calls: int | None = None  # concurrent calls (slots); None = 1 on CPU, 64 on a GPU
    lead_in_frames: int = 1
    rollover_frames: int = 250
    prefix_boundary: PrefixBoundaryName = PrefixBoundaryName.UPSTREAM
    overload_refusal_s: float = 5.0
    # -- access and limits; turned into objects by http.HttpPolicy.from_config and
    # limits.Limits.from_config, documented in docs/operations.md
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    allowed_origins: str | None = None
    max_command_bytes: int = 64 * 1024
    max_voice_message_bytes: int = 8 * 1024 * 1024
    commands_per_second: float = 50.0
    command_burst: int = 100
    flood_close_s: float = 2.0  # sustained excess over the command rate before the connection is closed (1008)
    max_pending_text_chars: int = 16_384
    idle_timeout_s: float = 300.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    max_voices_per_connection: int = 4
    voice_cache_mb: int = 2048
    web: bool = True  # the playground and dashboard pages (issue 23); --no-web answers 404
    # -- a fleet behind a balancer (issue 22); docs/deploy.md
    agent_port: int | None = None  # HAProxy agent-check responder (serve/agent.py); None = off, 0 = a free port
    drain_timeout_s: float = 30.0  # SIGTERM: how long calls may finish their utterance; 0 = close at once
    http_port: int | None = None  # POST endpoints (ElevenLabs REST, /v1/speech) on their own port; None = off
    tls_cert: str | None = None  # PEM certificate (chain): the websocket port speaks wss:// (docs/compat.md)
    tls_key: str | None = None
    # -- liveness (issue 19); docs/operations.md
    engine_stall_s: float = 5.0  # calls waiting for a frame step this long: the engine has failed; 0 = no watchdog
    # the engine in a process of its own (serve/engine_process.py): connection work cannot slow the frame loop
    engine_process: Switch = Switch.ON
    # launch the next frame step before the host applies the last one's outputs (issue 18; H200 run 20:
    # same tokens on CUDA, one call's new-turn onset 233 -> 211 ms with decode_stream, 64 calls' step 19.6 -> 16.4 ms)
    step_in_flight: CompileMode = CompileMode.AUTO
    # the Mimi decode on a CUDA stream of its own, beside the next frame step (issue 18; measured with the above)
    decode_stream: Switch = Switch.ON
    # starting calls that read no codes yet step alone between full steps (issue 18; simulated, see docs/benchmarks.md)
    split_start_lanes: Switch = Switch.ON
    step_trace: str | None = None  # one JSON line per frame step the engine runs (engine/step_trace.py)

    def voice_settings(self, allow_download: bool = False, whisper_device: str | None = None):
        """Voice preparation's settings. Serving never downloads whisper weights (finding 11):
        without local weights a set_voice with no transcript is `transcript_required`. Whisper
        runs on `whisper_device` (the model's; None: cuda if available, else cpu)."""
        from dia2stream.voices.voice import VoiceSettings

        return VoiceSettings(voice_dir=self.voice_dir, max_seconds=self.max_voice_seconds,
                             whisper_model=self.whisper_model, whisper_device=whisper_device,
                             cache_dir=self.voice_cache, allow_download=allow_download,
                             cache_max_mb=self.voice_cache_mb or None)

    def engine_config(self, device, **overrides):
        """The engine's settings for a model on `device`: every field the two configs share is
        taken from here; `auto` choices are resolved for the device. `overrides` may name fields of
        either config (a ServerConfig field is replaced before anything is derived from it)."""
        from dia2stream.engine.engine import EngineConfig

        server_names = {f.name for f in dataclasses.fields(self)}
        config = dataclasses.replace(self, **{k: v for k, v in overrides.items() if k in server_names})
        engine_names = {f.name for f in dataclasses.fields(EngineConfig)}
        values = {name: getattr(config, name) for name in engine_names & server_names}
        values.update(max_calls=config.max_calls or default_max_calls(device),
                      compile=config.compile is CompileMode.ON or (config.compile is CompileMode.AUTO
                                                                    and _is_cuda(device)),
                      kernels=resolve_kernels(config.kernels, device),
                      voice=config.voice_settings(whisper_device=str(device)),
                      step_in_flight=config.step_in_flight == CompileMode.ON or (
                          config.step_in_flight == CompileMode.AUTO and (_is_cuda(device) or bool(config.simulate_gpu))),
                      decode_stream=config.decode_stream == Switch.ON,
                      split_start_lanes=config.split_start_lanes == Switch.ON)
        values.update({k: v for k, v in overrides.items() if k not in server_names})
        return EngineConfig(**values)


def default_max_calls(device) -> int:
    """One call on CPU; on a GPU, 64: measured on an H100 at the 2b shape, a batched step for 64
    calls (~25 ms) plus their batched Mimi decode (~4 ms) stays far inside a frame's 80 ms
    (docs/benchmarks.md). The engine still refuses calls if it ever falls behind."""
    return 64 if _is_cuda(device) else 1


def resolve_kernels(choice: KernelChoice, device) -> Kernels:
    """`--kernels auto`: the fused Triton depformer where it can run (CUDA with triton), else torch."""
    if choice is not KernelChoice.AUTO:
        return Kernels(choice.value)
    if not _is_cuda(device):
        return Kernels.TORCH
    from vendor_dia2 import kernels

    return Kernels.TRITON if kernels.available(device) else Kernels.TORCH


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    """`--device`: cpu, cuda or cuda:N (ValueError for anything else: the model runs on nothing else)."""
    if not _DEVICE.match(text):
        raise ValueError(text)
    return text


_FLAGS = [  # (name, type, help)
    ("host", str, "address to listen on"),
    ("port", int, "port to listen on, 0-65535 (0 picks a free one)"),
    ("checkpoint", str, "preset (tiny, 1b, 2b: random weights), local directory or Hugging Face repo id "
                        "(default: nari-labs/Dia2-2B on a GPU, tiny on CPU)"),
    ("device", device_name, "cpu, cuda, cuda:N (default: cuda if available)"),
    ("dtype", Dtype, "bf16, fp16 or fp32 (or bfloat16, float16, float32; default: bf16 on cuda, fp32 on cpu)"),
    ("mimi", str, "codec source: random, random-small, a path or repo id (default: the checkpoint's)"),
    ("simulate_gpu", str, "run on a simulated GPU timed by this profile (e.g. profiles/h100-2b.json): the whole "
                          "server is real except the frame step and the Mimi decode, which compute nothing and "
                          "take the profile's time; for measuring scheduling on a CPU (figures are simulated)"),
    ("max_lead_ms", float, "how far generation may run ahead of real-time playback, ms (more than 0)"),
    ("seed", int, f"default sampling seed ({SEED_RANGE[0]}-{SEED_RANGE[1]})"),
    ("cfg_scale", float, f"default CFG scale ({CFG_SCALE_RANGE[0]:g}-{CFG_SCALE_RANGE[1]:g}, as a start's cfg_scale); "
                         "1 runs a single branch (faster, no per-request CFG)"),
    ("context_frames", int, "frames before context_full (default: the model's limit, 1500 for Dia2); 0 = the "
                            "model's limit; more than the model's limit is clamped to it (a warning in the log)"),
    ("threads", int, "torch CPU threads; 0 = torch's own choice (default: 1 on a CPU-only machine with <= 2 "
                     "cores, else torch's choice)"),
    ("compile", CompileMode, "torch.compile inside the frame's CUDA graph: auto (on with cuda), on, off; "
                     "costs ~30 s once at start-up"),
    ("compile_max_calls", int, "with --compile: the largest padded batch (calls) that runs compiled; larger ones "
                               "run eager in their CUDA graphs (default: every batch size compiled, measured "
                               "fastest: docs/benchmarks.md)"),
    ("kernels", KernelChoice, "depformer kernels: auto (triton on cuda when triton is installed, else torch), torch, "
                     "triton (fused Triton kernels, five launches a layer; docs/benchmarks.md)"),
    ("sampler", Sampler, "how each draw (CFG, top-k, the draw) runs: auto (one fused Triton kernel a draw with the "
                         "triton kernels, else torch), torch (sorted candidates), triton; the same tokens either "
                         "way (H200: 0.7-1.0 ms a step faster fused, docs/benchmarks.md run 39)"),
    ("weights", Weights, "depformer projection weights: bf16, or fp8 (e4m3, one scale per row; needs the triton "
                     "kernels; changes some greedy tokens, measured in docs/benchmarks.md)"),
    ("pdl", CompileMode, "programmatic dependent launch between the triton kernels: auto (on for Hopper and later), on, "
                 "off (docs/benchmarks.md)"),
    ("gpu_tilings", GpuTilings, "the triton kernels' tile table: auto (the table swept on this GPU model, from its name; "
                         "the H100's for a model without one), H100, H200 (docs/benchmarks.md)"),
    ("persistent_stage", Switch, "run each Triton depformer stage (all its layers and the logits, at 1-4 rows) as one "
                                 "persistent launch with grid barriers instead of 21 launches: on, off "
                                 "(docs/benchmarks.md)"),
    ("compile_dynamic", Switch, "with --compile: every shape (batch, cache length) dynamic from the first compile, "
                                "one compile serving every batch size (a shorter cold start); off: torch's automatic "
                                "dynamic shapes, a compile per size until it marks them dynamic (docs/benchmarks.md)"),
    ("graphed_swaps", Switch, "move calls between slots (the stepper's and the Mimi stream's rows) as one CUDA "
                              "graph replay for up to 8 moves at once instead of a few hundred launches each, where "
                              "the steps run as CUDA graphs: on (the default), off (docs/benchmarks.md, run 22)"),
    ("decode_attention", CompileMode, "the decoder's attention in a step: off (SDPA over the cache window, the "
                                      "default), on (a Triton kernel over each call's filled cache slots), auto (on "
                                      "where the triton kernels run); off by default until compiled CUDA graphs with "
                                      "it draw eager's tokens (docs/benchmarks.md, run 21)"),
    ("batched_stage_attention", CompileMode, "the depformer's attention at more than 4 rows (the batched steps, which "
                                             "run the compiled torch stages) as one Triton launch a layer (q/k norms, "
                                             "RoPE map, cache write and attention) instead of ~6 kernels with "
                                             "SDPA; the projections stay cuBLAS: auto (on where the Triton depformer "
                                             "runs: CUDA with triton), on, off (SDPA)"),
    ("log_level", LogLevel, "DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)"),
    ("voice_dir", str, "folder that set_voice 'path' must lie in (default: no server-side paths)"),
    ("voice_cache", str, "where transcripts and prepared voices are cached (default: $DIA2_CACHE/voices)"),
    ("compile_cache", str, "where torch.compile and Triton keep compiled kernels (default: $DIA2_CACHE/compile; "
                           "TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, when set, win): keep it across restarts "
                           "for a warm start (docs/benchmarks.md, run 38)"),
    ("max_voice_seconds", float, "longest prefix audio per speaker, seconds (more than 0)"),
    ("max_user_turn_seconds", float, "longest caller's turn (user_turn audio), seconds (more than 0)"),
    ("whisper_model", str, "openai-whisper model name or checkpoint path for voice transcripts"),
    ("max_calls", int, "concurrent calls, one engine slot each; more get 'busy' (default: 1 on CPU, 64 on a GPU)"),
    ("lead_in_frames", int, "frames (80 ms each) sent before a turn's first word; silence before them is not sent; "
                            "0 or more and less than half the context (checked once the model is loaded)"),
    ("rollover_frames", int, "recent conversation (frames) kept when a full context is rebuilt; 0 = no rollover "
                             "(context_full and a reset instead); at most half the context is kept (a larger "
                             "value is clamped to it, with a warning in the log)"),
    ("prefix_boundary", PrefixBoundaryName, "how a turn continues a voice prefix: upstream (as the published runtime: repeats the "
                             "last prefix position, samples over the prefix's delayed tail) or clean (continues "
                             "after it, teacher-forcing the known codes); docs/parity.md P5-P6"),
    ("overload_refusal_s", float, "after a call fell behind real time, refuse new calls ('busy') until none has "
                                  "been behind for this long, seconds; 0 = never refuse for that reason"),
    # -- access and limits; see docs/operations.md
    ("auth_token", str, "token clients must present (Authorization: Bearer, or ?token=) for the websocket and "
                        "/metrics; /health stays open"),
    ("auth_token_file", str, "read the token from this file instead (keeps it out of the process list)"),
    ("allowed_origins", str, "comma list of browser origins allowed to connect, or *; without it browsers are "
                             "refused when there is no token"),
    ("max_command_bytes", int, f"largest message other than a set_voice or user_turn with audio, bytes (at least "
                               f"{MIN_COMMAND_BYTES})"),
    ("max_voice_message_bytes", int, f"largest set_voice or user_turn message with base64 audio, bytes (at most "
                                     f"{MAX_MESSAGE_BYTES}); 0 = no inline audio: voices by server path only, and a "
                                     "user_turn must fit --max-command-bytes"),
    ("commands_per_second", float, "commands per second a connection may send (excess: rate_limited); more than 0"),
    ("command_burst", int, "commands a connection may send at once before the rate applies; at least 1"),
    ("flood_close_s", float, "close a connection (1008) that stays over the command rate this long, or sends 10x "
                             "the burst over it, or keeps sending binary or oversize messages; 0 = only refuse, "
                             "never close"),
    ("max_pending_text_chars", int, "text queued on a call but not yet spoken (excess: pending_text_full)"),
    ("idle_timeout_s", float, "close a connection with no command and nothing generating after this; 0 = never"),
    ("ping_interval_s", float, "websocket keepalive ping interval, seconds; 0 = no pings"),
    ("ping_timeout_s", float, "drop a connection whose pong is this late, seconds; more than 0 (--ping-interval-s "
                              "0 turns the pings off)"),
    ("max_voices_per_connection", int, "distinct voices one connection may create (excess: too_many_voices); 0 = "
                                       "none (only the --voice preloads)"),
    ("voice_cache_mb", int, "disk for cached prepared voices, MiB; least recently used evicted; 0 = no limit"),
    ("web", bool, "serve the playground (/) and dashboard (/dashboard) pages; --no-web answers 404 for them"),
    # -- a fleet behind a balancer (issue 22); see docs/deploy.md
    ("agent_port", int, "answer HAProxy agent checks on this TCP port, 0-65535 (free capacity as 'up ready N%%', "
                        "'drain', 'down'); 0 picks a free one; off when unset"),
    ("drain_timeout_s", float, "on SIGTERM, how long calls may finish the utterance they are speaking before "
                               "they are closed (a second SIGTERM ends at once); 0 = close at once"),
    ("http_port", int, "port for the POST endpoints, 0-65535 (ElevenLabs REST text-to-speech, /v1/speech; "
                       "aiohttp, the [compat] extra); 0 picks a free one; unset = none (docs/compat.md)"),
    ("tls_cert", str, "PEM certificate (chain) file: the websocket port speaks wss:// (with --tls-key)"),
    ("tls_key", str, "PEM private key file of --tls-cert"),
    ("engine_stall_s", float, "no frame step for this long while calls wait for one: the engine has failed "
                              "(/health 503, calls get internal_error, the process exits 1); 0 = no watchdog"),
    ("engine_process", Switch, "run the engine in a process of its own, so connection work (parsing, floods, "
                               "encoding) cannot slow the frame loop: on, or off (one process: debugging)"),
    ("step_in_flight", CompileMode, "launch each frame step before the host has applied the last one's actions, PCM "
                                    "and end checks, so host work overlaps the GPU: auto (on with CUDA or a simulated "
                                    "GPU; on a CPU nothing runs beside the host), on, or off (each step applied before "
                                    "the next is launched); the tokens are the same either way"),
    ("decode_stream", Switch, "run each frame's Mimi decode on a CUDA stream of its own, so it overlaps the next "
                              "frame step (that step must be launched first: with --step-in-flight on): on, or off "
                              "(decodes and steps in one stream); no effect without CUDA graphs"),
    ("split_start_lanes", Switch, "while some new turns need the full frame step and others are still in their "
                                  "first ~16 steps (which read no codes), step the latter alone in the cheaper "
                                  "decoder-only lane between full steps: on, or off (all starting calls step "
                                  "together); the tokens are the same either way"),
    ("step_trace", str, "write one JSON line per frame step, batch of slot moves and piece of planned work the "
                        "engine runs to this file (why it ran, calls, padded batch, lane, the starting turns in it); "
                        "read it with python -m dia2stream.tools.step_trace FILE"),
]
_SECRETS = {"auth_token"}  # never echoed by --help, even when set through the environment
_ONE_OF = ("auth_token", "auth_token_file")  # one token source: a flag on the command line overrides the other's env


@dataclass(frozen=True)
class Bound:
    """The values a number flag may take: `low` (inclusive, or excluded with `above`) to `high`
    (inclusive); a float must be finite too. `note`: what a special value means, for the message."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    port: bool = False
    note: str = ""

    def refusal(self, value: float) -> str | None:
        """Why `value` is out of range (the end of a sentence about the flag), or None."""
        finite = not isinstance(value, float) or math.isfinite(value)
        if finite and (self.low is None or value > self.low or (value == self.low and not self.above)) \
                and (self.high is None or value <= self.high):
            return None
        if self.port:
            wanted = "a TCP port (0-65535)"
        elif self.high is not None:
            wanted = f"between {_number(self.low)} and {_number(self.high)}"
        elif self.above:
            wanted = f"more than {_number(self.low)}"
        elif self.low is not None:
            wanted = "0 or more" if self.low == 0 else f"at least {_number(self.low)}"
        else:
            wanted = "a number"
        return f"must be {'' if finite else 'a finite number, '}{wanted}" + (f" ({self.note})" if self.note else "")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


_PORT = Bound(0, 65535, port=True)
# Every int and float flag's range (tests/test_config.py checks that none is missing), from what
# the code does with it: a value outside would fail later with a traceback, or silently do nothing.
_BOUNDS: dict[str, Bound] = {
    "port": _PORT,
    "http_port": _PORT,
    "agent_port": _PORT,
    "max_lead_ms": Bound(0, above=True, note="a call steps only while its lead is below it"),
    "seed": Bound(*SEED_RANGE),
    "cfg_scale": Bound(*CFG_SCALE_RANGE),
    "context_frames": Bound(0, note="0 = the model's limit"),
    "threads": Bound(0, note="0 = torch's own choice"),
    "compile_max_calls": Bound(1),
    "max_voice_seconds": Bound(0, above=True),
    "max_user_turn_seconds": Bound(0, above=True),
    "max_calls": Bound(1),
    "lead_in_frames": Bound(0),
    "rollover_frames": Bound(0, note="0 = no rollover"),
    "overload_refusal_s": Bound(0, note="0 = never refuse for that reason"),
    "max_command_bytes": Bound(MIN_COMMAND_BYTES),
    "max_voice_message_bytes": Bound(0, MAX_MESSAGE_BYTES),
    "commands_per_second": Bound(0, above=True),
    "command_burst": Bound(1),
    "flood_close_s": Bound(0, note="0 = never close"),
    "max_pending_text_chars": Bound(MAX_TEXT_CHARS, note="one text"),
    "idle_timeout_s": Bound(0, note="0 = never"),
    "ping_interval_s": Bound(0, note="0 = no pings"),
    "ping_timeout_s": Bound(0, above=True, note="--ping-interval-s 0 turns the pings off"),
    "max_voices_per_connection": Bound(0),
    "voice_cache_mb": Bound(0, note="0 = no limit"),
    "drain_timeout_s": Bound(0, note="0 = close at once"),
    "engine_stall_s": Bound(0, note="0 = no watchdog"),
}

def _expected(kind) -> str:
    """What a flag's value must look like, for an error message."""
    if isinstance(kind, enum.EnumMeta):
        return "one of " + ", ".join(kind)
    return {int: "an integer", float: "a number", device_name: "cpu, cuda or cuda:N",
            bool: "1 or 0 (on or off)"}.get(kind, f"a valid {getattr(kind, '__name__', kind)}")


def _convert(kind, text: str):
    """A flag's value from its text (ValueError if it is not one)."""
    return _env_bool(text) if kind is bool else kind(text)


def _argument_type(kind):
    """argparse's `type` for a flag: the value, or an error that says what was expected (argparse's
    own says only "invalid CompileMode value")."""
    def convert(text: str):
        try:
            return _convert(kind, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {_expected(kind)}") from None

    convert.__name__ = getattr(kind, "__name__", str(kind))
    return convert


class _Store(argparse.Action):
    """`store`, remembering that the flag was given on the command line (`parser.given`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        parser.given.add(self.dest)


class _StoreBool(argparse.BooleanOptionalAction):
    """`--web` / `--no-web`, remembering it was given likewise."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        parser.given.add(self.dest)


def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """The configuration from the command line, over the environment's `DIA2_<FLAG>` defaults.
    Every value is checked here, where it can be (ranges, choices, files that must exist): a bad
    one is `server.py: error: ...` and exit status 2, never a traceback at start-up. What only the
    model can decide (the context, and the lead-in and rollover against it) is checked once it is
    loaded (`serve/server.py` run())."""
    environ = os.environ if environ is None else environ
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="server.py", description="dia2stream: streaming Dia2 TTS over websockets. "
                                     "Every flag can also be set by the environment variable DIA2_<FLAG>; a flag on "
                                     "the command line wins over the environment.")
    parser.given = set()  # the flags given on the command line (_Store)
    for name, kind, text in _FLAGS:
        env = "DIA2_" + name.upper()
        default = getattr(defaults, name)
        choices = list(kind) if isinstance(kind, enum.EnumMeta) else None
        if env in environ:
            try:
                default = _convert(kind, environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r}: expected {_expected(kind)}")
        shown = "(set)" if name in _SECRETS and default else default
        if kind is bool:  # --web / --no-web
            parser.add_argument("--" + name.replace("_", "-"), action=_StoreBool,
                                default=default, help=f"{text} [env {env}=1|0, default {shown}]")
            continue
        parser.add_argument("--" + name.replace("_", "-"), action=_Store, type=_argument_type(kind), default=default,
                            choices=choices, help=f"{text} [env {env}, default {shown}]")
    env_voices = tuple(v.strip() for v in environ.get("DIA2_VOICE", "").split(";") if v.strip())
    parser.add_argument("--voice", dest="voices", action="append", default=None, metavar="NAME=PATH[,TRANSCRIPT]",
                        help="preload a voice at start-up (repeatable; the first is the default voice; the transcript "
                             "may be @FILE) [env DIA2_VOICE, ';'-separated]")
    args = parser.parse_args(argv)
    values = vars(args)
    voices_from = "--voice" if values["voices"] else "DIA2_VOICE"
    values["voices"] = tuple(values["voices"]) if values["voices"] else env_voices

    def source(name: str) -> str:
        """Where a value came from, as the user wrote it: the flag, or the environment variable."""
        env = "DIA2_" + name.upper()
        return env if name not in parser.given and env in environ else "--" + name.replace("_", "-")

    for name, kind, _ in _FLAGS:
        value = values[name]
        if kind in (int, float) and value is not None:
            bound = _BOUNDS.get(name, Bound())
            why = bound.refusal(value)
            if why is not None:
                parser.error(f"{source(name)} {value!r}: {why}")
    # One token source. A flag on the command line overrides the other's environment variable
    # (the environment only gives the flags' defaults); both on the command line, or both in the
    # environment, is a mistake to say, not to resolve.
    given = [name for name in _ONE_OF if name in parser.given]
    for name in _ONE_OF:
        if given and name not in given:
            values[name] = None
    if all(values[name] is not None for name in _ONE_OF):
        parser.error(f"give {source('auth_token')} or {source('auth_token_file')}, not both")
    token, token_file = values["auth_token"], values["auth_token_file"]
    if token is not None and not token.strip():
        parser.error(f"{source('auth_token')} is empty (leave it unset for no token)")
    if token_file is not None and not os.path.exists(token_file):  # read at start-up (a pipe is fine)
        parser.error(f"{source('auth_token_file')} {token_file}: no such file")
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        parser.error("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key", "simulate_gpu"):
        if values[name] is not None and not os.path.exists(values[name]):
            parser.error(f"{source(name)} {values[name]}: no such file")
    if values["voice_dir"] is not None and not os.path.isdir(values["voice_dir"]):
        parser.error(f"{source('voice_dir')} {values['voice_dir']}: no such folder")
    for spec in values["voices"]:  # the format only: the files are read as the engine is built
        try:
            split_voice_spec(spec)
        except ValueError as exc:
            parser.error(f"{voices_from} {exc}")
    problem = _unwritable_folder(values["compile_cache"])
    if problem:
        parser.error(f"{source('compile_cache')} {values['compile_cache']}: {problem}")
    trace = values["step_trace"]
    if trace is not None and not os.path.isdir(os.path.dirname(os.path.abspath(trace))):
        parser.error(f"--step-trace: the folder of {trace} does not exist")
    return ServerConfig(**values)


def _unwritable_folder(path: str | None) -> str | None:
    """Why `path` cannot be a folder this process writes into (made if missing), or None."""
    if path is None:
        return None
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "cannot be written"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be made ({parent} is not a folder)"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be made ({parent} cannot be written)"


def split_voice_spec(spec: str) -> tuple[str, str, str]:
    """`--voice NAME=PATH[,TRANSCRIPT]` as (name, path, transcript: everything after the first
    comma, "" when none); ValueError naming the spec when it is not of that form."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"{spec!r}: expected NAME=PATH[,TRANSCRIPT]")
    if not VOICE_NAME_RE.match(name):
        raise ValueError(f"{spec!r}: the name must be 1-64 characters of A-Z a-z 0-9 _ . -")
    path, _, transcript = rest.partition(",")
    return name, path, transcript


def checkpoint_for(config: ServerConfig) -> str:
    """The checkpoint to serve: the configured one, else the published model where the model runs
    on CUDA and the random `tiny` elsewhere (a CPU cannot run the real one in real time)."""
    if config.checkpoint:
        return config.checkpoint
    from vendor_dia2.api import default_device
    from vendor_dia2.checkpoint import PUBLISHED_CHECKPOINT

    device = config.device or default_device().type
    return PUBLISHED_CHECKPOINT if str(device).startswith("cuda") else "tiny"
