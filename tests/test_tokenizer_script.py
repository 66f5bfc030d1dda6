import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from vendor_dia2.script import ScriptEntry, ScriptError, break_padding, parse_script
from vendor_dia2.tokenizer import (
    TINY_NEW_WORD_ID,
    TINY_PAD_ID,
    TINY_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    TINY_ZERO_ID,
    Dia2Tokenizer,
    TokenizerError,
    write_tiny_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Dia2Tokenizer.from_dir(tiny_dir)


# --- tokenizer ------------------------------------------------------------------------------


def test_tiny_tokenizer_is_byte_identical_across_runs_and_processes(tmp_path, tiny_dir):
    write_tiny_tokenizer(tmp_path / "a")
    # A fresh interpreter with another hash seed must write the same bytes.
    code = "import sys; from vendor_dia2.tokenizer import write_tiny_tokenizer as w; w(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")],
        check=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    )
    for name in FILES:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes(), name
        assert a == (tiny_dir / name).read_bytes(), name


def test_tiny_tokenizer_layout(tok, tiny_dir):
    assert tok.vocab_size == TINY_VOCAB_SIZE == 512
    for tid, name in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == tid
    assert (TINY_PAD_ID, TINY_NEW_WORD_ID, TINY_ZERO_ID) == (0, 3, 7)
    assert tok.encode("[S1]") == [5] and tok.encode("[S2]") == [6]
    assert tok.s1_id == 5 and tok.s2_id == 6
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["5"]["content"] == "[S1]"
    assert config["added_tokens_decoder"]["7"]["special"] is True
    special = json.loads((tiny_dir / "special_tokens_map.json").read_text())
    assert special["pad_token"] == "<pad>"
    assert special["additional_special_tokens"] == ["<new_word>", "[S1]", "[S2]", "<zero>"]


def test_tiny_tokenizer_encodes_words_compactly_and_round_trips(tok):
    for word in ["the", "and", "you", "hello", "world", "okay", "people", "thanks"]:
        ids = tok.encode(word)
        assert 1 <= len(ids) <= 3, (word, ids)
        assert all(i >= 8 for i in ids), (word, ids)  # no special token added
        assert tok.decode(ids) == word
    assert len(tok.encode("the")) == 1
    ids = tok.encode("[S2] hello, world")
    assert ids[0] == 6 and ids.count(5) + ids.count(6) == 1
    assert tok.decode(ids) == "[S2] hello, world"
    # Unseen text still round-trips through the byte fallback.
    assert tok.decode(tok.encode("Zürich ☃ 42")) == "Zürich ☃ 42"


def test_missing_tokenizer_files_names_them(tmp_path):
    with pytest.raises(TokenizerError) as info:
        Dia2Tokenizer.from_dir(tmp_path)
    msg = str(info.value)
    assert "tokenizer.json" in msg and "vocab.json" in msg and "merges.txt" in msg
    with pytest.raises(TokenizerError, match="does not exist"):
        Dia2Tokenizer.from_dir(tmp_path / "nope")


def _plain_bpe() -> tokenizers.Tokenizer:
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz[]S12 ")}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_tokenizer_without_speaker_tags_is_rejected(tmp_path):
    with pytest.raises(TokenizerError, match=r"\[S1\].*one added token"):
        Dia2Tokenizer(_plain_bpe())
    _plain_bpe().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"\[S1\]"):
        Dia2Tokenizer.from_dir(tmp_path)
    only_s1 = _plain_bpe()
    only_s1.add_special_tokens(["[S1]"])
    with pytest.raises(TokenizerError, match=r"\[S2\]"):
        Dia2Tokenizer(only_s1)


def test_vocab_and_merges_fallback(tmp_path, tiny_dir):
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    merges = data["model"]["merges"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"additional_special_tokens": ["[S1]", "[S2]", "<new_word>"]})
    )
    fallback = Dia2Tokenizer.from_dir(tmp_path)
    reference = Dia2Tokenizer.from_dir(tiny_dir)
    assert fallback.vocab_size == 512
    assert fallback.token_to_id("[S2]") == 6
    for text in ["[S1] hello", "thanks a lot", "[S2] don't go"]:
        assert fallback.encode(text) == reference.encode(text)
        assert fallback.decode(fallback.encode(text)) == text


def test_corrupt_tokenizer_json_is_a_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Dia2Tokenizer.from_dir(tmp_path)


# --- script parsing -------------------------------------------------------------------------


def _word(tok, text, spoken):
    ids = tuple(tok.encode(spoken))
    return ScriptEntry(text=text, tokens=ids, padding=len(ids))


