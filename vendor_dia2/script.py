"""Script parsing: text with speaker tags and break tags → one `ScriptEntry` per word (spec §7).

    parse_script('[S1] Hi there. <break time="0.5s"/> [S2] Hello!', tok) gives four entries:
    "Hi" (tokens of "[S1] Hi"), "there." (tokens of "there."), a break of 6 frames,
    "Hello!" (tokens of "[S2] Hello!").

Rules:
- `’` → `'` and `:` → space; words are split on whitespace and on break tags;
- `[S1]`/`[S2]` are not words: they are tokenised together with the next word ("[S1] word");
  a tag with no word after it is dropped;
- the script's first word starts with the leading speaker's id (`[S1]`): as upstream does
  (dia2/runtime/script_parser.py), the id is put in front of the word's tokens unless they
  already start with it, so "hello" becomes `[S1]` + tokens("hello") (not tokens("[S1] hello"),
  which would include a space token) and "[S2] hello" becomes `[S1]` + tokens("[S2] hello");
  `keep_own_speaker=True` (our fix, off by default) leaves a first word that carries its own tag
  alone, so "[S2] hello" is tokens("[S2] hello");
- a word's padding is its token count; a break `<break time="1.5s"/>` (or `500ms`, single
  quotes, no space before `/>`) is an entry with no tokens and `round(seconds · 12.5)` padding;
  a break of 0 frames adds nothing (as upstream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import FRAME_RATE

MAX_BREAK_SECONDS = 30.0
SPEAKER_TAGS = ("[S1]", "[S2]")


@dataclass(frozen=True)
class ScriptEntry:
    """One word (or one break) of a script, as the state machine consumes it."""

    text: str  # the word as written, without its speaker tag; "" for a break
    tokens: tuple[int, ...]  # token ids, speaker tag included; () for a break
    padding: int  # frames forced to pad after the word starts (break: the break's length)

    @property
    def is_break(self) -> bool:
        return not self.tokens


class ScriptError(ValueError):
    """The script text cannot be parsed (a malformed or out-of-range break tag)."""

    code = "bad_script"


# Any tag starting with "<break" is a break tag; it must then match _BREAK_TAG exactly.
_ANY_BREAK_TAG = re.compile(r"<\s*break\b[^>]*>?", re.IGNORECASE)
_BREAK_TAG = re.compile(
    r"""<\s*break\s+time\s*=\s*(?P<q>["'])\s*(?P<value>[+-]?\d*\.?\d+)\s*(?P<unit>ms|s)\s*(?P=q)\s*/\s*>""",
    re.IGNORECASE,
)
_SPEAKER_SPLIT = re.compile(r"(\[S[12]\])")


def parse_script(text: str, tokenizer, *, leading_speaker: str | None = "[S1]",
                 keep_own_speaker: bool = False) -> list[ScriptEntry]:
    """Parse `text` into entries. `tokenizer` needs `encode(str) -> list[int]` (no specials added).

    `leading_speaker`: speaker id put in front of the first word (see the module notes). Use
    None when the text continues a turn that is already being spoken (text injected
    mid-utterance). `keep_own_speaker`: a first word with its own tag gets no leading id.
    """
    if leading_speaker is not None and leading_speaker not in SPEAKER_TAGS:
        raise ValueError(f"leading_speaker must be one of {SPEAKER_TAGS} or None, got {leading_speaker!r}")
    text = text.replace("\u2019", "'").replace(":", " ")

    entries: list[ScriptEntry] = []
    speaker: str | None = None  # tag waiting for the next word
    first_word = True
    for kind, value in _pieces(text):
        if kind == "break":
            if value > 0:  # upstream drops a 0-frame break; kept, it would cost a new-word decision
                entries.append(ScriptEntry(text="", tokens=(), padding=value))
            continue
        if value in SPEAKER_TAGS:
            speaker = value
            continue
        tokens = tuple(int(t) for t in tokenizer.encode(f"{speaker} {value}" if speaker else value))
        if first_word and leading_speaker is not None and not (keep_own_speaker and speaker):
            # Upstream's "line parity" speaker (the whole script is its line 0, so [S1]) goes in
            # front as an id, even before a word that has its own [S2].
            lead = _speaker_id(tokenizer, leading_speaker)
            if not tokens or tokens[0] != lead:
                tokens = (lead, *tokens)
        first_word = False
        entries.append(ScriptEntry(text=value, tokens=tokens, padding=len(tokens)))
        speaker = None
    return entries


def _speaker_id(tokenizer, tag: str) -> int:
    ids = tokenizer.encode(tag)
    assert len(ids) == 1, f"{tag} must be one token"  # Dia2Tokenizer checks this at load
    return int(ids[0])


def break_padding(tag: str) -> int:
    """Frames of pad for one break tag; raises ScriptError if malformed or out of range."""
    match = _BREAK_TAG.fullmatch(tag.strip())
    if match is None:
        raise ScriptError(f'malformed break tag {tag}; expected e.g. <break time="1.5s"/> or <break time="500ms"/>')
    seconds = float(match["value"])
    if match["unit"].lower() == "ms":
        seconds /= 1000.0
    if seconds < 0:
        raise ScriptError(f"negative break time in {tag}")
    if seconds > MAX_BREAK_SECONDS:
        raise ScriptError(f"break time in {tag} is longer than {MAX_BREAK_SECONDS:g} s")
    return round(seconds * FRAME_RATE)


def _pieces(text: str):
    """Yield ("word", str) for words and speaker tags, ("break", padding) for break tags."""
    pos = 0
    for match in _ANY_BREAK_TAG.finditer(text):
        yield from _words(text[pos : match.start()])
        yield "break", break_padding(match.group(0))
        pos = match.end()
    yield from _words(text[pos:])


def _words(text: str):
    for chunk in text.split():
        for part in _SPEAKER_SPLIT.split(chunk):
            if part:
                yield "word", part
