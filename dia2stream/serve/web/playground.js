// The playground: one call on this server's websocket (docs/protocol.md), its audio played as it
// streams through an AudioWorklet (player-worklet.js), words highlighted as they are heard.
// Everything it knows is in `state` (window.playground), which the browser tests read.

import { decodeFrame, fmtMs, loadFormats, saveToken, savedToken, tokenNeeded } from "/web/common.js";

const $ = (id) => document.getElementById(id);
const CONTEXT_RATE = 24000; // the model's rate: pcm_24000 frames play without resampling
const MAX_LOG_LINES = 200;
const MAX_EVENTS = 2000; // kept in `state.events`
const MAX_RECORDING_S = 600; // Save as WAV keeps the last ten minutes played

const state = {
  ws: null,
  ready: null,
  table: null, // /web/formats.json: {frame_rate, formats: {name: {sample_rate, encoding, frame_samples, lead_ms}}}
  ctx: null,
  player: null,
  format: "pcm_24000", // the connection's current format: what its frames are in
  nextId: 1,
  nextSeq: 1,
  utterances: new Map(), // seq → utterance, in the order the player plays them
  current: null, // the utterance the server is on (frames belong to it)
  pendingTurn: null, // sent, waiting for its `started`
  turns: [],
  feeder: null, // the word-by-word sender of the turn being typed out
  framesReceived: 0,
  player_status: { utterance: 0, position: 0, rate: CONTEXT_RATE, time: 0, framesScheduled: 0, framesPlayed: 0,
                   framesDropped: 0,
                   underruns: 0, audioQuanta: 0, quanta: 0 },
  heard: [], // every word as it was highlighted, in order
  wordsReceived: [], // every `word` event's word, in order
  barge: null, // the last barge-in: {click, stopped, played_ms, paused}
  recording: [], // Float32Array chunks at the context's rate: what was played
  events: [], // every JSON event received
};
window.playground = state;

// --- start-up -------------------------------------------------------------------------------

async function init() {
  $("token").value = savedToken();
  $("speed").addEventListener("input", () => { $("speed-value").textContent = $("speed").value; });
  $("connect").addEventListener("click", connect);
  $("speak").addEventListener("click", () => sendTurn("start"));
  $("continue").addEventListener("click", () => sendTurn("inject"));
  $("barge").addEventListener("click", bargeIn);
  $("resume").addEventListener("click", resume);
  $("reset").addEventListener("click", reset);
  $("save").addEventListener("click", saveWav);
  state.table = await loadFormats();
  fillSelect($("format"), Object.keys(state.table.formats), state.format);
  if (!$("token").value && await tokenNeeded("")) {
    notice("This server needs a token: enter it above, then Connect.");
  }
  document.body.dataset.loaded = "1";
}

async function connect() {
  if (state.ws) state.ws.close();
  if (!window.isSecureContext || !window.AudioWorkletNode) {
    notice("Playing audio needs an AudioWorklet, which browsers give only to https pages or to " +
           "http://localhost / 127.0.0.1: open the playground there (e.g. through an SSH tunnel).");
    return;
  }
  const token = $("token").value.trim();
  saveToken(token);
  await startAudio();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/${token ? "?token=" + encodeURIComponent(token) : ""}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  status("connecting…");
  ws.onmessage = (message) => (typeof message.data === "string" ? onEvent(JSON.parse(message.data)) : onFrame(message.data));
  ws.onclose = (close) => onClose(ws, close);
}

async function startAudio() {
  if (state.ctx) {
    state.ctx.resume();
    return;
  }
  const ctx = new AudioContext({ sampleRate: CONTEXT_RATE, latencyHint: "interactive" });
  await ctx.audioWorklet.addModule("/web/player-worklet.js");
  const player = new AudioWorkletNode(ctx, "frame-player", { numberOfInputs: 0, outputChannelCount: [1] });
  player.port.onmessage = (message) => onPlayer(message.data);
  player.connect(ctx.destination);
  state.ctx = ctx;
  state.player = player;
  ctx.resume(); // not awaited: a context the browser holds suspended must not keep the call from opening
}

