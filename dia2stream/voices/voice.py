"""Voice preparation: prefix audio → a `VoiceState` that a session restores by copy.

    preparer = VoicePreparer(tts, VoiceSettings(voice_dir="/srv/voices"))
    loaded = preparer.load(VoiceRequest(name="alice", path="/srv/voices/alice.wav", transcript="Hi, I'm Alice."))
    state = preparer.build(loaded, stepper, machine, codec)   # on the thread that owns the model
    state.save(directory); VoiceState.load(directory, device)

Steps (DIA2_SPEC.md §9):
1. **Audio**: soundfile (WAV/FLAC/OGG, MP3 where libsndfile has it), mixed to mono, resampled to
   24 kHz (soxr, band-limited), at most `max_seconds` per speaker. Unreadable,
   empty, silent or too long audio raises `VoiceError` with code `bad_audio`. Without speaker-2
   audio the speaker-1 audio is reused for speaker 2: Dia2 needs both prefixes to hold a voice.
2. **Word timing**: a supplied transcript is aligned *without* a recogniser: the voiced span
   (first to last 20 ms window whose RMS exceeds 10 % of the loud windows' level) is shared
   among the words in proportion to their length in characters plus one (a rough stand-in for
   duration; whole-word accuracy is all the plan needs, since a word only marks the frame where
   its text tokens enter). Without a transcript, openai-whisper (loaded lazily, word
   timestamps) transcribes; results are cached on disk by the audio's content hash. Offline
   with no local weights: `transcript_required`.
3. **Plan and prefill**: `vendor_dia2.prefix` builds the entries/new-word steps and delayed grid;
   the state machine consumes the prefix words with forced actions; `FrameStepper.prefill` fills
   the cache in parallel; Mimi's streaming decoder is warmed with the prefix codes.
4. **State**: stepper snapshot + state-machine snapshot + codec stream snapshot, saved as
   safetensors + JSON so a restart skips whisper and prefill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from vendor_dia2.checkpoint import cache_dir
from vendor_dia2.codec import CodecStreamSnapshot
from vendor_dia2.prefix import PrefixSpeaker, TimedWord, build_prefix_plan, warm_up_text
from vendor_dia2.tokenizer import step0_bos_id
from vendor_dia2.runtime import StepperSnapshot
from vendor_dia2.script import ScriptEntry
from vendor_dia2.state_machine import TextState

from dia2stream.clock import FRAME_RATE, SAMPLE_RATE
from dia2stream.wire.protocol import ErrorCode

log = logging.getLogger(__name__)

WHISPER_RATE = 16_000
SILENCE_PEAK = 1e-3  # peak amplitude below which audio counts as silent
# Prefix audio bounds checked from the file's header before decoding (issue 13, finding 5: a
# 58 KB FLAC of 150 s x 8 channels x 48 kHz decoded to 214 MiB before its length was checked).
MAX_CHANNELS = 2
RATE_RANGE = (8_000, 192_000)
FORMAT_VERSION = 1


class VoiceError(Exception):
    """Voice preparation failed; `code` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class VoiceSettings:
    voice_dir: str | None = None  # server-side paths must lie inside this folder (None: no paths)
    max_seconds: float = 30.0  # per speaker
    whisper_model: str = "turbo"  # an openai-whisper model name or a checkpoint path
    cache_dir: str | None = None  # transcripts and prepared voices; default $DIA2_CACHE/voices
    allow_download: bool | None = None  # whisper weights; default: not when HF_HUB_OFFLINE=1
    cache_max_mb: int | None = None  # prepared voices on disk, least recently used evicted; None: no limit
    whisper_device: str | None = None  # where whisper runs (the server's device); None: cuda if available, else cpu

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_dir() / "voices"

    def state_cache(self) -> "VoiceCache":
        return VoiceCache(self.cache_path() / "states",
                          max_bytes=self.cache_max_mb << 20 if self.cache_max_mb else None)


