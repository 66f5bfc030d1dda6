"""Checkpoints: deterministic writing, strict loading, clear config/weights errors, manifests,
offline repo ids, and the checkpoint's own tokenizer."""

import json
import shutil

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import (CheckpointError, load_model, random_state_dict, resolve,
                                    write_random_checkpoint)
from vendor_dia2.config import PRESETS, ConfigError, Dia2Config, preset
from vendor_dia2.tokenizer import TokenizerError


def _copy(tiny_dir, tmp_path, name="ckpt"):
    return shutil.copytree(tiny_dir, tmp_path / name)


def _tiny_dict():
    return json.loads(json.dumps(preset("tiny").to_dict()))  # a deep, plain-JSON copy


def _write_config(tmp_path, raw) -> "Path":  # noqa: F821
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return path


def _config_error(tmp_path, raw) -> str:
    with pytest.raises(ConfigError) as info:
        Dia2Config.from_file(_write_config(tmp_path, raw))
    return str(info.value)


# -- round trip ------------------------------------------------------------------------------------

def test_same_seed_writes_byte_identical_checkpoint(tmp_path, tiny_dir):
    a = write_random_checkpoint(preset("tiny"), tmp_path / "a", seed=0)
    b = write_random_checkpoint(preset("tiny"), tmp_path / "b", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() == (tiny_dir / name).read_bytes(), name  # the fixture too
    assert not list(tmp_path.glob(".*")), "temporary directories left behind"


def test_other_seed_other_weights_same_names():
    a, b = random_state_dict(preset("tiny"), seed=0), random_state_dict(preset("tiny"), seed=1)
    assert a.keys() == b.keys()
    assert not torch.equal(a["transformer.cb0_head.weight"], b["transformer.cb0_head.weight"])
    assert torch.equal(a["transformer.norm.weight"], b["transformer.norm.weight"])  # norms are ones


def test_load_gives_exactly_the_written_weights(tiny_dir):
    model, config = load_model(resolve(str(tiny_dir)), torch.device("cpu"), torch.float32)
    assert config == preset("tiny")
    written = load_file(str(tiny_dir / "model.safetensors"))
    loaded = model.state_dict()
    assert written.keys() == loaded.keys()
    assert all(torch.equal(written[k], loaded[k]) for k in written)
    # published names and shapes (spec §3), spot-checked against the tiny preset's numbers
    assert tuple(loaded["transformer.text_embed.embedding.weight"].shape) == (512, 64)
    assert tuple(loaded["transformer.audio_embeds.31.weight"].shape) == (2050, 64)
    assert tuple(loaded["depformer.logits.30.weight"].shape) == (2050, 32)
    assert "depformer.layers.1.self_attention.in_proj.15.weight" in loaded  # schedule i // 2 → 16 sets
    assert "depformer.layers.1.self_attention.in_proj.16.weight" not in loaded


def test_config_round_trips_through_file(tmp_path, tiny_dir):
    for cfg in PRESETS.values():
        cfg.save(tmp_path / "config.json")
        again = Dia2Config.from_file(tmp_path / "config.json")
        assert again == cfg
        assert again.to_dict() == cfg.to_dict()
    assert Dia2Config.from_file(tiny_dir / "config.json") == preset("tiny")


def test_defaults_fill_optional_keys(tmp_path):
    raw = _tiny_dict()
    for key in ("text_zero_token_id", "audio_pad_token_id", "audio_bos_token_id"):
        del raw["data"][key]
    del raw["runtime"]["weights_schedule"], raw["runtime"]["max_context_steps"]
    del raw["model"]["rope_max_timescale"], raw["model"]["linear"]
    cfg = Dia2Config.from_file(_write_config(tmp_path, raw))
    assert cfg.data.text_zero_token_id == 7
    assert (cfg.data.audio_pad, cfg.data.audio_bos) == (2049, 2048)
    assert cfg.runtime.weights_schedule == tuple(range(31))
    assert cfg.runtime.max_context_steps == 1500
    assert cfg.model.rope_max_timescale == 10000.0
    assert cfg.model.decoder_mlp_activations == ("silu", "linear")


# -- config errors ---------------------------------------------------------------------------------

def test_missing_config_file(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="config.json not found"):
        Dia2Config.from_file(tmp_path / "config.json")
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Dia2.from_pretrained(str(ckpt), device="cpu")


def test_invalid_json(tmp_path):
    msg = _config_error(tmp_path, '{"data": {"channels": 34,')
    assert "not valid JSON" in msg and "config.json" in msg


def test_top_level_not_an_object(tmp_path):
    assert "top level must be a JSON object" in _config_error(tmp_path, [1, 2])


def test_missing_required_key_named(tmp_path):
    raw = _tiny_dict()
    del raw["data"]["channels"]
    msg = _config_error(tmp_path, raw)
    assert "data.channels: required key is missing" in msg
    assert "1 problem" in msg


def test_missing_runtime_block(tmp_path):
    raw = _tiny_dict()
    del raw["runtime"]
    assert "runtime: block is required" in _config_error(tmp_path, raw)


def test_wrong_type_named(tmp_path):
    raw = _tiny_dict()
    raw["data"]["text_vocab_size"] = "512"
    msg = _config_error(tmp_path, raw)
    assert "data.text_vocab_size" in msg and "expected int" in msg and "'512'" in msg


def test_bool_is_not_an_int(tmp_path):
    raw = _tiny_dict()
    raw["model"]["decoder"]["n_layer"] = True
    assert "model.decoder.n_layer: expected int" in _config_error(tmp_path, raw)


def test_several_problems_in_one_error(tmp_path):
    raw = _tiny_dict()
    del raw["data"]["channels"]
    raw["data"]["text_vocab_size"] = "512"
    del raw["model"]["decoder"]["n_embd"]
    raw["model"]["depformer"]["gqa_head_dim"] = 1.5
    msg = _config_error(tmp_path, raw)
    assert "4 problem(s)" in msg
    for key in ("data.channels", "data.text_vocab_size", "model.decoder.n_embd", "model.depformer.gqa_head_dim"):
        assert key in msg


def test_delay_pattern_wrong_length(tmp_path):
    raw = _tiny_dict()
    raw["data"]["delay_pattern"] = [0, 1, 2]
    msg = _config_error(tmp_path, raw)
    assert "data.delay_pattern: needs 32 entries" in msg and "found 3" in msg


def test_weights_schedule_wrong_length(tmp_path):
    raw = _tiny_dict()
    raw["runtime"]["weights_schedule"] = [0, 1]
    msg = _config_error(tmp_path, raw)
    assert "runtime.weights_schedule: needs 31 entries" in msg and "found 2" in msg


def test_schedule_and_delay_problems_reported_together(tmp_path):
    raw = _tiny_dict()
    raw["runtime"]["weights_schedule"] = [0, 1]
    raw["data"]["delay_pattern"] = [0, 1, 2]
    msg = _config_error(tmp_path, raw)
    assert "2 problem(s)" in msg
    assert "runtime.weights_schedule" in msg and "data.delay_pattern" in msg


def test_depformer_kv_heads_must_equal_query_heads(tmp_path):
    raw = _tiny_dict()
    raw["model"]["depformer"]["kv_heads"] = 1  # 2 query heads: fine for GQA, wrong for the depformer
    msg = _config_error(tmp_path, raw)
    assert "model.depformer: kv_heads must equal gqa_query_heads" in msg


def test_token_id_outside_vocab(tmp_path):
    raw = _tiny_dict()
    raw["data"]["text_new_word_token_id"] = 512
    assert "data.text_new_word_token_id: 512 is outside the text vocab" in _config_error(tmp_path, raw)


def test_config_error_surfaces_through_from_pretrained(tmp_path, tiny_dir):
    ckpt = _copy(tiny_dir, tmp_path)
    raw = _tiny_dict()
    del raw["data"]["channels"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"data\.channels: required key is missing"):
        Dia2.from_pretrained(str(ckpt), device="cpu")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        preset("huge")
    assert "'huge'" in str(info.value)
    assert all(name in str(info.value) for name in ("tiny", "1b", "2b"))
    for name in ("huge", "tiny2", "./no-such-dir"):
        with pytest.raises(CheckpointError) as info:
            resolve(name)
        msg = str(info.value)
        assert repr(name) in msg and all(p in msg for p in ("tiny", "1b", "2b")), msg


# -- weights errors --------------------------------------------------------------------------------

def test_weights_problems_listed_all_at_once(tmp_path, tiny_dir):
    ckpt = _copy(tiny_dir, tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    del state["transformer.norm.weight"]
    del state["depformer.logits.3.weight"]
    state["transformer.extra_head.weight"] = torch.zeros(5, 7)
    state["transformer.cb0_head.weight"] = torch.zeros(2049, 64)
    state["depformer.layers.0.mlp.wi.weight"] = torch.zeros(64, 32, 1)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        Dia2.from_pretrained(str(ckpt), device="cpu")
    msg = str(info.value)
    assert "model.safetensors" in msg
    assert "missing tensor transformer.norm.weight: expected shape [64]" in msg
    assert "missing tensor depformer.logits.3.weight: expected shape [2050, 32]" in msg
    assert "unexpected tensor transformer.extra_head.weight: shape [5, 7]" in msg
    assert "wrong shape for transformer.cb0_head.weight: expected [2050, 64], found [2049, 64]" in msg
    assert "wrong shape for depformer.layers.0.mlp.wi.weight: expected [128, 32], found [64, 32, 1]" in msg
    assert len(msg.splitlines()) == 6  # a header and exactly one line per problem


def test_missing_weights_file(tmp_path, tiny_dir):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        Dia2.from_pretrained(str(ckpt), device="cpu")


# -- manifest, repo ids, tokenizer ---------------------------------------------------------------

def test_manifest_names_other_files(tmp_path, tiny_dir):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "settings").mkdir()
    (ckpt / "config.json").rename(ckpt / "settings" / "dia2.json")
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")
    (ckpt / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).rename(ckpt / "tok" / name)
    (ckpt / "dia2_assets.json").write_text(json.dumps(
        {"config": "settings/dia2.json", "weights": "weights.safetensors", "tokenizer": "tok", "mimi": "random-small"}))
    tts = Dia2.from_pretrained(str(ckpt), device="cpu")
    assert tts.config == preset("tiny")
    assert tts.tokenizer.source == str(ckpt / "tok" / "tokenizer.json")
    ref = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(tts.model.state_dict()["transformer.cb0_head.weight"], ref["transformer.cb0_head.weight"])


def test_manifest_pointing_at_missing_file(tmp_path, tiny_dir):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "dia2_assets.json").write_text(json.dumps({"weights": "nope.safetensors"}))
    with pytest.raises(CheckpointError, match=r"no nope\.safetensors"):
        resolve(str(ckpt))


