"""Public entry point: `Dia2.from_pretrained(...)` and offline `generate(...)`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import CheckpointFiles, load_model, resolve, tokenizer_location
from .codec import MimiCodec
from .config import FRAME_RATE, MAX_TOP_K, Dia2Config
from .delays import undelay_codes
from .model import Dia2Model
from .runtime import FrameStepper, SamplingParams
from .script import parse_script
from .state_machine import TextStateMachine
from .tokenizer import Dia2Tokenizer, step0_bos_id

log = logging.getLogger(__name__)

DEFAULT_MIMI = "kyutai/moshiko-pytorch-bf16"
MAX_PADDING = 6  # upstream's padding budget after a word
INITIAL_PADDING = 2


@dataclass
class GenerationResult:
    audio_tokens: torch.Tensor  # aligned codes [Q, T]
    waveform: np.ndarray  # float32 [T * 1920] in [-1, 1]
    sample_rate: int
    timestamps: list[tuple[str, float]]  # (word, seconds from the start of the waveform)
    frames: int = 0  # frame steps run
    wall_seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Dia2:
    """A loaded checkpoint: model, tokenizer and codec, with an offline `generate`.

    The model holds weights only; every `FrameStepper` owns its own caches, so `generate` and a
    streaming engine on the same instance do not disturb each other.
    """

    def __init__(self, model: Dia2Model, config: Dia2Config, tokenizer: Dia2Tokenizer, codec: MimiCodec,
                 name: str = "dia2"):
        self.model, self.config, self.tokenizer, self.codec, self.name = model, config, tokenizer, codec, name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._stepper: FrameStepper | None = None

    @classmethod
    def from_pretrained(cls, checkpoint: str = "tiny", *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, mimi: str | None = None) -> "Dia2":
        """Load a preset (`tiny`, `1b`, `2b`), a local directory or a Hugging Face repo id.

        `mimi` overrides the codec source (see `MimiCodec.load`); by default the checkpoint's own
        (`assets.mimi`), else Kyutai's release, falling back to a seeded random Mimi offline.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(device)
        files = resolve(checkpoint)
        model, config = load_model(files, device, dtype)
        tokenizer = Dia2Tokenizer.from_dir(tokenizer_location(files, config))
        codec = _load_codec(mimi, files, config, device)
        return cls(model, config, tokenizer, codec, name=files.name)

    # -- pieces the streaming session also uses ------------------------------------------------

    def new_state_machine(self) -> TextStateMachine:
        d = self.config.data
        return TextStateMachine(d.text_pad_token_id, d.text_new_word_token_id, max_padding=MAX_PADDING,
                                initial_padding=INITIAL_PADDING, second_stream_ahead=d.second_stream_ahead)

    @property
    def bos_token_id(self) -> int:
        """The text id fed at step 0 (DIA2_SPEC.md §5), by upstream's rule (`step0_bos_id`)."""
        return step0_bos_id(self.tokenizer)

    def new_stepper(self, *, n_calls: int = 1, cfg: bool, max_positions: int | None = None,
                    use_cuda_graph: bool | None = None, compile: bool = False,
                    batch_sizes: tuple[int, ...] | None = None, max_top_k: int = MAX_TOP_K, kernels: str = "torch",
                    weights: str = "bf16", compile_max_calls: int | None = None,
                    cache_buckets: tuple[int, ...] | None = None, sampler: str = "torch") -> FrameStepper:
        """A frame stepper with its own caches for `n_calls` call slots. `compile` runs
        torch.compile inside the CUDA graphs (fewer, fused kernels; costs time once, here).
        `kernels="triton"` runs the depformer through the fused kernels (CUDA), `weights="fp8"`
        with FP8 projections; `compile_max_calls` bounds the batch sizes that run compiled;
        `sampler="triton"` draws through one fused kernel per draw ("auto": with the triton kernels;
        the same tokens; the server's `--sampler auto` takes it: 0.7-1.0 ms a step faster, run 39)."""
        return FrameStepper(self.model, n_calls=n_calls, cfg=cfg, max_positions=max_positions,
                            use_cuda_graph=use_cuda_graph, compile=compile, bos_token_id=self.bos_token_id,
                            batch_sizes=batch_sizes, max_top_k=max_top_k, kernels=kernels, weights=weights,
                            compile_max_calls=compile_max_calls, cache_buckets=cache_buckets, sampler=sampler)

    def stepper(self, *, cfg: bool, max_positions: int | None = None, use_cuda_graph: bool | None = None) -> FrameStepper:
        """The single-call stepper `generate` uses, kept between calls; rebuilt when the CFG mode
        or size changes."""
        s = self._stepper
        want = max_positions or self.config.runtime.max_context_steps
        if s is None or (s.branches == 2) != cfg or s.max_positions != want:
            self._stepper = None  # drop graphs and caches before allocating new ones
            self._stepper = self.new_stepper(cfg=cfg, max_positions=want, use_cuda_graph=use_cuda_graph)
        return self._stepper

    @property
    def tail_frames(self) -> int:
        """Steps after the last word needed to flush the delayed codebooks."""
        return self.config.data.max_delay + MAX_PADDING

    # -- offline generation --------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, script: str, *, seed: int = 0, cfg_scale: float = 2.0, temperature: float | None = None,
                 top_k: int | None = None, text_temperature: float | None = None,
                 audio_temperature: float | None = None, text_top_k: int | None = None,
                 audio_top_k: int | None = None, max_frames: int | None = None, progress: bool = False,
                 decode: bool = True, trim_lead_in: bool = False) -> GenerationResult:
        """Speak `script` and return aligned codes, waveform and word timestamps.

        `temperature`/`top_k` set text and audio sampling alike; the text_/audio_ forms override
        one side. Temperature 0 is greedy (the seed then has no effect).

        The output starts where upstream's does (`upstream_crop`): at aligned frame 0 for a fresh
        call, so it includes the `initial_padding` frames before the first word.
        `trim_lead_in=True` starts it at the first word's step instead (2 frames later).
        """
        base = SamplingParams()
        params = SamplingParams(
            text_temperature=_first(text_temperature, temperature, base.text_temperature),
            audio_temperature=_first(audio_temperature, temperature, base.audio_temperature),
            text_top_k=_first(text_top_k, top_k, base.text_top_k),
            audio_top_k=_first(audio_top_k, top_k, base.audio_top_k),
            cfg_scale=cfg_scale, seed=seed)
        entries = parse_script(script, self.tokenizer)
        if not entries:
            raise ValueError("script has no words to speak")
        stepper = self.stepper(cfg=cfg_scale != 1.0)
        stepper.reset_call(0)
        stepper.set_sampling(0, params)
        machine = self.new_state_machine()
        machine.push(entries)
        limit = min(max_frames or math.inf, self.config.runtime.max_context_steps)
        bar = _progress_bar(progress, limit)
        start, step_ms, t = time.perf_counter(), [], 0
        while t < limit:
            t0 = time.perf_counter()
            action = stepper.step([machine.preview(t)])[0]
            machine.process(t, action)
            step_ms.append((time.perf_counter() - t0) * 1000)
            t += 1
            bar.update(1)
            if machine.end_step is not None and t >= machine.end_step + self.tail_frames:
                break
        bar.close()
        aligned = undelay_codes(stepper.written_codes(0, 0, t + 1).cpu(), self.config.data.delay_pattern)
        if trim_lead_in:
            crop = machine.transcript[0][1] if machine.transcript else 0
        else:
            crop = upstream_crop(machine.transcript, self.config.data.second_stream_ahead, INITIAL_PADDING)
        crop = crop if crop < aligned.shape[1] else 0  # upstream keeps everything rather than nothing
        aligned = aligned[:, crop:]
        waveform = np.zeros(0, dtype=np.float32)
        if decode and aligned.shape[1]:
            waveform = self.codec.decode(aligned[None].to(self.codec.device))[0, 0].float().cpu().numpy()
        stamps = [(word, (step - crop) / FRAME_RATE) for word, step in machine.transcript]
        return GenerationResult(aligned, waveform, self.codec.sample_rate, stamps, frames=t,
                                wall_seconds=time.perf_counter() - start, step_ms=step_ms)


