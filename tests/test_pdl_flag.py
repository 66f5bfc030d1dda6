"""`--pdl` (programmatic dependent launch between the Triton kernels): validated, read from the
environment, and never on without a GPU that has it. The other Triton switches beside it
(`--persistent-stage`, `--batched-stage-attention`) likewise."""

import argparse

import pytest

from dia2stream.serve.config import parse_args
from vendor_dia2 import kernels


def test_pdl_flag_is_validated_and_read_from_the_environment():
    with pytest.raises(SystemExit):
        parse_args(["--pdl", "maybe"], environ={})
    assert parse_args([], environ={}).pdl == "auto"
    assert parse_args([], environ={"DIA2_PDL": "off"}).pdl == "off"
    assert parse_args(["--pdl", "on"], environ={"DIA2_PDL": "off"}).pdl == "on"


def test_pdl_is_off_without_a_hopper_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(kernels, "PDL", None)
    if torch.cuda.is_available() and kernels.triton is not None and not kernels.INTERPRETED:
        assert kernels.pdl_enabled() == (torch.cuda.get_device_capability()[0] >= 9)
    else:
        assert kernels.pdl_enabled() is False
    monkeypatch.setattr(kernels, "PDL", False)
    assert kernels.pdl_enabled() is False


def test_gpu_tilings_are_chosen_by_device_name(monkeypatch):
    monkeypatch.setattr(kernels, "CONFIGS", dict(kernels.CONFIGS))
    monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", kernels.FUSED_MAX_ROWS)
    assert kernels.gpu_model("NVIDIA H200") == "H200"
    assert kernels.gpu_model("NVIDIA H100 80GB HBM3") == "H100"
    assert kernels.gpu_model("NVIDIA A100-SXM4-80GB") == kernels.DEFAULT_GPU  # no table of its own
    assert kernels.use_gpu_tilings("NVIDIA H200") == "H200"
    assert kernels.CONFIGS == kernels.GPU_TILINGS["H200"]
    assert kernels.FUSED_MAX_ROWS == kernels.GPU_FUSED_MAX_ROWS["H200"]


def test_gpu_tilings_flag_offers_the_tables_the_kernels_have():
    from dia2stream.serve.config import GpuTilings

    assert {str(t) for t in GpuTilings} - {"auto"} == set(kernels.GPU_TILINGS)
    with pytest.raises(SystemExit):
        parse_args(["--gpu-tilings", "A100"], environ={})
    assert parse_args([], environ={}).gpu_tilings == "auto"
    assert parse_args([], environ={"DIA2_GPU_TILINGS": "H100"}).gpu_tilings == "H100"


def test_the_stepper_loads_the_table_named_or_its_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(kernels, "CONFIGS", dict(kernels.CONFIGS))
    monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", kernels.FUSED_MAX_ROWS)
    monkeypatch.setattr(kernels, "TILINGS_MODEL", "H200")
    assert kernels.load_tilings(torch.device("cpu")) == "H200"
    assert kernels.CONFIGS == kernels.GPU_TILINGS["H200"]
    monkeypatch.setattr(kernels, "TILINGS_MODEL", None)  # auto: no GPU name, the default table
    assert kernels.load_tilings(torch.device("cpu")) == kernels.DEFAULT_GPU
    assert kernels.CONFIGS == kernels.GPU_TILINGS[kernels.DEFAULT_GPU]
    monkeypatch.setattr(kernels, "TILINGS_MODEL", "B200")
    with pytest.raises(ValueError, match="no tiling table for 'B200'"):
        kernels.load_tilings(torch.device("cpu"))


def test_persistent_stage_flag_is_off_by_default_validated_and_read_from_the_environment():
    with pytest.raises(SystemExit):
        parse_args(["--persistent-stage", "maybe"], environ={})
    assert parse_args([], environ={}).persistent_stage == "off"
    assert parse_args([], environ={"DIA2_PERSISTENT_STAGE": "on"}).persistent_stage == "on"
    assert parse_args(["--persistent-stage", "off"], environ={"DIA2_PERSISTENT_STAGE": "on"}).persistent_stage == "off"


def test_persistent_stage_needs_the_triton_depformer(tiny_tts, monkeypatch):
    """The flag only changes how Triton stages launch: the torch depformer never takes it."""
    from vendor_dia2 import persistent_stage

    monkeypatch.setattr(persistent_stage, "ENABLED", True)
    stepper = tiny_tts.new_stepper(cfg=True, max_positions=32, kernels="torch")
    assert stepper.frame.stage_counters is None


