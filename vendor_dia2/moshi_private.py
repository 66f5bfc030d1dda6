"""Every use of moshi beyond its public API, in one place.

moshi has no public way to do these three things, so they lean on its internals as of
`WRITTEN_FOR` (tests/test_moshi_private.py checks each against the installed moshi and fails
naming both versions when one moves):

- Mimi's default configuration (`loaders._mimi_config`), to build a random Mimi of the real
  layout and a small one of the same layout;
- seeding the codebooks of a random Mimi (moshi leaves them at zero and marks them
  uninitialised, so every code would decode alike): the `_initialized` buffer and the cached
  `_embedding` of `EuclideanCodebook`;
- copying streaming state row by row: moshi hands out its `State` dataclasses through the public
  `get_streaming_state()`, but what their fields hold (tensors with the batch on dim 0, ring KV
  caches with the batch on dim 1 and an `end_offset`) is moshi's business;
- exchanging two rows of a state in place (`swap_rows`) and a state over the first rows only
  whose tensors are views of the whole one (`leading_rows`): every update Mimi's decoder makes
  to its state is in place (`[:] =`, `scatter_`), so a decode over the views advances those rows
  of the whole state.

Streaming itself goes through the public API (`streaming()`, `get_streaming_state()`,
`set_streaming_state()`, `reset_streaming()`), in `codec.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing as tp
from importlib.metadata import version

import torch

WRITTEN_FOR = "0.2.13"

RING_CACHE_FIELDS = ("cache", "end_offset")  # moshi.modules.transformer.RingKVCache


def installed_version() -> str:
    return version("moshi")


def mimi_config() -> dict:
    """A copy of moshi's default Mimi configuration (seanet, transformer, quantizer, rates)."""
    from moshi.models import loaders
    return copy.deepcopy(loaders._mimi_config)


def codebooks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Mimi's k-means codebooks (`EuclideanCodebook`), recognised by their buffers."""
    return [m for m in model.modules() if hasattr(m, "embedding_sum") and hasattr(m, "_initialized")]


@torch.no_grad()
def seed_codebooks(model: torch.nn.Module) -> None:
    """Random codebooks from the global generator, marked initialised, the cached table dropped."""
    for module in codebooks(model):
        module.embedding_sum.normal_()
        module.cluster_usage.fill_(1.0)
        module._initialized.fill_(1.0)
        module.register_buffer("_embedding", None, persistent=False)


def is_ring_cache(value: tp.Any) -> bool:
    return value is not None and all(hasattr(value, name) for name in RING_CACHE_FIELDS)


def state_fields(state: tp.Any) -> dict[str, tp.Any]:
    """The fields of one module's streaming state (a moshi `State` dataclass): tensors, ring KV
    caches, and host-side numbers. The execution mask is not a field (it is set, not carried)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def copy_state(state: tp.Any, rows: slice | None = None) -> dict[str, tp.Any]:
    """Copies of a state's tensors (all rows, or `rows`), ring caches and numbers."""
    out: dict[str, tp.Any] = {}
    for key, value in state_fields(state).items():
        if isinstance(value, torch.Tensor):
            out[key] = (value if rows is None else value[rows]).clone()
        elif isinstance(value, (bool, int, float)):
            out[key] = value
        elif is_ring_cache(value):
            cache = value.cache if rows is None else value.cache[:, rows]  # [2, B, H, T, D]
            end = value.end_offset if rows is None else value.end_offset[rows]
            out[key] = {"cache": cache.clone(), "end_offset": end.clone()}
        # anything else (the device, absent cross-attention caches) is not state
    return out


def gather_rows(state: tp.Any, index: torch.Tensor) -> dict[str, tp.Any]:
    """`copy_state(state, slice(r, r + 1))` for every row r of `index` at once: one gather per
    tensor and ring cache, whatever the number of rows (`row_of` takes row i out of it). Each
    copy is a launch on CUDA: one row at a time, the ~50 of a Mimi decoder's state cost the host
    ~2 ms a row (H200, run 19), for ~4 rows a step at 64 calls."""
    out: dict[str, tp.Any] = {}
    for key, value in state_fields(state).items():
        if isinstance(value, torch.Tensor):
            out[key] = value.index_select(0, index)
        elif isinstance(value, (bool, int, float)):
            out[key] = value
        elif is_ring_cache(value):
            out[key] = {"cache": value.cache.index_select(1, index), "end_offset": value.end_offset.index_select(0, index)}
    return out


def row_of(gathered: dict[str, tp.Any], i: int) -> dict[str, tp.Any]:
    """Row i of `gather_rows`'s output, as `copy_state` gives one row (views: no copy)."""
    out: dict[str, tp.Any] = {}
    for key, value in gathered.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[i:i + 1]
        elif isinstance(value, dict):
            out[key] = {"cache": value["cache"][:, i:i + 1], "end_offset": value["end_offset"][i:i + 1]}
        else:
            out[key] = value
    return out


def restore_state(state: tp.Any, saved: dict[str, tp.Any], rows: slice | None = None) -> None:
    """Copy `copy_state`'s output back in place (into `rows` when given)."""
    for key, value in saved.items():
        current = getattr(state, key)
        if isinstance(value, torch.Tensor):
            if rows is None:
                current.copy_(value)
            else:
                current[rows] = value
        elif isinstance(value, dict):
            if rows is None:
                current.cache.copy_(value["cache"])
                current.end_offset.copy_(value["end_offset"])
            else:
                current.cache[:, rows] = value["cache"]
                current.end_offset[rows] = value["end_offset"]
        elif rows is None:
            setattr(state, key, value)
        # with rows: plain ints (moshi's host-side offsets) are shared by all rows and unused by Mimi's decoder


def swap_rows(state: tp.Any, pair: torch.Tensor, crossed: torch.Tensor) -> None:
    """Exchange rows `pair` = [a1, b1, ...] and `crossed` = [b1, a1, ...] (index tensors on the
    state's device) of every tensor and ring cache of a state, in place."""
    for value in state_fields(state).values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == state.batch_size:
            value[pair] = value[crossed]
        elif is_ring_cache(value):
            value.cache[:, pair] = value.cache[:, crossed]
            if value.end_offset.shape[0] == state.batch_size:
                value.end_offset[pair] = value.end_offset[crossed]


def leading_rows(state: tp.Any, rows: int, exec_mask: torch.Tensor) -> tp.Any:
    """A copy of a state object whose tensors and ring caches are views of its first `rows` rows
    (writes land in the whole state), with `exec_mask` (a view too) as its execution mask."""
    narrow = copy.copy(state)
    for key, value in state_fields(state).items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == state.batch_size:
            setattr(narrow, key, value[:rows])
        elif is_ring_cache(value):
            cache = copy.copy(value)
            cache.cache = value.cache[:, :rows]
            if value.end_offset.shape[0] == state.batch_size:
                cache.end_offset = value.end_offset[:rows]
            setattr(narrow, key, cache)
    narrow.batch_size = rows
    narrow.exec_mask = exec_mask
    return narrow
