// The dashboard: polls /dashboard/feed (the server's /health body and /metrics samples) once a
// second, keeps the last minutes of snapshots in the page, and draws them. Rates and windowed
// quantiles are differences between snapshots, as a Prometheus query would take them.

import { authHeaders, fmtMs, histogramDelta, histogramQuantile, saveToken, savedToken } from "/web/common.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const HISTORY_S = 300; // what the charts and windowed tiles cover, at most
const MIN_SPAN_S = 60; // a chart spans at least this much, growing with the history to HISTORY_S
const ONSET_WINDOW_S = 60; // each onset point: the observations of the minute before it
const COLORS = { a: "#2563eb", b: "#dc2626", c: "#16a34a", grid: "#e5e7eb", text: "#6b7280" };

const state = { token: savedToken(), history: [], polls: 0, failures: 0, last: null };
window.dashboard = state;

async function poll() {
  let again = true;
  try {
    const response = await fetch("/dashboard/feed", { headers: authHeaders(state.token), cache: "no-store" });
    if (response.status === 401) {
      // Wait for a token instead of asking every second: each refusal is counted in /metrics.
      again = false;
      $("token-form").hidden = false;
      setBadge("token needed", "warn");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const feed = await response.json();
    $("token-form").hidden = true;
    record(feed);
    render();
  } catch (error) {
    state.failures++;
    setBadge(`unreachable (${error.message})`, "bad");
  } finally {
    if (again) setTimeout(poll, POLL_MS);
  }
}

function record(feed) {
  const now = performance.now() / 1000;
  state.history.push({ t: now, feed });
  while (state.history.length && state.history[0].t < now - HISTORY_S) state.history.shift();
  state.polls++;
  state.last = feed;
}

// --- series from snapshots -------------------------------------------------------------------

const metric = (snapshot, name) => snapshot.feed.metrics[name];

function perPoll(fn) {
  const points = [];
  for (let i = 1; i < state.history.length; i++) {
    const value = fn(state.history[i], state.history[i - 1]);
    if (value != null) points.push([state.history[i].t, value]);
  }
  return points;
}

function rate(name) {
  return perPoll((s, prev) => (metric(s, name) - metric(prev, name)) / (s.t - prev.t));
}

function increase(name) {
  return perPoll((s, prev) => metric(s, name) - metric(prev, name));
}

function meanStepMs() {
  return perPoll((s, prev) => {
    const a = metric(s, "dia2_frame_step_seconds"), b = metric(prev, "dia2_frame_step_seconds");
    const steps = a.count - b.count;
    return steps > 0 ? (1000 * (a.sum - b.sum)) / steps : null;
  });
}

// The snapshot at least `seconds` older than `index`'s, or the oldest there is.
function before(index, seconds) {
  const t = state.history[index].t - seconds;
  for (let j = index; j >= 0; j--) if (state.history[j].t <= t) return state.history[j];
  return state.history[0];
}

function windowQuantile(q, name, index, seconds) {
  const s = state.history[index];
  const earlier = before(index, seconds);
  const since = earlier === s ? null : metric(earlier, name);
  const value = histogramQuantile(q, histogramDelta(metric(s, name), since));
  return value == null ? null : 1000 * value;
}

function onsetSeries(q) {
  const points = [];
  state.history.forEach((s, i) => {
    const value = windowQuantile(q, "dia2_speech_onset_seconds", i, ONSET_WINDOW_S);
    if (value != null) points.push([s.t, value]);
  });
  return points;
}

// --- drawing ---------------------------------------------------------------------------------

function render() {
  const feed = state.last;
  const health = feed.health;
  const last = state.history.length - 1;
  const flag = health.status !== "ok" ? [health.status, "bad"] : health.overloaded ? ["overloaded", "bad"]
    : health.busy ? ["busy (every slot taken)", "warn"] : ["ok", "ok"];
  setBadge(...flag);
  $("server").textContent = `${health.model} on ${health.device}`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("calls").textContent = `${health.calls} / ${health.max_calls}`;
  $("step").textContent = `${health.step_ms.toFixed(1)} ms (${health.step_calls} call${health.step_calls === 1 ? "" : "s"})`;
  const fps = rate("dia2_frames_sent_total");
  $("fps").textContent = fps.length ? fps[fps.length - 1][1].toFixed(1) : "–";
  const whole = state.history.length > 1 ? HISTORY_S : 0;
  $("onset").textContent = `${fmtMs(windowQuantile(0.5, "dia2_speech_onset_seconds", last, whole))} / ` +
    `${fmtMs(windowQuantile(0.95, "dia2_speech_onset_seconds", last, whole))}`;
  $("ttfb").textContent = fmtMs(windowQuantile(0.5, "dia2_time_to_first_byte_seconds", last, whole));
  const first = state.history[0];
  $("underruns").textContent = String(feed.metrics.dia2_underruns_total - (last ? metric(first, "dia2_underruns_total") : 0));
  const calls = state.history.map((s) => [s.t, s.feed.health.calls]);
  const stepCalls = state.history.map((s) => [s.t, metric(s, "dia2_frame_step_calls")]);
  drawChart($("chart-calls"), [{ points: calls, color: COLORS.a, label: "calls" },
                               { points: stepCalls, color: COLORS.c, label: "in last step" }], health.max_calls);
  drawChart($("chart-step"), [{ points: meanStepMs(), color: COLORS.a, label: "mean step" }], 1);
  drawChart($("chart-fps"), [{ points: fps, color: COLORS.a, label: "frames/s" }], 12.5);
  drawChart($("chart-onset"), [{ points: onsetSeries(0.5), color: COLORS.a, label: "p50" },
                               { points: onsetSeries(0.95), color: COLORS.b, label: "p95" }], 100);
  drawChart($("chart-underruns"), [{ points: increase("dia2_underruns_total"), color: COLORS.b, label: "underruns",
                                     bars: true }], 1);
  document.body.dataset.polls = String(state.polls);
}

function drawChart(canvas, series, minTop) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 40, right: 8, top: 8, bottom: 18 };
  ctx.clearRect(0, 0, width, height);
  const now = performance.now() / 1000;
  const span = Math.min(HISTORY_S, Math.max(MIN_SPAN_S, state.history.length ? now - state.history[0].t : 0));
  const t0 = now - span;
  const values = series.flatMap((s) => s.points.map((p) => p[1]));
  const top = niceTop(Math.max(minTop, ...values));
  const x = (t) => pad.left + ((t - t0) / span) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = COLORS.text;
  ctx.strokeStyle = COLORS.grid;
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y(v)); ctx.lineTo(width - pad.right, y(v)); ctx.stroke();
    ctx.fillText(formatTick(v), 2, y(v) + 3);
  }
  const tick = span > 120 ? 60 : 15;
  for (let k = 0; k * tick <= span; k++) {
    const label = !k ? "now" : tick === 60 ? `-${k} min` : `-${k * tick} s`;
    ctx.fillText(label, x(now - k * tick) - (k ? 14 : 18), height - 4);
  }
  series.forEach((s, k) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    if (s.bars) {
      for (const [t, v] of s.points) if (v > 0) ctx.fillRect(x(t) - 1.5, y(v), 3, y(0) - y(v));
    } else {
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      s.points.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
      ctx.stroke();
      ctx.lineWidth = 1;
    }
    ctx.fillText(s.label, width - pad.right - 70, pad.top + 10 + 12 * k);
  });
}

function niceTop(value) {
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

function formatTick(v) {
  return String(Number(v.toPrecision(3)));
}

function setBadge(text, kind) {
  $("state").textContent = text;
  $("state").className = `badge ${kind || ""}`;
}

$("token-save").addEventListener("click", () => {
  state.token = $("token").value.trim();
  saveToken(state.token);
  poll();
});
$("window-min").textContent = String(HISTORY_S / 60);
poll();
