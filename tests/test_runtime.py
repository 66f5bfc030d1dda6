"""The frame step against an independent, naive reference, and seeded sampling behaviour."""

import math

import pytest
import torch

from vendor_dia2.config import preset
from vendor_dia2.delays import delay_codes
from vendor_dia2.runtime import FrameStepper, PrefillSpan, SamplingParams, SlotPlace
from vendor_dia2.script import parse_script

from stepping import step_pattern

SCRIPT = "[S1] Hello there, how are you today?"


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_tts):
    a = tiny_tts.generate(SCRIPT, seed=1, temperature=1.0, max_frames=20, decode=False)
    b = tiny_tts.generate(SCRIPT, seed=1, temperature=1.0, max_frames=20, decode=False)
    c = tiny_tts.generate(SCRIPT, seed=2, temperature=1.0, max_frames=20, decode=False)
    assert a.audio_tokens.shape[1] > 5
    assert torch.equal(a.audio_tokens, b.audio_tokens)
    assert not torch.equal(a.audio_tokens, c.audio_tokens)


def test_greedy_ignores_seed(tiny_tts):
    a = tiny_tts.generate(SCRIPT, seed=1, temperature=0.0, max_frames=15, decode=False)
    b = tiny_tts.generate(SCRIPT, seed=99, temperature=0.0, max_frames=15, decode=False)
    assert torch.equal(a.audio_tokens, b.audio_tokens)


def test_generate_speaks_all_words_and_ends(tiny_tts):
    result = tiny_tts.generate("[S1] one two three", seed=0, max_frames=200)
    assert [w for w, _ in result.timestamps] == ["one", "two", "three"]
    assert result.frames < 200  # ended by itself after the tail
    stamps = [s for _, s in result.timestamps]
    # upstream keeps the initial_padding frames before the first word (the tiny preset has a
    # second text stream, so upstream crops nothing): the first word is 2 frames in
    assert stamps == sorted(stamps) and stamps[0] == 2 / 12.5
    assert result.waveform.shape[0] == result.audio_tokens.shape[1] * 1920
    trimmed = tiny_tts.generate("[S1] one two three", seed=0, max_frames=200, decode=False, trim_lead_in=True)
    assert trimmed.timestamps[0][1] == 0.0 and torch.equal(trimmed.audio_tokens, result.audio_tokens[:, 2:])
    assert result.audio_tokens.shape[0] == 32 and int(result.audio_tokens.max()) < 2048


# -- naive reference ---------------------------------------------------------------------------

