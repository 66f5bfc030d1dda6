"""Where the engine thread waits for the device outside the step waits: an engine on the tiny
checkpoint runs start (with and without a voice), inject, flush, a barge-in (pause played_ms +
inject), a next turn after done and reset on 4 calls, with torch's sync debug mode on; each
synchronizing op's Python stack (our frames) is counted."""
import collections, queue, sys, threading, time, traceback, warnings
sys.path[:0] = [".", "tests"]
import torch
from helpers import engine_config
from test_voice import tone, wav_bytes
from dia2stream.engine.engine import Engine
from dia2stream.wire import protocol as p
from dia2stream.voices.voice import VoiceRequest, VoiceSettings
from vendor_dia2 import Dia2
from vendor_dia2.checkpoint import write_random_checkpoint
from vendor_dia2.config import preset

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
ckpt = write_random_checkpoint(preset("tiny"), __import__("pathlib").Path("/tmp/probe-ckpt"))
tts = Dia2.from_pretrained(str(ckpt), device=device, mimi="random-small")
from dia2stream.serve.config import CompileMode
engine = Engine(tts, engine_config(tts, compile=CompileMode.OFF, max_calls=4, max_lead_ms=400, max_unsent_frames=10**9, voice=VoiceSettings(cache_dir="/tmp/probe-voices"), step_trace="/tmp/probe-trace.jsonl"))
engine.preload_voice(VoiceRequest("v", audio=wav_bytes(tone(0.8)), transcript="[S1] Hi there."), cache=False)
found = collections.Counter()
phase = ["warm"]
def hook(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.extract_stack()[:-1] if "/dia2stream/" in f.filename or "/vendor_dia2/" in f.filename]
    key = " < ".join(f"{f.filename.split('/work/main/')[-1].split('/')[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:5])
    found[(phase[0], key)] += 1
warnings.showwarning = hook
warnings.simplefilter("always")
TEXT = "[S1] One two three four five six seven eight nine ten eleven twelve."
boxes = [queue.Queue() for _ in range(4)]
calls = [engine.open_call(b.put) for b in boxes]
def until(box, kind, timeout=20):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            item = box.get(timeout=timeout)
        except queue.Empty:
            print("TIMEOUT", phase[0], engine.health())
            for c in calls:
                m = c.machine
                print(" call", c.slot.index, c.phase, "gen", c.generating, "pos", c.position, "end", m.end_step,
                      "entries", m.remaining_entries, "final", m.final, "turn", c.turn and vars(c.turn))
            import faulthandler; faulthandler.dump_traceback(all_threads=True)
            live = [c for c in calls if c.generating]
            print("plan", engine.scheduler.plan(live), "wait", engine.scheduler.wait_seconds(live))
            print("leads", [round(c.lead_seconds(), 3) for c in live], "in flight", engine._in_flight)
            engine.trace.close(); import os; os._exit(3)
        pass
        if isinstance(item, p.ErrorEvent):
            print("error", item)
        if isinstance(item, kind):
            return item
    raise TimeoutError(kind)
def drain_all():
    for b in boxes:
        while not b.empty():
            b.get()
# warm every graph with one turn each, sync mode off
for c in calls:
    engine.submit(c, p.Start(text=TEXT, seed=1, id="w"))
for b in boxes:
    until(b, p.Done)
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
for round_ in range(2):
    phase[0] = "start"
    for i, c in enumerate(calls):
        engine.submit(c, p.Start(text=TEXT, seed=round_, id=f"s{round_}", **({"voice": "v"} if i % 2 else {})))
    for b in boxes:
        until(b, p.Done)
    phase[0] = "next turn (inject after done) + flush"
    for c in calls:
        engine.submit(c, p.Inject(text=" Thirteen fourteen fifteen.", id=f"n{round_}"))
        pass
    for b in boxes:
        until(b, p.Done)
    phase[0] = "barge-in"
    for c in calls:
        engine.submit(c, p.Inject(text=" Sixteen seventeen eighteen nineteen twenty.", id=f"b{round_}"))
    time.sleep(0.4)
    for c in calls:
        engine.submit(c, p.Pause(played_ms=120.0, id="barge"))
    for b in boxes:
        until(b, p.Paused)
    for c in calls:
        engine.submit(c, p.Inject(text=" Okay then.", id=f"a{round_}"))
    for b in boxes:
        until(b, p.Done)
    phase[0] = "reset"
    for c in calls:
        engine.submit(c, p.Reset())
    for b in boxes:
        until(b, p.ResetDone)
if device == "cuda":
    torch.cuda.set_sync_debug_mode(0)
engine.close()
print(f"{sum(found.values())} synchronizing ops in the engine thread (sync debug mode, {device})")
for (ph, key), n in sorted(found.items(), key=lambda kv: -kv[1]):
    print(f"{n:5d}  [{ph}] {key}")
