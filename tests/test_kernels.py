"""The fused depformer kernels against the eager math (bf16 tolerance).

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed); skipped otherwise, as on CI's CPU machine, whose torch wheel has no Triton.
"""

import pytest
import torch
import torch.nn.functional as F

from vendor_dia2 import kernels
from vendor_dia2.model import (StageLayerWeights, StageShape, StageWeights, depformer_stage, depformer_stage_fused,
                               depformer_stage_kernel_attention, gated_mlp)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs CUDA, or triton with TRITON_INTERPRET=1")


@pytest.fixture(params=["dot", "no_dot"])
def tiling(request, monkeypatch):
    """Run each check under both products (tensor cores and the few-rows CUDA-core path), whatever
    the tuned table picks for its shapes."""
    config = kernels.TileConfig(bn=16, bk=64, dot=request.param == "dot")
    monkeypatch.setattr(kernels, "_config", lambda kind, m: config)
    return config


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def _randn(*shape, scale=1.0, generator):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("m", [2, 5, 40])
@pytest.mark.parametrize("with_norm,with_res", [(True, False), (False, True)])
def test_linear_matches_reference(m, with_norm, with_res, tiling):
    g = torch.Generator().manual_seed(m)
    k, n = 256, 96
    x, w = _randn(m, k, generator=g), _randn(n, k, scale=k ** -0.5, generator=g)
    norm = _randn(k, generator=g) if with_norm else None
    res = _randn(m, n, generator=g) if with_res else None
    ref_x = F.rms_norm(x.float(), (k,), norm.float(), 1e-5) if with_norm else x.float()
    ref = ref_x @ w.float().T + (res.float() if with_res else 0)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)  # every element must be written
    kernels.linear(x, w, norm=norm, eps=1e-5, residual=res, out=out)
    assert _rel(out, ref) < 1e-2


def test_linear_takes_the_first_rows_only_when_asked(tiling):
    g = torch.Generator().manual_seed(3)
    x, w = _randn(2, 64, generator=g), _randn(40, 64, generator=g)
    out = kernels.linear(x, w, n=32)
    assert out.shape == (2, 32)
    assert _rel(out, x.float() @ w.float()[:32].T) < 1e-2


@pytest.mark.parametrize("acts", [("silu", "linear"), ("gelu", "relu")])
def test_gated_mlp_in_matches_reference(acts, tiling):
    g = torch.Generator().manual_seed(5)
    m, k, hidden = 3, 128, 80
    x, w = _randn(m, k, generator=g), _randn(2 * hidden, k, scale=k ** -0.5, generator=g)
    norm = _randn(k, generator=g)
    wo = torch.eye(hidden, dtype=torch.bfloat16, device=DEVICE)
    ref = gated_mlp(F.rms_norm(x.float(), (k,), norm.float(), 1e-5), w.float(), wo.float(), hidden, acts)
    # gate, up and their product are each rounded to bf16, as in the eager path: three roundings
    assert _rel(kernels.gated_mlp_in(x, w, norm, 1e-5, hidden, acts), ref) < 2e-2


def test_fp8_weights_dequantize_close_and_run():
    g = torch.Generator().manual_seed(9)
    w = _randn(64, 128, generator=g)
    q = kernels.QuantWeight.quantize(w)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (64,)
    assert _rel(q.dequantize(), w) < 0.05  # e4m3 keeps 3 mantissa bits
    if DEVICE != "cuda":
        pytest.skip("FP8 loads need the GPU (the interpreter has no float8)")
    x = _randn(2, 128, generator=g)
    assert _rel(kernels.linear(x, q), x.float() @ q.dequantize().float().T) < 1e-2


