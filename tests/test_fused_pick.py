"""The fused draw kernel (vendor_dia2/fused_pick.py) against `runtime.pick`, the sorted torch path.

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed); skipped otherwise, as on CI's CPU machine, whose torch wheel has no Triton. Logits
are fp32 draws without ties, where both paths have one answer; the tie rule itself is checked
on its own (ids chosen as a stable sort of the candidates would order them).
"""

import pytest
import torch
import torch.nn.functional as F

from vendor_dia2 import fused_pick, kernels
from vendor_dia2.runtime import pick
from vendor_dia2.sampling import draw_noise, gumbel_noise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA, or triton with TRITON_INTERPRET=1")

V, MAX_TOP_K, FILTER_K = 2048, 256, 50


def _frame(n: int, branches: int, *, seed: int, temperature: float, top_k: int, cfg: float = 2.0, v: int = V):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n * branches, v, generator=g) * 3).to(DEVICE)
    temp = torch.full((n, 1), temperature, device=DEVICE)
    if temperature > 0 and n > 1:
        temp[0] = 0.0  # a greedy row among sampled ones
    top = torch.full((n, 1), top_k, device=DEVICE, dtype=torch.long)
    keys = torch.arange(n, device=DEVICE, dtype=torch.long) + seed
    noise, inv_temp = draw_noise(gumbel_noise(keys, keys * 7, 1, MAX_TOP_K), temp, top)
    scale = torch.full((n,), cfg, device=DEVICE)
    return logits, inv_temp[:, 0], noise[:, 0], scale, top[:, 0]


def _both(logits, inv_temp, noise, scale, top, branches, banned=()):
    ref = pick(logits.clone(), inv_temp, noise, scale, branches=branches, filter_k=FILTER_K, max_top_k=MAX_TOP_K,
               banned=banned)
    out = fused_pick.pick(logits, inv_temp, noise, scale, top, branches=branches, filter_k=FILTER_K, banned=banned)
    return out, ref