def test_speaker_tags_attach_to_next_word(tok):
    entries = parse_script("[S1] Hello there [S2] hi [S1]", tok)
    assert entries == [
        _word(tok, "Hello", "[S1] Hello"),
        _word(tok, "there", "there"),
        _word(tok, "hi", "[S2] hi"),
    ]
    assert entries[0].tokens[0] == 5 and entries[2].tokens[0] == 6
    assert entries[0].padding == len(entries[0].tokens) > 1
    assert not entries[0].is_break
    # A tag glued to its word splits the same way.
    assert parse_script("[S2]hi", tok, keep_own_speaker=True) == [_word(tok, "hi", "[S2] hi")]


def _lead(tok, text, tag="[S1]"):
    """Upstream's first word: the speaker id in front of the word's own tokens."""
    ids = (tok.encode(tag)[0], *tok.encode(text))
    return ScriptEntry(text=text, tokens=ids, padding=len(ids))


def test_leading_speaker(tok):
    # upstream: the [S1] id goes in front of tokens("hello"), which differ from tokens("[S1] hello")
    assert parse_script("hello world", tok)[0] == _lead(tok, "hello")
    assert tuple(tok.encode("[S1] hello")) != _lead(tok, "hello").tokens  # so the distinction is real
    assert parse_script("[S1] hello", tok)[0] == _word(tok, "hello", "[S1] hello")  # already leads: as is
    # upstream's quirk, the default: a script starting with [S2] becomes [S1] + tokens("[S2] hello")
    s2 = tuple(tok.encode("[S2] hello"))
    assert parse_script("[S2] hello", tok)[0] == ScriptEntry("hello", (5, *s2), len(s2) + 1)
    # our fix, opt-in: the first word's own tag is kept alone
    assert parse_script("[S2] hello", tok, keep_own_speaker=True)[0] == _word(tok, "hello", "[S2] hello")
    assert parse_script("hello", tok, keep_own_speaker=True)[0] == _lead(tok, "hello")
    assert parse_script("hello", tok, leading_speaker="[S2]")[0] == _lead(tok, "hello", "[S2]")
    assert parse_script("hello world", tok, leading_speaker=None) == [
        _word(tok, "hello", "hello"),
        _word(tok, "world", "world"),
    ]
    # A leading break does not take the speaker tag; the first word does.
    entries = parse_script('<break time="1s"/> hello', tok)
    assert entries[0] == ScriptEntry("", (), 12)
    assert entries[1] == _lead(tok, "hello")
    with pytest.raises(ValueError):
        parse_script("hi", tok, leading_speaker="S1")


def test_breaks(tok):
    entries = parse_script('[S1] one <break time="1.5s"/> two<break time=\'500ms\'/>three', tok)
    assert [e.text for e in entries] == ["one", "", "two", "", "three"]
    assert entries[1] == ScriptEntry("", (), 19)  # round(1.5 * 12.5) = round(18.75)
    assert entries[3] == ScriptEntry("", (), 6)  # round(0.5 * 12.5) = round(6.25)
    assert entries[1].is_break and entries[3].is_break
    assert break_padding('<break time="2s" />') == 25
    assert break_padding('<break time="0s"/>') == 0
    assert parse_script('[S1] hi <break time="0s"/> <break time="10ms"/> yo', tok) == [
        _word(tok, "hi", "[S1] hi"), _word(tok, "yo", "yo")]  # 0-frame breaks add nothing (upstream)
    assert break_padding('<break time="30s"/>') == 375
    # A tag before a break goes to the word after it.
    entries = parse_script('hi [S2] <break time="80ms"/> yo', tok)
    assert entries[1] == ScriptEntry("", (), 1)
    assert entries[2] == _word(tok, "yo", "[S2] yo")


@pytest.mark.parametrize(
    "tag",
    [
        '<break time="-1s"/>',
        '<break time="31s"/>',
        '<break time="40000ms"/>',
        '<break time="1.5"/>',
        '<break time="abc"/>',
        '<break time="1s">',
        "<break/>",
        '<break time="1s\'/>',
    ],
)
def test_bad_break_raises_with_tag(tok, tag):
    with pytest.raises(ScriptError) as info:
        parse_script(f"hello {tag} world", tok)
    assert tag in str(info.value)


def test_normalisation_and_empty(tok):
    entries = parse_script("It\u2019s time:now", tok)
    assert [e.text for e in entries] == ["It's", "time", "now"]
    assert entries[0] == _lead(tok, "It's")
    assert parse_script("", tok) == []
    assert parse_script("  \n\t ", tok) == []
    assert parse_script("[S1] [S2]", tok) == []