def test_repo_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        Dia2.from_pretrained("someone/dia2-unreachable", device="cpu")
    msg = str(info.value)
    assert "'someone/dia2-unreachable'" in msg and "Hugging Face hub" in msg
    assert "local directory" in msg and "'tiny'" in msg  # what to do instead
    assert "\n" not in msg


def test_tokenizer_is_the_checkpoints_own(tiny_tts, tiny_dir):
    assert tiny_tts.tokenizer.source == str(tiny_dir / "tokenizer.json")
    # the standard Hugging Face loader reads the same file and agrees, speaker tags included
    hf = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for tag, tid in (("[S1]", tiny_tts.tokenizer.s1_id), ("[S2]", tiny_tts.tokenizer.s2_id)):
        assert tiny_tts.tokenizer.encode(tag) == [tid]
        assert hf.encode(tag, add_special_tokens=False).ids == [tid]
    assert tiny_tts.tokenizer.s1_id != tiny_tts.tokenizer.s2_id
    text = "[S1] Hello there. [S2] Hi!"
    ids = tiny_tts.tokenizer.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert ids.count(tiny_tts.tokenizer.s1_id) == 1 and ids.count(tiny_tts.tokenizer.s2_id) == 1
    assert tiny_tts.tokenizer.decode(ids) == text
    assert tiny_tts.tokenizer.vocab_size <= tiny_tts.config.data.text_vocab_size


def test_tokenizer_files_changed_in_checkpoint_are_used(tmp_path, tiny_dir):
    # Drop [S2] from the checkpoint's added tokens: loading must fail on *this* file, proving no
    # built-in tokenizer is used instead.
    ckpt = _copy(tiny_dir, tmp_path)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "[S2]"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerError) as info:
        Dia2.from_pretrained(str(ckpt), device="cpu")
    assert "'[S2]'" in str(info.value) and str(ckpt / "tokenizer.json") in str(info.value)
