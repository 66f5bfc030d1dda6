"""One call: a connection's conversation, driven frame by frame by the engine.

A `Call` holds everything per conversation that lives on the host: the phase machine (none,
generating, holding, paused, idle), the turn being spoken and its words, the text state machine,
the sampling defaults, the current voice, pacing against real time, and the epoch that silences
stale audio. It has no thread and no model, and it never sees the engine: its device state is
reached through a `SlotHandle` (one slot of the stepper, one row of the Mimi stream), its
settings come as `CallSettings`, its voices from the registry. The engine calls its command handlers and
its per-frame hooks (`preview`, `advance`, `deliver`, `check_end`) on the generation thread.

Speech onset: a turn's first sent frame is the frame where its first word starts, less
`lead_in_frames`. Frames before it (initial padding, the previous turn's silent tail) are decoded,
so the codec stays continuous, but never sent: a client that plays what it receives hears the
first word `lead_in_frames` frames after the first byte.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from vendor_dia2.runtime import SamplingParams
from vendor_dia2.script import ScriptError, parse_script
from vendor_dia2.delays import delay_codes
from vendor_dia2.prefix import forced_text

from dia2stream.clock import FRAME_RATE, FRAME_SECONDS, MAX_TOP_K
from dia2stream.wire import protocol as p
from dia2stream.wire.frames import AudioFrame
from dia2stream.wire.formats import DEFAULT_FORMAT, get_format
from dia2stream.wire.protocol import ErrorCode
from dia2stream.call.history import CodecMarks, RollbackLog, StepBefore, TextLog
from dia2stream.call.slot import CallSettings, PlannedPrefill, SlotHandle
from dia2stream.call.pending import check_turn_text
from dia2stream.call.phases import Phase, PhaseEvent, PhaseMachine
from dia2stream.call.turn import Turn

if TYPE_CHECKING:
    from dia2stream.call.user_turn import LoadedUserTurn
    from dia2stream.voices.registry import VoiceRegistry

log = logging.getLogger(__name__)

HISTORY_MARGIN = 64  # steps of history kept beyond what the lead and the delay need
MAX_HISTORY = 2048
# Frames between snapshots of the call's Mimi row: a rollback restores the last one before the
# frame it goes back to and re-decodes up to CODEC_MARK_EVERY - 1 frames before the call steps
# again. 8 rather than 16: the simulated H200 64-call call-centre's after-barge-in onset p50 fell
# from ~357 to ~277 ms (p95 ~640 -> ~576); each mark is ~8.2 MB of device memory (Mimi's decoder
# state for one row), ~13 a call at the default lead instead of ~7.
CODEC_MARK_EVERY = 8


@dataclass(frozen=True)
class Drained:
    """Internal, never sent: a draining call has said everything (its utterance's last frame and
    `done` are queued before this), so its connection may close now."""


Item = object  # an event dataclass from `protocol`, an AudioFrame, or Drained
Sink = Callable[[Item], None]


@dataclass(frozen=True)
class CallModel:
    """What a call needs of the model: its tokenizer, a text state machine per call, and the
    codebook layout a rollover rebuilds the delayed grid with."""

    tokenizer: object
    new_state_machine: Callable[[], object]
    data: object  # vendor_dia2.config.DataConfig


class Call:
    """One conversation on one slot of an engine (see module docstring)."""

    def __init__(self, slot: SlotHandle, settings: CallSettings, model: CallModel, voices: "VoiceRegistry",
                 sink: Sink):
        self.slot, self.settings, self.model, self.voices, self.sink = slot, settings, model, voices, sink
        self.machine = model.new_state_machine()
        self.defaults = SamplingParams(cfg_scale=settings.cfg_scale, seed=settings.seed)
        self.current_voice: str | None = voices.default
        # The wire format asked for: a new one applies from the next turn. Frames go out as PCM
        # stamped with it; the sender encodes them (wire/frames.FrameWriter), off this thread.
        self.format = DEFAULT_FORMAT
        self._fresh_audio = True  # the next frame does not continue the last one sent
        self.phases = PhaseMachine()
        self.turn: Turn | None = None
        self.last_turn: Turn | None = None
        # Raised by barrier commands (pause, reset) when they are submitted, on the event loop; the
        # sender drops frames stamped with an older epoch.
        self.epoch = 0
        self.out_epoch = 0  # stamped on frames by the generation thread
        self.frames_acked = 0  # frames the sender has taken off its queue (set by the server)
        self.frames_emitted = 0
        self.attached = False  # set on the generation thread once the slot is reset for this call
        self.draining = False  # the server is draining: finish the utterance, begin none (generation thread)
        self._drained_sent = False
        self._floor_frame = 0  # aligned frames before this belong to the voice prefix (never decoded)
        self._rolled_over_at: int | None = None  # where the last planned rollover left the context
        self._prefix_codes: torch.Tensor | None = None  # its aligned codes as prepared (set by voice_reset)
        self._received_at = 0.0
        # Barge-in rollback: the last steps' text states and inputs (rows of ints in a ring, see
        # call/history.py), and Mimi row snapshots every few frames, enough to go back over
        # everything generated ahead of the caller.
        lead_frames = int(settings.max_lead_ms / 1000 * FRAME_RATE) + 1
        self._history = RollbackLog(min(MAX_HISTORY, lead_frames + slot.max_delay + HISTORY_MARGIN))
        self._codec_marks = CodecMarks(self._history.capacity // CODEC_MARK_EVERY + 2)
        self._text = TextLog()  # the client's text since the oldest step a rollback can go back to
        self._last_text: tuple[int, int] = (0, 0)
        self._drop_unspoken = False  # after a rollback, an inject replaces the words not heard
        # Text inputs of every step in the context, for a rollover to prefill them again.
        self._text_log = np.zeros((settings.context_frames + 2, 2), dtype=np.int64)
        self.rollovers = 0
        # A caller's turn (issue 21): aligned frames before `_caller_until` are in Mimi's stream
        # already (never decoded by a turn), and the agent's next words are tagged [S1].
        self._caller_until = 0
        self._speaker_tag: str | None = None
        self.user_turns = 0

    # -- state shared with the engine ----------------------------------------------------------

    @property
    def position(self) -> int:
        return self.slot.position

    @property
    def phase(self) -> Phase:
        return self.phases.phase

    @property
    def generating(self) -> bool:
        return self.phase is Phase.GENERATING and self.attached

    @property
    def speaking(self) -> bool:
        """An utterance is under way: generating, or holding for more of its streamed text."""
        return self.phase in (Phase.GENERATING, Phase.HOLDING)

    def lead_seconds(self) -> float:
        """How far the audio sent so far runs ahead of a client playing it in real time."""
        return 0.0 if self.turn is None else self.turn.lead_seconds(time.monotonic())

    def lead_peak_seconds(self) -> float:
        """The most lead this turn's audio has had since its pacing last (re)started."""
        turn = self.turn
        return 0.0 if turn is None else turn.lead_peak

    @property
    def awaiting_first_audio(self) -> bool:
        """The caller waits for this turn's first audio, or for its first after a resume."""
        return self.turn is not None and self.turn.awaiting_first_audio

    @property
    def catching_up(self) -> bool:
        """Frames are owed that the model has not made yet: the steps after a rollback or a
        rollover (heard frames replayed) before the next frame can be decoded."""
        turn = self.turn
        return turn is not None and turn.next_frame > self.slot.ready_frame + 1

    @property
    def unsent_frames(self) -> int:
        return self.frames_emitted - self.frames_acked

    # -- lifecycle (generation thread) -----------------------------------------------------------

    def attach(self) -> None:
        self.voice_reset()
        self.attached = True

    def detach(self) -> None:
        self.attached = False
        self.phases.go(PhaseEvent.RESET)
        self.clean_reset()

    def drain(self) -> None:
        """The server is draining: the utterance being spoken goes on to its end, no new one
        begins (`draining` error), and `Drained` follows the last of it (`note_drained`)."""
        self.draining = True
        self.note_drained()

    def note_drained(self) -> None:
        """Once a draining call is not speaking, tell its connection (once) that it may close."""
        if self.draining and not self._drained_sent and not self.speaking:
            self._drained_sent = True
            self.emit(Drained())

    # -- commands (generation thread) ------------------------------------------------------------

    def handle(self, cmd: object, received_at: float, epoch: int) -> None:
        self.out_epoch = max(self.out_epoch, epoch)
        self._received_at = received_at
        handler = {p.Start: self._on_start, p.Inject: self._on_inject, p.Flush: self._on_flush,
                   p.Pause: self._on_pause, p.Resume: self._on_resume, p.Reset: self._on_reset,
                   p.ListVoices: self._on_list_voices}.get(type(cmd))
        if handler is None:
            raise TypeError(f"a call cannot handle {type(cmd).__name__}")
        try:
            if self.draining and self._begins_utterance(cmd):
                raise p.ProtocolError(ErrorCode.DRAINING, "the server is draining for a restart and takes no new "
                                      "turn on this call; reconnect to be served by another server",
                                      cmd=cmd.cmd, id=cmd.id)
            handler(cmd)
        except p.ProtocolError as err:
            self.emit(err.to_event())

    def _begins_utterance(self, cmd: object) -> bool:
        """Would `cmd` make this call speak when it is not speaking now? (An inject or flush
        during an utterance continues it, and a draining server lets it finish.)"""
        if isinstance(cmd, p.Start):
            return True
        return isinstance(cmd, (p.Inject, p.Resume)) and not self.speaking

    def _on_start(self, cmd: p.Start) -> None:
        check_turn_text(self.machine, cmd, self.settings.max_pending_text_chars)
        if self.phase in (Phase.GENERATING, Phase.HOLDING):
            raise p.ProtocolError(ErrorCode.BUSY, "an utterance is being generated; send pause or reset first",
                                  cmd="start", id=cmd.id)
        self._check_voice(cmd)
        params = self._sampling(cmd)
        entries = self._parse(cmd.text, cmd, leading_speaker="[S1]")
        if cmd.final and not any(entry.tokens for entry in entries):
            raise p.ProtocolError(ErrorCode.EMPTY_TEXT, "text: no word to speak (only speaker tags or markup); "
                                  "stream a turn's first words with final: false if they come later",
                                  cmd="start", id=cmd.id)
        if cmd.voice is not None:
            self.current_voice = cmd.voice
        self._set_format(cmd.format)
        self.voice_reset()
        self.slot.set_sampling(params)
        self._begin_turn(cmd.id)
        self._push(entries, cmd.final, cmd.id)

    def _on_inject(self, cmd: p.Inject) -> None:
        check_turn_text(self.machine, cmd, self.settings.max_pending_text_chars)
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to continue: send start first", cmd="inject",
                                  id=cmd.id)
        entries = self._parse(cmd.text, cmd, leading_speaker=self._speaker_tag)
        if any(e.tokens for e in entries):
            self._speaker_tag = None  # tagged once, on the first word after the caller's turn
        if self._drop_unspoken:  # after a barge-in: the new text replaces what the caller did not hear
            self._drop_words_not_heard()
        if self.phase is Phase.IDLE:
            self._begin_turn(cmd.id, first_frame=self._drop_undecoded_tail())  # the next turn, from the warm state
        elif self.phase is Phase.HOLDING and any(e.tokens for e in entries):
            # words after a hold (the text came slower than speech): without the drop, the 18
            # steps of silent tail made before the hold would be decoded and sent before them
            self._drop_undecoded_tail()
        elif self.phase is Phase.PAUSED:
            self.phases.go(PhaseEvent.RESUME)
            self._fresh_audio = True  # frames queued before the pause were dropped
            self.emit(p.Resumed(id=cmd.id if cmd.id is not None else self.turn.id))
            self.turn.resumed = True
        if cmd.id is not None:
            self.turn.id = cmd.id
        self._push(entries, cmd.final, cmd.id)

    def _on_flush(self, cmd: p.Flush) -> None:
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to flush: send start first", cmd="flush", id=cmd.id)
        self._give_text((), final=True)
        if self.phase is Phase.HOLDING:
            self._leave_hold()  # speak the tail, then done
        else:
            self.phases.go(PhaseEvent.FINAL_TEXT)

    def _on_pause(self, cmd: p.Pause) -> None:
        spoken = unspoken = None
        if cmd.played_ms is not None:
            spoken, unspoken = self._roll_back(cmd)
        turn = self.turn or self.last_turn
        self.phases.go(PhaseEvent.PAUSE)
        frames = turn.frames_sent if turn else 0
        self.emit(p.Paused(id=cmd.id if cmd.id is not None else (turn.id if turn else None), frames_sent=frames,
                           position=self.position, audio_s=round(frames * FRAME_SECONDS, 3),
                           spoken=spoken, unspoken=unspoken))

    def _roll_back(self, cmd: p.Pause) -> tuple[list[dict], list[str]]:
        """Barge-in: go back to the end of what the caller heard (`played_ms` of this utterance).
        Everything is checked before anything changes; a bad value leaves the call as it was."""
        turn = self.turn
        if turn is None or self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, "played_ms: there is no utterance to roll back",
                                  cmd="pause", id=cmd.id)
        heard = int((cmd.played_ms + 1e-6) // (FRAME_SECONDS * 1000))  # whole frames played
        if heard > turn.frames_sent:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"played_ms: {cmd.played_ms:g} ms is more than the "
                                  f"{turn.frames_sent * FRAME_SECONDS * 1000:.0f} ms of audio sent for this utterance",
                                  cmd="pause", id=cmd.id)
        start = turn.send_from if turn.send_from is not None else turn.next_frame
        target = start + heard  # first aligned frame the caller has not heard
        if target < self._caller_until:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, "played_ms: the caller's turn came after this utterance; "
                                  "there is nothing of it to roll back", cmd="pause", id=cmd.id)
        record = self._history.find(target)
        mark = self._codec_marks.last_at_or_before(target)
        if record is None or mark is None or target > self.position:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"played_ms: cannot roll back to {cmd.played_ms:g} ms "
                                  "(out of the range this call keeps)", cmd="pause", id=cmd.id)
        self._take_back_to(target, record)
        for pushed in self._text.since(record.text_seen):  # sent after that step: not taken back with it
            self.machine.push(list(pushed.entries), final=pushed.final)
        self.slot.replay_codec(mark[1], self.slot.aligned_codes(mark[0], target))  # planned: decoded between frames
        turn.next_frame = target
        turn.frames_sent = heard
        transcript = self.machine.words
        turn.words_emitted = min(turn.words_emitted, len(transcript))
        spoken = [{"word": word, "start_s": round(max(0, step - start) * FRAME_SECONDS, 3)}
                  for word, step in transcript[turn.words_before:]]
        unspoken = self.machine.queued_words()
        self.phases.go(PhaseEvent.ROLLED_BACK)
        self._drop_unspoken = True
        log.info("call %d: rolled back to frame %d (%d heard), %d word(s) spoken, %d not", self.slot.index, target, heard,
                 len(spoken), len(unspoken))
        return spoken, unspoken

    def _on_resume(self, cmd: p.Resume) -> None:
        if self.phase is Phase.NONE:
            raise p.ProtocolError(ErrorCode.NOT_STARTED, "nothing to resume: send start first", cmd="resume", id=cmd.id)
        if self.phase is not Phase.PAUSED:
            raise p.ProtocolError(ErrorCode.NOT_PAUSED, f"nothing is paused (the call is {self.phase.value})",
                                  cmd="resume", id=cmd.id)
        self.phases.go(PhaseEvent.RESUME)
        self._drop_unspoken = False  # speak the words the caller did not hear, from where they stopped
        self._fresh_audio = True  # frames queued before the pause were dropped
        self.turn.resumed = True
        self.emit(p.Resumed(id=cmd.id if cmd.id is not None else self.turn.id))

    def _on_reset(self, cmd: p.Reset) -> None:
        self._check_voice(cmd)
        if cmd.voice is not None:
            self.current_voice = cmd.voice
        self._set_format(cmd.format)
        self.voice_reset()
        self.phases.go(PhaseEvent.RESET)
        self.emit(p.ResetDone(voice=self.current_voice, id=cmd.id))

    def _on_list_voices(self, cmd: p.ListVoices) -> None:
        self.emit(p.Voices(voices=self.voices.infos(), id=cmd.id))

    # -- frames (generation thread) --------------------------------------------------------------

    def context_left(self) -> bool:
        return self.position + 1 < self.settings.context_frames

    def preview(self):
        """Both possible text answers of the next step (before it runs); records the step."""
        position = self.position
        self.record_step_before(position)
        return self.machine.preview(position)

    def preview_after(self, step: int):
        """The text answers of the step after `step`, which is in flight (its action not applied
        yet): for each action `step` may have sampled, both answers of the next step. Records
        nothing: the state before the next step is recorded once `step` is applied
        (`record_step_before`), and no command reaches this call before then (the engine holds them)."""
        return self.machine.preview_after(step, 0), self.machine.preview_after(step, 1)

    def record_step_before(self, position: int) -> None:
        """Keep the text state and inputs before step `position` (a rollback goes back to them,
        a rollover prefills the text again)."""
        self._history.record(position, self._last_text, self.machine.mark(), self._text.serial)
        if position >= self._floor_frame:  # upstream's boundary runs step F - 1 again: keep the prefix's text
            self._text_log[position] = self._last_text

    def may_step_ahead(self) -> bool:
        """Whether this call may be launched again while its last launched step is not applied:
        nothing that step's actions can do (end the turn, put it on hold) may be due by its end
        check, and the call must need nothing a known text state is needed for (a rollover, a
        full context, draining). When in doubt, no: a call sitting out one step costs that call
        one step; a wrong guess would change its tokens. `position` already stands after the
        step in flight (the host mirror moves at launch)."""
        turn, m = self.turn, self.machine
        if self.draining or not self.generating or turn is None or not self.context_left():
            return False
        position, tail = self.position, self.settings.tail_frames
        if m.end_step is not None:
            return position < m.end_step + tail  # `check_end` after the step in flight would not end it
        if m.remaining_entries:
            return True  # a word is queued: the step in flight can neither end the turn nor starve it
        if m.final:  # the step in flight may set the end at its own step, position - 1: due at position - 1 + tail
            return tail > 1
        # the step in flight may starve the call; the hold begins once every word is out
        return position < _first(m.last_word_step, turn.start_position) + tail

    def takes_text_beside_step_in_flight(self, cmd: object) -> bool:
        """Whether `cmd` may be applied while this call's last launched step is not applied yet,
        with the result it would have after it: an `inject` of the same turn or a `flush`, while
        that step cannot take a word (it emits the word being spoken or pads a forced pause, so
        it never reads the queue, whichever action it samples) and its end check reads nothing
        the command changes (no end and no hold under way). Streamed text then costs the call no
        step of sitting out (a held command does), which matters most as a turn starts.
        A command refused for its text answers one step sooner than it would after that step."""
        if self.phase is not Phase.GENERATING or self._drop_unspoken or self.turn is None:
            return False
        if isinstance(cmd, p.Inject):
            if cmd.id is not None and cmd.id != self.turn.id:
                return False  # the turn's id is what that step's events carry
        elif not isinstance(cmd, p.Flush):
            return False
        m = self.machine
        c = m.cursor
        return m.end_step is None and not m.starved and (c.pending_pos < c.pending_end or c.forced_padding > 0)

    def frame_ready(self, position: int | None = None) -> bool:
        """After a step: whether it made an aligned frame of this turn ready to decode (from the
        position alone, so the decode can be queued before `advance`). `position`: where the step
        left the call (default: where it stands now)."""
        ready = (self.position if position is None else position) - self.slot.max_delay
        return ready >= self.turn.next_frame

    def advance(self, action: int, step: int | None = None) -> bool:
        """Apply the sampled action of step `step` (default: the step just run; the host mirror
        moved past it at launch). True when an aligned frame of this turn is ready to decode."""
        step = self.position - 1 if step is None else step
        self._last_text = self.machine.process(step, action)
        return self.frame_ready(step + 1)

    def codec_mark_due(self) -> bool:
        """Whether the call's Mimi row is to be marked before the announced frame is decoded:
        every few frames (a rollback re-decodes from the last mark before the frame it goes
        back to). The engine takes the marks due in a step together (`add_codec_mark`)."""
        return self.slot.ready_frame % CODEC_MARK_EVERY == 0

    def add_codec_mark(self, snapshot) -> None:
        """A snapshot of the call's Mimi row before the announced frame is decoded."""
        self._codec_marks.add(self.slot.ready_frame, snapshot)

    def deliver(self, pcm: np.ndarray, frame: int | None = None) -> None:
        """The decoded frame `advance` announced (aligned frame `frame`; default: the one the
        slot's last step made ready): send it, with its words, unless it lies before the turn's
        first word (less the lead-in)."""
        turn = self.turn
        frame = self.slot.ready_frame if frame is None else frame
        turn.next_frame = frame + 1
        if turn.send_from is None:
            first_word = self._first_word_frame()
            if first_word is None or frame < first_word - self.settings.lead_in_frames:
                return  # silence before the first word: decoded for continuity, not sent
            turn.first_word_frame = first_word
            turn.send_from = frame
        self._emit_words_up_to(frame)
        self.emit(AudioFrame(pcm, self.out_epoch, turn.frames_sent, self.format, self._fresh_audio))
        self._fresh_audio = False
        turn.frame_sent(time.monotonic())
        self.frames_emitted += 1

    def check_end(self, position: int | None = None) -> None:
        """After a step is applied: end the turn, or hold for more text, when due. `position`:
        where that step left the call (default: where it stands now)."""
        if self.phase is not Phase.GENERATING:
            return  # a step is applied before any command that could change the phase: never here
        position = self.position if position is None else position
        m = self.machine
        if m.end_step is not None and position >= m.end_step + self.settings.tail_frames:
            turn = self.turn
            self._emit_words_up_to(1 << 60)
            ttfa, onset = turn.timings_ms()
            self.emit(p.Done(id=turn.id, frames=turn.frames_sent, audio_s=round(turn.frames_sent * FRAME_SECONDS, 3),
                             wall_s=round(time.monotonic() - turn.started_at, 3), ttfa_ms=ttfa, onset_ms=onset))
            log.info("call %d: utterance done, %d frames, ttfa %s ms, onset %s ms", self.slot.index, turn.frames_sent,
                     ttfa, onset)
            self.phases.go(PhaseEvent.TURN_ENDED)
        elif m.starved and position >= _first(m.last_word_step, self.turn.start_position) + self.settings.tail_frames:
            self.phases.go(PhaseEvent.WORDS_RAN_OUT)  # every consumed word is out; wait for more text

    def context_full(self) -> None:
        turn_id = self.turn.id if self.turn else None
        self.emit(p.ErrorEvent(code=ErrorCode.CONTEXT_FULL, id=turn_id,
                               message=f"the context limit of {self.settings.context_frames} frames was reached; "
                                       "the call was reset"))
        self.voice_reset()
        self.phases.go(PhaseEvent.RESET)
        self.emit(p.ResetDone(voice=self.current_voice))

    def roll_over(self) -> bool:
        """Calls of any length: rebuild the context from the voice prefix plus the most recent
        conversation (its audio codes and text inputs, a sliding window) with one parallel prefill,
        and go on from the first frame not yet decoded. Nothing sent changes and Mimi's stream is
        untouched, so the audio continues without a seam. False if there is no room to do it."""
        settings, slot, turn = self.settings, self.slot, self.turn
        floor = self._floor_frame
        if turn is None:
            return False
        resume_at = turn.next_frame  # every frame before it is decoded (complete)
        before = self._state_before(resume_at)
        window = min(settings.rollover_frames, resume_at - floor, (settings.context_frames - floor) // 2)
        if before is None or window < slot.max_delay:
            return False
        t0 = time.perf_counter()
        self.machine.rewind(before.text)
        self.machine.shift_steps(floor + window - resume_at)
        self._rebuild(resume_at, window, before.text_in)
        self.rollovers += 1
        log.info("call %d: context rolled over at frame %d: prefix %d + last %d frames, %.1f ms", self.slot.index,
                 resume_at, floor, window, (time.perf_counter() - t0) * 1000)
        return True

    def _rebuild(self, resume_at: int, window: int, text_in: tuple[int, int],
                 appended: tuple[torch.Tensor, np.ndarray] | None = None) -> int:
        """Rebuild the slot's context as the voice prefix + the `window` frames of conversation
        before `resume_at` (+ `appended` known frames: codes [Q, N] and the text inputs of their
        steps and of the step after them [N + 1, 2]) in one parallel prefill, standing before the
        step after them. `text_in`: the text inputs of step `resume_at`. The state machine is the
        caller's to set. Returns the shift of positions (new - old) for frames before `resume_at`."""
        slot, turn, floor, d = self.slot, self.turn, self._floor_frame, self.model.data
        frames = floor + window
        # the prefix as prepared: with upstream's boundary the turn sampled over its delayed tail
        parts = [self._prefix_codes, slot.aligned_codes(resume_at - window, resume_at)]
        if appended is not None:
            parts.append(appended[0].to(parts[0].device))
        codes = torch.cat(parts, dim=1)  # [Q, F + W (+ N)]
        total = codes.shape[1]
        delayed = delay_codes(codes.cpu(), list(d.delay_pattern), d.audio_pad)
        for k, delay in enumerate(d.delay_pattern):
            delayed[k, :delay] = d.audio_bos
        text = np.empty((total + 1, 2), dtype=np.int64)
        text[:floor] = self._text_log[:floor]
        text[floor:frames] = self._text_log[resume_at - window:resume_at]
        text[frames] = text_in
        if appended is not None:
            text[frames:] = appended[1]
        # clean boundary, whatever the voices use: this is conversation already heard, kept as it was
        slot.prefill(delayed, torch.from_numpy(text), total, boundary="clean")
        delta = frames - resume_at
        self._rebase(delta, keep_from=resume_at - window, upto=resume_at)
        self._text_log[floor:total + 1] = text[floor:]
        self._last_text = tuple(int(t) for t in text[total])
        self._caller_until = max(0, self._caller_until + delta)
        turn.shift(delta)
        return delta

    def _state_before(self, position: int) -> StepBefore | None:
        """The text state and text inputs before step `position`: the live ones when the slot
        stands there (after a rollback), else the rollback history's (None if it is too old)."""
        if self.position == position:
            return StepBefore(position, self.machine.mark(), self._last_text, self._text.serial)
        return self._history.find(position)

    # -- the caller's turn (issue 21) ------------------------------------------------------------

    def plan_user_turn(self, loaded: "LoadedUserTurn", client_id) -> None:
        """A caller's turn, loaded off this thread: checked now, appended to the context as
        planned work (`_append_user_turn`) that the engine runs between frames."""
        try:
            self._check_user_turn(loaded, client_id)
        except p.ProtocolError as err:
            self.emit(err.to_event())
            return
        self.slot.plan_prefill(PlannedPrefill(lambda: self._append_user_turn(loaded, client_id),
                                              f"user turn of {loaded.frames} frames"))

    def _check_user_turn(self, loaded: "LoadedUserTurn", client_id) -> None:
        def refuse(code, message):
            return p.ProtocolError(code, message, cmd="user_turn", id=client_id)

        if self.draining:
            raise refuse(ErrorCode.DRAINING, "the server is draining for a restart and takes no new turn on this "
                         "call; reconnect to be served by another server")
        if self.phase is Phase.NONE or self.turn is None:
            raise refuse(ErrorCode.NOT_STARTED, "a caller's turn joins a conversation: send start first")
        if self.speaking:
            raise refuse(ErrorCode.BUSY, "an utterance is being generated; user_turn is accepted when idle, or "
                         "when paused with played_ms (barge-in)")
        if self.phase is Phase.PAUSED and not self._drop_unspoken:
            raise refuse(ErrorCode.BUSY, "the utterance is paused without played_ms: pause with played_ms (what "
                         "the caller heard) before the caller's turn, or resume it")
        room = self.settings.context_frames - self.settings.min_turn_frames - self._floor_frame
        if loaded.frames > room:
            raise refuse(ErrorCode.BAD_AUDIO, f"the caller's turn of {loaded.frames} frames does not fit this call's "
                         f"context beside the voice prefix ({room} frames)")
        if self.turn.next_frame + loaded.frames > room + self._floor_frame and self.settings.rollover_frames <= 0:
            raise refuse(ErrorCode.CONTEXT_FULL, "the caller's turn does not fit the context left and this server "
                         "does not roll over (--rollover-frames 0); reset the call")

    def _append_user_turn(self, loaded: "LoadedUserTurn", client_id) -> None:
        """The model work of a caller's turn (planned, after any codec re-decode of a rollback):
        Mimi-encode it, force its words through the text state machine as [S2] speech, and
        prefill its frames at the first frame the last turn did not decode, on the context as it
        stands (only the caller's frames run); where they would not fit, rebuild the context as
        the recent window plus these frames (a rollover). The frames the last turn generated past
        what was decoded (its silent tail, or what the caller did not hear) are dropped, as a
        rollback drops them."""
        assert self.slot.pending_replay is None, "the engine finishes a rollback's re-decode first"
        t0 = time.perf_counter()
        settings, slot, turn = self.settings, self.slot, self.turn
        floor = self._floor_frame
        resume_at = turn.next_frame  # frames before it are decoded (heard, or the tail's start)
        before = self._state_before(resume_at)
        if before is None:
            raise RuntimeError(f"no text state kept for frame {resume_at}")
        codes = slot.encode(loaded.wav)[:, : loaded.frames]  # [Q, N]
        n = codes.shape[1]
        room = settings.context_frames - settings.min_turn_frames - floor - n
        window = resume_at - floor
        rolls_over = window > room
        if rolls_over:  # keep the most recent conversation of both speakers
            window = max(0, min(settings.rollover_frames, room))
        start = floor + window  # where the caller's turn lands
        text_in = before.text_in
        self.machine.rewind(before.text)
        self.machine.shift_steps(start - resume_at)
        self.machine.drop_queued()  # what the caller did not hear is not said (a barge-in)
        self.machine.clear_pending()  # nor the rest of a word the caller cut off
        self.machine.push(list(loaded.entries), final=True)
        said = forced_text(self.machine, loaded.steps, n, start=start)
        self.machine.clear_lookahead()  # the caller's words must not leak into the agent's turn
        assert not self.machine.remaining_entries, "the caller's words were placed to fit its frames"
        text = np.empty((n + 1, 2), dtype=np.int64)
        text[0] = text_in
        text[1:] = said.numpy()
        if rolls_over:
            self._rebuild(resume_at, window, text_in, appended=(codes, text))
            self.rollovers += 1
        else:
            self._append_at(resume_at, codes, text)
        end = start + n
        # Mimi's row stays where the agent's last decoded frame left it: the caller's frames are
        # never decoded (never sent), and the next turn's first decoded frames are its unsent
        # lead-in. A rollback re-decodes from here, never over the caller's frames. (Running the
        # row over the caller's frames one by one, as planned work, starved 64 simulated calls.)
        self._codec_marks.restart_at(end, slot.codec_snapshot())
        self._caller_until = end
        turn.next_frame = end  # the slot stands before step `end`: the live text state is its state
        self._speaker_tag = "[S1]"  # the agent answers as speaker 1
        self._drop_unspoken = False
        self.phases.go(PhaseEvent.CALLER_SPOKE)
        self.user_turns += 1
        prefill_ms = round((time.perf_counter() - t0) * 1000, 1)
        log.info("call %d: caller's turn of %d frames appended at frame %d (%d kept before it%s), %.1f ms",
                 slot.index, n, start, window, ", rolled over" if rolls_over else "", prefill_ms)
        self.emit(p.UserTurnDone(id=client_id, frames=n, position=self.position, prefill_ms=prefill_ms))

    def _append_at(self, start: int, codes: torch.Tensor, text: np.ndarray) -> None:
        """Prefill known frames (codes [Q, N], the text inputs of steps start..start + N [N + 1, 2])
        at `start` on the slot's context as it stands: the cache, codes and text before `start`
        are kept, and what the slot held from `start` on (a turn's undecoded tail) is replaced."""
        d, n = self.model.data, codes.shape[1]
        delayed = delay_codes(codes.cpu(), list(d.delay_pattern), d.audio_pad)  # columns start.. of the grid
        self.slot.prefill(delayed, torch.from_numpy(text), n, boundary="clean", start=start)
        self._rebase(0, keep_from=0, upto=start)  # steps past `start` were not heard: a rollback cannot go there
        self._text_log[start:start + n + 1] = text
        self._last_text = tuple(int(t) for t in text[n])

    def context_text(self) -> np.ndarray:
        """The text inputs of the steps in the context so far, [position + 1, 2] (a copy)."""
        return self._text_log[: self.position + 1].copy()

    def _rebase(self, delta: int, keep_from: int, upto: int) -> None:
        """Move the rollback history into the rebuilt context (what lies outside it is dropped)."""
        self._history.rebase(delta, keep_from, upto)
        self._codec_marks.rebase(delta, keep_from, upto)

    def fail(self, exc: BaseException) -> None:
        """A fault in this call's handling or frame: end its utterance, reset it; others go on."""
        self.emit(p.ErrorEvent(code=ErrorCode.INTERNAL_ERROR, message=f"internal error: {exc}",
                               id=self.turn.id if self.turn else None))
        try:
            self.clean_reset()
        finally:
            self.phases.go(PhaseEvent.RESET)

    def emit(self, item: Item) -> None:
        if self.attached:
            self.sink(item)

    # -- helpers ---------------------------------------------------------------------------------

    def clean_reset(self) -> None:
        self._floor_frame = 0
        self._caller_until = 0
        self._speaker_tag = None
        self.slot.reset()
        self.machine.reset()
        if self.turn is not None:
            self.last_turn = self.turn
        self.turn = None
        self._history.clear()
        self._text.clear()
        self._codec_marks.clear()
        self._drop_unspoken = False
        self._last_text = (self.slot.bos_token_id, self.settings.text_pad_token_id)
        self._text_log[:] = 0

    def voice_reset(self) -> None:
        """Back to the current voice's prepared state by copy (the clean state without a voice)."""
        self.clean_reset()
        state = self.voices.get(self.current_voice)
        if state is not None:
            self.slot.restore_voice(state, self.machine)
            self._floor_frame = state.prefix_frames
            if state.text_tokens is not None:
                self._text_log[: state.prefix_frames + 1] = state.text_tokens.numpy()
                self._last_text = tuple(int(t) for t in self._text_log[state.prefix_frames])  # no device read
            else:
                self._last_text = self.slot.text_inputs()
        self._prefix_codes = self.slot.aligned_codes(0, self._floor_frame).clone()
        self._codec_marks.add(self._floor_frame, self.slot.codec_snapshot())

    def _check_voice(self, cmd) -> None:
        if cmd.voice is not None and cmd.voice not in self.voices:
            known = ", ".join(sorted(self.voices)) or "none"
            raise p.ProtocolError(ErrorCode.UNKNOWN_VOICE, f"no voice named {cmd.voice!r} has been prepared "
                                  f"(prepared: {known}); send set_voice first", cmd=cmd.cmd, id=cmd.id)

    def _sampling(self, cmd: p.Start) -> SamplingParams:
        d = self.defaults
        params = SamplingParams(
            text_temperature=_first(cmd.text_temperature, cmd.temperature, d.text_temperature),
            audio_temperature=_first(cmd.audio_temperature, cmd.temperature, d.audio_temperature),
            text_top_k=_first(cmd.text_top_k, cmd.top_k, d.text_top_k),
            audio_top_k=_first(cmd.audio_top_k, cmd.top_k, d.audio_top_k),
            cfg_scale=_first(cmd.cfg_scale, d.cfg_scale), seed=_first(cmd.seed, d.seed))
        if params.cfg_scale != 1.0 and not self.slot.has_guidance:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, "cfg_scale: this server runs without guidance "
                                  "(started with --cfg-scale 1); only 1.0 is accepted", cmd="start", id=cmd.id)
        limit = MAX_TOP_K
        if max(params.text_top_k, params.audio_top_k) > limit:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"top_k: at most {limit} on this server",
                                  cmd="start", id=cmd.id)
        return params

    def _parse(self, text: str, cmd, leading_speaker: str | None):
        if not p.is_encodable(text):  # the native parser refuses these; other doors (HTTP, adapters) may not
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, p.unencodable_message("text"), cmd=cmd.cmd, id=cmd.id)
        try:
            # a turn that opens with [S2] keeps its own speaker (our fix of an upstream quirk, docs/parity.md)
            return parse_script(text, self.model.tokenizer, leading_speaker=leading_speaker, keep_own_speaker=True)
        except ScriptError as exc:
            raise p.ProtocolError(ErrorCode.INVALID_FIELD, f"text: {exc}", cmd=cmd.cmd, id=cmd.id) from None

    def plan_rollover_before(self, cmd: object) -> bool:
        """Before `cmd` starts the next turn from the warm state on a nearly full context: plan
        the context's rollover (between turns, where it is cheapest; else the turn rolls over
        mid-way) as model work the engine runs between frames, and say so: the engine then holds
        `cmd` back until it has run. A prefill inside the command handler would stall every
        other call's next frame for as long as it takes."""
        if not (isinstance(cmd, p.Inject) and self.phase is Phase.IDLE and self.turn is not None):
            return False
        if self.position + self.settings.min_turn_frames < self.settings.context_frames:
            return False
        if self._rolled_over_at == self.position:
            return False  # rolled over (or found no room) for this very turn: it goes on as it can
        self.slot.plan_prefill(PlannedPrefill(self._roll_over_between_turns, "rollover before the next turn"))
        return True

    def _roll_over_between_turns(self) -> None:
        self.roll_over()
        self._rolled_over_at = self.position

    def _drop_undecoded_tail(self) -> int | None:
        """Before the next turn, or the words after a hold: take back the steps the turn ran past
        its last decoded frame (its silent tail, which nobody heard), as a rollback or a caller's
        turn does, and return that frame, where the next turn starts. Every frame before it is then
        teacher-forced, so the next turn's first steps until a sampled code is read are decoder-only steps (2.1
        against 5.9 ms at one call on the H200, run 22), not full ones: a next turn's first word
        is heard as soon as a first turn's. Where the slot already stands there (after a caller's
        turn, or a rollover between turns) nothing is taken back, but the lead-in comes first all
        the same. None where the history no longer reaches the frame."""
        turn = self.turn
        if turn is None:
            return None
        target = turn.next_frame
        if target < max(self._floor_frame, self._caller_until) or target > self.position:
            return None
        if target == self.position:
            self.machine.hold_words(self.settings.lead_in_frames)
            return target
        record = self._history.find(target)
        if record is None:
            return None
        self._take_back_to(target, record)
        # the frames before `target` were sent with the finished turn: the next turn's lead-in
        # comes after them (its first word at `target` or later would otherwise have none)
        self.machine.hold_words(self.settings.lead_in_frames)
        return target

    def _take_back_to(self, target: int, record) -> None:
        """Stand the call before step `target` again, as `record` (its history's) found it: the
        slot rewound (frames before `target` teacher-forced), the text state, the history and
        the codec marks past it dropped. The codec row is the caller's concern."""
        self.slot.rewind(target, record.text_in)
        self.machine.rewind(record.text)
        self._history.drop_from(target)
        self._codec_marks.drop_after(target)
        self._last_text = record.text_in

    def _begin_turn(self, client_id, first_frame: int | None = None) -> None:
        """`first_frame`: the first aligned frame this turn decodes, where known (a dropped
        tail's); else the first one the slot's position leaves undecoded."""
        position = self.position
        first = max(0, position + 1 - self.slot.max_delay) if first_frame is None else first_frame
        # prefix frames and a caller's turn: already in Mimi's stream, never decoded by a turn
        first = max(first, self._floor_frame, self._caller_until)
        self.turn = Turn(id=client_id, start_position=position, first_frame=first, started_at=self._received_at,
                         next_frame=first, words_before=len(self.machine.transcript))
        self.turn.words_emitted = self.turn.words_before
        self._fresh_audio = True  # the turn's first sent frame does not continue the last one sent
        self.phases.go(PhaseEvent.BEGIN_TURN)
        self.emit(p.Started(id=client_id, voice=self.current_voice if self._floor_frame else None, position=position))

    def _first_word_frame(self) -> int | None:
        transcript = self.machine.words
        if len(transcript) <= self.turn.words_before:
            return None
        return max(transcript[self.turn.words_before][1], self.turn.first_frame)

    def _push(self, entries, final: bool, client_id) -> None:
        self.turn.add_words(sum(1 for e in entries if e.tokens), client_id)
        self._give_text(entries, final)
        if self.phase is Phase.HOLDING and (entries or final):
            self._leave_hold()

    def _give_text(self, entries, final: bool) -> None:
        """The client's text to the text state machine, logged for a rollback to give again."""
        self.machine.push(entries, final=final)
        self._text.add(entries, final)
        self._text.forget_up_to(self._history.oldest_text_seen())

    def _leave_hold(self) -> None:
        # The client played on while we held: without re-pacing, the hold's duration would be
        # credited as lead and the generator could run that far ahead of real time. Keep only
        # the lead the client still has buffered (none after a long hold).
        self.phases.go(PhaseEvent.TEXT_CAME)
        self.turn.restart_pacing(time.monotonic(), lead=max(0.0, self.lead_seconds()))

    def _drop_words_not_heard(self) -> None:
        """After a barge-in, before the text that replaces what the caller did not hear: the
        queued words go, and so do the rest of the word cut off and its pauses; the first new
        word starts right after the lead-in from the frame the caller heard last. The frames
        between are sent and played (the resumed utterance's frames stay contiguous, so a later
        `played_ms` still maps to them), so every frame the model waited there was heard as
        silence: finishing the cut word and then waiting for the model to start the next put
        the first new word 0-7 frames later, spreading the onset after a barge-in from 60 to
        600 ms (simulated, 64 calls)."""
        self._drop_unspoken = False
        self.machine.drop_queued()
        self.machine.cut_word(self.settings.lead_in_frames)
        self.turn.keep_words(len(self.machine.words) - self.turn.words_before)

    def _set_format(self, name: str | None) -> None:
        if name is not None:
            self.format = get_format(name).name

    def _emit_words_up_to(self, frame: int) -> None:
        turn = self.turn
        if turn.send_from is None:
            return
        transcript = self.machine.words
        while turn.words_emitted < len(transcript) and transcript[turn.words_emitted][1] <= frame:
            word, step = transcript[turn.words_emitted]
            index = max(0, step - turn.send_from)
            owner = turn.word_owner(turn.words_emitted - turn.words_before)
            self.emit(p.Word(id=owner, word=word, start_s=round(index * FRAME_SECONDS, 3), frame=index))
            turn.words_emitted += 1


def _first(*values):
    return next(v for v in values if v is not None)
