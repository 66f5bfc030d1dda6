"""Fixtures for tests that drive one in-process engine on the tiny checkpoint: the model (`tts`,
per module; `own_tts` for a test that builds an engine of its own, since an engine owns its
codec's stream), the engine (`engine`, per module, never ahead of real time by much) and a call
on it (`call`, its events in `call.test_events`). A test module takes them with
`from engine_fixtures import ...`."""

from __future__ import annotations

import queue

import pytest

from dia2stream.engine.engine import Engine

from helpers import engine_config


def load_tts(tiny_dir):
    from vendor_dia2 import Dia2

    return Dia2.from_pretrained(str(tiny_dir), device="cpu", mimi="random-small")


@pytest.fixture(scope="module")
def tts(tiny_dir):
    return load_tts(tiny_dir)


@pytest.fixture
def own_tts(tiny_dir):
    return load_tts(tiny_dir)


@pytest.fixture(scope="module")
def engine(tts):
    eng = Engine(tts, engine_config(tts, max_lead_ms=1e6))
    yield eng
    eng.close()


@pytest.fixture
def call(engine):
    got = queue.Queue()
    call = engine.open_call(got.put)
    call.test_events = got
    yield call
    engine.close_call(call)
