"""Server configuration in one place: every setting is a CLI flag with an environment variable
(`DIA2_<NAME>`) as its default, so containers can be configured either way."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    checkpoint: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    mimi: str | None = None
    max_lead_ms: float = 1000.0
    seed: int = 0
    cfg_scale: float = 2.0
    context_frames: int | None = None
    threads: int | None = None
    compile: str = "auto"
    compile_max_calls: int | None = None
    kernels: str = "auto"
    weights: str = "bf16"
    pdl: str = "auto"
    log_level: str = "INFO"
    voice_dir: str | None = None
    voice_cache: str | None = None
    max_voice_seconds: float = 30.0
    whisper_model: str = "turbo"
    voices: tuple[str, ...] = ()  # NAME=PATH[,TRANSCRIPT], preloaded at start-up
    max_calls: int | None = None  # concurrent calls (slots); None = 1 on CPU, 64 on a GPU
    lead_in_frames: int = 1
    rollover_frames: int = 250
    prefix_boundary: str = "upstream"
    # -- access and limits (issue 13); turned into objects by http.HttpPolicy.from_config and
    # limits.Limits.from_config, documented in docs/operations.md
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    allowed_origins: str | None = None
    max_command_bytes: int = 64 * 1024
    max_voice_message_bytes: int = 8 * 1024 * 1024
    commands_per_second: float = 50.0
    command_burst: int = 100
    max_pending_text_chars: int = 16_384
    idle_timeout_s: float = 300.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    max_voices_per_connection: int = 4
    voice_cache_mb: int = 2048


_FLAGS = [  # (name, type, help)
    ("host", str, "address to listen on"),
    ("port", int, "port to listen on (0 picks a free one)"),
    ("checkpoint", str, "preset (tiny, 1b, 2b), local directory or Hugging Face repo id"),
    ("device", str, "cpu, cuda, cuda:N (default: cuda if available)"),
    ("dtype", str, "bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)"),
    ("mimi", str, "codec source: random, random-small, a path or repo id (default: the checkpoint's)"),
    ("max_lead_ms", float, "how far generation may run ahead of real-time playback"),
    ("seed", int, "default sampling seed"),
    ("cfg_scale", float, "default CFG scale; 1 runs a single branch (faster, no per-request CFG)"),
    ("context_frames", int, "frames before context_full (default: the model's limit, 1500)"),
    ("threads", int, "torch CPU threads (default: 1 on a CPU-only machine with <= 2 cores, else torch's choice)"),
    ("compile", str, "torch.compile inside the frame's CUDA graph: auto (on with cuda), on, off; "
                     "costs ~30 s once at start-up"),
    ("compile_max_calls", int, "with --compile: the largest padded batch (calls) that runs compiled; larger ones "
                               "run eager in their CUDA graphs (default: every batch size compiled, measured "
                               "fastest: docs/benchmarks.md)"),
    ("kernels", str, "depformer kernels: auto (triton on cuda when triton is installed, else torch), torch, "
                     "triton (fused Triton kernels, five launches a layer; docs/benchmarks.md)"),
    ("weights", str, "depformer projection weights: bf16, or fp8 (e4m3, one scale per row; needs the triton "
                     "kernels; changes some greedy tokens, measured in docs/benchmarks.md)"),
    ("pdl", str, "programmatic dependent launch between the triton kernels: auto (on for Hopper and later), on, "
                 "off (docs/benchmarks.md)"),
    ("log_level", str, "DEBUG, INFO, WARNING"),
    ("voice_dir", str, "folder that set_voice 'path' must lie in (default: no server-side paths)"),
    ("voice_cache", str, "where transcripts and prepared voices are cached (default: $DIA2_CACHE/voices)"),
    ("max_voice_seconds", float, "longest prefix audio per speaker, seconds"),
    ("whisper_model", str, "openai-whisper model name or checkpoint path for voice transcripts"),
    ("max_calls", int, "concurrent calls, one engine slot each; more get 'busy' (default: 1 on CPU, 64 on a GPU)"),
    ("lead_in_frames", int, "frames (80 ms each) sent before a turn's first word; silence before them is not sent"),
    ("rollover_frames", int, "recent conversation (frames) kept when a full context is rebuilt; 0 = no rollover "
                             "(context_full and a reset instead)"),
    ("prefix_boundary", str, "how a turn continues a voice prefix: upstream (as the published runtime: repeats the "
                             "last prefix position, samples over the prefix's delayed tail) or clean (continues "
                             "after it, teacher-forcing the known codes); docs/parity.md P5-P6"),
    # -- access and limits (issue 13); see docs/operations.md
    ("auth_token", str, "token clients must present (Authorization: Bearer, or ?token=) for the websocket and "
                        "/metrics; /health stays open"),
    ("auth_token_file", str, "read the token from this file instead (keeps it out of the process list)"),
    ("allowed_origins", str, "comma list of browser origins allowed to connect, or *; without it browsers are "
                             "refused when there is no token"),
    ("max_command_bytes", int, "largest message other than a set_voice with audio, bytes"),
    ("max_voice_message_bytes", int, "largest set_voice message with base64 audio, bytes; 0 = voices by server "
                                     "path only"),
    ("commands_per_second", float, "commands per second a connection may send (excess: rate_limited)"),
    ("command_burst", int, "commands a connection may send at once before the rate applies"),
    ("max_pending_text_chars", int, "text queued on a call but not yet spoken (excess: pending_text_full)"),
    ("idle_timeout_s", float, "close a connection with no command and nothing generating after this; 0 = never"),
    ("ping_interval_s", float, "websocket keepalive ping interval, seconds; 0 = no pings"),
    ("ping_timeout_s", float, "drop a connection whose pong is this late, seconds"),
    ("max_voices_per_connection", int, "distinct voices one connection may create (excess: too_many_voices)"),
    ("voice_cache_mb", int, "disk for cached prepared voices, MiB; least recently used evicted; 0 = no limit"),
]
_SECRETS = {"auth_token"}  # never echoed by --help, even when set through the environment


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="server.py", description="dia2stream: streaming Dia2 TTS over websockets. "
                                     "Every flag can also be set by the environment variable DIA2_<FLAG>.")
    for name, kind, text in _FLAGS:
        env = "DIA2_" + name.upper()
        default = getattr(defaults, name)
        if env in environ:
            try:
                default = kind(environ[env])
            except ValueError:
                parser.error(f"{env}={environ[env]!r} is not a valid {kind.__name__}")
        shown = "(set)" if name in _SECRETS and default else default
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            help=f"{text} [env {env}, default {shown}]")
    env_voices = tuple(v.strip() for v in environ.get("DIA2_VOICE", "").split(";") if v.strip())
    parser.add_argument("--voice", dest="voices", action="append", default=None, metavar="NAME=PATH[,TRANSCRIPT]",
                        help="preload a voice at start-up (repeatable; the first is the default voice; the transcript "
                             "may be @FILE) [env DIA2_VOICE, ';'-separated]")
    args = parser.parse_args(argv)
    values = vars(args)
    values["voices"] = tuple(values["voices"]) if values["voices"] else env_voices
    if values["max_calls"] is not None and values["max_calls"] < 1:
        parser.error("--max-calls must be at least 1")
    if values["rollover_frames"] < 0:
        parser.error("--rollover-frames must be 0 or more")
    if values["lead_in_frames"] < 0:
        parser.error("--lead-in-frames must be 0 or more")
    if values["prefix_boundary"] not in ("upstream", "clean"):  # vendor_dia2.runtime.PREFIX_BOUNDARIES
        parser.error(f"--prefix-boundary must be upstream or clean, not {values['prefix_boundary']!r}")
    if values["compile_max_calls"] is not None and values["compile_max_calls"] < 1:
        parser.error("--compile-max-calls must be at least 1")
    if values["kernels"] not in ("auto", "torch", "triton"):
        parser.error(f"--kernels must be auto, torch or triton, not {values['kernels']!r}")
    if values["weights"] not in ("bf16", "fp8"):
        parser.error(f"--weights must be bf16 or fp8, not {values['weights']!r}")
    if values["pdl"] not in ("auto", "on", "off"):
        parser.error(f"--pdl must be auto, on or off, not {values['pdl']!r}")
    if values["compile"] not in ("auto", "on", "off"):
        parser.error(f"--compile must be auto, on or off, not {values['compile']!r}")
    return ServerConfig(**values)
