"""dia2stream.serve.limits: command rate, reply cap, message sizes off the event loop, idle clock,
quotas, and the websockets settings (compression off, max_size) against a real serve()."""

import asyncio
import base64
import json
import threading
import tracemalloc

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from dia2stream.serve import limits as lim
from dia2stream.wire import protocol as p
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- rate ------------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate():
    clock = FakeClock()
    bucket = lim.TokenBucket(rate=8, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.125  # one token at 8/s (exact in binary floating point)
    assert bucket.take() and not bucket.take()
    clock.now += 100  # refills only up to the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_rate_limiter_refuses_then_drops_refusals_over_their_cap():
    clock = FakeClock()
    rate = lim.CommandRateLimiter(rate=5, burst=2, refusals_per_second=1, clock=clock)
    got = [rate.admit() for _ in range(6)]
    assert got == [lim.Admission.ACCEPT] * 2 + [lim.Admission.REFUSE] + [lim.Admission.DROP] * 3
    assert rate.refused == 4
    clock.now += 1.0
    assert rate.admit() is lim.Admission.ACCEPT
    event = lim.rate_limited_error(rate.refused)
    assert event.code == "rate_limited" and "4" in event.message
    event.to_json().encode("utf-8")


def test_ping_flood_costs_constant_memory_and_bounded_replies():
    # Finding 4's shape: 50,000 messages at once from a client that does not read.
    rate = lim.CommandRateLimiter(rate=50, burst=100, refusals_per_second=1)
    replies = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50_000):
            if rate.admit() is not lim.Admission.DROP:
                replies += 1
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert replies < 100 + 50 * 5 + 10  # the burst, the rate over a few seconds of CPU, refusals
    assert grown < 64 * 1024
    assert rate.refused >= 50_000 - replies


# --- sizes ------------------------------------------------------------------------------------


def test_websocket_settings_turn_compression_off_and_bound_messages():
    limits = lim.Limits(max_command_bytes=4096, max_voice_message_bytes=1 << 20)
    settings = limits.websocket_settings()
    assert settings["compression"] is None
    assert settings["max_size"] == 1 << 20
    assert settings["close_timeout"] <= 2
    assert settings["ping_interval"] == 20 and settings["ping_timeout"] == 20
    no_voice = lim.Limits(max_voice_message_bytes=0, ping_interval_s=0).websocket_settings()
    assert no_voice["max_size"] == 64 * 1024 and no_voice["ping_interval"] is None
    with pytest.raises(ValueError):
        lim.Limits(max_voice_message_bytes=p.MAX_MESSAGE_BYTES + 1)


def test_is_large_counts_utf8_bytes():
    assert not lim.is_large("a" * 100, 100)
    assert lim.is_large("a" * 101, 100)
    assert lim.is_large("\u00e9" * 60, 100)  # 120 bytes
    assert not lim.is_large("\u00e9" * 50, 100)
    assert lim.is_large(b"x" * 101, 100)


def voice_message(n_bytes: int) -> str:
    audio = base64.b64encode(b"\x00" * n_bytes).decode()
    return json.dumps({"cmd": "set_voice", "name": "v", "audio": audio, "transcript": "[S1] hi", "id": 3})


async def test_large_messages_are_only_set_voice_and_parsed_off_the_loop(monkeypatch):
    limits = lim.Limits(max_command_bytes=1024, max_voice_message_bytes=1 << 20)
    gate = lim.LargeMessageGate(limits)
    assert await gate.parse('{"cmd": "ping", "id": 1}') == p.Ping(id=1)

    threads = []
    real = lim.parse_large
    monkeypatch.setattr(lim, "parse_large", lambda m: threads.append(threading.current_thread()) or real(m))
    command = await gate.parse(voice_message(4000))
    assert isinstance(command, p.SetVoice) and command.id == 3
    assert threads and threads[0] is not threading.main_thread()

    big_text = json.dumps({"cmd": "inject", "text": "x" * 2000, "id": "big"})
    with pytest.raises(p.ProtocolError) as info:
        await gate.parse(big_text)
    assert info.value.code == "message_too_large" and info.value.id == "big"

    no_inline = lim.LargeMessageGate(lim.Limits(max_command_bytes=1024, max_voice_message_bytes=0))
    with pytest.raises(p.ProtocolError) as info:
        await no_inline.parse(voice_message(4000))
    assert info.value.code == "message_too_large" and "path" in info.value.message


async def test_real_server_declines_deflate_and_closes_1009_past_max_size():
    # Finding 6: with compression off nothing is ever inflated; past max_size the transport
    # closes the connection before buffering the whole message.
    limits = lim.Limits(max_command_bytes=2048, max_voice_message_bytes=0)
    received = []

    async def handler(ws):
        async for message in ws:
            received.append(len(message))

    async with serve(handler, "127.0.0.1", 0, **limits.websocket_settings()) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", compression="deflate", max_size=None) as ws:
            assert ws.protocol.extensions == []  # permessage-deflate offered, declined
            await ws.send("x" * 2000)
            await ws.send("y" * 4000)
            with pytest.raises(ConnectionClosed):
                for _ in range(50):
                    await ws.send("z")
                    await asyncio.sleep(0.02)
            assert ws.close_code == 1009
    assert received == [2000]


# --- idle, quotas ----------------------------------------------------------------------------