@pytest.mark.parametrize("n", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("branches", [1, 2])
def test_greedy_picks_equal_the_sorted_path(n, branches):
    args = _frame(n, branches, seed=n, temperature=0.0, top_k=50)
    out, ref = _both(*args, branches)
    assert out.dtype == torch.long and out.shape == (n,)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("n", [1, 2, 16, 64])
@pytest.mark.parametrize("branches,top_k", [(1, 50), (1, 256), (1, 1), (2, 50), (2, 7)])
def test_sampled_draws_equal_the_sorted_path_for_the_same_keys(n, branches, top_k):
    args = _frame(n, branches, seed=100 + n, temperature=0.8, top_k=top_k)
    out, ref = _both(*args, branches)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cfg", [1.0, 3.0, 0.25])
def test_other_guidance_scales_equal_the_sorted_path(cfg):
    args = _frame(16, 2, seed=7, temperature=0.8, top_k=50, cfg=cfg)
    out, ref = _both(*args, 2)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("branches", [1, 2])
def test_banned_ids_are_never_drawn_and_match(branches):
    n = 32
    logits, inv_temp, noise, scale, top = _frame(n, branches, seed=3, temperature=0.8, top_k=50, v=2050)
    logits[:, 2048] = 50.0  # the banned ids would win every draw
    logits[:, 2049] = 49.0
    out, ref = _both(logits, inv_temp, noise, scale, top, branches, banned=(2048, 2049))
    assert torch.equal(out, ref)
    assert (out < 2048).all()


def test_small_vocabularies_like_the_action_head():
    for branches in (1, 2):
        args = _frame(8, branches, seed=11, temperature=0.6, top_k=50, v=3)
        out, ref = _both(*args, branches)
        assert torch.equal(out, ref)


def test_ties_go_as_a_stable_sort_orders_them():
    # cond ties between ids 5 and 9 at the top: the guided order (9 above 5) decides, as the
    # second, stable sort of the sorted path keeps the guided top-k's order
    cond = torch.full((1, 64), -10.0)
    uncond = torch.full((1, 64), -10.0)
    cond[0, 5] = cond[0, 9] = 4.0
    uncond[0, 5], uncond[0, 9] = 1.0, 0.0  # guided = 2 cond - uncond: id 9 (8.0) above id 5 (7.0)
    logits = torch.cat([cond, uncond]).to(DEVICE)
    zeros = torch.zeros(1, MAX_TOP_K, device=DEVICE)
    ones = torch.ones(1, device=DEVICE)
    top = torch.full((1,), 50, device=DEVICE, dtype=torch.long)
    out = fused_pick.pick(logits, ones, zeros, 2 * ones, top, branches=2, filter_k=FILTER_K)
    assert out.tolist() == [9]
    # without CFG equal logits go to the lower id, as torch's top-k takes them
    plain = torch.full((1, 64), -10.0)
    plain[0, 12] = plain[0, 40] = 3.0
    out = fused_pick.pick(plain.to(DEVICE), ones, zeros, ones, top, branches=1, filter_k=FILTER_K)
    assert out.tolist() == [12]


def test_forced_rows_take_the_known_code_and_next_stage_rows_are_written():
    n, branches, d = 4, 2, 48
    logits, inv_temp, noise, scale, top = _frame(n, branches, seed=5, temperature=0.0, top_k=50)
    forced = torch.tensor([False, True, False, True], device=DEVICE)
    known = torch.tensor([7, 8, 9, 10], device=DEVICE)
    g = torch.Generator().manual_seed(1)
    projected = torch.randn(n * branches, d, generator=g).to(DEVICE, torch.bfloat16)
    table = torch.randn(V, d, generator=g).to(DEVICE, torch.bfloat16)
    x_next = torch.full((n * branches, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out = fused_pick.pick(logits, inv_temp, noise, scale, top, branches=branches, filter_k=FILTER_K,
                          forced=forced, known=known, next_embed=(projected, table, x_next))
    ref = pick(logits.clone(), inv_temp, noise, scale, branches=branches, filter_k=FILTER_K, max_top_k=MAX_TOP_K)
    ref = torch.where(forced, known, ref)
    assert torch.equal(out, ref)
    expected = projected + F.embedding(ref.repeat_interleave(branches), table)
    if DEVICE == "cuda":
        assert torch.equal(x_next, expected)
    else:  # the interpreter rounds fp32 to bf16 toward zero: one bf16 step at most
        assert torch.allclose(x_next.float(), expected.float(), rtol=2 ** -7, atol=0)


def test_strided_stream_views_are_read_as_such():
    # the runtime passes column views of [N, streams] and [N, streams, K] tensors
    n, streams = 8, 3
    logits, _, _, scale, _ = _frame(n, 2, seed=21, temperature=0.8, top_k=50)
    temp = torch.full((n, streams), 0.8, device=DEVICE)
    top = torch.full((n, streams), 50, device=DEVICE, dtype=torch.long)
    top[:, 1] = 5
    keys = torch.arange(n, device=DEVICE)
    noise, inv_temp = draw_noise(gumbel_noise(keys, keys, streams, MAX_TOP_K), temp, top)
    out = fused_pick.pick(logits, inv_temp[:, 1], noise[:, 1], scale, top[:, 1], branches=2, filter_k=FILTER_K)
    ref = pick(logits.clone(), inv_temp[:, 1], noise[:, 1], scale, branches=2, filter_k=FILTER_K,
               max_top_k=MAX_TOP_K)
    assert torch.equal(out, ref)



@pytest.mark.parametrize("bits", [2, 4])
def test_every_select_width_takes_the_same_tokens(monkeypatch, bits):
    # the threshold select decides 1, 2 or 4 bits a pass (SELECT_BITS): the same candidates, so the
    # same tokens, with and without CFG, top-k at the row's edges; on bf16-rounded logits (ties at
    # the threshold, as the depformer's have them) against the one-bit select, and on fp32 ones
    # against the sorted path
    for branches, top_k in ((1, 1), (1, 256), (2, 50)):
        logits, inv_temp, noise, scale, top = _frame(16, branches, seed=40 + top_k, temperature=0.8, top_k=top_k)
        tied = logits.bfloat16().float()
        monkeypatch.setattr(fused_pick, "SELECT_BITS", 1)
        one_bit = fused_pick.pick(tied, inv_temp, noise, scale, top, branches=branches, filter_k=FILTER_K)
        monkeypatch.setattr(fused_pick, "SELECT_BITS", bits)
        out = fused_pick.pick(tied, inv_temp, noise, scale, top, branches=branches, filter_k=FILTER_K)
        assert torch.equal(out, one_bit)
        out, ref = _both(logits, inv_temp, noise, scale, top, branches)
        assert torch.equal(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [False, True])
def test_whole_greedy_frames_take_the_sorted_paths_tokens(tiny_dir, cfg):
    # bf16 logits tie at the top in about one draw in fifty: both draws must take the lower id
    # (on the CPU, torch's top-k alone orders ties otherwise). 12 frames of the tiny checkpoint
    # with the torch depformer (the Triton one takes minutes a frame under the interpreter).
    from vendor_dia2 import Dia2
    from vendor_dia2.runtime import SamplingParams
    from vendor_dia2.script import parse_script

    tts = Dia2.from_pretrained(str(tiny_dir), device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for sampler in ("torch", "triton"):
        stepper = tts.new_stepper(cfg=cfg, max_positions=40, kernels="torch", sampler=sampler)
        stepper.set_sampling(0, SamplingParams(seed=5, cfg_scale=2.0 if cfg else 1.0, text_temperature=0.0,
                                               audio_temperature=0.0))
        machine = tts.new_state_machine()
        machine.push(parse_script("[S1] Hello there, how are you doing today? " * 2, tts.tokenizer))
        actions, codes = [], []
        for _ in range(12):
            t = stepper.position(0)
            actions.append(stepper.step([machine.preview(t)])[0])
            machine.process(t, actions[-1])
            codes.append(stepper.codes.clone())
        runs.append((actions, torch.stack(codes)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