def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, cfg):
    """x [Dh] at integer position pos, rotate-half layout, computed element by element."""
    dh = x.shape[-1]
    half = dh // 2
    out = torch.empty_like(x)
    for i in range(half):
        tau = cfg.model.rope_min_timescale * (cfg.model.rope_max_timescale / cfg.model.rope_min_timescale) ** (2 * i / dh)
        theta = pos / tau
        c, s = math.cos(theta), math.sin(theta)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def _attend(q_heads, keys, values, group):
    """Per query head: softmax over all given positions, scale 1.0."""
    outs = []
    for h, q in enumerate(q_heads):
        k, v = keys[h // group], values[h // group]  # [P, Dh]
        w = torch.softmax(k @ q, dim=0)
        outs.append(w @ v)
    return torch.cat(outs)


def _mlp(x, wi, wo):
    hidden = wo.shape[1]
    u = wi @ x
    return wo @ (torch.nn.functional.silu(u[:hidden]) * u[hidden:])


def _text_embed(sd, prefix, main, second, pad):
    e = sd[f"{prefix}.embedding.weight"]
    out = sd[f"{prefix}.main_proj.weight"] @ e[main]
    if second != pad:
        out = out + sd[f"{prefix}.second_proj.weight"] @ e[second]
    return out


def reference_decoder(sd, cfg, history):
    """Decoder outputs for the LAST row of `history` (list of token lists), recomputed from scratch."""
    d, dec, eps = cfg.data, cfg.model.decoder, cfg.model.normalization_layer_epsilon
    xs = []
    for toks in history:
        h = _text_embed(sd, "transformer.text_embed", toks[0], toks[1], d.text_pad_token_id)
        for k in range(d.num_codebooks):
            h = h + sd[f"transformer.audio_embeds.{k}.weight"][toks[2 + k]]
        xs.append(h)
    for layer in range(dec.n_layer):
        p = f"transformer.layers.{layer}"
        keys, values, queries = [], [], []
        for pos, x in enumerate(xs):
            hn = _rms(x, sd[f"{p}.pre_norm.weight"], eps)
            q = (sd[f"{p}.attn.q_proj.weight"] @ hn).view(dec.gqa_query_heads, dec.gqa_head_dim)
            k = (sd[f"{p}.attn.k_proj.weight"] @ hn).view(dec.kv_heads, dec.gqa_head_dim)
            v = (sd[f"{p}.attn.v_proj.weight"] @ hn).view(dec.kv_heads, dec.gqa_head_dim)
            q = torch.stack([_rope(_rms(qh, sd[f"{p}.attn.q_norm.weight"], eps), pos, cfg) for qh in q])
            k = torch.stack([_rope(_rms(kh, sd[f"{p}.attn.k_norm.weight"], eps), pos, cfg) for kh in k])
            queries.append(q), keys.append(k), values.append(v)
        new = []
        for pos, x in enumerate(xs):
            ks = [torch.stack([keys[j][g] for j in range(pos + 1)]) for g in range(dec.kv_heads)]
            vs = [torch.stack([values[j][g] for j in range(pos + 1)]) for g in range(dec.kv_heads)]
            att = _attend(queries[pos], ks, vs, dec.gqa_query_heads // dec.kv_heads)
            x = x + sd[f"{p}.attn.o_proj.weight"] @ att
            x = x + _mlp(_rms(x, sd[f"{p}.post_norm.weight"], eps), sd[f"{p}.mlp.wi.weight"], sd[f"{p}.mlp.wo.weight"])
            new.append(x)
        xs = new
    hn = _rms(xs[-1], sd["transformer.norm.weight"], eps)
    return sd["transformer.action_head.weight"] @ hn, sd["transformer.cb0_head.weight"] @ hn, hn


def reference_depformer(sd, cfg, hidden_rows, first_code, text_rows, pick):
    """Codebooks 1..Q-1 for each row set; `pick(stage_logits_per_row) -> code` (shared by rows)."""
    d, dep, eps = cfg.data, cfg.model.depformer, cfg.model.normalization_layer_epsilon
    schedule = cfg.runtime.weights_schedule
    keys = [[[] for _ in range(dep.n_layer)] for _ in hidden_rows]
    values = [[[] for _ in range(dep.n_layer)] for _ in hidden_rows]
    prev, codes = first_code, []
    for s in range(cfg.num_stages):
        w = schedule[s]
        stage_logits = []
        for r, hidden in enumerate(hidden_rows):
            x = sd[f"depformer.depformer_in.{w}.weight"] @ hidden + sd[f"depformer.audio_embeds.{s}.weight"][prev]
            if s == 0:
                x = x + _text_embed(sd, "depformer.text_embed", text_rows[r][0], text_rows[r][1], d.text_pad_token_id)
            for layer in range(dep.n_layer):
                p = f"depformer.layers.{layer}"
                hn = _rms(x, sd[f"{p}.pre_norm.weight"], eps)
                qkv = (sd[f"{p}.self_attention.in_proj.{w}.weight"] @ hn).view(3, dep.gqa_query_heads, dep.gqa_head_dim)
                q = torch.stack([_rope(_rms(h, sd[f"{p}.self_attention.q_norm.weight"], eps), s, cfg) for h in qkv[0]])
                k = torch.stack([_rope(_rms(h, sd[f"{p}.self_attention.k_norm.weight"], eps), s, cfg) for h in qkv[1]])
                keys[r][layer].append(k), values[r][layer].append(qkv[2])
                ks = [torch.stack([kk[h] for kk in keys[r][layer]]) for h in range(dep.gqa_query_heads)]
                vs = [torch.stack([vv[h] for vv in values[r][layer]]) for h in range(dep.gqa_query_heads)]
                x = x + sd[f"{p}.self_attention.out_proj.{w}.weight"] @ _attend(q, ks, vs, 1)
                x = x + _mlp(_rms(x, sd[f"{p}.post_norm.weight"], eps), sd[f"{p}.mlp.wi.weight"], sd[f"{p}.mlp.wo.weight"])
            logits = sd[f"depformer.logits.{s}.weight"] @ _rms(x, sd["depformer.norm.weight"], eps)
            stage_logits.append(logits[:2048])
        prev = pick(stage_logits)
        codes.append(prev)
    return codes


def _greedy_pick(cfg_scale):
    def pick(rows):
        if len(rows) == 1:
            return int(rows[0].argmax())
        cond, uncond = rows
        guided = uncond + cfg_scale * (cond - uncond)
        keep = guided.topk(min(50, guided.numel())).indices
        return int(keep[cond[keep].argmax()])
    return pick


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_frame_step_matches_naive_reference(tiny_tts, cfg_scale):
    """Greedy steps of the runtime (static cache, batched stages) equal a from-scratch reference that
    recomputes the whole history each frame with per-head, per-stage loops."""
    cfg = tiny_tts.config
    d = cfg.data
    sd = {k: v.float() for k, v in tiny_tts.model.state_dict().items()}
    stepper = tiny_tts.stepper(cfg=cfg_scale != 1.0)
    stepper.reset_call(0)
    stepper.set_sampling(0, SamplingParams(text_temperature=0, audio_temperature=0, cfg_scale=cfg_scale))
    # fixed text choices make the text path visible: pad → (pad, pad), new_word → (new_word, 10)
    choices = ((d.text_pad_token_id, d.text_pad_token_id), (d.text_new_word_token_id, 10))
    pick = _greedy_pick(cfg_scale)
    history_cond, history_uncond = [], []
    # step 0: the conditional row reads [bos, pad] (DIA2_SPEC.md §5)
    inputs = [stepper.bos_token_id, d.text_pad_token_id] + [d.audio_bos] * d.num_codebooks
    for t in range(6):
        history_cond.append(list(inputs))
        history_uncond.append([d.text_zero_token_id, d.text_pad_token_id] + inputs[2:])
        act_c, cb0_c, hid_c = reference_decoder(sd, cfg, history_cond)
        rows_act, rows_cb0, hidden_rows = [act_c], [cb0_c], [hid_c]
        if cfg_scale != 1.0:
            act_u, cb0_u, hid_u = reference_decoder(sd, cfg, history_uncond)
            rows_act, rows_cb0, hidden_rows = [act_c, act_u], [cb0_c, cb0_u], [hid_c, hid_u]
        action = pick(rows_act)
        text = choices[int(action == 1)]
        masked = [r.clone().index_fill_(0, torch.tensor([d.audio_pad, d.audio_bos]), float("-inf")) for r in rows_cb0]
        c0 = pick(masked)
        text_rows = [text, text]  # upstream: depformer stage 0 sees the conditional text on both rows
        codes = [c0] + reference_depformer(sd, cfg, hidden_rows, c0, text_rows, pick)

        got_action = stepper.step([choices])[0]
        assert got_action == int(action == 1), f"frame {t}: action"
        assert stepper.text_out[0].tolist() == list(text)
        delays = d.delay_pattern
        # codes of codebooks that have not started are never read (the decoder-only lane skips them)
        live = [k for k in range(d.num_codebooks) if delays[k] <= t + 1]
        assert [stepper.codes[0, k].item() for k in live] == [codes[k] for k in live], f"frame {t}: codes differ"
        inputs = list(text) + [d.audio_bos if delays[k] > t + 1 else codes[k] for k in range(d.num_codebooks)]
        assert stepper.step_inputs(0)[0].tolist() == inputs


@pytest.mark.parametrize("boundary", ["upstream", "clean"])
def test_prefill_matches_frame_by_frame(tiny_tts, boundary):
    """Parallel prefill leaves the same cache and next-step outputs as stepping the same frames."""
    cfg = tiny_tts.config
    d = cfg.data
    stepper = tiny_tts.stepper(cfg=True)
    stepper.set_sampling(0, SamplingParams(text_temperature=0, audio_temperature=0))
    frames = 7
    gen = torch.Generator().manual_seed(0)
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=gen)
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    text = torch.full((frames + 1, 2), d.text_pad_token_id)
    text[2] = torch.tensor([d.text_new_word_token_id, d.text_new_word_token_id])

    stepper.reset_call(0)
    stepper.prefill(0, delayed, text, frames, boundary=boundary)
    # upstream's boundary stands at position frames-1 again, its next step written to cache slot
    # `frames` (docs/parity.md P6); the clean one at position `frames`
    column = frames - 1 if boundary == "upstream" else frames
    assert (stepper.position(0), stepper.place(0).cache_offset) == (column, frames - column)
    caches_parallel = [(k[:, :, :frames], v[:, :, :frames]) for k, v in stepper.snapshot(0).caches]
    tokens_parallel = stepper.step_inputs(0)

    # the same frames through the decoder one at a time, into caches of the test's own
    caches, _ = tiny_tts.model.new_caches(2, stepper.max_positions + 2)
    with torch.inference_mode():
        for t in range(frames):
            toks = torch.empty(2, 1, d.channels, dtype=torch.long)
            toks[:, 0, 2:] = delayed[:, t]
            toks[0, 0, :2] = text[t]
            toks[1, 0, :2] = torch.tensor([d.text_zero_token_id, d.text_pad_token_id])
            tiny_tts.model.transformer(toks, torch.full((2, 1), t), caches)
    for (k1, v1), cache in zip(caches_parallel, caches):
        torch.testing.assert_close(k1, cache.k[:, :, :frames], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, cache.v[:, :, :frames], atol=1e-5, rtol=1e-4)
    # the next step reads the text of step `frames` and the delayed column of its position
    assert tokens_parallel[0, :2].tolist() == text[frames].tolist()
    assert tokens_parallel[0, 2:].tolist() == delayed[:, column].tolist()


def test_an_append_at_a_position_equals_one_prefill_of_all_the_frames(tiny_tts):
    """`prefill(start=)` (a caller's turn) runs only the appended frames over the cache the slot
    has, and leaves the slot as one clean prefill of every frame would."""
    d = tiny_tts.config.data
    before, appended = 9, 6
    frames = before + appended
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2048, (d.num_codebooks, frames), generator=gen)
    text = torch.randint(0, 100, (frames + 1, 2), generator=gen)
    grid = delay_codes(codes, list(d.delay_pattern), d.audio_pad)
    for k, delay in enumerate(d.delay_pattern):
        grid[k, :delay] = d.audio_bos

    whole = tiny_tts.stepper(cfg=True)
    whole.reset_call(0)
    whole.prefill(0, grid, text, frames, boundary="clean")
    expected = {name: t for name, t in whole.slot_tensors(0).items() if "cache" not in name}
    caches_whole = [(k[:, :, :frames].clone(), v[:, :, :frames].clone()) for k, v in whole.snapshot(0).caches]

    parts = tiny_tts.stepper(cfg=True)  # the shared stepper: the first prefill rewrites the whole slot
    parts.reset_call(0)
    first = delay_codes(codes[:, :before], list(d.delay_pattern), d.audio_pad)
    for k, delay in enumerate(d.delay_pattern):
        first[k, :delay] = d.audio_bos
    parts.prefill(0, first, text[: before + 1], before, boundary="clean")
    # the appended frames' own delayed grid: its cells of frames before `before` are the slot's
    parts.prefill(0, delay_codes(codes[:, before:], list(d.delay_pattern), d.audio_pad), text[before:], appended,
                  boundary="clean", start=before)
    assert parts.last_prefill == PrefillSpan(before, appended)
    got = {name: t for name, t in parts.slot_tensors(0).items() if "cache" not in name}
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    for (k1, v1), (k2, v2) in zip(caches_whole, parts.snapshot(0).caches):
        torch.testing.assert_close(k2[:, :, :frames], k1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v2[:, :, :frames], v1, atol=1e-5, rtol=1e-4)


