"""The playground and the dashboard in a real headless browser (issue 23): Debian's chromium and
chromedriver (scripts/system-packages.txt), driven by Selenium, against the tiny-checkpoint
server on 127.0.0.1. Nothing is downloaded: the driver's path is given, so Selenium Manager
never runs. What is asserted comes from the pages' own counters (`window.playground`,
`window.dashboard`) and the AudioContext clock.

Screenshots go to the test's temporary folder; with `DIA2_WEB_SCREENSHOTS=docs` they are written
there instead (how docs/web-playground.png and docs/web-dashboard.png were made).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families


from dia2stream.wire.formats import decode_frame, encode_samples
from helpers import ServerThread, server_config

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("chromium and chromedriver are not installed (Debian packages chromium, chromium-driver; "
                "`make test` installs them when run as root)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1100,1250")
WAIT_S = 90.0  # the longest any awaited page state may take (tiny model on shared CPU cores)
TOKEN = "web-test-token"
FRAME_S = 0.08
LONG_TEXT = ("[S1] Thanks for calling the clinic. Let me look up your appointment, it will only take "
             "a moment while I check the calendar for next week and the week after.")


# ---------------------------------------------------------------------------------------------
# The browser, the servers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="dia2-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def web_server():
    # Two slots: a page that just left may still hold one for a moment.
    srv = ServerThread(server_config(max_calls=2,
                                    log_level="WARNING")).start()
    srv.base = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.stop()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = os.environ.get("DIA2_WEB_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


def wait_for(driver, script: str, what: str, timeout: float = WAIT_S):
    """Poll `script` (a JS expression) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {script}")
        time.sleep(0.1)


def wait_until_not_busy(base: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())["busy"]:
        assert time.monotonic() < deadline, "the server stayed busy"
        time.sleep(0.5)


def pg(driver, expression: str):
    return driver.execute_script(f"const s = window.playground; return ({expression});")


def open_playground(driver, base: str, token: str = "") -> None:
    driver.get(base + "/")
    wait_for(driver, "document.body.dataset.loaded === '1'", "the playground to load")
    field = driver.find_element(By.ID, "token")
    field.clear()
    if token:
        field.send_keys(token)
    driver.find_element(By.ID, "connect").click()


def connected(driver, base: str | None = None) -> None:
    """Wait for `ready`. A `busy` refusal (the shared CPU fell behind real time while the browser
    ran beside the model) is the server working as documented: wait until /health says it takes
    calls again and connect again."""
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            state = wait_for(driver, "window.playground.ready ? 'ready' : "
                                     "document.getElementById('status').textContent.startsWith('refused: busy') "
                                     "&& 'busy'", "ready or busy")
            if state == "ready" or time.monotonic() > deadline:
                break
            wait_until_not_busy(base or driver.current_url.rsplit("/", 1)[0])
            driver.find_element(By.ID, "connect").click()
        assert state == "ready", "busy until the deadline"
    except AssertionError as e:
        page = driver.execute_script("return [document.getElementById('status').textContent, "
                                     "document.getElementById('notice').textContent, "
                                     "document.getElementById('log').textContent]")
        raise AssertionError(f"{e}; the page says {page}; console: {driver.get_log('browser')}") from None


def speak(driver, text: str, mode: str = "whole", fmt: str = "pcm_24000", button: str = "speak") -> int:
    """Type `text`, pick mode and format, press the button; the index of the new turn."""
    area = driver.find_element(By.ID, "text")
    area.clear()
    area.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, f"input[name=mode][value={mode}]").click()
    Select(driver.find_element(By.ID, "format")).select_by_value(fmt)
    turns = pg(driver, "s.turns.length")
    driver.find_element(By.ID, button).click()
    return turns


def played_out(driver, turn: int) -> dict:
    """Wait until turn `turn` is done and every frame received has been played."""
    wait_for(driver, f"window.playground.turns[{turn}] && window.playground.turns[{turn}].end === 'done'",
             f"turn {turn} done")
    wait_for(driver, "((s, p) => p.framesScheduled === s.framesReceived && "
                     "p.framesPlayed + p.framesDropped === p.framesScheduled)(window.playground, "
                     "window.playground.player_status)", "the player to play every frame (or drop it at a barge-in)")
    return pg(driver, f"(({{frames, end, underruns, firstByteAt, onsetHeardAt, sentAt}}) => "
                      f"({{frames, end, underruns, firstByteAt, onsetHeardAt, sentAt}}))(s.turns[{turn}])")


