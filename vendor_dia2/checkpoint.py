"""Finding, checking, loading and writing checkpoints in the published Dia2 layout.

A checkpoint is a directory (or Hugging Face repo) with `config.json`, `model.safetensors` and
tokenizer files, optionally described by a `dia2_assets.json` manifest (DIA2_SPEC.md §2).
Preset names (`tiny`, `1b`, `2b`) stand for deterministic random checkpoints that we write once
into a cache directory (their audio is noise); the published weights are the Hugging Face repo
`PUBLISHED_CHECKPOINT`, fetched into (or, with HF_HUB_OFFLINE=1, read from) the hub's cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PRESETS, ConfigError, Dia2Config, preset
from .model import Dia2Model

log = logging.getLogger(__name__)

PUBLISHED_CHECKPOINT = "nari-labs/Dia2-2B"  # Nari Labs' published Dia2 weights on the Hugging Face hub
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "dia2_assets.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, fetched or loaded."""


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: Path
    weights: Path
    tokenizer: Path
    mimi: str | None  # codec source named by the checkpoint, if any
    name: str


def cache_dir() -> Path:
    """Where preset checkpoints are written: $DIA2_CACHE, else ~/.cache/dia2stream."""
    return Path(os.environ.get("DIA2_CACHE", Path.home() / ".cache" / "dia2stream"))