def test_an_append_keeps_the_cache_offset_and_needs_the_frames_before_it_complete(tiny_tts):
    d = tiny_tts.config.data
    stepper = _prefilled_stepper(tiny_tts, 6, sampling_seed=1, codes_seed=4)  # upstream: cache offset 1
    pad, new = (d.text_pad_token_id, d.text_pad_token_id), (d.text_new_word_token_id, 20)
    for _ in range(d.max_delay + 3):
        stepper.step([(pad, new)])
    position = stepper.position(0)
    codes = torch.randint(0, 2048, (d.num_codebooks, 4), generator=torch.Generator().manual_seed(5))
    grid = delay_codes(codes, list(d.delay_pattern), d.audio_pad)
    text = torch.full((5, 2), d.text_pad_token_id)
    with pytest.raises(ValueError, match="not complete"):  # the last max_delay frames are still being written
        stepper.prefill(0, grid, text, 4, boundary="clean", start=position)
    with pytest.raises(ValueError, match="clean boundary"):
        stepper.prefill(0, grid, text, 4, start=position - d.max_delay + 1)
    start = position - d.max_delay + 1  # every aligned frame before it is complete
    stepper.prefill(0, grid, text, 4, boundary="clean", start=start)
    assert stepper.place(0) == SlotPlace(position=start + 4, prefix_frames=start + 4, cache_offset=1)
    assert torch.equal(stepper.aligned_codes(0, start, start + 4), codes)


