"""Mimi codec for Dia2: encode, batch decode, and streaming decode with snapshots.

A thin wrapper over moshi's `MimiModel` (moshi 0.2.13), through moshi's public API except for
what `moshi_private.py` holds. Dia2 frames are Mimi frames:
24 kHz audio, 12.5 frames/s, 1920 samples (80 ms) per frame, 32 codebooks of 2048 codes.

Sources (`MimiCodec.load(source=...)`):
- `"random"`: the full-size Mimi (79 M parameters) with deterministic random weights.
- `"random-small"`: the same architecture, built from moshi's own classes with few filters and
  a one-layer transformer (same rate, same 32x2048 codebooks), for fast CPU tests and demos.
- a `.safetensors` file, or a directory holding `tokenizer-e351c8d8-checkpoint125.safetensors`.
- anything else: a Hugging Face repo id (the real one is `DEFAULT_MIMI_REPO`).
Random codecs make noise, not speech: never judge audio quality with them.

Streaming touches only the decoder side (upsample, decoder transformer, SEANet decoder), so
`encode` and batch `decode` keep working while a stream is open. Not thread-safe: one caller at
a time per `MimiCodec`.

Measured streaming decode cost, batch 1, fp32, on this project's 2-core CPU box (torch 2.13 CPU;
other engineers' jobs shared the cores, so these are rough), with
`PYTHONPATH=. .venv/bin/python -m vendor_dia2.codec --bench` (20 frames after 2 warm-up frames,
three runs):
- `random` (full size): 78-81 ms per frame (one run under contention: 180 ms), i.e. about
  real time (a frame is 80 ms of audio);
- `random-small`: 4-6 ms per frame.
"""

from __future__ import annotations

import contextlib
import os
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.modules.streaming import StreamingContainer

from . import moshi_private, row_swap
from .config import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE
from .transfers import pinned_for, queued_to_device
NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2048

DEFAULT_MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_WEIGHTS_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
RANDOM_SEED = 20240601
# Longest chunk fed to the decoder in one streaming call: the decoder transformer's ring KV
# cache holds 250 steps at 25 Hz (= 125 frames); a chunk must stay well inside it.
_WARM_CHUNK_FRAMES = 50