async function onClose(ws, close) {
  if (ws !== state.ws) return;
  state.ws = null;
  enable(false);
  const refusal = state.events.length && !state.ready ? state.events[state.events.length - 1] : null;
  if (state.ready) {
    status(`closed (${close.code}${close.reason ? " " + close.reason : ""})`);
  } else if (refusal && refusal.event === "error") {
    status(`refused: ${refusal.code}: ${refusal.message}`);
  } else if (await tokenNeeded($("token").value.trim())) {
    status("refused: this server needs a token, and this one is missing or wrong");
  } else {
    status("refused: this page's origin is not allowed, or the server is unreachable");
  }
  state.ready = null;
}

// --- what the server says -------------------------------------------------------------------

function onEvent(event) {
  state.events.push(event);
  if (state.events.length > MAX_EVENTS) state.events.shift();
  const handler = HANDLERS[event.event];
  if (handler) handler(event);
  if (event.event !== "word") log(JSON.stringify(event));
}

const HANDLERS = {
  ready(event) {
    state.ready = event;
    fillSelect($("voice"), ["", ...event.voices], "");
    fillSelect($("format"), event.formats, state.format);
    status(`connected: ${event.model} on ${event.device}`);
    $("notice").hidden = true; // an earlier refusal is over
    enable(true);
  },
  started(event) {
    const turn = state.pendingTurn || newTurn("inject", "whole");
    state.pendingTurn = null;
    const seq = state.nextSeq++;
    const utterance = { seq, id: event.id, turn, format: state.format, words: [], done: false, paused: false, muted: false,
                        line: document.createElement("p"), underrunBase: null };
    $("transcript").append(utterance.line);
    turn.utterance = seq;
    state.utterances.set(seq, utterance);
    state.current = utterance;
    state.player.port.postMessage({ type: "begin", utterance: seq, position: 0 });
  },
  word(event) {
    const utterance = state.current;
    if (!utterance) return;
    const el = document.createElement("span");
    el.className = "word";
    el.textContent = event.word;
    utterance.line.append(el, " ");
    utterance.words.push({ word: event.word, start_s: event.start_s, el, heard: false });
    state.wordsReceived.push(event.word);
  },
  done(event) {
    const utterance = state.current;
    if (!utterance) return;
    utterance.done = true;
    Object.assign(utterance.turn, { serverOnset: event.onset_ms, end: "done" });
    renderTurn(utterance.turn);
    state.player.port.postMessage({ type: "end" });
  },
  paused(event) {
    const utterance = state.current;
    if (state.barge) state.barge.paused = event;
    if (!utterance) return;
    utterance.paused = true;
    utterance.turn.end = "paused";
    renderTurn(utterance.turn);
    if (event.spoken) showSpoken(utterance, event);
  },
  resumed() {
    if (!state.current) return;
    state.current.paused = state.current.done = state.current.muted = false;
    state.current.turn.end = "";
    renderTurn(state.current.turn);
  },
  reset() {
    state.current = null;
  },
  error(event) {
    if (state.pendingTurn && event.cmd === state.pendingTurn.cmd) {
      state.pendingTurn.end = event.code;
      renderTurn(state.pendingTurn);
      state.pendingTurn = null;
    }
    notice(`error ${event.code}: ${event.message}`);
  },
};

function onFrame(buffer) {
  const utterance = state.current;
  if (!utterance || utterance.muted) return; // sent before the server saw our pause: never heard
  const format = state.table.formats[utterance.format];
  const samples = decodeFrame(buffer, format);
  state.player.port.postMessage({ type: "frame", samples, rate: format.sample_rate }, [samples.buffer]);
  state.framesReceived++;
  const turn = utterance.turn;
  turn.frames++;
  if (turn.firstByteAt == null) {
    turn.firstByteAt = performance.now();
    renderTurn(turn);
  }
}

// What the player reports from the audio thread.
function onPlayer(message) {
  if (message.type === "recording") {
    state.recording.push(message.samples);
    let kept = state.recording.reduce((n, chunk) => n + chunk.length, 0);
    while (kept > MAX_RECORDING_S * state.ctx.sampleRate) kept -= state.recording.shift().length;
    return;
  }
  Object.assign(state.player_status, message);
  if (message.type === "stopped") onStopped(message);
  const utterance = state.utterances.get(message.utterance);
  if (utterance) highlight(utterance, message);
  renderCounters();
}