@pytest.mark.parametrize("boundary", ["upstream", "clean"])
def test_prefix_codes_past_the_prefix_end_are_kept_only_by_the_clean_boundary(tiny_tts, boundary):
    d = tiny_tts.config.data
    stepper = tiny_tts.stepper(cfg=True)
    stepper.set_sampling(0, SamplingParams(seed=3))
    frames = 5
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=torch.Generator().manual_seed(1))
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    text = torch.full((frames + 1, 2), d.text_pad_token_id)
    stepper.reset_call(0)
    stepper.prefill(0, delayed, text, frames, boundary=boundary)
    pad = (d.text_pad_token_id, d.text_pad_token_id)
    for _ in range(d.max_delay):
        stepper.step([(pad, pad)])
    buf = stepper.written_codes(0, 0, frames + d.max_delay)
    tail_kept = []
    for k, delay in enumerate(d.delay_pattern):
        # aligned frames 0..frames-1 of codebook k sit at delayed columns delay..delay+frames-1;
        # the columns before `frames` were read during the prefill and are never written again
        assert torch.equal(buf[k, delay:frames], delayed[k, delay:frames])
        tail_kept.append(torch.equal(buf[k, frames: delay + frames], delayed[k, frames: delay + frames]))
    # clean: teacher-forced; upstream (docs/parity.md P5): sampled over
    assert all(tail_kept) if boundary == "clean" else not any(tail_kept)