class CodecLoadError(RuntimeError):
    """The codec weights could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class CodecStreamSnapshot:
    """Copies of every streaming-state tensor (and int counter) of the decoder side."""

    batch_size: int
    states: dict[str, dict[str, tp.Any]]  # module name -> field name -> copied value


@dataclass(frozen=True)
class PendingPcm:
    """PCM rows [b, 1920] on their way to the host; `wait` blocks until they are there."""

    pcm: torch.Tensor  # host memory (pinned on CUDA, reused by the next decode: `wait` copies it out)
    done: tp.Any  # a torch.cuda.Event, or None when the PCM is on the host already

    def wait(self):
        if self.done is not None:
            self.done.synchronize()
            return self.pcm.numpy().copy()
        return self.pcm.numpy()


def sanitize_codes(codes: torch.Tensor | tp.Sequence) -> torch.Tensor:
    """Map every id outside [0, 2048) (bos 2048, pad 2049, the -2 marker) to 0; never clamp.

    No host sync: safe inside a CUDA graph.
    """
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point:
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    codes = codes.long()
    valid = (codes >= 0) & (codes < CODEBOOK_SIZE)
    return torch.where(valid, codes, torch.zeros_like(codes))


class MimiCodec:
    """moshi's Mimi with 32 codebooks; see the module docstring."""

    sample_rate = SAMPLE_RATE
    frame_samples = FRAME_SAMPLES
    frame_rate = FRAME_RATE
    num_codebooks = NUM_CODEBOOKS

    def __init__(self, model, device: torch.device, dtype: torch.dtype, source: str):
        assert model.sample_rate == SAMPLE_RATE, model.sample_rate
        assert model.frame_size == FRAME_SAMPLES, model.frame_size
        assert model.num_codebooks == NUM_CODEBOOKS, model.num_codebooks
        assert model.cardinality == CODEBOOK_SIZE, model.cardinality
        self.model = model
        self.device = device
        self.dtype = dtype
        self.source = source
        self._decoder_side = _DecoderSide(model)
        self._stream_batch: int | None = None
        self.use_cuda_graph = True  # streaming decode as one CUDA graph on GPU (set before open_stream)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # decode size -> graph, its PCM
        self.decode_sizes: tuple[int, ...] = ()
        self._side: torch.cuda.Stream | None = None  # the stream queued decodes run on (`open_stream(side_stream=)`)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        source: str | os.PathLike = "random",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "MimiCodec":
        device = torch.device(device)
        source_str = str(source)
        if source_str == "random":
            model = _build_random(_full_config())
        elif source_str == "random-small":
            model = _build_random(_small_config())
        else:
            weights = _resolve_weights(source_str)
            model = _build_from_weights(weights)
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, device, dtype, source_str)

    # ---- encode / batch decode -----------------------------------------------------------

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """float audio at 24 kHz, [B, 1, N] ([N] and [B, N] accepted) -> long codes [B, 32, F].

        N is zero-padded up to a multiple of 1920, so F = ceil(N / 1920).
        """
        wav = torch.as_tensor(wav)
        if wav.dim() == 1:
            wav = wav[None, None]  # [1, 1, N]
        elif wav.dim() == 2:
            wav = wav[:, None]  # [B, 1, N]
        if wav.dim() != 3 or wav.shape[1] != 1 or wav.shape[-1] == 0:
            raise ValueError(f"expected mono audio [B, 1, N] with N > 0, got {tuple(wav.shape)}")
        pad = (-wav.shape[-1]) % FRAME_SAMPLES
        wav = torch.nn.functional.pad(wav, (0, pad))
        wav = wav.to(device=self.device, dtype=self.dtype)
        return self.model.encode(wav).long()  # [B, 32, F]

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 32, F] -> float32 audio [B, 1, F * 1920] in [-1, 1]. Leaves any stream alone."""
        codes = self._check_codes(codes, dims=3)
        with self._stream_detached():
            pcm = self.model.decode(codes)  # [B, 1, F * 1920]
        assert pcm.shape[-1] == codes.shape[-1] * FRAME_SAMPLES, pcm.shape
        return pcm.float().clamp_(-1.0, 1.0)

    # ---- streaming decode -----------------------------------------------------------------

    @property
    def stream_batch_size(self) -> int | None:
        """Batch size of the open stream, or None."""
        return self._stream_batch

    @property
    def stream_graphed(self) -> bool:
        """Whether the open stream's frame decode replays a CUDA graph."""
        return bool(self._stream_batch is not None and self._graphs)

    @torch.inference_mode()
    def open_stream(self, batch_size: int = 1, decode_sizes: tp.Sequence[int] = (), side_stream: bool = False) -> None:
        """Start (or restart, from a fresh state) streaming decode for `batch_size` rows. A decode
        runs over the first rows only, padded to the smallest of `decode_sizes` (and
        `batch_size`) that covers the highest row decoding (each size one CUDA graph on GPU).

        `side_stream` (graphed CUDA decodes only): `decode_frame_async` runs the decode on a CUDA
        stream of its own, after the work queued before it on the caller's stream, so it overlaps
        whatever the caller queues next (the next frame step). Every other use of the stream's
        state waits for the decodes queued before it."""
        self.close_stream()
        self._decoder_side.start(batch_size)
        self._stream_batch = batch_size
        # One execution mask shared by every streaming module: rows that do not decode this frame
        # keep their state (moshi's modules honour it), and setting it is one copy.
        self._exec_mask = torch.ones(batch_size, dtype=torch.bool, device=self.device)
        whole = self._decoder_side.get_streaming_state()
        for state in whole.values():
            state.exec_mask = self._exec_mask
        self.decode_sizes = tuple(sorted({b for b in decode_sizes if 0 < b < batch_size} | {batch_size}))
        # the state over the first b rows, as views of the whole state
        self._states = {b: {name: moshi_private.leading_rows(state, b, self._exec_mask[:b])
                            for name, state in whole.items()} if b < batch_size else whole
                        for b in self.decode_sizes}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda" and self.use_cuda_graph:
            self._capture_decodes(batch_size)
        self._side = torch.cuda.Stream(self.device) if side_stream and self._graphs else None
        self.capture_swap(graph=row_swap.GRAPHED)

    @torch.inference_mode()  # the stream's state is made under inference mode
    def capture_swap(self, graph: bool) -> None:
        """Set up `swap_rows` for the open stream: eager, or (`graph`, with graphed decodes) one
        CUDA graph captured now over the stream's state tensors."""
        self._check_stream(None)
        self._row_swap = row_swap.RowSwap(self._swap_state_rows, self.device, graph=graph and bool(self._graphs))

    def close_stream(self) -> None:
        """Drop the streaming state (no-op when none is open)."""
        if self._stream_batch is not None:
            self._join_side_stream()
            self._decoder_side.stop()
            self._stream_batch = None
            self._graphs = {}

    def decode_size_for(self, rows: int) -> int:
        """The padded rows a decode whose highest decoding row is `rows - 1` runs over."""
        return next(b for b in self.decode_sizes if b >= rows)

    @torch.inference_mode()
    def decode_frame(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One frame per row, codes [B, 32] ([32] for B = 1) -> float32 PCM [b, 1920]. With the
        bool mask `rows` [B], only those rows advance (the others' output is meaningless), and on
        the host the decode runs over the first `b = decode_size_for(highest row + 1)` rows only
        (b = B otherwise): row i of the PCM is row i of the stream."""
        b, codes = self._stage_decode(codes, rows)
        graph = self._graphs.get(b)
        if graph is not None:
            graph[0].replay()
            return graph[1].clone()
        return self._decode_rows(codes[:b, :, None])

    def _stage_decode(self, codes: torch.Tensor, rows: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """Check a frame decode's input, set the rows that decode, and (graphed) copy the codes
        into the graph's input, on the current stream, after the decodes queued beside (the last
        one reads that input); the rows it runs over and the codes."""
        codes = torch.as_tensor(codes)
        if codes.dim() == 1:
            codes = codes[None]
        codes = self._check_codes(codes, dims=2)
        self._check_stream(codes.shape[0])
        b = self._stream_batch
        if rows is None:
            self._exec_mask.fill_(True)
        else:
            rows = torch.as_tensor(rows, dtype=torch.bool)
            if rows.device.type == "cpu":  # where each row decodes is known without a device read
                on = rows.nonzero()
                b = self.decode_size_for(int(on[-1]) + 1) if len(on) else self.decode_sizes[0]
            self._exec_mask.copy_(pinned_for(rows, self.device), non_blocking=True)
        if b in self._graphs:
            self._graph_codes[:b].copy_(codes[:b, :, None])
        return b, codes

    @torch.inference_mode()
    def decode_frame_async(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> "PendingPcm":
        """`decode_frame`, with the PCM on its way to the host: on CUDA the decode and a copy into
        pinned memory are queued and this returns at once (the host works on while they run);
        `PendingPcm.wait` gives the PCM rows [b, 1920] as a host array of their own. With a side
        stream (`open_stream`) the decode and the copy run there."""
        if self._side is not None:
            return self._decode_beside(codes, rows)
        pcm = self.decode_frame(codes, rows)
        if pcm.device.type != "cuda":
            return PendingPcm(pcm, None)
        return self._to_host(pcm)

    def _decode_beside(self, codes: torch.Tensor, rows: torch.Tensor | None) -> "PendingPcm":
        """The decode on the side stream: it starts once the current stream has done what was
        queued on it so far (the step that wrote `codes`, the copies into the graph's input), and
        the current stream goes on at once."""
        b, _ = self._stage_decode(codes, rows)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            graph, pcm = self._graphs[b]
            graph.replay()
            return self._to_host(pcm)

    def _to_host(self, pcm: torch.Tensor) -> "PendingPcm":
        """Queue the copy of PCM rows into pinned host memory on the current stream."""
        b = pcm.shape[0]
        # Two pinned buffers in turn: with a step in flight the next decode is queued before the
        # host has waited for this one's PCM, and must not copy over it.
        if getattr(self, "_pinned_pcm", None) is None or self._pinned_pcm[0].shape[0] < b:
            self._pinned_pcm = [torch.empty(self._stream_batch, FRAME_SAMPLES, dtype=torch.float32, pin_memory=True)
                                for _ in range(2)]
            self._pinned_done = [None, None]
        turn = self._pinned_turn = 1 - getattr(self, "_pinned_turn", 1)
        if self._pinned_done[turn] is not None:
            self._pinned_done[turn].synchronize()  # its PCM of two decodes ago is on the host
        host = self._pinned_pcm[turn][:b]
        host.copy_(pcm, non_blocking=True)
        done = self._pinned_done[turn] = torch.cuda.Event()
        done.record()
        return PendingPcm(host, done)

    def _join_side_stream(self) -> None:
        """Order the current stream after the decodes queued on the side stream (no host wait)."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _decode_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode codes [b, 32, 1] over the stream's first b rows."""
        b = codes.shape[0]
        if b == self._stream_batch:
            return self._decode_step(codes)
        whole = self._decoder_side.get_streaming_state()
        self._decoder_side.set_streaming_state(self._states[b])
        try:
            return self._decode_step(codes)
        finally:
            self._decoder_side.set_streaming_state(whole)

    def _decode_step(self, codes: torch.Tensor) -> torch.Tensor:
        pcm = self.model.decode(codes)  # codes [B, 32, 1] -> [B, 1, 1920]
        return pcm[:, 0].float().clamp(-1.0, 1.0)

    @torch.inference_mode()
    def _capture_decodes(self, batch_size: int) -> None:
        """One CUDA graph for a streaming frame decode per decode size. moshi's streaming states
        are tensors updated in place (its own server graphs them too), so a replay advances the
        same state the eager path would; ~85 small kernels per frame otherwise pay a launch each."""
        self._graph_codes = torch.zeros(batch_size, NUM_CODEBOOKS, 1, dtype=torch.long, device=self.device)
        fresh = self.snapshot_stream()
        for b in self.decode_sizes:
            codes = self._graph_codes[:b]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_rows(codes)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            whole = self._decoder_side.get_streaming_state()
            self._decoder_side.set_streaming_state(self._states[b])
            try:
                with torch.cuda.graph(graph):
                    pcm = self._decode_step(codes)
            finally:
                self._decoder_side.set_streaming_state(whole)
            self._graphs[b] = (graph, pcm)
        self.restore_stream(fresh)

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows `a` and `b` of the open stream's state (a call moved to another slot)."""
        self.swap_rows_many([(a, b)])

    @torch.inference_mode()  # the stream's state is made under inference mode
    def swap_rows_many(self, pairs: list[tuple[int, int]]) -> None:
        """`swap_rows` of each pair (no row in two pairs), in one go (one replay with graphs)."""
        self._check_stream(None)
        pairs = [(a, b) for a, b in pairs if a != b]
        if pairs:
            self._row_swap(pairs)

    @property
    def swap_graphed(self) -> bool:
        """Whether the open stream swaps rows by one CUDA graph replay (`row_swap.GRAPHED`)."""
        return self._stream_batch is not None and self._row_swap.graphed

    def _swap_state_rows(self, pair: torch.Tensor, extent: int | None) -> None:
        """Every state tensor's rows exchanged, for each pair in `pair` [a1, b1, ...] (`RowSwap`'s
        body; whole rows)."""
        crossed = row_swap.crossed(pair)
        for state in self._decoder_side.get_streaming_state().values():
            moshi_private.swap_rows(state, pair, crossed)

    @torch.inference_mode()
    def warm_stream(self, codes: torch.Tensor) -> None:
        """Decode codes [B, 32, F] into the stream and discard the audio (voice-prefix warm-up)."""
        codes = self._check_codes(codes, dims=3)
        self._check_stream(codes.shape[0])
        for start in range(0, codes.shape[-1], _WARM_CHUNK_FRAMES):
            self.model.decode(codes[:, :, start:start + _WARM_CHUNK_FRAMES])

    @torch.inference_mode()
    def reset_stream(self, mask: torch.Tensor | None = None) -> None:
        """Reset all rows, or the rows where the bool `mask` [B] is True, to a fresh state."""
        self._check_stream(None)
        if mask is not None:
            # every start resets its call's row: no wait for the step in flight
            mask = queued_to_device(torch.as_tensor(mask, dtype=torch.bool), self.device)
            if mask.shape != (self._stream_batch,):
                raise ValueError(f"mask must be [{self._stream_batch}], got {tuple(mask.shape)}")
        self._decoder_side.reset_streaming(mask)

    def stream_states(self) -> dict[str, tp.Any]:
        """The open stream's live moshi states by module name (references: read, do not keep)."""
        self._check_stream(None)
        return self._decoder_side.get_streaming_state()

    @torch.inference_mode()
    def snapshot_stream(self) -> CodecStreamSnapshot:
        """Copy the whole decoder state (moshi hands out live references: we clone)."""
        self._check_stream(None)
        states = {name: moshi_private.copy_state(state)
                  for name, state in self._decoder_side.get_streaming_state().items()}
        return CodecStreamSnapshot(self._stream_batch, states)

    @torch.inference_mode()
    def restore_stream(self, snapshot: CodecStreamSnapshot) -> None:
        """Copy a snapshot back into the open stream's state tensors, in place."""
        self._check_stream(snapshot.batch_size)
        live = self._decoder_side.get_streaming_state()
        assert live.keys() == snapshot.states.keys(), "snapshot from another codec"
        for name, state in live.items():
            moshi_private.restore_state(state, snapshot.states[name])

    # ---- one row of the stream --------------------------------------------------------------

    @torch.inference_mode()
    def snapshot_row(self, row: int) -> CodecStreamSnapshot:
        """Copies of one row's decoder state (a one-row snapshot, restorable into any row)."""
        self._check_stream(None)
        states = {name: moshi_private.copy_state(state, slice(row, row + 1))
                  for name, state in self._decoder_side.get_streaming_state().items()}
        return CodecStreamSnapshot(1, states)

    @torch.inference_mode()
    def snapshot_rows(self, rows: list[int]) -> list[CodecStreamSnapshot]:
        """`snapshot_row` of each of `rows`, taken with one copy per state tensor for all of them.
        The snapshots are views of those shared copies: memory is freed once all of them are
        dropped (the calls marked in one step drop their marks at about the same age)."""
        self._check_stream(None)
        if not rows:
            return []
        index = queued_to_device(torch.tensor(rows, dtype=torch.long), self.device)
        gathered = {name: moshi_private.gather_rows(state, index)
                    for name, state in self._decoder_side.get_streaming_state().items()}
        return [CodecStreamSnapshot(1, {name: moshi_private.row_of(saved, i) for name, saved in gathered.items()})
                for i in range(len(rows))]

    @torch.inference_mode()
    def restore_row(self, row: int, snapshot: CodecStreamSnapshot) -> None:
        """Copy a one-row snapshot into row `row` of the open stream; other rows are untouched."""
        self._check_stream(None)
        if snapshot.batch_size != 1:
            raise ValueError(f"restore_row takes a one-row snapshot, got {snapshot.batch_size} rows")
        live = self._decoder_side.get_streaming_state()
        assert live.keys() == snapshot.states.keys(), "snapshot from another codec"
        for name, state in live.items():
            moshi_private.restore_state(state, snapshot.states[name], slice(row, row + 1))

    @torch.inference_mode()
    def warmed_row(self, codes: torch.Tensor) -> CodecStreamSnapshot:
        """A fresh one-row decoder state warmed with codes [1, 32, F] (a voice prefix), as a
        snapshot for `restore_row`. Runs on a stream of its own: the open stream is untouched."""
        codes = self._check_codes(codes, dims=3)
        with self._stream_detached(), self._decoder_side.streaming(1):
            for start in range(0, codes.shape[-1], _WARM_CHUNK_FRAMES):
                self.model.decode(codes[:, :, start:start + _WARM_CHUNK_FRAMES])
            states = {name: moshi_private.copy_state(state)
                      for name, state in self._decoder_side.get_streaming_state().items()}
        return CodecStreamSnapshot(1, states)

    # ---- helpers ---------------------------------------------------------------------------

    def _check_codes(self, codes: torch.Tensor, dims: int) -> torch.Tensor:
        codes = sanitize_codes(codes)
        if codes.dim() != dims or codes.shape[1] != NUM_CODEBOOKS:
            want = "[B, 32, F]" if dims == 3 else "[B, 32]"
            raise ValueError(f"codes must be {want}, got {tuple(codes.shape)}")
        return codes.to(self.device)

    def _check_stream(self, batch_size: int | None) -> None:
        """The stream is open (with `batch_size` rows, unless None). Every user of the stream's
        state comes through here, and its work is ordered after the decodes queued on the side
        stream."""
        if self._stream_batch is None:
            raise RuntimeError("no stream open: call open_stream(batch_size) first")
        if batch_size is not None and batch_size != self._stream_batch:
            raise ValueError(f"stream has {self._stream_batch} rows, got {batch_size}")
        self._join_side_stream()

    def _stream_detached(self) -> tp.ContextManager:
        if self._stream_batch is None:
            return contextlib.nullcontext()
        return self._decoder_side.detached()


# ---- decoder-side streaming container ----------------------------------------------------


def _decoder_modules(model) -> list[tuple[str, torch.nn.Module]]:
    mods = [("upsample", getattr(model, "upsample", None)),
            ("decoder_transformer", model.decoder_transformer),
            ("decoder", model.decoder)]
    return [(name, mod) for name, mod in mods if mod is not None]


class _DecoderSide(StreamingContainer):
    """Streams only Mimi's decoder modules. The encoder and the top-level model stay
    non-streaming, so `MimiModel.decode` calls these modules directly and each uses its own
    state. Holds the same module objects as the model (no copy of weights)."""

    def __init__(self, model):
        super().__init__()
        for name, mod in _decoder_modules(model):
            self.add_module(name, mod)
        self._open: contextlib.ExitStack | None = None

    def start(self, batch_size: int) -> None:
        """Open a stream that stays open until `stop` (moshi's `streaming()`, kept open)."""
        self._open = self.streaming(batch_size)

    def stop(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    @contextlib.contextmanager
    def detached(self) -> tp.Iterator[None]:
        """Take the open stream's state off the modules for a while (a batch decode, a side
        stream), then put it back as it was."""
        saved = self.get_streaming_state()
        self.set_streaming_state({name: None for name in saved})
        try:
            yield
        finally:
            self.set_streaming_state(saved)


# ---- building models ---------------------------------------------------------------------


def _full_config() -> dict:
    return moshi_private.mimi_config()


def _small_config() -> dict:
    """Mimi's layout with few filters and a tiny transformer; rates and codebooks unchanged."""
    dim = 64
    seanet = dict(_full_config()["seanet"], dimension=dim, n_filters=4)
    transformer = dict(
        _full_config()["transformer"],
        d_model=dim, num_heads=2, num_layers=1, dim_feedforward=128,
        input_dimension=dim, output_dimensions=[dim],
    )
    quantizer = dict(_full_config()["quantizer"], dimension=32,
                     input_dimension=dim, output_dimension=dim)
    return dict(_full_config(), seanet=seanet, transformer=transformer, quantizer=quantizer)


def _build_random(config: dict):
    """Mimi with deterministic random weights, codebooks included (moshi leaves them at zero,
    which would make every code decode alike). Built on CPU so the seed means the same
    everywhere; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = loaders.get_mimi(None, config, device="cpu", num_codebooks=NUM_CODEBOOKS)
        moshi_private.seed_codebooks(model)
    return model


def _build_from_weights(path: Path):
    try:
        return loaders.get_mimi(path, device="cpu", num_codebooks=NUM_CODEBOOKS)
    except Exception as e:  # corrupt file, wrong keys: say which file
        raise CodecLoadError(f"could not load Mimi weights from {path}: {e}") from e


def _resolve_weights(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / MIMI_WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
        raise CodecLoadError(
            f"directory {path} has no {MIMI_WEIGHTS_FILENAME}; pass the .safetensors file itself, "
            f"a directory containing it, or source='random' for random weights")
    looks_like_path = (source.startswith((".", "/", "~")) or source.endswith(".safetensors")
                       or source.count("/") != 1)
    if looks_like_path:
        raise CodecLoadError(
            f"Mimi source {source!r} is not an existing file or directory (nor a Hugging Face "
            f"repo id like {DEFAULT_MIMI_REPO!r}); pass a local path to {MIMI_WEIGHTS_FILENAME} "
            f"or source='random' for random weights")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, MIMI_WEIGHTS_FILENAME))
    except Exception as e:
        offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        offline = " (HF_HUB_OFFLINE is set)" if offline_env else ""
        raise CodecLoadError(
            f"could not fetch {MIMI_WEIGHTS_FILENAME} from Hugging Face repo {source!r}{offline}: "
            f"{type(e).__name__}: {str(e).rstrip('. ')}. Fix: download it where you have network and pass the local "
            f"path (the file, or a directory containing it), or use source='random' "
            f"(or 'random-small') for random weights that make noise, not speech") from e


# ---- benchmark ---------------------------------------------------------------------------


def _bench(sources: tp.Sequence[str] = ("random-small", "random"), frames: int = 20) -> None:
    """Print ms per frame of streaming decode (batch 1) for each source."""
    for source in sources:
        codec = MimiCodec.load(source)
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, CODEBOOK_SIZE, (1, NUM_CODEBOOKS, frames + 2), generator=gen)
        codec.open_stream(1)
        for t in range(2):
            codec.decode_frame(codes[:, :, t])
        start = time.perf_counter()
        for t in range(2, frames + 2):
            codec.decode_frame(codes[:, :, t])
        ms = (time.perf_counter() - start) * 1000 / frames
        print(f"{source}: {ms:.1f} ms/frame streaming decode "
              f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    import sys

    if "--bench" in sys.argv:
        _bench()
    else:
        print("usage: python -m vendor_dia2.codec --bench")