function highlight(utterance, status) {
  const format = state.table.formats[utterance.format];
  const playedMs = (1000 * status.position) / status.rate;
  if (utterance.underrunBase == null) utterance.underrunBase = status.underruns;
  const turn = utterance.turn;
  turn.underruns = status.underruns - utterance.underrunBase;
  for (const word of utterance.words) {
    if (word.heard) continue;
    if (1000 * word.start_s + format.lead_ms > playedMs) break;
    word.heard = true;
    word.el.classList.add("heard");
    state.heard.push(word.word);
    if (turn.onsetHeardAt == null) turn.onsetHeardAt = performance.now();
  }
  renderTurn(turn);
}

// --- what the page sends ---------------------------------------------------------------------

function send(command) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return null;
  state.ws.send(JSON.stringify(command));
  return command;
}

function newTurn(cmd, mode) {
  const turn = { n: state.turns.length + 1, cmd, mode, sentAt: performance.now(), firstByteAt: null,
                 onsetHeardAt: null, serverOnset: null, frames: 0, underruns: 0, end: "", row: null };
  state.turns.push(turn);
  renderTurn(turn);
  return turn;
}

// `start` (Speak) or `inject` (Continue); whole, or word by word at the slider's speed.
function sendTurn(cmd) {
  const text = $("text").value;
  if (!text.trim() || !state.ws) return;
  stopFeeder();
  const mode = document.querySelector("input[name=mode]:checked").value;
  const fragments = mode === "stream" ? splitWords(text) : [text];
  const first = { cmd, text: fragments[0], id: `${cmd}-${state.nextId++}` };
  if (mode === "stream") first.final = false;
  if (cmd === "start") {
    first.format = $("format").value;
    if ($("voice").value) first.voice = $("voice").value;
    state.format = first.format;
  }
  // An inject during an utterance extends it, and one while paused resumes it: no new turn.
  const current = state.current;
  if (cmd === "start" || !current || (current.done && !current.paused)) state.pendingTurn = newTurn(cmd, mode);
  send(first);
  if (mode === "stream") feedWords(fragments.slice(1));
}

// An LLM's pace: one fragment every 1/speed seconds, then `flush` ends the turn's text.
function feedWords(rest) {
  const feeder = { timer: null, cut: false };
  state.feeder = feeder;
  const next = () => {
    if (state.feeder !== feeder) return;
    if (!rest.length) {
      send({ cmd: "flush" });
      state.feeder = null;
      return;
    }
    send({ cmd: "inject", text: rest.shift(), final: false });
    feeder.timer = setTimeout(next, 1000 / Number($("speed").value));
  };
  feeder.timer = setTimeout(next, 1000 / Number($("speed").value));
}

function stopFeeder() {
  if (!state.feeder) return false;
  clearTimeout(state.feeder.timer);
  state.feeder = null;
  return true;
}

export function splitWords(text) {
  const fragments = [];
  for (const token of text.match(/\s*\S+/g) || []) {
    const last = fragments[fragments.length - 1];
    if (last !== undefined && /^\s*\[S\d\]$/.test(last)) fragments[fragments.length - 1] = last + token;
    else fragments.push(token);
  }
  return fragments;
}

// Barge-in: the player stops at once and says how far it got; the server rolls back to there.
let streamCut = false;

function bargeIn() {
  if (!state.player) return;
  streamCut = stopFeeder() || streamCut;
  state.barge = { click: state.ctx.currentTime, stopped: null, played_ms: null, paused: null };
  if (state.current) state.current.muted = true;
  state.player.port.postMessage({ type: "stop", click: state.barge.click });
}

