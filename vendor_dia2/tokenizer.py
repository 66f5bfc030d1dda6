"""Text tokenizer for Dia2 checkpoints, and the writer of the tiny test tokenizer.

A checkpoint carries its own Hugging Face tokenizer files (spec §2). `Dia2Tokenizer.from_dir`
reads, in order of preference:
  1. `tokenizer.json` (what our own checkpoints write),
  2. `vocab.json` + `merges.txt` (a byte-level BPE; added tokens from `added_tokens.json`,
     `tokenizer_config.json` and `special_tokens_map.json`),
  3. whatever `transformers.AutoTokenizer` can load (upstream's own loader), if installed.
Whatever the source, the speaker tags `[S1]` and `[S2]` must each be one token.

`write_tiny_tokenizer` writes a small deterministic byte-level BPE (512 ids) for tests and tiny
checkpoints: the merges come from our own pure-Python BPE training over a built-in word list, so
the files are byte-identical on every run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Protocol

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

SPEAKER_TAGS = ("[S1]", "[S2]")

# Tiny tokenizer layout: special tokens at fixed ids 0..7, then the 256 byte symbols, then merges.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<new_word>", "<unk>", "[S1]", "[S2]", "<zero>")
TINY_VOCAB_SIZE = 512
TINY_PAD_ID = 0
TINY_BOS_ID = 1
TINY_EOS_ID = 2
TINY_NEW_WORD_ID = 3
TINY_UNK_ID = 4
TINY_S1_ID = 5
TINY_S2_ID = 6
TINY_ZERO_ID = 7


class TokenizerError(ValueError):
    """A checkpoint's tokenizer is missing or unusable."""


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def vocab_size(self) -> int: ...
    def token_to_id(self, token: str) -> int | None: ...


class Dia2Tokenizer:
    """The checkpoint's text tokenizer: plain `encode`/`decode`, never adds BOS/EOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer | _Backend, *, source: str = "<memory>",
                 bos_token: str | None = None):
        if isinstance(tokenizer, tokenizers.Tokenizer):
            tokenizer = _FastBackend(tokenizer)
        self._backend = tokenizer
        self.source = source
        # A bare tokenizer.json does not say which token is BOS; the config files beside it do
        # (that is where transformers, upstream's loader, reads `bos_token` from).
        self._bos_token = bos_token
        self._check_speaker_tags()

    @classmethod
    def from_dir(cls, path: str | Path) -> "Dia2Tokenizer":
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"tokenizer directory {str(root)!r} does not exist")
        tokenizer_json = root / "tokenizer.json"
        vocab_json, merges_txt = root / "vocab.json", root / "merges.txt"
        if tokenizer_json.is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
            except Exception as exc:  # the library raises plain Exception on bad JSON
                raise TokenizerError(f"cannot read {tokenizer_json}: {exc}") from exc
            return cls(tok, source=str(tokenizer_json), bos_token=_declared_bos(root))
        if vocab_json.is_file() and merges_txt.is_file():
            return cls(_bpe_from_vocab_merges(root), source=str(vocab_json), bos_token=_declared_bos(root))
        try:
            import transformers  # noqa: F401  (optional dependency)
        except ImportError:
            raise TokenizerError(
                f"no tokenizer in {str(root)!r}: looked for 'tokenizer.json' or "
                f"'vocab.json' + 'merges.txt' (and `transformers` is not installed for other formats)"
            ) from None
        return cls(_TransformersBackend.load(root), source=str(root))

    # --- public API -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; `[S1]`/`[S2]` map to their single ids."""
        return self._backend.encode(text)

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """The declared BOS token's id, or None when the tokenizer declares none."""
        if isinstance(self._backend, _TransformersBackend):
            return self._backend.bos_token_id()
        return self.token_to_id(self._bos_token) if self._bos_token else None

    @property
    def s1_id(self) -> int:
        return self._speaker_ids["[S1]"]

    @property
    def s2_id(self) -> int:
        return self._speaker_ids["[S2]"]

    # --- helpers ----------------------------------------------------------------------------

    def _check_speaker_tags(self) -> None:
        self._speaker_ids: dict[str, int] = {}
        for tag in SPEAKER_TAGS:
            ids = self._backend.encode(tag)
            if len(ids) != 1:
                raise TokenizerError(
                    f"tokenizer from {self.source} encodes {tag!r} as {len(ids)} tokens {ids}; "
                    f"Dia2 needs it to be one added token"
                )
            known = self._backend.token_to_id(tag)
            if known is not None and known != ids[0]:
                raise TokenizerError(
                    f"tokenizer from {self.source}: {tag!r} encodes to id {ids[0]} "
                    f"but its token id is {known}"
                )
            self._speaker_ids[tag] = ids[0]