def test_idle_clock():
    clock = FakeClock()
    idle = lim.IdleClock(30, clock)
    assert idle.remaining() == 30 and not idle.expired(busy=False)
    clock.now += 31
    assert idle.expired(busy=True) is False  # speaking is not idle; the clock restarts
    clock.now += 29
    assert not idle.expired(busy=False)
    clock.now += 2
    assert idle.expired(busy=False)
    idle.activity()
    assert not idle.expired(busy=False)
    assert lim.IdleClock(0, clock).remaining() is None
    assert lim.idle_timeout_error(30).code == "idle_timeout"


def test_pending_text_limit():
    from dia2stream.call.pending import check_pending_text

    cmd = p.Inject(text="abc", id="i1")
    check_pending_text(9_997, "abc", 10_000, cmd)
    with pytest.raises(p.ProtocolError) as info:
        check_pending_text(9_998, "abc", 10_000, cmd)
    assert info.value.code == "pending_text_full" and info.value.id == "i1" and info.value.cmd == "inject"


def test_voice_quota():
    quota = lim.VoiceQuota(2)
    for name in ("a", "b"):
        quota.check(p.SetVoice(name=name, path="x"))
        quota.add(name)
    quota.check(p.SetVoice(name="a", path="y"))  # replacing its own voice is free
    with pytest.raises(p.ProtocolError) as info:
        quota.check(p.SetVoice(name="c", path="z", id=9))
    assert info.value.code == "too_many_voices" and info.value.id == 9


def test_outbox_overflow():
    limits = lim.Limits(max_outbox_items=100)
    assert not lim.outbox_overflowing(100, limits)
    assert lim.outbox_overflowing(101, limits)


# --- abuse: when refusing is not enough (issue 19) ----------------------------------------------


def test_a_full_speed_flood_is_an_offence_after_ten_bursts_of_refusals():
    clock = FakeClock()
    limits = lim.Limits(commands_per_second=50, command_burst=100)
    rate, abuse = lim.CommandRateLimiter(50, 100, clock=clock), lim.AbuseWatch(limits, clock)
    verdicts = []
    for _ in range(100 + 10 * 100 + 1):  # all within one instant: nothing refills
        if rate.admit() is not lim.Admission.ACCEPT:
            verdicts.append(abuse.refused())
    assert verdicts[:-1] == [None] * (10 * 100) and verdicts[-1] is lim.Offence.FLOOD


def test_sustained_excess_is_an_offence_after_flood_close_s_but_bursts_now_and_then_are_not():
    clock = FakeClock()
    limits = lim.Limits(commands_per_second=50, command_burst=100, flood_close_s=2.0)
    abuse = lim.AbuseWatch(limits, clock)
    # a refusal every 0.5 s (gaps under EXCESS_GAP_S): one stretch, an offence once it passes 2 s
    got = []
    for _ in range(6):
        got.append(abuse.refused())
        clock.now += 0.5
    assert got == [None, None, None, None, None, lim.Offence.FLOOD]
    # a burst over the rate every few seconds: each stretch starts over
    calm = lim.AbuseWatch(limits, clock)
    for _ in range(10):
        assert [calm.refused() for _ in range(50)] == [None] * 50
        clock.now += lim.EXCESS_GAP_S + 1.5
    # flood_close_s = 0: only refuse, never close
    never = lim.AbuseWatch(lim.Limits(flood_close_s=0), clock)
    assert all(never.refused() is None for _ in range(100_000))
    assert all(never.bad_message(lim.Offence.BINARY) is None for _ in range(1000))


def test_binary_and_oversize_messages_are_told_apart_before_parsing_and_tolerated_a_few_times():
    limits = lim.Limits(max_command_bytes=1024, max_voice_message_bytes=1 << 20, bad_message_burst=3,
                        bad_messages_per_second=1.0)
    assert lim.misfit(b"\x00binary", limits) is lim.Offence.BINARY
    assert lim.misfit('{"cmd": "ping"}', limits) is None
    assert lim.misfit('{"cmd": "ping", "id": 1' + " " * 2000 + "}", limits) is lim.Offence.OVERSIZE
    assert lim.misfit(voice_message(4000), limits) is None  # may be a set_voice: parsed (off the loop)
    no_inline = lim.Limits(max_command_bytes=1024, max_voice_message_bytes=0)
    assert lim.misfit(voice_message(4000), no_inline) is lim.Offence.OVERSIZE
    assert lim.misfit_error(lim.Offence.BINARY, limits).code == "binary_not_supported"
    assert lim.misfit_error(lim.Offence.OVERSIZE, no_inline).code == "message_too_large"

    clock = FakeClock()
    abuse = lim.AbuseWatch(limits, clock)
    assert [abuse.bad_message(lim.Offence.BINARY) for _ in range(4)] == [None, None, None, lim.Offence.BINARY]
    assert abuse.bad_message(lim.Offence.OVERSIZE) is None  # a bucket per kind
    clock.now += 1.0
    assert abuse.bad_message(lim.Offence.BINARY) is None  # refilled at one a second
    for offence in lim.Offence:
        event = lim.policy_error(offence, limits)
        assert event.code == "policy_violation" and "closing" in event.message


def test_abuse_settings_are_checked():
    with pytest.raises(ValueError):
        lim.Limits(flood_close_s=-1)
    with pytest.raises(ValueError):
        lim.Limits(bad_message_burst=0)