def test_snapshot_restore_replays_identically(tiny_tts):
    d = tiny_tts.config.data
    stepper = tiny_tts.stepper(cfg=True)
    stepper.reset_call(0)
    stepper.set_sampling(0, SamplingParams(seed=5))
    pad = (d.text_pad_token_id, d.text_pad_token_id)
    new = (d.text_new_word_token_id, 20)
    for _ in range(3):
        stepper.step([(pad, new)])
    snap = stepper.snapshot()
    first = []
    for _ in range(4):
        stepper.step([(pad, new)])
        first.append(stepper.codes.clone())
    stepper.restore(snap)
    assert stepper.position(0) == 3
    for expected in first:
        stepper.step([(pad, new)])
        assert torch.equal(stepper.codes, expected)


def _prefilled_stepper(tts, frames: int, *, sampling_seed: int, codes_seed: int, **prefill_options) -> FrameStepper:
    """The shared one-call stepper, slot 0 reset and prefilled with `frames` random prefix frames."""
    d = tts.config.data
    stepper = tts.stepper(cfg=True)
    stepper.reset_call(0)
    stepper.set_sampling(0, SamplingParams(seed=sampling_seed))
    generator = torch.Generator().manual_seed(codes_seed)
    delayed = torch.randint(0, 2048, (d.num_codebooks, frames + d.max_delay), generator=generator)
    for k, delay in enumerate(d.delay_pattern):
        delayed[k, :delay] = d.audio_bos
    stepper.prefill(0, delayed, torch.full((frames + 1, 2), d.text_pad_token_id), frames, **prefill_options)
    return stepper


