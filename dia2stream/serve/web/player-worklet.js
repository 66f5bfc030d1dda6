// The playground's player, on the audio rendering thread: plays decoded 80 ms frames back to
// back, as a caller's phone would, and counts what it really played. It resamples each frame
// from its own rate (24, 16 or 8 kHz) to the context's by linear interpolation, so the page
// needs one AudioContext whatever the format.
//
// Messages in, queued in order (an utterance begins only when the one before has played out):
//               {type: "frame", samples: Float32Array, rate}    a frame
//               {type: "begin", utterance, position}   a new utterance (or the rolled-back point
//                                          of one): its timeline starts at `position` input samples
//               {type: "end"}              the utterance is done: an empty queue is its end
// and at once: {type: "stop", click}      barge-in: drop the queue and play nothing more
// Messages out: {type: "tick", ...counters}            every few render quanta while playing
//               {type: "stopped", ...counters, click}  the answer to "stop"
//               {type: "recording", samples}          what was played, in chunks (save as WAV)

const TICK_QUANTA = 4; // ~21 ms at 24 kHz: often enough to highlight words as they are heard
const RECORD_CHUNK = 24000;

class FramePlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // [{samples, rate}]
    this.offset = 0; // fractional read position in queue[0]
    this.position = 0; // input samples of this utterance played (its timeline)
    this.rate = 24000;
    this.utterance = 0;
    this.started = false; // a frame of this utterance has played: an empty queue now is a gap
    this.ended = false;
    this.starved = false;
    this.counters = { framesScheduled: 0, framesPlayed: 0, framesDropped: 0, underruns: 0, audioQuanta: 0, quanta: 0 };
    this.record = new Float32Array(RECORD_CHUNK);
    this.recorded = 0;
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "frame") {
      this.queue.push(message);
      this.counters.framesScheduled++;
    } else if (message.type === "begin" || message.type === "end") {
      this.queue.push(message);
      this.applyMarkers();
    } else if (message.type === "stop") {
      this.counters.framesDropped += this.queue.filter((item) => item.type === "frame").length;
      this.queue = [];
      this.offset = 0;
      this.ended = true;
      this.flushRecording();
      this.port.postMessage({ type: "stopped", click: message.click, stoppedAt: currentTime, ...this.status() });
    }
  }

  status() {
    return { utterance: this.utterance, position: this.position + Math.floor(this.offset), rate: this.rate,
             time: currentTime, ...this.counters };
  }

  // Markers at the head of the queue take effect when playback reaches them.
  applyMarkers() {
    while (this.queue.length && this.queue[0].type !== "frame") {
      const marker = this.queue.shift();
      if (marker.type === "begin") {
        // The last word of the utterance that just ended is highlighted from this report.
        if (this.started) this.port.postMessage({ type: "tick", ...this.status() });
        this.utterance = marker.utterance;
        this.position = marker.position;
        this.offset = 0;
        this.started = this.ended = this.starved = false;
      } else {
        this.ended = true;
      }
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    this.counters.quanta++;
    let played = 0;
    for (let i = 0; i < out.length; i++) {
      const sample = this.next();
      if (sample === null) { out.fill(0, i); break; }
      out[i] = sample;
      played++;
    }
    if (played) {
      this.counters.audioQuanta++;
      this.keep(out, played);
    }
    if (played < out.length && this.started && !this.ended && !this.starved) {
      this.starved = true; // the next frame came late: the caller hears a gap
      this.counters.underruns++;
    }
    if (played && this.counters.quanta % TICK_QUANTA === 0) this.port.postMessage({ type: "tick", ...this.status() });
    if (!played && this.ended && this.recorded) {
      this.flushRecording();
      this.port.postMessage({ type: "tick", ...this.status() });
    }
    return true;
  }

  // The next output sample, or null when nothing is queued.
  next() {
    this.applyMarkers();
    if (!this.queue.length) return null;
    const head = this.queue[0];
    this.rate = head.rate;
    const index = Math.floor(this.offset);
    const fraction = this.offset - index;
    const a = head.samples[index];
    const following = this.queue[1];
    const b = index + 1 < head.samples.length ? head.samples[index + 1]
      : following && following.type === "frame" ? following.samples[0] : a;
    this.offset += head.rate / sampleRate;
    if (this.offset >= head.samples.length) {
      this.offset -= head.samples.length;
      this.position += head.samples.length;
      this.queue.shift();
      this.counters.framesPlayed++;
    }
    this.started = true;
    this.starved = false;
    return a + (b - a) * fraction;
  }

  keep(out, count) {
    for (let i = 0; i < count; i++) {
      this.record[this.recorded++] = out[i];
      if (this.recorded === this.record.length) this.flushRecording();
    }
  }

  flushRecording() {
    if (!this.recorded) return;
    const chunk = this.record.slice(0, this.recorded);
    this.recorded = 0;
    this.port.postMessage({ type: "recording", samples: chunk }, [chunk.buffer]);
  }
}

registerProcessor("frame-player", FramePlayer);