@dataclass(frozen=True)
class VoiceRequest:
    name: str
    audio: bytes | None = None
    path: str | None = None
    transcript: str | None = None
    speaker2_audio: bytes | None = None
    speaker2_path: str | None = None
    speaker2_transcript: str | None = None
    trusted: bool = False  # paths given by the operator (CLI), not subject to voice_dir

    @classmethod
    def from_command(cls, cmd) -> "VoiceRequest":
        return cls(name=cmd.name, audio=cmd.audio_bytes(), path=cmd.path, transcript=cmd.transcript,
                   speaker2_audio=cmd.speaker2_audio_bytes(), speaker2_path=cmd.speaker2_path,
                   speaker2_transcript=cmd.speaker2_transcript)


@dataclass
class LoadedSpeaker:
    wav: np.ndarray  # float32 mono 24 kHz
    words: list[TimedWord]
    digest: str  # sha256 of the resampled audio
    transcript: str | None


@dataclass
class LoadedVoice:
    name: str
    speakers: list[LoadedSpeaker]  # always two (speaker 2 may be speaker 1 reused)
    distinct: int  # 1 when speaker 1 was reused for speaker 2
    load_ms: float

    def key(self, extra: str) -> str:
        h = hashlib.sha256(f"v{FORMAT_VERSION}|{extra}".encode())
        for s in self.speakers:
            h.update(s.digest.encode())
            h.update(json.dumps([dataclasses.astuple(w) for w in s.words]).encode())
        return h.hexdigest()


HOST_FIELDS = ("positions", "prefix_frames")  # a StepperSnapshot's fields kept on the host


@dataclass
class VoiceState:
    """A prepared voice: restore `stepper`, `text` and `codec` to stand at the prefix end."""

    name: str
    stepper: StepperSnapshot
    text: TextState
    codec: CodecStreamSnapshot
    prefix_frames: int
    prefix_s: float
    speakers: int
    prepare_ms: float
    words: list[str] = field(default_factory=list)  # the prefix words the plan used
    key: str = ""
    # the text inputs of prefix steps 0..F [F + 1, 2], on the host: a context rollover prefills
    # them again, and row F is what the slot's next step reads after a restore
    text_tokens: torch.Tensor | None = None

    def info(self) -> dict:
        return {"name": self.name, "prefix_s": self.prefix_s, "speakers": self.speakers}

    # -- disk --------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        meta_stepper = {}
        for f in dataclasses.fields(self.stepper):
            value = getattr(self.stepper, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f"stepper.{f.name}"] = value
            elif f.name == "caches":
                for i, (k, v) in enumerate(value):
                    tensors[f"stepper.caches.{i}.k"], tensors[f"stepper.caches.{i}.v"] = k, v
                meta_stepper["caches"] = len(value)
            else:
                meta_stepper[f.name] = value
        codec_meta: dict[str, dict] = {}
        for module, fields in self.codec.states.items():
            codec_meta[module] = {}
            for name, value in fields.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"codec.{module}.{name}"] = value
                    codec_meta[module][name] = {"tensor": True}
                elif isinstance(value, dict):
                    for sub, t in value.items():
                        tensors[f"codec.{module}.{name}.{sub}"] = t
                    codec_meta[module][name] = {"ring": sorted(value)}
                else:
                    codec_meta[module][name] = {"value": value}
        if self.text_tokens is not None:
            tensors["text_tokens"] = self.text_tokens
        text = dataclasses.asdict(self.text)
        text["entries"] = [[e.text, list(e.tokens), e.padding] for e in self.text.entries]
        meta = {"format": FORMAT_VERSION, "name": self.name, "prefix_frames": self.prefix_frames,
                "prefix_s": self.prefix_s, "speakers": self.speakers, "prepare_ms": self.prepare_ms,
                "words": self.words, "key": self.key, "stepper": meta_stepper,
                "codec": {"batch_size": self.codec.batch_size, "states": codec_meta}, "text": text}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "state.safetensors"))
        (directory / "voice.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> "VoiceState":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "voice.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"voice format {meta.get('format')} is not {FORMAT_VERSION}")
        tensors = load_file(str(directory / "state.safetensors"), device=str(device))
        kwargs = {}
        for f in dataclasses.fields(StepperSnapshot):
            if f.name == "caches":
                n = meta["stepper"]["caches"]
                kwargs["caches"] = [(tensors[f"stepper.caches.{i}.k"], tensors[f"stepper.caches.{i}.v"]) for i in range(n)]
            elif f.name in HOST_FIELDS:  # read on every restore: on the host, no device read then
                kwargs[f.name] = tensors[f"stepper.{f.name}"].cpu()
            elif f"stepper.{f.name}" in tensors:
                kwargs[f.name] = tensors[f"stepper.{f.name}"]
            elif f.name in meta["stepper"]:  # entries saved before a field existed get its default
                kwargs[f.name] = meta["stepper"][f.name]
        states: dict[str, dict] = {}
        for module, fields in meta["codec"]["states"].items():
            states[module] = {}
            for name, how in fields.items():
                if "tensor" in how:
                    states[module][name] = tensors[f"codec.{module}.{name}"]
                elif "ring" in how:
                    states[module][name] = {sub: tensors[f"codec.{module}.{name}.{sub}"] for sub in how["ring"]}
                else:
                    states[module][name] = how["value"]
        text = dict(meta["text"])
        text["entries"] = [ScriptEntry(t, tuple(tokens), padding) for t, tokens, padding in text["entries"]]
        text["transcript"] = [tuple(x) for x in text["transcript"]]
        return cls(name=meta["name"], stepper=StepperSnapshot(**kwargs), text=TextState(**text),
                   codec=CodecStreamSnapshot(meta["codec"]["batch_size"], states), prefix_frames=meta["prefix_frames"],
                   prefix_s=meta["prefix_s"], speakers=meta["speakers"], prepare_ms=meta["prepare_ms"],
                   words=meta["words"], key=meta["key"],
                   text_tokens=tensors["text_tokens"].cpu() if "text_tokens" in tensors else None)