def test_snapshot_carries_the_cache_offset_of_an_upstream_boundary(tiny_tts):
    """After an upstream-boundary prefill a slot's cache index runs one ahead of its position; a
    snapshot restored into a reset slot (offset 0) must bring the offset back to replay the same."""
    d = tiny_tts.config.data
    frames = 6
    stepper = _prefilled_stepper(tiny_tts, frames, sampling_seed=5, codes_seed=2)  # the default boundary: upstream
    pad, new = (d.text_pad_token_id, d.text_pad_token_id), (d.text_new_word_token_id, 20)
    for _ in range(2):
        stepper.step([(pad, new)])
    snap = stepper.snapshot()
    assert snap.cache_offset == 1 and snap.length == frames - 1 + 2 + 1 + 1  # slots 0..position+1
    first = []
    for _ in range(4):
        stepper.step([(pad, new)])
        first.append(stepper.codes.clone())
    stepper.reset_call(0)
    stepper.restore(snap)
    assert (stepper.position(0), stepper.place(0).cache_offset) == (frames + 1, 1)
    for expected in first:
        stepper.step([(pad, new)])
        assert torch.equal(stepper.codes, expected)
    stepper.reset_call(0)
    assert stepper.place(0).cache_offset == 0 and int(stepper.slot_tensors(0)["cache_offset"]) == 0


def test_rewind_after_an_upstream_boundary_keeps_the_cache_offset(tiny_tts):
    """Barge-in rollback past an upstream-boundary prefix: the history fills slots 0..position, so
    the offset must stay; the replay then gives the codes of the first run."""
    d = tiny_tts.config.data
    frames = 6
    stepper = _prefilled_stepper(tiny_tts, frames, sampling_seed=9, codes_seed=3, boundary="upstream")
    pad, new = (d.text_pad_token_id, d.text_pad_token_id), (d.text_new_word_token_id, 20)
    codes, text = {}, {}
    for _ in range(8):
        position = stepper.position(0)
        stepper.step([(pad, new)])
        codes[position], text[position] = stepper.codes[0].clone(), tuple(stepper.text_out[0].tolist())
    target = frames + 3
    stepper.rewind(0, target, text[target - 1])
    assert stepper.place(0).cache_offset == 1
    for position in range(target, frames - 1 + 8):
        stepper.step([(pad, new)])
        assert torch.equal(stepper.codes[0], codes[position]), position


def test_unknown_prefix_boundary_is_refused(tiny_tts):
    d = tiny_tts.config.data
    stepper = tiny_tts.stepper(cfg=True)
    with pytest.raises(ValueError, match="upstream, clean"):
        stepper.prefill(0, torch.zeros(d.num_codebooks, 4 + d.max_delay, dtype=torch.long),
                        torch.zeros(5, 2, dtype=torch.long), 4, boundary="teacher")


def test_single_branch_stepper_rejects_cfg(tiny_tts):
    stepper = FrameStepper(tiny_tts.model, cfg=False, max_positions=32)
    with pytest.raises(ValueError, match="cfg_scale"):
        stepper.set_sampling(0, SamplingParams(cfg_scale=2.0))