function onStopped(stopped) {
  const utterance = state.current;
  if (!state.barge || stopped.click !== state.barge.click || !utterance) return; // a reset's stop
  // Only the utterance the server is on can be rolled back; if the player was still on an
  // earlier one, none of this one was heard.
  const playedMs = stopped.utterance === utterance.seq ? Math.floor((1000 * stopped.position) / stopped.rate) : 0;
  Object.assign(state.barge, { stopped, played_ms: playedMs });
  send({ cmd: "pause", played_ms: playedMs, id: `pause-${state.nextId++}` });
  // Frames after the pause continue from the first frame not wholly heard.
  const format = state.table.formats[utterance.format];
  const heardFrames = Math.floor(playedMs / (1000 / state.table.frame_rate));
  state.player.port.postMessage({ type: "begin", utterance: utterance.seq, position: heardFrames * format.frame_samples });
}

function showSpoken(utterance, paused) {
  const spoken = paused.spoken.length;
  utterance.words.forEach((word, i) => word.el.classList.add(i < spoken ? "spoken" : "unspoken"));
  utterance.words = utterance.words.slice(0, spoken); // `resume` speaks the rest again, as new words
  const result = $("barge-result");
  result.hidden = false;
  result.textContent = `spoken: ${paused.spoken.map((w) => w.word).join(" ") || "(nothing)"} — unspoken: ` +
    `${paused.unspoken.join(" ") || "(nothing)"} (played ${state.barge ? state.barge.played_ms : "?"} ms)`;
}

function resume() {
  send({ cmd: "resume", id: `resume-${state.nextId++}` });
  if (streamCut) send({ cmd: "flush" }); // the rest of a cut word-by-word turn is not coming
  streamCut = false;
}

function reset() {
  stopFeeder();
  streamCut = false;
  if (state.player) state.player.port.postMessage({ type: "stop", click: null });
  if (state.current) state.current.muted = true;
  const command = { cmd: "reset", format: $("format").value, id: `reset-${state.nextId++}` };
  if ($("voice").value) command.voice = $("voice").value;
  state.format = command.format;
  send(command);
  state.pendingTurn = null;
}

// --- save what was heard ---------------------------------------------------------------------

export function wavBytes(chunks, rate) {
  const count = chunks.reduce((n, c) => n + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * count));
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * count, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * count, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const sample of chunk) {
      view.setInt16(offset, Math.max(-32768, Math.min(32767, Math.round(sample * 32768))), true);
      offset += 2;
    }
  }
  return view.buffer;
}
state.wavBytes = () => wavBytes(state.recording, state.ctx ? state.ctx.sampleRate : CONTEXT_RATE);

function saveWav() {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([state.wavBytes()], { type: "audio/wav" }));
  link.download = "dia2stream-heard.wav";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// --- the page --------------------------------------------------------------------------------

function renderTurn(turn) {
  if (!turn.row) {
    turn.row = document.createElement("tr");
    $("turns").tBodies[0].prepend(turn.row);
  }
  const since = (t) => (t == null ? null : t - turn.sentAt);
  const cells = [turn.n, turn.cmd, turn.mode, fmtMs(since(turn.firstByteAt)), fmtMs(since(turn.onsetHeardAt)),
                 fmtMs(turn.serverOnset), turn.frames, turn.underruns, turn.end];
  turn.row.replaceChildren(...cells.map((value) => Object.assign(document.createElement("td"), { textContent: value })));
}

function renderCounters() {
  const s = state.player_status;
  $("counters").textContent = `frames: received ${state.framesReceived}, scheduled ${s.framesScheduled}, ` +
    `played ${s.framesPlayed}, dropped at a barge-in ${s.framesDropped}; underruns ${s.underruns}; audio clock ${(state.ctx ? state.ctx.currentTime : 0).toFixed(2)} s`;
}

function enable(on) {
  for (const id of ["speak", "continue", "barge", "resume", "reset", "save"]) $(id).disabled = !on;
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((value) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value || "(current)";
    option.selected = value === chosen;
    return option;
  }));
}

function status(text) {
  $("status").textContent = text;
}

function notice(text) {
  $("notice").hidden = false;
  $("notice").textContent = text;
}

function log(line) {
  const el = $("log");
  const lines = el.textContent ? el.textContent.split("\n") : [];
  lines.push(`${(performance.now() / 1000).toFixed(2)}  ${line}`);
  el.textContent = lines.slice(-MAX_LOG_LINES).join("\n");
}

init();