# ---------------------------------------------------------------------------------------------
# The playground
# ---------------------------------------------------------------------------------------------


def test_playground_plays_the_stream_and_highlights_words_in_order(browser, web_server, tmp_path):
    open_playground(browser, web_server.base)
    connected(browser)
    assert "connected: tiny" in browser.find_element(By.ID, "status").text
    clock0 = pg(browser, "s.ctx.currentTime")
    turn = speak(browser, "[S1] One two three four five six seven eight.")
    figures = played_out(browser, turn)
    done = pg(browser, "s.events.filter(e => e.event === 'done').pop()")
    received, status = pg(browser, "[s.framesReceived, s.player_status]")
    # Every frame the server sent was handed to the worklet and played through, at the audio clock.
    assert figures["frames"] == done["frames"] == received > 0
    assert status["framesScheduled"] == status["framesPlayed"] == received and status["framesDropped"] == 0
    assert status["position"] == received * 1920  # pcm_24000 at a 24 kHz context: one sample per sample
    clock = pg(browser, "s.ctx.currentTime")
    assert clock - clock0 >= received * FRAME_S  # the player cannot run ahead of the audio clock
    # Words: highlighted in the order the server committed them, and all of them.
    words, heard = pg(browser, "[s.wordsReceived, s.heard]")
    assert words == ["One", "two", "three", "four", "five", "six", "seven", "eight."]
    assert heard == words
    marked = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#transcript .word.heard")]
    assert marked == words
    # The turn's figures are on the page: first byte before onset, both measured.
    assert figures["sentAt"] < figures["firstByteAt"] <= figures["onsetHeardAt"]
    row = browser.find_element(By.CSS_SELECTOR, "#turns tbody tr").text
    assert row.startswith("1 start whole") and row.endswith("done")
    # What was heard can be saved: a 16-bit WAV of exactly the played samples.
    header, size = pg(browser, "((b) => [Array.from(new Uint8Array(b, 0, 4)), b.byteLength])(s.wavBytes())")
    assert bytes(header) == b"RIFF" and size == 44 + 2 * received * 1920
    browser.save_screenshot(str(tmp_path / "web-playground-turn.png"))


def test_g711_decoding_in_the_page_matches_the_server(browser, web_server):
    browser.get(web_server.base + "/")
    tables = browser.execute_async_script(
        "const done = arguments[0]; import('/web/common.js').then(m => "
        "done([Array.from(m.ULAW_TABLE), Array.from(m.ALAW_TABLE)]));")
    codes = bytes(range(256))
    for fmt, table in zip(("ulaw_8000", "alaw_8000"), tables):
        message = len(codes).to_bytes(4, "little") + codes
        assert table == decode_frame(message, fmt).tolist(), fmt
    # And a whole frame through the page's decodeFrame: the same samples as Python's decoder.
    samples = np.sin(np.linspace(0, 40, 1920)).astype(np.float32) * 0.5
    for fmt in ("ulaw_8000", "pcm_16000"):
        message = encode_samples(samples, fmt)
        page = browser.execute_async_script(
            "const [bytes, name, done] = arguments; Promise.all([import('/web/common.js'), "
            "fetch('/web/formats.json').then(r => r.json())]).then(([m, table]) => "
            "done(Array.from(m.decodeFrame(new Uint8Array(bytes).buffer, table.formats[name]), x => Math.round(x * 32768))));",
            list(message), fmt)
        assert page == decode_frame(message, fmt).tolist(), fmt


