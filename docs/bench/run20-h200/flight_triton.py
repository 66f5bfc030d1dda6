"""Diagnosis (run 20): with the Triton depformer, do seeded calls' tokens differ between two runs
with the step in flight off (batch composition alone), and between off and on?"""
import sys
sys.path.insert(0, "tests")
from dia2stream.serve.config import CompileMode, KernelChoice
from test_step_in_flight import assert_same, run_conversations
from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import write_random_checkpoint
from vendor_dia2.config import preset

path = write_random_checkpoint(preset("tiny"), __import__("pathlib").Path("/tmp/cktiny"))
tts = Dia2.from_pretrained(str(path), device="cuda", mimi="random-small")
settings = dict(context_frames=80, rollover_frames=30, min_turn_frames=20, compile=CompileMode.OFF)


def same(a, b):
    try:
        assert_same(a, b)
        return "same"
    except AssertionError as exc:
        return "DIFFER: " + str(exc).replace("\n", " ")[:300]


for kernels in (KernelChoice.TRITON,):
    runs = {name: run_conversations(tts, mode, kernels=kernels, **settings)
            for name, mode in (("off1", "off"), ("off2", "off"), ("on1", "on"), ("on2", "on"))}
    print(kernels.value, "off/off:", same(runs["off1"], runs["off2"]), flush=True)
    print(kernels.value, "on/on:  ", same(runs["on1"], runs["on2"]), flush=True)
    print(kernels.value, "on/off: ", same(runs["on1"], runs["off1"]), flush=True)