def test_presets_have_published_shapes():
    cfg = preset("2b")
    assert cfg.data.channels == 34 and cfg.data.delay_pattern == (16,) + (18,) * 31
    assert cfg.model.decoder.n_layer == 24 and preset("1b").model.decoder.n_layer == 18
    assert preset("tiny").runtime.weights_schedule[:4] == (0, 0, 1, 1)


def test_real_dia2_delays_generate_and_stream(tmp_path):
    """The published delay pattern [16] + [18] * 31 (not just the tiny preset's small delays):
    generation ends after the delay tail, every aligned frame is real codes, and the streamed
    frames (ready_codes after each step) equal the undelayed grid."""
    import dataclasses

    from vendor_dia2 import Dia2
    from vendor_dia2.checkpoint import write_random_checkpoint
    from vendor_dia2.delays import undelay_codes

    base = preset("tiny")
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, delay_pattern=(16,) + (18,) * 31))
    tts = Dia2.from_pretrained(str(write_random_checkpoint(cfg, tmp_path / "ckpt")), device="cpu")
    result = tts.generate("[S1] one two", seed=0, max_frames=120, decode=False)
    assert [w for w, _ in result.timestamps] == ["one", "two"]
    assert result.frames < 120
    assert int(result.audio_tokens.min()) >= 0 and int(result.audio_tokens.max()) < 2048

    stepper = tts.stepper(cfg=True)
    stepper.reset_call(0)
    machine = tts.new_state_machine()
    machine.push(parse_script("[S1] one two", tts.tokenizer))
    streamed = {}
    for t in range(40):
        machine.process(t, stepper.step([machine.preview(t)])[0])
        if stepper.ready_frame_index(0) >= 0:
            streamed[stepper.ready_frame_index(0)] = stepper.ready_codes[0].clone()
    assert min(streamed) == 0 and max(streamed) == 40 - 18  # first frame after 18 steps
    aligned = undelay_codes(stepper.written_codes(0, 0, 41), cfg.data.delay_pattern)
    for frame, codes in streamed.items():
        expected = aligned[:, frame].clone()
        if frame == 0:
            expected = torch.where(expected < 0, codes, expected)  # column 0 is never written
        assert torch.equal(codes, expected)


def test_kernel_and_weight_options_are_checked(tiny_tts, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernels must be"):
        tiny_tts.new_stepper(cfg=True, kernels="cuda")
    with pytest.raises(ValueError, match="weights must be"):
        tiny_tts.new_stepper(cfg=True, weights="int4")
    with pytest.raises(ValueError, match="fp8 weights need the triton kernels"):
        tiny_tts.new_stepper(cfg=True, weights="fp8")
    with pytest.raises(ValueError, match="need CUDA and triton"):
        tiny_tts.new_stepper(cfg=True, kernels="triton")  # this is a CPU stepper


def _bucket_run(tts, buckets, pattern):
    stepper = tts.new_stepper(n_calls=4, cfg=True, max_positions=64, use_cuda_graph=False, cache_buckets=buckets)
    actions, lengths = step_pattern(tts, stepper, pattern)
    return actions, torch.stack([stepper.written_codes(call) for call in range(4)]), lengths


def test_attending_over_the_filled_cache_only_changes_no_token(tiny_tts):
    """Buckets of 8 and 16 slots (the GPU's are 256 and 512): a step reads only the slots its
    batch has written, and every token stays what the whole-cache step draws."""
    pattern = [[True, False, False, False]] * 10 + [[True, True, True, True]] * 12 + [[False, True, False, False]] * 4
    whole = _bucket_run(tiny_tts, (), pattern)
    bucketed = _bucket_run(tiny_tts, (8, 16), pattern)
    assert whole[0] == bucketed[0]
    assert torch.equal(whole[1], bucketed[1])
    assert set(whole[2]) == {66}
    assert bucketed[2][:8] == [8] * 8 and 16 in bucketed[2] and 66 in bucketed[2]  # every bucket is used