def resolve(checkpoint: str | os.PathLike) -> CheckpointFiles:
    """A preset name, a local directory or a Hugging Face repo id → the checkpoint's files."""
    name = str(checkpoint)
    if name in PRESETS:
        root = cache_dir() / f"preset-{name}"
        if not (root / WEIGHTS_FILE).is_file():
            write_random_checkpoint(preset(name), root, progress=name != "tiny", overwrite=False)
        return _files(root, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _files(path, path.name)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(
            f"checkpoint {name!r} is neither a preset ({', '.join(PRESETS)}), a directory, nor a Hugging Face "
            "repo id of the form owner/name")
    return _files(_download(name), name)


def is_random_preset(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` names one of our random presets (weights that make noise, not speech)."""
    return str(checkpoint) in PRESETS


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(hub_failure(repo_id, exc)) from exc


def hub_failure(repo_id: str, exc: Exception) -> str:
    """What to tell a user whose checkpoint could not come from the hub: which repo, which cache
    folder was looked in, and how to run offline."""
    from huggingface_hub import constants

    reason = (str(exc).strip().splitlines() or [""])[0].rstrip(". ")
    where = f"the Hugging Face cache folder {constants.HF_HUB_CACHE} (HF_HUB_CACHE or HF_HOME move it)"
    if constants.HF_HUB_OFFLINE:
        how = (f"HF_HUB_OFFLINE is set, so only {where} was read, and it has no complete copy of {repo_id}. "
               f"Download it where the hub can be reached (`hf download {repo_id}`) and copy that cache folder here")
    else:
        how = (f"It was not in {where} either. Without network: download it where the hub can be reached "
               f"(`hf download {repo_id}`), copy that cache folder here and set HF_HUB_OFFLINE=1")
    return (f"could not fetch checkpoint {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {reason}). "
            f"{how}; or pass a local directory holding the checkpoint, or the preset 'tiny' "
            "(random weights: noise, not speech).")


def _files(root: Path, name: str) -> CheckpointFiles:
    config, weights, tokenizer, mimi = root / CONFIG_FILE, root / WEIGHTS_FILE, root, None
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{manifest}: not valid JSON ({exc})") from exc
        config = root / entries.get("config", CONFIG_FILE)
        weights = root / entries.get("weights", WEIGHTS_FILE)
        if entries.get("tokenizer"):
            tokenizer = _local_or_repo(root, entries["tokenizer"])
        mimi = entries.get("mimi")
    if not config.is_file():
        raise CheckpointError(f"{root}: no {config.name} (a Dia2 checkpoint needs config.json and model.safetensors)")
    if not weights.is_file():
        raise CheckpointError(f"{root}: no {weights.name} (a Dia2 checkpoint needs config.json and model.safetensors)")
    return CheckpointFiles(root, config, weights, tokenizer, mimi, name)


def _local_or_repo(root: Path, ref: str) -> Path:
    local = root / ref
    if local.exists():
        return local
    if Path(ref).is_dir():
        return Path(ref)
    return _download(ref)


def tokenizer_location(files: CheckpointFiles, config: Dia2Config) -> Path:
    ref = config.assets.tokenizer or config.data.tokenizer_path
    if files.tokenizer != files.root or not ref:
        return files.tokenizer
    return _local_or_repo(files.root, ref)


# -- loading ---------------------------------------------------------------------------------------

def load_model(files: CheckpointFiles, device: torch.device, dtype: torch.dtype) -> tuple[Dia2Model, Dia2Config]:
    """Build the model from config.json and load every tensor, checked strictly by name and shape."""
    try:
        config = Dia2Config.from_file(files.config)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    with torch.device("meta"):
        model = Dia2Model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {}
    with safe_open(files.weights, framework="pt", device="cpu") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        _check_tensors(expected, found, files.weights)
        for name in expected:
            state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.eval().requires_grad_(False)
    model.prepare_tables()
    return model, config


def _check_tensors(expected: dict[str, tuple], found: dict[str, tuple], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where}: weights do not match the config"]
    lines += [f"  missing tensor {n}: expected shape {list(expected[n])}" for n in missing]
    lines += [f"  unexpected tensor {n}: shape {list(found[n])}" for n in unexpected]
    lines += [f"  wrong shape for {n}: expected {list(expected[n])}, found {list(found[n])}" for n in wrong]
    raise CheckpointError("\n".join(lines))


# -- writing random checkpoints ------------------------------------------------------------------

def random_state_dict(config: Dia2Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                      progress: bool = False, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Deterministic random weights for every published tensor name.

    Each tensor has its own generator seeded from (seed, name), so a tensor's values do not
    depend on which other tensors exist. Linear/embedding rows ~ N(0, 1/fan_in); norms are ones.
    `device="cuda"` draws on the GPU (seconds instead of minutes at full size; other values).
    """
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Dia2Model(config).state_dict().items()}
    out = {}
    items = shapes.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="random weights", unit="tensor")
    for name, shape in items:
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype)
            continue
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        std = 1.0 if "embed" in name else shape[-1] ** -0.5
        out[name] = (torch.randn(shape, generator=gen, device=device) * std).to(dtype).cpu()
    return out


def write_random_checkpoint(config: Dia2Config, out_dir: str | os.PathLike, *, seed: int = 0,
                            dtype: torch.dtype | None = None, progress: bool = False, overwrite: bool = True,
                            device: str | torch.device = "cpu") -> Path:
    """Write config.json, model.safetensors and tokenizer files; atomic (a temp dir renamed), so
    a reader never sees half a checkpoint and two writers of one preset cannot corrupt it."""
    from .tokenizer import write_tiny_tokenizer

    out_dir = Path(out_dir)
    if dtype is None:  # full-size checkpoints in bf16 keep them at ~5.5 GB
        dtype = torch.float32 if sum(_numel(config).values()) < 50_000_000 else torch.bfloat16
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save(tmp / CONFIG_FILE)
        write_tiny_tokenizer(tmp)
        state = random_state_dict(config, seed=seed, dtype=dtype, progress=progress, device=device)
        if progress:
            log.info("writing %s", out_dir / WEIGHTS_FILE)
        # One metadata key only: safetensors writes the metadata map in hash order, so a second key
        # made the bytes differ from run to run for the same seed.
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if out_dir.exists():
            if not overwrite and (out_dir / WEIGHTS_FILE).is_file():
                shutil.rmtree(tmp)  # another writer finished first
                return out_dir
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _numel(config: Dia2Config) -> dict[str, int]:
    with torch.device("meta"):
        return {n: t.numel() for n, t in Dia2Model(config).state_dict().items()}
