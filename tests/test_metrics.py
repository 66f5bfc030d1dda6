"""dia2stream.serve.metrics: a registry per server, the families the docs promise, plain methods."""

import re
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dia2stream.serve.metrics import METRIC_NAMES, Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def families(metrics: Metrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_every_documented_family_is_exposed():
    exposed = families(Metrics(gpu_memory=lambda: (1.0, 2.0)))
    samples = {s.name for f in exposed.values() for s in f.samples}
    for name in METRIC_NAMES:
        assert name in samples or name + "_count" in samples or name in exposed, name


def test_methods_update_the_right_samples():
    m = Metrics(gpu_memory=lambda: (123.0, 456.0), process=False)
    m.set_info(model="tiny", device="cpu", max_calls=1)
    m.frame_step_ms(12.5, calls=3)
    m.frame_step_ms(30.0)
    m.first_byte_ms(180.0)
    m.speech_onset_ms(240.0)
    m.frames_sent(25)
    m.underrun()
    m.calls_active(2)
    m.call_refused("busy")
    m.call_refused("made-up")
    m.error("rate_limited")
    m.error("rate_limited")
    m.error("not-a-code\ud800")
    assert m.value("dia2_frame_step_seconds_count") == 2
    assert abs(m.value("dia2_frame_step_seconds_sum") - 0.0425) < 1e-9
    assert m.value("dia2_frame_step_seconds_bucket", le="0.0125") == 1
    assert m.value("dia2_frame_step_calls") == 3
    assert m.value("dia2_time_to_first_byte_seconds_sum") == 0.18
    assert m.value("dia2_speech_onset_seconds_bucket", le="0.25") == 1
    assert m.value("dia2_frames_sent_total") == 25
    assert m.value("dia2_audio_sent_seconds_total") == 2.0
    assert m.value("dia2_underruns_total") == 1
    assert m.value("dia2_calls_active") == 2
    assert m.value("dia2_calls_refused_total", reason="busy") == 1
    assert m.value("dia2_calls_refused_total", reason="other") == 1
    assert m.value("dia2_errors_total", code="rate_limited") == 2
    assert m.value("dia2_errors_total", code="other") == 1  # label values stay a fixed set
    assert m.value("dia2_errors_total", code="internal_error") == 0
    assert m.value("dia2_gpu_memory_allocated_bytes") == 123.0
    assert m.value("dia2_gpu_memory_reserved_bytes") == 456.0
    assert m.value("dia2_server_info", model="tiny", device="cpu", max_calls="1") == 1
    m.render()[0].decode("utf-8")


def test_two_servers_do_not_share_counters():
    a, b = Metrics(process=False), Metrics(process=False)
    a.frames_sent(5)
    assert a.value("dia2_frames_sent_total") == 5 and b.value("dia2_frames_sent_total") == 0


def test_no_gpu_reports_zero():
    m = Metrics(gpu_memory=lambda: None, process=False)
    assert m.value("dia2_gpu_memory_allocated_bytes") == 0


def test_frame_steps_from_another_thread_are_all_counted():
    m = Metrics(process=False)
    threads = [threading.Thread(target=lambda: [m.frame_step_ms(10.0) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.value("dia2_frame_step_seconds_count") == 8000


def test_operations_doc_lists_exactly_these_metrics():
    documented = set(re.findall(r"^\| `(dia2_[a-z_]+)`", DOCS.read_text(), re.M))
    assert documented == set(METRIC_NAMES)
