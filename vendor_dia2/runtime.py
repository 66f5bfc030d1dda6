"""The per-frame step over static buffers: decoder, CFG, sampling, 31 depformer stages, the
delayed-buffer write and the next step's inputs, all on the device.

The text state machine lives on the host, but the step needs its answer mid-frame (the new text
tokens condition depformer stage 0). Instead of a round trip, the host previews both possible
answers (action = pad, action = new_word) before the frame and the device picks one after
sampling the action. The whole frame is therefore one function over persistent tensors — one
CUDA graph on GPU, the same code eager on CPU — and the only device-to-host copy per frame is
the sampled action, read after the frame to advance the state machine.

Rows of the model batch are laid out `[branch, call]`: rows `0..N-1` are the conditional rows of
the N calls, rows `N..2N-1` (when CFG is on) their unconditional twins.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .config import Dia2Config
from .model import Dia2Model, StageShape, decoder_layer, depformer_stage
from .sampling import draw, draw_noise, guided_candidates, gumbel_noise, top_candidates

UNGENERATED = -2  # delayed-buffer cell not written yet
NEW_WORD_ACTION = 1  # upstream maps action index 1 to new_word and everything else to pad


@dataclass(frozen=True)
class SamplingParams:
    """Upstream GenerationConfig defaults (DIA2_SPEC.md §8)."""

    text_temperature: float = 0.6
    text_top_k: int = 50
    audio_temperature: float = 0.8
    audio_top_k: int = 50
    cfg_scale: float = 2.0
    seed: int = 0


@dataclass
class StepperSnapshot:
    """Copies of one stepper's device state, restorable with `FrameStepper.restore`."""

    positions: torch.Tensor
    tokens: torch.Tensor
    buffer: torch.Tensor
    prefix_frames: torch.Tensor
    caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0  # cache slots that hold data (0..length-1); only those are copied


def pick(logits: torch.Tensor, inv_temp: torch.Tensor, noise: torch.Tensor, cfg_scale: torch.Tensor, *,
         n: int, branches: int, filter_k: int, max_top_k: int, banned: tuple[int, ...] = ()) -> torch.Tensor:
    """Rows [R, V] → one id per call [N]: CFG candidates (two branches) or plain top-k, then a draw.
    `banned` ids are never drawn; with CFG, as upstream, they are removed only after the guided
    top-k has chosen the candidates, so one there takes a candidate's place."""
    if branches == 1:
        for token in banned:
            logits[:, token] = torch.finfo(logits.dtype).min
        values, ids = top_candidates(logits, max_top_k)
    else:
        values, ids = guided_candidates(logits[:n], logits[n:], cfg_scale, filter_k)
        if banned:
            for token in banned:
                values = values.masked_fill(ids == token, float("-inf"))
            values, order = values.sort(dim=-1, descending=True)  # keep the rank order top-k relies on
            ids = ids.gather(1, order)
    return draw(values, ids, inv_temp, noise)


def stage_and_pick(projected, embed, prev, layers, norm, logits_w, mask, slot, inv_temp, noise, forced, known,
                   cfg_scale, *, shape: StageShape, n: int, branches: int, filter_k: int, max_top_k: int) -> torch.Tensor:
    """A depformer stage and its draw (teacher-forced where the prefix is known): codes [N];
    prev [N] are the previous codebook's codes, shared by both CFG branches."""
    logits = depformer_stage(projected, embed, prev.repeat(branches), layers, norm, logits_w, mask, slot, shape)
    code = pick(logits, inv_temp, noise, cfg_scale, n=n, branches=branches, filter_k=filter_k, max_top_k=max_top_k)
    return torch.where(forced, known, code)


