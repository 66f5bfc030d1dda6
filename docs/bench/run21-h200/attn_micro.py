"""Decode attention vs masked SDPA alone, in CUDA graphs: µs per launch by rows, window, filled slots."""
import torch, sys
from vendor_dia2.decode_attention import attend, attend_reference

def timed(fn, reps=200):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(reps // 10): g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps

print("what rows hq hkv dh window filled: sdpa_us decode_us")
for kind, hq, hkv, dh, windows in (("decoder", 16, 4, 128, (256, 512, 2048)), ("depformer", 16, 16, 64, (32,))):
    for rows in (2, 16, 128, 256, 512):
        for window in windows:
            for filled in sorted({min(100, window), window}):
                q = torch.randn(rows, hq, 1, dh, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(rows, hkv, window, dh, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                last = torch.full((rows,), filled - 1, device="cuda", dtype=torch.long)
                mask = torch.arange(window, device="cuda")[None, None, None, :] <= last[:, None, None, None]
                sd = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=hq != hkv))
                de = timed(lambda: attend(q, k, v, last)) if kind == "decoder" else float("nan")
                print(f"{kind} {rows} {hq} {hkv} {dh} {window} {filled}: {sd:.1f} {de:.1f}", flush=True)