# ---------------------------------------------------------------------------------------------
# Disk cache of prepared voices
# ---------------------------------------------------------------------------------------------

_MARK = "voice.json"  # written last by VoiceState.save; its mtime is the entry's last use
_PARTIAL = ".partial-"


class VoiceCache:
    """Prepared voices on disk, one folder per state key (`root/<key[:32]>/`), at most `max_bytes`
    in all: saving evicts the least recently used entries (last use = the mtime of the entry's
    voice.json, set on save and on every load; atime is unreliable under noatime).

        cache = VoiceCache(settings.cache_path() / "states", max_bytes=config.voice_cache_mb << 20)
        state = cache.load(key, device)            # None on a miss or an unreadable entry
        cache.save(key, state)                      # then prunes, never the entry just saved

    Saving writes into a partial folder and renames it, so a reader never sees half an entry.
    Issue 13, finding 9: without a bound, any client could fill the disk with voices."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes  # None or 0: no limit

    def directory(self, key: str) -> Path:
        return self.root / key[:32]

    def load(self, key: str, device: torch.device | str = "cpu") -> VoiceState | None:
        directory = self.directory(key)
        if not (directory / _MARK).is_file():
            return None
        try:
            state = VoiceState.load(directory, device)
        except Exception as exc:
            log.warning("voice cache %s unreadable (%s); removing it", directory, exc)
            shutil.rmtree(directory, ignore_errors=True)
            return None
        if state.key != key:
            return None
        self._touch(directory)
        return state

    def save(self, key: str, state: VoiceState) -> None:
        """Write `state` under `key`, then evict old entries past the size limit. OSError if the
        disk refuses (the caller logs it; a voice works without its cache entry)."""
        final = self.directory(key)
        partial = self.root / f"{_PARTIAL}{key[:32]}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            state.save(partial)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
        self._touch(final)
        self.prune(keep={final})

    def prune(self, keep: set[Path] | frozenset[Path] = frozenset()) -> list[Path]:
        """Remove least recently used entries until the cache fits `max_bytes`; returns them."""
        if not self.max_bytes or not self.root.is_dir():
            return []
        entries = []
        for directory in self.root.iterdir():
            if not directory.is_dir() or directory.name.startswith(_PARTIAL):
                continue
            entries.append((_last_used(directory), directory, _size(directory)))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, directory, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if directory in keep:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            total -= size
            removed.append(directory)
        if removed:
            log.info("voice cache: evicted %d least recently used voice(s) to stay under %d MiB",
                     len(removed), self.max_bytes >> 20)
        return removed

    def size(self) -> int:
        return _size(self.root) if self.root.is_dir() else 0

    @staticmethod
    def _touch(directory: Path) -> None:
        try:
            os.utime(directory / _MARK)
        except OSError:
            pass


def _last_used(directory: Path) -> float:
    try:
        return (directory / _MARK).stat().st_mtime
    except OSError:
        return 0.0  # no marker: a broken entry, evicted first


def _size(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def resolve_path(path: str, voice_dir: str | None) -> Path:
    """`path` if it lies inside `voice_dir` (symlinks resolved), else `path_not_allowed`."""
    if not voice_dir:
        raise VoiceError(ErrorCode.PATH_NOT_ALLOWED, "this server allows no server-side voice paths "
                         "(start it with --voice-dir); send the audio as base64 'audio' instead")
    root = Path(voice_dir).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = candidate.resolve()
    if real != root and root not in real.parents:
        raise VoiceError(ErrorCode.PATH_NOT_ALLOWED, f"path {path!r} is outside the allowed voice folder")
    if not real.is_file():
        raise VoiceError(ErrorCode.BAD_AUDIO, f"no audio file at {path!r}")
    return real


_IN_MEMORY_FILE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def audio_error_reason(exc: BaseException) -> str:
    """libsndfile's reason, without the in-memory file's Python repr it names the file by."""
    return _IN_MEMORY_FILE.sub("the audio", str(exc))


def read_audio(source: bytes | Path, max_seconds: float, what: str = "audio", *,
               max_channels: int = MAX_CHANNELS) -> np.ndarray:
    """Decode a file (bytes or path) → float32 mono 24 kHz; `bad_audio` for anything unusable.

    Channels, rate and length come from the header first, and decoding stops after
    `max_seconds` whatever the header claims, so memory is bounded by
    max_seconds x max_channels x rate x 4 bytes (46 MB at the extremes), not by the file."""
    if isinstance(source, (bytes, bytearray)) and not source:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: the file is empty")

    def opened():
        return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)

    try:
        header = sf.info(opened())
    except Exception as exc:  # libsndfile's errors vary by format and version
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: unreadable or corrupt audio ({audio_error_reason(exc)})") from None
    rate, channels = int(header.samplerate), int(header.channels)
    if not 1 <= channels <= max_channels:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: {channels} channels; at most {max_channels} are accepted")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: sample rate {rate} Hz is outside "
                         f"{RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
    limit = int(math.ceil(max_seconds * rate))
    if header.frames > limit:  # some formats (MP3) only estimate: the decode below is bounded too
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: {header.frames / rate:.1f} s is longer than the "
                         f"{max_seconds:g} s limit")
    try:
        data, rate = sf.read(opened(), frames=limit + 1, dtype="float32", always_2d=True)
    except Exception as exc:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: unreadable or corrupt audio ({audio_error_reason(exc)})") from None
    if data.shape[0] == 0:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: the audio has no samples")
    if data.shape[0] > limit:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: longer than the {max_seconds:g} s limit")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: the audio holds NaN or infinite samples")
    if float(np.abs(mono).max()) < SILENCE_PEAK:
        raise VoiceError(ErrorCode.BAD_AUDIO, f"{what}: the audio is silent")
    return resample(mono, rate, SAMPLE_RATE)


def resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling of a whole clip with soxr (HQ), float32 out."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if rate == target:
        return wav
    return soxr.resample(wav, rate, target, quality="HQ").astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Transcripts
# ---------------------------------------------------------------------------------------------

_TAG = re.compile(r"\[S[12]\]")


def transcript_words(transcript: str) -> list[str]:
    return _TAG.sub(" ", transcript.replace("\u2019", "'").replace(":", " ")).split()


def voiced_span(wav: np.ndarray, rate: int = SAMPLE_RATE) -> tuple[float, float]:
    """(start_s, end_s) of the voiced part: first/last 20 ms window above 10 % of the loud level."""
    win = max(1, rate // 50)
    n = len(wav) // win
    if n == 0:
        return 0.0, len(wav) / rate
    rms = np.sqrt((wav[: n * win].reshape(n, win) ** 2).mean(axis=1))
    level = float(np.percentile(rms, 95))
    voiced = np.nonzero(rms > 0.1 * level)[0]
    if len(voiced) == 0:
        return 0.0, len(wav) / rate
    return voiced[0] * win / rate, (voiced[-1] + 1) * win / rate


def audio_digest(wav: np.ndarray) -> str:
    """The content key of decoded audio (the transcript cache's file name, part of a voice's key)."""
    return hashlib.sha256(wav.tobytes()).hexdigest()


def align_transcript(transcript: str, wav: np.ndarray, rate: int = SAMPLE_RATE) -> list[TimedWord]:
    """Spread the words over the voiced span in proportion to len(word) + 1 (no recogniser)."""
    words = transcript_words(transcript)
    if not words:
        raise VoiceError(ErrorCode.VOICE_ERROR, "the transcript has no words")
    start, end = voiced_span(wav, rate)
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum()
    return [TimedWord(w, float(edges[i]), float(edges[i + 1])) for i, w in enumerate(words)]


class Transcriber:
    """openai-whisper with word timestamps, loaded on first use, cached by audio content hash."""

    def __init__(self, settings: VoiceSettings):
        self.settings = settings
        self._model = None
        self._lock = threading.Lock()  # loads run in worker threads: load the model once, run one at a time

    def cache_file(self, digest: str) -> Path:
        """Where the words heard in the audio with content key `digest` (`audio_digest`) are kept."""
        return self.settings.cache_path() / "transcripts" / f"{digest}.json"

    def __call__(self, wav: np.ndarray, digest: str) -> list[TimedWord]:
        cache = self.cache_file(digest)
        if cache.is_file():
            return [TimedWord(*w) for w in json.loads(cache.read_text())["words"]]
        with self._lock:
            model = self._load()
            try:
                result = model.transcribe(resample(wav, SAMPLE_RATE, WHISPER_RATE), word_timestamps=True,
                                          fp16=next(model.parameters()).device.type == "cuda")
            except Exception as exc:
                raise VoiceError(ErrorCode.VOICE_ERROR, f"whisper failed: {exc}") from None
        words = [TimedWord(w["word"].strip(), float(w["start"]), float(w["end"]))
                 for seg in result.get("segments", []) for w in seg.get("words", []) if w["word"].strip()]
        if not words:
            raise VoiceError(ErrorCode.TRANSCRIPT_REQUIRED, "whisper heard no words in the prefix audio; "
                             "supply 'transcript'")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"model": self.settings.whisper_model, "words": [dataclasses.astuple(w) for w in words]}))
        return words

    def _load(self):
        if self._model is not None:
            return self._model
        how = ("supply the transcript: 'transcript' in set_voice, or --voice NAME=PATH,TRANSCRIPT on the server")
        try:
            import whisper
        except ImportError:
            raise VoiceError(ErrorCode.TRANSCRIPT_REQUIRED, f"openai-whisper is not installed; {how}") from None
        name = self.settings.whisper_model
        allow = self.settings.allow_download
        if allow is None:
            allow = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
        local = os.path.isfile(name) or (name in whisper._MODELS
                                         and os.path.isfile(os.path.join(root, os.path.basename(whisper._MODELS[name]))))
        if not local and not allow:
            raise VoiceError(ErrorCode.TRANSCRIPT_REQUIRED, f"whisper weights {name!r} are not available offline; {how}")
        try:
            device = self.settings.whisper_device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._model = whisper.load_model(name, device=device)
        except Exception as exc:
            raise VoiceError(ErrorCode.TRANSCRIPT_REQUIRED, f"whisper model {name!r} could not be loaded ({exc}); {how}") from None
        return self._model


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------


class VoicePreparer:
    def __init__(self, tts, settings: VoiceSettings = VoiceSettings()):
        self.tts, self.settings = tts, settings
        self.transcribe = Transcriber(settings)

    def load(self, request: VoiceRequest) -> LoadedVoice:
        """Audio and word timings of both speakers (no model work; may run whisper)."""
        t0 = time.perf_counter()
        s1 = self._speaker(request.audio, request.path, request.transcript, "speaker-1 audio", request.trusted)
        if request.speaker2_audio is None and request.speaker2_path is None:
            log.info("voice %s: no speaker-2 audio, reusing speaker 1's (Dia2 needs both speaker prefixes "
                     "to hold the voice)", request.name)
            s2, distinct = s1, 1
        else:
            s2 = self._speaker(request.speaker2_audio, request.speaker2_path, request.speaker2_transcript,
                               "speaker-2 audio", request.trusted)
            distinct = 2
        return LoadedVoice(request.name, [s1, s2], distinct, (time.perf_counter() - t0) * 1000)

    def _speaker(self, audio: bytes | None, path: str | None, transcript: str | None, what: str,
                 trusted: bool = False) -> LoadedSpeaker:
        if audio is not None:
            source = audio
        elif trusted:
            source = Path(path)
            if not source.is_file():
                raise VoiceError(ErrorCode.BAD_AUDIO, f"no audio file at {path!r}")
        else:
            source = resolve_path(path, self.settings.voice_dir)
        wav = read_audio(source, self.settings.max_seconds, what)
        digest = audio_digest(wav)
        words = align_transcript(transcript, wav) if transcript is not None else self.transcribe(wav, digest)
        return LoadedSpeaker(wav, words, digest, transcript)

    def state_key(self, loaded: LoadedVoice, stepper, boundary: str = "upstream") -> str:
        return loaded.key(f"{self.tts.name}|{self.tts.dtype}|{stepper.branches}|{stepper.max_positions}|"
                          f"{self.tts.codec.source}|{boundary}")

    @torch.inference_mode()
    def build(self, loaded: LoadedVoice, stepper, machine, codec, *, max_frames: int, slot: int = 0,
              boundary: str = "upstream") -> VoiceState:
        """Prefill slot `slot` of `stepper` and a fresh `machine` with the prefix, warm a one-row Mimi
        decoder state with it, and snapshot all three. Only that slot's rows are touched (an
        engine keeps a spare slot for this, so live calls are never disturbed). `boundary`: how
        the first turn continues the prefix (vendor_dia2.runtime.PREFIX_BOUNDARIES)."""
        t0 = time.perf_counter()
        d = self.tts.config.data
        codes = [codec.encode(torch.from_numpy(s.wav))[0].cpu() for s in loaded.speakers]
        total = sum(c.shape[1] for c in codes)
        if total > max_frames:
            raise VoiceError(ErrorCode.BAD_AUDIO, f"the prefix has {total} frames ({total / FRAME_RATE:.1f} s); "
                             f"this session's context allows at most {max_frames}")
        plan = build_prefix_plan([PrefixSpeaker(c, s.words, tag) for c, s, tag in
                                  zip(codes, loaded.speakers, ("[S1]", "[S2]"))],
                                 self.tts.tokenizer, d.delay_pattern, d.audio_bos, d.audio_pad, fit_words=True)
        if plan.dropped:
            log.warning("voice %s: %d prefix word(s) did not fit the audio and were left out: %s", loaded.name,
                        len(plan.dropped), " ".join(plan.dropped[:10]))
        machine.reset()
        text = warm_up_text(machine, plan, d.text_pad_token_id, step0_bos_id(self.tts.tokenizer), clear_lookahead=True)
        if machine.remaining_entries or machine.state.pending:
            raise AssertionError("prefix words left in the state machine after warm-up")
        stepper.reset_call(slot)
        stepper.prefill(slot, plan.delayed, text, plan.frames, boundary=boundary)
        warmed = codec.warmed_row(plan.aligned[None].to(codec.device))
        prepare_ms = (time.perf_counter() - t0) * 1000 + loaded.load_ms
        return VoiceState(name=loaded.name, stepper=stepper.snapshot(slot), text=machine.snapshot(),
                          codec=warmed, prefix_frames=plan.frames,
                          prefix_s=round(plan.frames / FRAME_RATE, 3), speakers=loaded.distinct,
                          prepare_ms=round(prepare_ms, 1), words=[e.text for e in plan.entries],
                          text_tokens=text.detach().cpu().clone())


def restore_voice(state: VoiceState, stepper, machine, codec, slot: int = 0) -> None:
    """Put slot `slot` (its stepper rows and codec row) and `machine` at the voice's prefix end."""
    stepper.restore(state.stepper, slot)
    machine.restore(state.text)
    codec.restore_row(slot, state.codec)