def _stage_inputs(shape: StageShape, rows: int, dim: int, stages: int, slot: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, dh, hidden = shape.heads, shape.head_dim, shape.hidden
    layers = []
    for _ in range(2):
        qk_map = torch.randn(2, dh, dh, generator=g) * dh ** -0.5
        layers.append(StageLayerWeights(
            pre_norm=_randn(dim, generator=g), in_proj=_randn(3 * h * dh, dim, scale=dim ** -0.5, generator=g),
            qk_map=qk_map.to(DEVICE, torch.bfloat16), out_proj=_randn(dim, h * dh, scale=(h * dh) ** -0.5, generator=g),
            post_norm=_randn(dim, generator=g), wi=_randn(2 * hidden, dim, scale=dim ** -0.5, generator=g),
            wo=_randn(dim, hidden, scale=hidden ** -0.5, generator=g)))
    caches = [(_randn(rows, h, stages, dh, generator=g), _randn(rows, h, stages, dh, generator=g)) for _ in layers]
    slots = torch.arange(stages, device=DEVICE)
    projected, embed = _randn(rows, dim, generator=g), _randn(300, dim, generator=g)
    prev = torch.randint(0, 300, (rows,), generator=g).to(DEVICE)
    stage = StageWeights(embed=embed, layers=tuple(layers), norm=_randn(dim, generator=g),
                         logits=_randn(shape.real_codes + 2, dim, generator=g),
                         mask=(slots <= slot)[None, None, None, :], slot=slots[slot:slot + 1].clone())
    return dict(projected=projected, stage=stage, prev=prev, caches=caches)


SMALL = (StageShape(heads=4, head_dim=16, hidden=96, eps=1e-5, activations=("silu", "linear"), real_codes=128), 64, 4)
# the 2b depformer (config.PRESETS), 64 calls with CFG: too slow for the interpreter
FULL = (StageShape(heads=16, head_dim=64, hidden=4096, eps=1e-5, activations=("silu", "linear"), real_codes=2048),
        1024, 128)


@pytest.mark.parametrize("slot", [0, 6, 30])
@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="full size on the GPU only"))])
def test_fused_stage_matches_eager_stage(slot, size, tiling):
    shape, dim, rows = SMALL if size == "small" else FULL
    args = _stage_inputs(shape, rows=rows, dim=dim, stages=31, slot=slot, seed=slot)
    eager_caches = [(k.clone(), v.clone()) for k, v in args["caches"]]
    fused_caches = [(k.clone(), v.clone()) for k, v in args["caches"]]
    ref = depformer_stage(args["projected"], args["stage"], args["prev"], eager_caches, shape)
    out = depformer_stage_fused(args["projected"], args["stage"], args["prev"], fused_caches, shape, index=slot)
    assert out.shape == ref.shape == (rows, shape.real_codes)
    assert _rel(out, ref) < 2e-2
    for (ek, ev), (fk, fv) in zip(eager_caches, fused_caches):
        assert _rel(fk[:, :, slot], ek[:, :, slot]) < 1e-2  # the stage's keys and values land in its slot
        assert _rel(fv[:, :, slot], ev[:, :, slot]) < 1e-2
        others = [s for s in range(31) if s != slot]
        assert torch.equal(fk[:, :, others], ek[:, :, others])  # and nothing else is touched


def _check_stage_against_eager(shape: StageShape, rows: int, dim: int, slot: int, stage_fn) -> None:
    """`stage_fn` (a stage taking `index=`) against the eager torch stage: logits and the cache slot
    written within bf16 tolerance, every other slot untouched."""
    args = _stage_inputs(shape, rows=rows, dim=dim, stages=31, slot=slot, seed=slot + rows)
    eager_caches = [(k.clone(), v.clone()) for k, v in args["caches"]]
    new_caches = [(k.clone(), v.clone()) for k, v in args["caches"]]
    ref = depformer_stage(args["projected"], args["stage"], args["prev"], eager_caches, shape)
    out = stage_fn(args["projected"], args["stage"], args["prev"], new_caches, shape, index=slot)
    assert out.shape == ref.shape == (rows, shape.real_codes) and out.dtype == ref.dtype
    assert _rel(out, ref) < 2e-2
    others = [s for s in range(31) if s != slot]
    for (ek, ev), (nk, nv) in zip(eager_caches, new_caches):
        assert _rel(nk[:, :, slot], ek[:, :, slot]) < 1e-2
        assert _rel(nv[:, :, slot], ev[:, :, slot]) < 1e-2
        assert torch.equal(nk[:, :, others], ek[:, :, others])
        assert torch.equal(nv[:, :, others], ev[:, :, others])


