"""The engine's prepared voices: built on the engine's spare slot, read by calls by name.

Loading a voice (decoding its audio, finding its words with whisper) is blocking host work and
runs in a worker thread (`load`); building it (Mimi encode, prefill, warm-up) is model work and
runs on the generation thread (`build`). Prepared states are also kept in a disk cache, keyed
by everything that decides them, so a restart or a second server does not prepare them again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

from dia2stream.voices.voice import (LoadedVoice, VoiceCache, VoiceError, VoicePreparer, VoiceRequest, VoiceSettings,
                                     VoiceState)
from dia2stream.wire import protocol as p
from dia2stream.wire.protocol import ErrorCode

log = logging.getLogger(__name__)


class VoiceRegistry:
    """Voices by name. Written on the generation thread only; read anywhere (a dict under the GIL)."""

    def __init__(self, tts, stepper, codec, settings: VoiceSettings, *, spare_slot: int, max_prefix_frames: int,
                 boundary):
        self.tts, self.stepper, self.codec = tts, stepper, codec
        self.settings = settings
        self.preparer = VoicePreparer(tts, settings)
        self.spare_slot, self.max_prefix_frames, self.boundary = spare_slot, max_prefix_frames, boundary
        self.states: dict[str, VoiceState] = {}
        self.default: str | None = None  # the first voice the operator preloaded

    def __contains__(self, name: object) -> bool:
        return name in self.states

    def __iter__(self):
        return iter(list(self.states))

    def get(self, name: str | None) -> VoiceState | None:
        return self.states.get(name) if name else None

    def infos(self) -> list[dict]:
        return [state.info() for state in list(self.states.values())]

    @functools.cached_property
    def disk_cache(self) -> VoiceCache:
        return self.settings.state_cache()

    def load(self, cmd: p.SetVoice, key: str) -> LoadedVoice:
        """Decode a set_voice's audio and find its words (whisper, if no transcript): blocking,
        no model work. Call it in a worker thread, never the generation thread. VoiceError."""
        return self.preparer.load(dataclasses.replace(VoiceRequest.from_command(cmd), name=key))

    def prepare(self, request: VoiceRequest, cache: bool = True) -> VoiceState:
        """Load and build a voice on the generation thread: the operator's preloads at start-up,
        before any call (serving loads in a worker thread, then builds here)."""
        return self.build(self.preparer.load(request), request.name, cache)

    def build(self, loaded: LoadedVoice, name: str, cache: bool = True) -> VoiceState:
        """Build (or take from the disk cache) a loaded voice on the spare slot and store it as
        `name`. Generation thread only. VoiceError."""
        t0 = time.perf_counter()
        key = self.preparer.state_key(loaded, self.stepper, self.boundary)
        state = self.disk_cache.load(key, self.tts.device) if cache else None
        if state is not None:
            state.name = name
            state.speakers = loaded.distinct
            state.prepare_ms = round((time.perf_counter() - t0) * 1000 + loaded.load_ms, 1)
            log.info("voice %s loaded from the cache in %.0f ms", name, state.prepare_ms)
        else:
            state = self._prepare_on_spare_slot(loaded)
            state.name = name
            state.key = key
            if cache:
                try:
                    self.disk_cache.save(key, state)
                except OSError as exc:
                    log.warning("could not save voice %s to the cache: %s", name, exc)
            log.info("voice %s prepared: %.2f s prefix (%d frames), %d speaker(s), %.0f ms", name,
                     state.prefix_s, state.prefix_frames, state.speakers, state.prepare_ms)
        self.states[name] = state
        return state

    def forget(self, names) -> None:
        for name in names:
            self.states.pop(name, None)

    def _prepare_on_spare_slot(self, loaded: LoadedVoice) -> VoiceState:
        try:
            return self.preparer.build(loaded, self.stepper, self.tts.new_state_machine(), self.codec,
                                       max_frames=self.max_prefix_frames, slot=self.spare_slot,
                                       boundary=self.boundary)
        except VoiceError:
            raise
        except Exception as exc:
            log.exception("voice preparation failed")
            raise VoiceError(ErrorCode.VOICE_ERROR, f"voice preparation failed: {exc}") from None
