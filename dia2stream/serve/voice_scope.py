"""Which voices one connection may see and use (issue 13, finding 9).

Voices the operator preloads (`--voice`) are shared. A voice a connection makes with `set_voice`
is that connection's alone: the engine stores it under an opaque key (`~c<connection>v<n>`,
never a valid client name, so it cannot collide with a shared voice or be named by another
client), and this scope translates at the connection's edge:

- commands in: `start`/`reset` naming one of the connection's own voices get its key; a name
  that is neither its own nor shared is `unknown_voice` here, listing only what it may use;
- events out: keys in `started`, `reset` and `voices` become the connection's names again, and
  `voices` lists only the shared voices and the connection's own.

An own voice shadows a shared voice of the same name for that connection only. The engine
forgets a connection's voices when it leaves (`Engine.forget_voices(scope.keys())`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable

from dia2stream.wire import protocol as p
from dia2stream.serve.limits import VoiceQuota

PRIVATE_MARK = "~"  # in every private key; VOICE_NAME_RE admits no "~" in a name
_serials = itertools.count(1)


def is_shared(key: str) -> bool:
    return PRIVATE_MARK not in key


class VoiceScope:
    def __init__(self, quota: VoiceQuota) -> None:
        self.quota = quota
        self._tag = f"{PRIVATE_MARK}c{next(_serials)}v"
        self._keys: dict[str, str] = {}  # name -> key, this connection's own voices
        self._names: dict[str, str] = {}  # key -> name

    def key_for(self, command: p.SetVoice) -> str:
        """The key a set_voice stores its voice under (the same key when it replaces one of the
        connection's own). ProtocolError too_many_voices past the connection's quota."""
        self.quota.check(command)
        return self._keys.get(command.name) or f"{self._tag}{len(self._keys) + 1}"

    def made(self, name: str, key: str) -> None:
        """The voice loaded and was handed to the engine under `key`."""
        self.quota.add(name)
        self._keys[name] = key
        self._names[key] = name

    def keys(self) -> list[str]:
        return list(self._names)

    def visible(self, voices: Iterable[str]) -> list[str]:
        """The names this connection may use, given the engine's voice keys."""
        keys = list(voices)
        own = [self._names[k] for k in keys if k in self._names]
        return [k for k in keys if is_shared(k) and k not in self._keys] + own

    def command(self, command: p.Command, voices: Iterable[str]) -> p.Command:
        """`command` with an own voice's name replaced by its key (ProtocolError unknown_voice
        for a voice this connection may not use). `voices`: the engine's voice keys now."""
        name = getattr(command, "voice", None)
        if name is None:
            return command
        if name in self._keys:
            return dataclasses.replace(command, voice=self._keys[name])
        known = set(voices)
        if name not in known:
            usable = ", ".join(sorted(self.visible(known))) or "none"
            raise p.ProtocolError(p.ErrorCode.UNKNOWN_VOICE, f"no voice named {name!r} has been prepared "
                                  f"(prepared: {usable}); send set_voice first", cmd=command.cmd, id=command.id)
        return command

    def event(self, event: object) -> object:
        """`event` as this connection sees it (own keys back to names, others' voices hidden)."""
        if isinstance(event, (p.Started, p.ResetDone)) and event.voice in self._names:
            return dataclasses.replace(event, voice=self._names[event.voice])
        if isinstance(event, p.Voices):
            listed = []
            for info in event.voices:
                key = info["name"]
                if key in self._names:
                    listed.append({**info, "name": self._names[key]})
                elif is_shared(key) and key not in self._keys:
                    listed.append(info)
            return dataclasses.replace(event, voices=listed)
        return event