# The torch stage with its attention in one Triton launch a layer (`--batched-stage-attention`):
# the batched rows, above FUSED_MAX_ROWS, where the projections stay cuBLAS
@pytest.mark.parametrize("slot", [0, 6, 30])
@pytest.mark.parametrize("rows", [16, 64])
def test_kernel_attention_stage_matches_eager_stage(rows, slot):
    shape, dim, _ = SMALL
    _check_stage_against_eager(shape, rows, dim, slot, depformer_stage_kernel_attention)


@pytest.mark.skipif(DEVICE != "cuda", reason="full size on the GPU only")
@pytest.mark.parametrize("slot", [0, 6, 30])
@pytest.mark.parametrize("rows", [16, 64, 256])
def test_full_size_kernel_attention_stage_matches_eager_stage(rows, slot):
    shape, dim, _ = FULL
    _check_stage_against_eager(shape, rows, dim, slot, depformer_stage_kernel_attention)


@pytest.mark.parametrize("rows_per_program", [2, 3, 8])
@pytest.mark.parametrize("slot", [0, 17])
def test_attention_of_several_rows_a_program_equals_one_row_a_program(rows_per_program, slot):
    """`kernels.stage_attention(rows_per_program=n)` (the stage's maps read once for n rows):
    the same outputs and cache writes as one row a program, bit for bit, with rows that do not
    fill the last program (10 rows)."""
    g = torch.Generator().manual_seed(slot)
    rows, heads, dh, slots = 10, 4, 16, 32
    qkv = _randn(rows, 3 * heads * dh, generator=g)
    qk_map = _randn(2, dh, dh, scale=dh ** -0.5, generator=g)
    cache = [_randn(rows, heads, slots, dh, generator=g) for _ in range(2)]
    one = [c.clone() for c in cache]
    several = [c.clone() for c in cache]
    ref = kernels.stage_attention(qkv, qk_map, one[0], one[1], slot, heads, 1e-5)
    out = kernels.stage_attention(qkv, qk_map, several[0], several[1], slot, heads, 1e-5,
                                  rows_per_program=rows_per_program)
    assert torch.equal(out, ref)
    assert torch.equal(several[0], one[0]) and torch.equal(several[1], one[1])
    assert not torch.equal(one[0], cache[0])  # the slot was written


def test_kernel_attention_refuses_a_cache_whose_slots_are_not_rows_of_head_dims():
    """The kernel steps slots by Dh: a cache laid out [R, S, H, Dh] (seen as [R, H, S, Dh]) is refused."""
    shape, dim, _ = SMALL
    args = _stage_inputs(shape, rows=16, dim=dim, stages=31, slot=3, seed=1)
    interleaved = [(k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2))
                   for k, v in args["caches"]]
    with pytest.raises(ValueError, match="contiguous"):
        depformer_stage_kernel_attention(args["projected"], args["stage"], args["prev"], interleaved, shape, index=3)


def test_compiled_kernel_attention_stage_compiles_its_pieces_once_for_every_slot():
    """Compiled as the frame compiles it (graphs._compiled_functions; aot_eager here, for speed):
    the launch is a graph break, so the layer loop runs eagerly and each piece it calls is a
    compiled graph, and the slot becomes a dynamic int: later slots reuse the graphs, no compile
    per stage. The logits stay the eager stage's."""
    import functools

    from torch._dynamo.utils import counters

    shape, dim, _ = SMALL
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(functools.partial(depformer_stage_kernel_attention, shape=shape), backend="aot_eager")

    def run(slot: int) -> None:
        args = _stage_inputs(shape, rows=16, dim=dim, stages=31, slot=slot, seed=slot)
        eager_caches = [(k.clone(), v.clone()) for k, v in args["caches"]]
        ref = depformer_stage(args["projected"], args["stage"], args["prev"], eager_caches, shape)
        out = compiled(args["projected"], args["stage"], args["prev"], args["caches"], index=slot)
        assert _rel(out, ref) < 2e-2
        assert _rel(args["caches"][0][0][:, :, slot], eager_caches[0][0][:, :, slot]) < 1e-2

    with torch.inference_mode():
        for slot in range(3):  # 0 and 1 are specialised, then the slot turns dynamic
            run(slot)
        graphs = counters["stats"]["unique_graphs"]
        for slot in (17, 30):
            run(slot)
    assert graphs > 0
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
