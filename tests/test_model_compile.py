"""The decoder's cache write stays out of torch.compile (model.write_cache; why: docs/benchmarks.md,
run 8), now that the disabling is made on the first call rather than at import, and importing
the model no longer loads torch._dynamo (~1.3 s in each process that never runs a model)."""

from __future__ import annotations

import subprocess
import sys

import torch

from vendor_dia2.config import preset
from vendor_dia2.model import Dia2Model, decoder_layer


def test_the_server_process_imports_without_torch_dynamo():
    """What `server.py` imports before its engine process is started (no model in this process)."""
    code = ("import sys, server, dia2stream.serve.server, vendor_dia2.checkpoint, vendor_dia2.model; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_a_compiled_decoder_layer_writes_the_cache_outside_its_graphs():
    torch.manual_seed(0)
    model = Dia2Model(preset("tiny")).eval().requires_grad_(False)
    model.prepare_tables()
    rows, frames, length = 2, 3, 8
    channels = 2 + model.config.data.num_codebooks
    tokens = torch.randint(0, 4, (rows, frames, channels))
    positions = torch.arange(frames).expand(rows, frames).contiguous()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(decoder_layer, backend=recording_backend)
    with torch.inference_mode():
        eager_caches, _ = model.new_caches(rows, length)
        compiled_caches, _ = model.new_caches(rows, length)
        eager = model.transformer(tokens, positions, eager_caches)
        traced = model.transformer(tokens, positions, compiled_caches, layer_fn=compiled)

    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op in ("call_method", "call_function")]
    assert ops and any("linear" in op for op in ops), ops  # the layer's math was compiled ...
    assert not any("scatter" in op for op in ops), ops  # ... and the cache write was not
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_caches, compiled_caches):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)  # the write still happened