def upstream_crop(transcript: list[tuple[str, int]], second_stream_ahead: int, initial_padding: int,
                  start_step: int = 0) -> int:
    """The first aligned frame upstream's `generate` keeps (dia2/runtime/generator.py, engine.py).

    Upstream notes the first step whose main text token is new_word and crops at that step minus
    `initial_padding`. For a fresh call that is frame 0: the machine forces the first word exactly
    `initial_padding` steps in (or the model takes it then). With a second text stream the main
    token is never new_word (the new_word goes to the second stream), so upstream crops at the
    call's start step.
    """
    if second_stream_ahead > 0 or not transcript:
        return max(start_step, 0)
    return max(transcript[0][1] - initial_padding, 0)


def _first(*values):
    return next(v for v in values if v is not None)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _load_codec(mimi: str | None, files: CheckpointFiles, config: Dia2Config, device: torch.device) -> MimiCodec:
    source = mimi or files.mimi or config.assets.mimi or DEFAULT_MIMI
    try:
        return MimiCodec.load(source, device=device)
    except Exception as exc:
        if mimi is not None or source != DEFAULT_MIMI:
            raise
        log.warning("Mimi weights unavailable (%s); using a seeded random Mimi: audio will not be speech", exc)
        return MimiCodec.load("random", device=device)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: float):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=None if math.isinf(total) else int(total), desc="frames", unit="frame")