def test_batched_stage_attention_flag_is_auto_by_default_validated_and_read_from_the_environment():
    with pytest.raises(SystemExit):
        parse_args(["--batched-stage-attention", "maybe"], environ={})
    assert parse_args([], environ={}).batched_stage_attention == "auto"
    assert parse_args([], environ={"DIA2_BATCHED_STAGE_ATTENTION": "off"}).batched_stage_attention == "off"
    assert parse_args(["--batched-stage-attention", "on"],
                      environ={"DIA2_BATCHED_STAGE_ATTENTION": "off"}).batched_stage_attention == "on"


@pytest.mark.parametrize("mode", [None, True, False])
def test_batched_stage_attention_is_off_on_a_cpu_without_the_interpreter(tiny_tts, monkeypatch, mode):
    """The CPU suite runs as before: without CUDA (or Triton's interpreter) no stage takes the kernel."""
    from vendor_dia2 import model

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(model, "BATCHED_STAGE_ATTENTION", mode)
    stepper = tiny_tts.new_stepper(n_calls=4, cfg=True, max_positions=32, kernels="torch")
    assert stepper.frame.kernel_attention is False


def test_batched_stage_attention_auto_follows_the_triton_depformer(monkeypatch):
    """auto: on where the stepper runs the Triton depformer (its torch stages are the batched
    rows); on: wherever the kernels run; off: never."""
    from vendor_dia2 import model

    if kernels.triton is None:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels can run on this CPU
    expected = {(None, True): True, (None, False): False, (True, True): True, (True, False): True,
                (False, True): False, (False, False): False}
    for (mode, triton_depformer), on in expected.items():
        monkeypatch.setattr(model, "BATCHED_STAGE_ATTENTION", mode)
        assert model.batched_stage_attention(triton_depformer, "cpu") is on


def test_bench_runs_the_batched_steps_once_in_each_stage_attention_mode_its_variants_name():
    from dia2stream.tools.bench import batched_runs, parse_variant, variant_options

    def runs(steps: str, flag: str = "auto"):
        return batched_runs(argparse.Namespace(steps=steps, batched_stage_attention=flag))

    assert runs("") == [("batched", None)]
    assert runs("graph_compiled_triton_cfg2,graph_compiled_triton_stagesdpa_cfg2") == [("batched", None),
                                                                                       ("batched_stagesdpa", False)]
    assert runs("graph_compiled_triton_stagesdpa_cfg2,graph_compiled_triton_stageattn_cfg2", flag="off") == [
        ("batched", False), ("batched_stageattn", True)]
    assert parse_variant("graph_compiled_triton_stageattn_cfg2") == (True, True, "triton", "bf16", True)
    assert variant_options("graph_compiled_triton_stagesdpa_cfg2") == {"stage_attention": False}


def test_compile_dynamic_is_off_by_default_and_asks_torch_compile_for_dynamic_shapes(monkeypatch):
    import torch

    from vendor_dia2 import graphs
    from vendor_dia2.frame import FrameFunctions

    assert parse_args([], environ={}).compile_dynamic == "off"
    assert parse_args([], environ={"DIA2_COMPILE_DYNAMIC": "on"}).compile_dynamic == "on"
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: asked.append(options) or fn)
    eager = FrameFunctions(*(lambda *a: None for _ in FrameFunctions._fields))
    for dynamic, expected in ((False, None), (True, True)):
        monkeypatch.setattr(graphs, "DYNAMIC_SHAPES", dynamic)
        asked.clear()
        graphs.FrameGraphs(eager, n_calls=2, cache_length=64, batch_sizes=None, compile=True, compile_max_calls=None,
                           use_cuda_graph=False, cache_buckets=None)
        assert asked and all(options == {"dynamic": expected} for options in asked)


def test_sampler_flag_reaches_the_engine_and_auto_follows_the_kernels():
    """`--sampler auto` (the default) is the fused draw with the Triton kernels, the sorted draw
    with torch's; the engine hands the choice to its stepper."""
    import torch

    from vendor_dia2.frame import resolve_sampler

    assert parse_args([], environ={}).sampler == "auto"
    assert parse_args([], environ={"DIA2_SAMPLER": "torch"}).sampler == "torch"
    assert parse_args([], environ={}).engine_config("cpu").sampler == "auto"
    assert resolve_sampler("auto", "torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_sampler("triton", "torch", torch.device("cpu"))
    with pytest.raises(SystemExit):
        parse_args(["--sampler", "fastest"], environ={})