class _FastBackend:
    """`tokenizers.Tokenizer` (Rust) backend."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _TransformersBackend:
    """`transformers` tokenizer backend (upstream's loader: slow, remote code allowed)."""

    def __init__(self, tok):
        self._tok = tok

    @classmethod
    def load(cls, root: Path) -> "_TransformersBackend":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(root), use_fast=False, trust_remote_code=True)
        except Exception as exc:
            raise TokenizerError(
                f"no tokenizer in {str(root)!r}: looked for 'tokenizer.json' or "
                f"'vocab.json' + 'merges.txt', and transformers.AutoTokenizer failed: {exc}"
            ) from exc
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def vocab_size(self) -> int:
        return len(self._tok)

    def bos_token_id(self) -> int | None:
        return self._tok.bos_token_id

    def token_to_id(self, token: str) -> int | None:
        tid = self._tok.convert_tokens_to_ids(token)
        if tid is None or (tid == self._tok.unk_token_id and token != self._tok.unk_token):
            return None
        return int(tid)


def _bpe_from_vocab_merges(root: Path) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`, with its added tokens."""
    try:
        model = models.BPE.from_file(str(root / "vocab.json"), str(root / "merges.txt"))
    except Exception as exc:
        raise TokenizerError(f"cannot read vocab.json/merges.txt in {str(root)!r}: {exc}") from exc
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    wanted: dict[str, int | None] = {}  # added token -> id it must get (None: any)
    added = _read_json(root / "added_tokens.json")
    if isinstance(added, dict):
        wanted.update({str(k): int(v) for k, v in added.items()})
    config = _read_json(root / "tokenizer_config.json")
    if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
        for tid, spec in config["added_tokens_decoder"].items():
            if isinstance(spec, dict) and "content" in spec:
                wanted[str(spec["content"])] = int(tid)
    for name in _special_token_names(_read_json(root / "special_tokens_map.json")):
        wanted.setdefault(name, None)
    vocab = tok.get_vocab(with_added_tokens=False)
    for tag in SPEAKER_TAGS:  # present in the vocab but not declared: still one token
        if tag in vocab:
            wanted.setdefault(tag, vocab[tag])

    # Tokens in the vocab keep their id; new ones are appended in order of their wanted id.
    order = sorted(wanted.items(), key=lambda kv: (kv[1] is None, kv[1] or 0, kv[0]))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t, _ in order])
    for token, tid in order:
        if tid is not None and tok.token_to_id(token) != tid:
            raise TokenizerError(
                f"added token {token!r} in {str(root)!r} should have id {tid}, "
                f"got {tok.token_to_id(token)} (ids not contiguous with vocab.json?)"
            )
    return tok


def step0_bos_id(tokenizer) -> int:
    """The text id the conditional row reads at step 0 of a fresh call (DIA2_SPEC.md §5).

    Upstream takes `tokenizer.bos_token_id or 1` (dia2/runtime/context.py): a tokenizer without
    a BOS falls back to 1, and so, through Python's `or`, does one whose BOS id is 0.
    """
    return getattr(tokenizer, "bos_token_id", None) or 1


def _declared_bos(root: Path) -> str | None:
    """`bos_token` from tokenizer_config.json, else special_tokens_map.json (string or dict form)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _read_json(root / name)
        value = config.get("bos_token") if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _special_token_names(special_map) -> list[str]:
    names: list[str] = []
    if not isinstance(special_map, dict):
        return names
    for value in special_map.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict) and isinstance(item.get("content"), str):
                names.append(item["content"])
    return names


# --- tiny tokenizer -------------------------------------------------------------------------

# A few hundred common English words; the BPE merges are learned from these.
_TINY_CORPUS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go
me when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first well
way even new want because any these give day most us is are was were been has had did said going
hello hi yes okay thanks thank please sorry sure right really very much more many little big
small long great old young high low here where why again still never always often today tomorrow
yesterday morning night home house world life hand part place case week company system program
question number point group problem fact water money story month lot book eye job word business
issue side kind head friend father mother power hour game line end member law car city name
president team minute idea kid body information back parent face others level office door health
person art war history party result change reason research girl guy moment air teacher force
education call ask feel try leave put mean keep let begin seem help talk turn start show hear play
run move live believe hold bring happen write provide sit stand lose pay meet include continue set
learn lead understand watch follow stop create speak read allow add spend grow open walk win offer
remember love consider appear buy wait serve die send expect build stay fall cut reach kill remain
nice bad best better sound voice speech audio listen stream model text hey oh wow well um uh yeah
doing done being having made told found gave took came went thought wanted asked called tried
something nothing everything anything someone everyone maybe actually probably really together
don't can't won't i'm it's that's you're we're they're let's what's there's isn't didn't
"""


def write_tiny_tokenizer(out_dir: str | Path) -> None:
    """Write a deterministic 512-id byte-level BPE tokenizer to `out_dir`.

    Files: `tokenizer.json`, `tokenizer_config.json` (class PreTrainedTokenizerFast, so
    `transformers.AutoTokenizer` can load the directory) and `special_tokens_map.json`.
    Ids 0..7 are `TINY_SPECIAL_TOKENS`, 8..263 the byte symbols, the rest learned merges.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    byte_symbols = _byte_symbols()
    symbols = [byte_symbols[b] for b in range(256)]
    num_merges = TINY_VOCAB_SIZE - len(TINY_SPECIAL_TOKENS) - len(symbols)
    merges = _train_bpe_merges(_tiny_word_counts(byte_symbols), num_merges)

    vocab: dict[str, int] = {}
    for token in (*TINY_SPECIAL_TOKENS, *symbols, *(a + b for a, b in merges)):
        if token not in vocab:
            vocab[token] = len(vocab)
    assert len(vocab) <= TINY_VOCAB_SIZE

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS]
    )
    for tid, token in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(token) == tid, (token, tok.token_to_id(token))

    # Re-serialise through json with a fixed layout so the bytes never depend on the library.
    tokenizer_json = json.loads(tok.to_str())
    _write_json(out / "tokenizer.json", tokenizer_json)

    added_tokens_decoder = {
        str(tid): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tid, token in enumerate(TINY_SPECIAL_TOKENS)
    }
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<new_word>", "[S1]", "[S2]", "<zero>"],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        **special_map,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _byte_symbols() -> dict[int, str]:
    """Byte -> printable symbol, the byte-level BPE convention (what `ByteLevel` expects).

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256+
    in byte order, so that e.g. the space byte becomes 'Ġ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _tiny_word_counts(byte_symbols: dict[int, str]) -> dict[tuple[str, ...], int]:
    """Training words as byte-symbol tuples. Dia2 tokenises each word on its own, so words are
    learned without a leading space (after a speaker tag, 'Ġ' stays one extra token)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for word in _TINY_CORPUS.split():
        counts[tuple(byte_symbols[b] for b in word.encode("utf-8"))] += 1
    return dict(counts)


def _train_bpe_merges(words: dict[tuple[str, ...], int], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Stops once the merges have produced `num_merges` distinct new symbols (two merges can
    spell the same string)."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    new_symbols: set[str] = set()
    while len(new_symbols) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_symbols.add(merged)
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + count
        words = new_words
    return merges