def test_barge_in_stops_within_a_frame_shows_spoken_words_and_resumes(browser, web_server, shots):
    open_playground(browser, web_server.base)
    connected(browser)
    turn = speak(browser, LONG_TEXT)
    # Barge in once a second of this turn has been heard, while the server is still ahead.
    seq = wait_for(browser, f"window.playground.turns[{turn}].utterance", "started")
    wait_for(browser, f"window.playground.player_status.utterance === {seq} && "
                      f"window.playground.player_status.position >= 12 * 1920", "a second of audio played")
    assert pg(browser, f"s.turns[{turn}].end") == ""  # still speaking
    browser.find_element(By.ID, "barge").click()
    barge = wait_for(browser, "window.playground.barge && window.playground.barge.paused && window.playground.barge",
                     "paused after the barge-in")
    stopped, paused = barge["stopped"], barge["paused"]
    # Playback stopped within one frame of the click, by the audio clock.
    assert 0 <= stopped["stoppedAt"] - barge["click"] <= FRAME_S
    # ... and played nothing after: no audio quantum since the stop, though the clock goes on.
    quanta = stopped["audioQuanta"]
    clock = pg(browser, "s.ctx.currentTime")
    wait_for(browser, f"window.playground.ctx.currentTime > {clock} + 0.3", "the audio clock to move on")
    assert pg(browser, "s.player_status.audioQuanta") == quanta
    # The server rolled back to what was played, and the page shows the spoken and unspoken words.
    assert barge["played_ms"] == stopped["position"] * 1000 // 24000 > 0
    assert paused["audio_s"] >= barge["played_ms"] // 80 * FRAME_S
    spoken = [w["word"] for w in paused["spoken"]]
    words = LONG_TEXT.removeprefix("[S1] ").split()
    assert spoken and spoken + paused["unspoken"] == words
    heard = pg(browser, f"s.utterances.get({seq}).words.filter(w => w.heard).map(w => w.word)")
    assert abs(len(heard) - len(spoken)) <= 1  # the word under way when the caller cut in
    result = browser.find_element(By.ID, "barge-result").text
    assert result.startswith("spoken: " + " ".join(spoken) + " — unspoken: " + " ".join(paused["unspoken"]))
    assert [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#transcript p:last-child .word.spoken")] == spoken
    browser.save_screenshot(str(shots / "web-playground-barge-in.png"))
    # Resume: the unspoken words are spoken from the heard point on, and the turn ends.
    browser.find_element(By.ID, "resume").click()
    played_out(browser, turn)
    after = pg(browser, f"s.utterances.get({seq}).words.map(w => w.word)")
    assert after == words
    assert pg(browser, f"s.utterances.get({seq}).words.every(w => w.heard)")


def test_word_by_word_in_mu_law(browser, web_server, shots):
    open_playground(browser, web_server.base)
    connected(browser)
    browser.execute_script("const r = document.getElementById('speed'); r.value = 20; "
                           "r.dispatchEvent(new Event('input'));")
    turn = speak(browser, "[S1] Sure, let me check that for you.", mode="stream", fmt="ulaw_8000")
    played_out(browser, turn)
    words, heard, status = pg(browser, "[s.wordsReceived, s.heard, s.player_status]")
    assert words == heard == ["Sure,", "let", "me", "check", "that", "for", "you."]
    assert status["rate"] == 8000 and status["position"] == pg(browser, "s.framesReceived") * 640
    row = browser.find_element(By.CSS_SELECTOR, "#turns tbody tr").text
    assert row.startswith("1 start stream") and row.endswith("done")
    # A G.711 frame decodes to audio, not to silence (the random model makes noise).
    energy = pg(browser, "s.recording.reduce((e, c) => e + c.reduce((a, x) => a + x * x, 0), 0)")
    assert energy > 0
    browser.save_screenshot(str(shots / "web-playground.png"))
    # Reset, then a new call turn in A-law: the page decodes and plays that too.
    driver_events = "s.events.filter(e => e.event === 'reset').length"
    browser.find_element(By.ID, "reset").click()
    wait_for(browser, f"(s => {driver_events})(window.playground) === 1", "the reset event")
    assert pg(browser, "s.current") is None
    before = pg(browser, "s.heard.length")
    turn = speak(browser, "[S1] Goodbye for now.", fmt="alaw_8000")
    played_out(browser, turn)
    assert pg(browser, f"s.heard.slice({before})") == ["Goodbye", "for", "now."]
    assert pg(browser, "s.player_status.rate") == 8000


# ---------------------------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------------------------


def test_dashboard_shows_a_call_while_one_is_active(browser, web_server, shots):
    browser.get(web_server.base + "/dashboard")
    dashboard = browser.current_window_handle
    wait_for(browser, "Number(document.body.dataset.polls) >= 2", "two polls")
    wait_for(browser, "document.getElementById('calls').textContent === '0 / 2'", "no call")
    assert browser.find_element(By.ID, "token-form").is_displayed() is False
    browser.switch_to.new_window("tab")
    playground = browser.current_window_handle
    try:
        open_playground(browser, web_server.base)
        connected(browser)
        played_out(browser, speak(browser, "[S1] Good morning, how can I help?"))
        played_out(browser, speak(browser, " One moment please, I will check.", button="continue"))
        played_out(browser, speak(browser, " Okay, I found it.", mode="stream", button="continue"))
        assert pg(browser, "s.turns.map(t => [t.cmd, t.mode, t.end])") == [
            ["start", "whole", "done"], ["inject", "whole", "done"], ["inject", "stream", "done"]]
        browser.switch_to.window(dashboard)
        wait_for(browser, "document.getElementById('calls').textContent === '1 / 2'", "the dashboard to show the call")
        feed = browser.execute_script("return window.dashboard.last")
        assert feed["health"]["calls"] == 1 and feed["metrics"]["dia2_frames_sent_total"] > 0
        wait_for(browser, "document.getElementById('onset').textContent.includes('ms')", "onset quantiles")
        browser.save_screenshot(str(shots / "web-dashboard.png"))
    finally:
        browser.switch_to.window(playground)
        browser.close()
        browser.switch_to.window(dashboard)
    wait_for(browser, "document.getElementById('calls').textContent === '0 / 2'", "the call to end")


# ---------------------------------------------------------------------------------------------
# Access: the token, other origins
# ---------------------------------------------------------------------------------------------


def test_without_the_token_the_page_cannot_open_a_call(browser):
    srv = ServerThread(server_config(log_level="WARNING",
                                    auth_token=TOKEN)).start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        open_playground(browser, base)
        wait_for(browser, "document.getElementById('status').textContent.startsWith('refused')", "the refusal")
        assert "needs a token" in browser.find_element(By.ID, "status").text
        assert "needs a token" in browser.find_element(By.ID, "notice").text
        assert pg(browser, "s.ready") is None and pg(browser, "s.events.length") == 0
        browser.get(base + "/dashboard")
        wait_for(browser, "document.getElementById('token-form').hidden === false", "the dashboard's token form")
        # It waits for the token rather than asking every second (each refusal is counted).
        refused = refusals(srv.port, "unauthorized", TOKEN)
        time.sleep(2.5)
        assert refusals(srv.port, "unauthorized", TOKEN) == refused
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()
        wait_for(browser, "document.getElementById('calls').textContent === '0 / 1'", "the dashboard with the token")
        assert browser.find_element(By.ID, "token-form").is_displayed() is False
        browser.execute_script("sessionStorage.clear()")
        # With the token the same page gets its call.
        open_playground(browser, base, token=TOKEN)
        connected(browser)
    finally:
        browser.execute_script("sessionStorage.clear()")
        srv.stop()


def test_a_page_from_another_origin_is_refused(browser, web_server, tmp_path):
    """The existing Origin rule: with no token and no --allowed-origins, only the server's own
    pages may open a call; a page served from another port (another origin) is refused."""
    (tmp_path / "foreign.html").write_text(
        "<!doctype html><script>window.result = null; const ws = new WebSocket('ws://127.0.0.1:%d/');"
        "ws.onopen = () => { window.result = 'open'; }; ws.onclose = (e) => { window.result = window.result || "
        "'closed ' + e.code; };</script>" % web_server.port)
    refused_before = refusals(web_server.port, "origin")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    foreign = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{foreign.server_address[1]}/foreign.html")
        result = wait_for(browser, "window.result", "the foreign page's websocket to settle")
        assert result == "closed 1006"  # the handshake failed: the browser never opens it
    finally:
        foreign.shutdown()
        foreign.server_close()
    assert refusals(web_server.port, "origin") == refused_before + 1  # it was the server's 403
    # The same server's own page is let in (the own-origin rule), which the first test relies on.
    open_playground(browser, web_server.base)
    connected(browser)


def refusals(port: int, reason: str, token: str | None = None) -> float:
    """dia2_calls_refused_total{reason} from the server's /metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    body = urllib.request.urlopen(request, timeout=10).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "dia2_calls_refused_total" and sample.labels.get("reason") == reason:
                return sample.value
    raise AssertionError(f"no dia2_calls_refused_total{{reason={reason}}} in /metrics")
