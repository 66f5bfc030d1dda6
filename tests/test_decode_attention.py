"""The decoder's decode-step attention kernel against SDPA with the causal mask (bf16 tolerance).

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with triton
installed); skipped otherwise, as on CI's CPU machine, whose torch wheel has no Triton.
"""

import pytest
import torch

from vendor_dia2 import decode_attention
from vendor_dia2.decode_attention import attend, attend_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not decode_attention.available(DEVICE),
                                reason="needs CUDA, or triton with TRITON_INTERPRET=1")


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator).to(DEVICE, torch.bfloat16)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def _case(rows: int, hq: int, hkv: int, length: int, dh: int, seed: int, window: int | None = None):
    """q [rows, hq, 1, dh], caches [rows, hkv, length, dh] seen through a window of the first
    `window` slots (the stepper's bucket views), and each row's last slot at random in it."""
    g = torch.Generator().manual_seed(seed)
    q = _randn(rows, hq, 1, dh, generator=g) * 2
    k_full, v_full = _randn(rows, hkv, length, dh, generator=g), _randn(rows, hkv, length, dh, generator=g)
    window = window or length
    last = torch.randint(0, window, (rows,), generator=g)
    last[0] = 0  # a row that has only its first slot
    last[-1] = window - 1  # and one that fills the window
    return q, k_full[:, :, :window], v_full[:, :, :window], last.to(DEVICE)


@pytest.mark.parametrize("rows,hq,hkv,length,window", [
    (2, 4, 2, 96, None),  # one call with CFG: fewer slots than a chunk
    (3, 8, 2, 300, 260),  # three chunks, the last one part filled, through a window view
    (16, 4, 4, 200, None),  # no grouping
])
def test_attend_matches_masked_sdpa(rows, hq, hkv, length, window):
    q, k, v, last = _case(rows, hq, hkv, length, dh=32, seed=rows, window=window)
    out = attend(q, k, v, last)
    ref = attend_reference(q, k, v, last)
    assert out.shape == ref.shape == (rows, hq, 1, 32)
    assert out.dtype == q.dtype
    assert _rel(out, ref) < 1e-2
    for row in range(rows):  # row by row too: a wrong mask on one short row hides in the norm of all
        assert _rel(out[row], ref[row]) < 2e-2


def test_slots_past_the_last_are_never_read():
    q, k, v, last = _case(4, 4, 2, 200, dh=32, seed=7)
    out = attend(q, k, v, last)
    for row in range(4):
        k[row, :, int(last[row]) + 1:] = float("nan")  # what a row has not written may hold anything
        v[row, :, int(last[row]) + 1:] = float("nan")
    again = attend(q, k, v, last)
    assert torch.equal(out, again)


def test_refuses_a_prefill():
    q, k, v, last = _case(2, 4, 2, 64, dh=32, seed=1)
    with pytest.raises(ValueError, match="one query per row"):
        attend(q.expand(2, 4, 3, 32), k, v, last)


@pytest.mark.skipif(DEVICE != "cuda", reason="the 2b decoder's shape, on the GPU only")
@pytest.mark.parametrize("rows", [2, 16, 128, 512])
def test_full_size_decoder_shape(rows):
    q, k, v, last = _case(rows, 16, 4, 1024, dh=128, seed=rows, window=512)
    assert _rel(attend(q, k, v, last), attend_reference(q, k, v, last)) < 1e-2


def _whole_frames(tiny_dir, monkeypatch, *, prefix: bool, frames: int, kernels: str, dtype: torch.dtype):
    """Greedy frames of the tiny checkpoint (cfg 2), the decoder attending through this kernel
    against SDPA: (actions, codes) of each."""
    from stepping import prefill_voice, speak_frames
    from vendor_dia2 import Dia2
    from vendor_dia2.runtime import SamplingParams

    tts = Dia2.from_pretrained(str(tiny_dir), device=DEVICE, dtype=dtype)

    def run(enabled: bool):
        monkeypatch.setattr(decode_attention, "ENABLED", enabled)
        stepper = tts.new_stepper(cfg=True, max_positions=frames + 40, kernels=kernels)
        assert stepper.decode_attention is enabled
        stepper.set_sampling(0, SamplingParams(seed=5, cfg_scale=2.0, text_temperature=0.0, audio_temperature=0.0))
        if prefix:
            prefill_voice(tts, stepper)
        return speak_frames(tts, stepper, frames)

    return run(False), run(True)


def test_fp32_eager_frames_take_the_same_tokens(tiny_dir, monkeypatch):
    """The stepper's path through the kernel (the decoder layer's hook, each row's last slot),
    eager in fp32 (on the CPU under the interpreter, or on the GPU without TF32), 30 frames."""
    ref, new = _whole_frames(tiny_dir, monkeypatch, prefix=True, frames=30, kernels="torch", dtype=torch.float32)
    assert ref[0] == new[0]
    assert torch.equal(ref[1], new[1])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 CUDA graphs with the Triton depformer, on the GPU only")
@pytest.mark.parametrize("prefix", [False, True])
def test_whole_frames_take_the_same_tokens(tiny_dir, monkeypatch, prefix):
    """100 greedy frames in bf16, CUDA graphs, the Triton depformer: the same actions and codes."""
    ref, new = _whole_frames(tiny_dir, monkeypatch, prefix=prefix, frames=100, kernels="triton", dtype=torch.bfloat16)
    assert sum(ref[0]) > 0
    assert ref[0] == new[0]
    assert torch.equal(ref[1], new[1])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled CUDA graphs, on the GPU only")
@pytest.mark.xfail(strict=True, reason="run 21 (H200): with this kernel on, compiled CUDA graphs of the fp32 tiny "
                                       "checkpoint drew other codes than eager steps from step ~30 on, once all four "
                                       "calls stepped again after six steps of one alone (graphs alone and compile "
                                       "alone agree); why is open, so "
                                       "the kernel is off by default. Strict: when this passes, turn it on again")
def test_compiled_graphs_take_eager_tokens(tiny_dir, monkeypatch):
    from stepping import step_pattern
    from vendor_dia2 import Dia2

    tts = Dia2.from_pretrained(str(tiny_dir), device=DEVICE, dtype=torch.float32)
    monkeypatch.setattr(decode_attention, "ENABLED", True)
    pattern = [[True] * 4] * 24 + [[True, False, False, False]] * 6 + [[True] * 4] * 6

    def run(**options):
        stepper = tts.new_stepper(n_calls=4, cfg=True, max_positions=128, kernels="triton", **options)
        assert stepper.decode_attention
        actions, _ = step_pattern(tts, stepper, pattern, True)
        return actions, torch.stack([stepper.written_codes(c) for c in range(4)])

    eager, graph = run(use_cuda_graph=False), run(use_cuda_graph=True, compile=True)
    assert eager[0] == graph[0]
    assert torch.equal(eager[1], graph[1])