class FrameStepper:
    """Runs frame steps for `n_calls` independent calls sharing one model.

    `cfg` fixes whether an unconditional branch is run (two rows per call); the CFG scale itself
    is per call. `max_positions` bounds the decoder cache and the delayed buffer.
    """

    # Buffers must be normal tensors even when the stepper is built inside inference mode (as
    # `Dia2.generate` does): inference tensors cannot be updated in place outside it later.
    @torch.inference_mode(False)
    def __init__(self, model: Dia2Model, *, n_calls: int = 1, cfg: bool = True, max_positions: int | None = None,
                 max_top_k: int = 256, cfg_filter_k: int = 50, use_cuda_graph: bool | None = None,
                 compile: bool = False, bos_token_id: int = 1):
        config: Dia2Config = model.config
        p = next(model.parameters())
        self.model, self.config = model, config
        self.device, self.dtype = p.device, p.dtype
        self.n, self.branches = n_calls, (2 if cfg else 1)
        self.rows = self.n * self.branches
        self.max_positions = max_positions or config.runtime.max_context_steps
        self.max_top_k, self.cfg_filter_k = max_top_k, cfg_filter_k
        self.bos_token_id = bos_token_id  # step 0's conditional text (spec §5); 1 is upstream's fallback
        d = config.data
        self.num_codebooks, self.max_delay = d.num_codebooks, d.max_delay
        model.setup_caches(self.rows, self.max_positions + 1)
        if self.device.type == "cpu":
            # random weights drive softmax tails into denormals, which make CPU matmuls ~10x slower
            torch.set_flush_denormal(True)

        dev = self.device
        long = dict(device=dev, dtype=torch.long)
        self.delays = torch.tensor(d.delay_pattern, **long)  # [Q]
        self.tokens = torch.zeros(self.rows, d.channels, **long)  # inputs of the current step
        self.positions = torch.zeros(self.n, **long)
        self.buffer = torch.full((self.n, self.num_codebooks, self.max_positions + 2), UNGENERATED, **long)
        self.prefix_frames = torch.zeros(self.n, **long)  # aligned frames teacher-forced from a voice prefix
        self.text_choices = torch.zeros(self.n, 2, 2, **long)  # [call, action is new_word, (main, second)]
        self.seeds = torch.zeros(self.n, **long)
        f32 = dict(device=dev, dtype=torch.float32)
        # per draw stream: column 0 the action (text sampling), columns 1..Q the codebooks (audio)
        self.stream_temperature = torch.zeros(self.n, 1 + self.num_codebooks, **f32)
        self.stream_top_k = torch.ones(self.n, 1 + self.num_codebooks, **long)
        self.cfg_scale = torch.ones(self.n, **f32)
        # outputs of the step
        self.action = torch.zeros(self.n, **long)
        self.text_out = torch.zeros(self.n, 2, **long)
        self.codes = torch.zeros(self.n, self.num_codebooks, **long)
        self.ready_codes = torch.zeros(self.n, self.num_codebooks, **long)  # aligned frame pos+1-max_delay

        self._host_choices = torch.zeros(self.n, 2, 2, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._host_action = torch.zeros(self.n, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.host_positions = [0] * self.n
        self._graph = None
        statics = dict(n=self.n, branches=self.branches, filter_k=cfg_filter_k, max_top_k=max_top_k)
        self._pick = functools.partial(pick, **statics)
        self._stage_fn = functools.partial(stage_and_pick, shape=model.depformer.shape, **statics)
        if compile:
            # One compiled graph serves all 31 stages (their weights are arguments), fusing the
            # elementwise work between matmuls; compiled once, at capture time, never per request.
            self._stage_fn = torch.compile(self._stage_fn, dynamic=False)
            model.transformer.step_layer_fn = torch.compile(decoder_layer, dynamic=False)
        else:
            model.transformer.step_layer_fn = decoder_layer
        self._frame_fn = self._frame
        for call in range(self.n):
            self.set_sampling(call, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
            self.reset_call(call)
        if use_cuda_graph is None:
            use_cuda_graph = dev.type == "cuda"
        if use_cuda_graph:
            self._capture()

    # -- host API --------------------------------------------------------------------------------

    def set_sampling(self, call: int, params: SamplingParams) -> None:
        if params.cfg_scale != 1.0 and self.branches == 1:
            raise ValueError("this stepper runs without the unconditional branch; cfg_scale must be 1")
        if max(params.text_top_k, params.audio_top_k) > self.max_top_k:
            raise ValueError(f"top_k above {self.max_top_k} is not supported by this stepper")
        self.stream_temperature[call, 0] = params.text_temperature
        self.stream_temperature[call, 1:] = params.audio_temperature
        self.stream_top_k[call, 0] = params.text_top_k
        self.stream_top_k[call, 1:] = params.audio_top_k
        self.cfg_scale[call] = params.cfg_scale
        self.seeds[call] = params.seed

    def reset_call(self, call: int, position: int = 0) -> None:
        """Start a call afresh at `position` (its cache past that position is ignored)."""
        d = self.config.data
        self.positions[call] = position
        self.host_positions[call] = position
        self.buffer[call].fill_(UNGENERATED)
        self.prefix_frames[call] = 0
        for branch in range(self.branches):
            row = branch * self.n + call
            self.tokens[row, 0] = self.bos_token_id if branch == 0 else d.text_zero_token_id
            self.tokens[row, 1] = d.text_pad_token_id
            self.tokens[row, 2:] = d.audio_bos

    def step(self, choices: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[int]:
        """Run one frame for every call. `choices[call]` = ((main, second) if the sampled action is
        pad, (main, second) if it is new_word). Returns the sampled actions (0 pad / 1 new_word)."""
        for call, (on_pad, on_new_word) in enumerate(choices):
            self._host_choices[call, 0, 0], self._host_choices[call, 0, 1] = on_pad
            self._host_choices[call, 1, 0], self._host_choices[call, 1, 1] = on_new_word
        self.text_choices.copy_(self._host_choices, non_blocking=True)
        if self._graph is not None:
            self._graph.replay()
        else:
            with torch.inference_mode():
                self._frame_fn()
        self._host_action.copy_(self.action)  # the one device-to-host copy (synchronises)
        for call in range(self.n):
            self.host_positions[call] += 1
        return [int(a == NEW_WORD_ACTION) for a in self._host_action.tolist()]

    def ready_frame_index(self, call: int) -> int:
        """Aligned frame index whose codes are in `ready_codes[call]` after the last step."""
        return self.host_positions[call] - self.max_delay

    def written_codes(self, call: int, start: int, stop: int) -> torch.Tensor:
        """Delayed buffer columns [start, stop) of a call: `[Q, stop-start]`."""
        return self.buffer[call, :, start:stop]

    # -- snapshots -------------------------------------------------------------------------------

    def snapshot(self) -> StepperSnapshot:
        length = max(self.host_positions) + 1
        caches = [(c.k[:, :, :length].clone(), c.v[:, :, :length].clone()) for c in self.model.decoder_caches()]
        return StepperSnapshot(self.positions.clone(), self.tokens.clone(), self.buffer.clone(),
                               self.prefix_frames.clone(), caches, length)

    def restore(self, snap: StepperSnapshot) -> None:
        self.positions.copy_(snap.positions)
        self.tokens.copy_(snap.tokens)
        self.buffer.copy_(snap.buffer)
        self.prefix_frames.copy_(snap.prefix_frames)
        for cache, (k, v) in zip(self.model.decoder_caches(), snap.caches):
            cache.k[:, :, : snap.length].copy_(k)
            cache.v[:, :, : snap.length].copy_(v)
        self.host_positions = snap.positions.tolist()

    # -- prefill (voice prefix) ------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, call: int, delayed: torch.Tensor, text: torch.Tensor, frames: int, chunk: int = 256) -> None:
        """Run the decoder over `frames` known steps in parallel, filling the cache, no sampling.

        delayed `[Q, frames + max_delay]`: the delayed grid of the prefix codes, bos in the cells
        before each codebook starts; text `[frames + 1, 2]`: the text tokens of steps 0..frames.
        Afterwards the call stands at position `frames`, and the prefix codes that the delay
        reaches past that position are teacher-forced instead of sampled.
        """
        assert self.n == 1, "prefill of one call among several is not supported yet"
        d = self.config.data
        delayed, text = delayed.to(self.device), text.to(self.device)
        tokens = torch.empty(self.branches, frames + 1, d.channels, dtype=torch.long, device=self.device)
        tokens[:, :, 2:] = delayed[:, : frames + 1].T
        tokens[0, :, :2] = text
        if self.branches == 2:
            tokens[1, :, 0] = d.text_zero_token_id
            tokens[1, :, 1] = d.text_pad_token_id
        for start in range(0, frames, chunk):
            stop = min(frames, start + chunk)
            pos = torch.arange(start, stop, device=self.device)[None].expand(self.branches, -1)
            self.model.transformer(tokens[:, start:stop], pos)
        self.tokens.view(self.branches, self.n, -1)[:, call] = tokens[:, frames]
        self.buffer[call].fill_(UNGENERATED)
        self.buffer[call, :, : delayed.shape[1]] = delayed
        self.prefix_frames[call] = frames
        self.positions[call] = frames
        self.host_positions[call] = frames

    # -- the frame, on the device ----------------------------------------------------------------

    def _frame(self) -> None:
        n, br, q = self.n, self.branches, self.num_codebooks
        d = self.config.data
        dep = self.model.depformer
        pos = self.positions  # [N]
        action_logits, cb0_logits, hidden = self.model.transformer(self.tokens[:, None], pos.repeat(br)[:, None])
        noise, inv_temp = draw_noise(gumbel_noise(self.seeds, pos, q + 1, self.max_top_k),
                                     self.stream_temperature, self.stream_top_k)  # [N, 1 + Q, K], [N, 1 + Q]
        action = self._pick(action_logits[:, 0], inv_temp[:, 0], noise[:, 0], self.cfg_scale)
        text = self.text_choices[torch.arange(n, device=self.device), (action == NEW_WORD_ACTION).long()]  # [N, 2]

        write_pos = pos + 1  # step t fills delayed column t+1
        known = self.buffer.gather(2, write_pos[:, None, None].expand(n, q, 1))[:, :, 0]  # [N, Q]
        aligned_index = write_pos[:, None] - self.delays[None, :]  # [N, Q]
        forced = (aligned_index >= 0) & (aligned_index < self.prefix_frames[:, None])  # teacher forcing

        code = self._pick(cb0_logits[:, 0], inv_temp[:, 1], noise[:, 1], self.cfg_scale, banned=(d.audio_pad, d.audio_bos))
        code = torch.where(forced[:, 0], known[:, 0], code)
        codes = [code]
        # Depformer stage 0 reads this step's conditional text on BOTH branches, as upstream does
        # (its unconditional row is blanked only in the decoder input): docs/parity.md.
        dep_text = text.repeat(br, 1)
        projected = dep.first_stage_text(dep.project_inputs(hidden), dep_text)  # [S, R, Dd]
        for s, w in enumerate(dep.stage_weights):
            code = self._stage_fn(projected[s], w.embed, code, w.layers, w.norm, w.logits, w.mask, w.slot,
                                  inv_temp[:, 2 + s], noise[:, 2 + s], forced[:, s + 1], known[:, s + 1],
                                  self.cfg_scale)
            codes.append(code)
        codes_t = torch.stack(codes, dim=1)  # [N, Q]

        self.buffer.scatter_(2, write_pos[:, None, None].expand(n, q, 1), codes_t[:, :, None])
        next_audio = torch.where(self.delays[None, :] > write_pos[:, None], d.audio_bos, codes_t)
        self.tokens[:n, :2] = text
        self.tokens[:, 2:] = next_audio.repeat(br, 1)
        ready = (write_pos - self.max_delay)[:, None] + self.delays[None, :]  # [N, Q] delayed columns
        self.ready_codes.copy_(self.buffer.gather(2, ready.clamp(min=0)[:, :, None])[:, :, 0])
        self.action.copy_(action)
        self.text_out.copy_(text)
        self.codes.copy_(codes_t)
        self.positions.add_(1)

    def _capture(self) -> None:
        """Capture `_frame` as one CUDA graph. Warm-up steps run first (on a side stream, as
        capture requires); the state they touch is put back afterwards."""
        saved = (self.positions.clone(), self.tokens.clone(), self.buffer.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self._frame_fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self._frame_fn()
        self._graph = graph
        self.positions.copy_(saved[0])
        self.tokens.copy_(saved[1])
        self.buffer.copy_(saved[2])
        torch.cuda.synchronize()
