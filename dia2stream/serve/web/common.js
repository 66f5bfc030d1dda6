// What the playground and the dashboard share: the token, the wire formats, G.711 decoding,
// histogram quantiles. Plain ES module, no dependencies.

const TOKEN_KEY = "dia2stream.token";

export function savedToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) sessionStorage.setItem(TOKEN_KEY, fromHash);
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function saveToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The dashboard feed sits behind the server's token like /metrics: a 401 without one says the
// server needs it, which a refused websocket cannot say (browsers hide its HTTP status).
export async function tokenNeeded(token) {
  const response = await fetch("/dashboard/feed", { method: "HEAD", headers: authHeaders(token), cache: "no-store" });
  return response.status === 401;
}

// The formats table the server generates from its own (dia2stream.wire.formats).
export async function loadFormats() {
  const response = await fetch("/web/formats.json", { cache: "no-store" });
  return response.json();
}

// --- G.711 (ITU-T), expanded to 16-bit like Python's audioop ---------------------------------

function ulawToLinear(code) {
  const u = ~code & 0xff;
  let t = ((u & 0x0f) << 3) + 0x84;
  t <<= (u & 0x70) >> 4;
  return u & 0x80 ? 0x84 - t : t - 0x84;
}

function alawToLinear(code) {
  const a = code ^ 0x55;
  let t = (a & 0x0f) << 4;
  const segment = (a & 0x70) >> 4;
  if (segment === 0) t += 8;
  else if (segment === 1) t += 0x108;
  else t = (t + 0x108) << (segment - 1);
  return a & 0x80 ? t : -t;
}

export const ULAW_TABLE = Int16Array.from({ length: 256 }, (_, i) => ulawToLinear(i));
export const ALAW_TABLE = Int16Array.from({ length: 256 }, (_, i) => alawToLinear(i));

// One binary frame → Float32 samples in [-1, 1) at the format's rate.
// Layout (docs/protocol.md): uint32 LE sample count, then the samples.
export function decodeFrame(buffer, format) {
  const count = new DataView(buffer).getUint32(0, true);
  const out = new Float32Array(count);
  if (format.encoding === "pcm_s16le") {
    const pcm = new DataView(buffer, 4);
    for (let i = 0; i < count; i++) out[i] = pcm.getInt16(2 * i, true) / 32768;
  } else {
    const table = format.encoding === "ulaw" ? ULAW_TABLE : ALAW_TABLE;
    const codes = new Uint8Array(buffer, 4, count);
    for (let i = 0; i < count; i++) out[i] = table[codes[i]] / 32768;
  }
  return out;
}

// --- histograms -----------------------------------------------------------------------------

export function bucketBound(le) {
  return le === "+Inf" ? Infinity : Number(le);
}

// Quantile q of a cumulative histogram [[le, count], ...], interpolated inside the bucket the
// way Prometheus' histogram_quantile does; null when it holds no observation.
export function histogramQuantile(q, buckets) {
  if (!buckets.length) return null;
  const total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const [le, count] of buckets) {
    const upper = bucketBound(le);
    if (count >= rank) {
      if (upper === Infinity) return lower;
      return count === below ? upper : lower + (upper - lower) * (rank - below) / (count - below);
    }
    lower = upper;
    below = count;
  }
  return lower;
}

// Observations between two snapshots of the same histogram (later minus earlier, per bucket).
export function histogramDelta(later, earlier) {
  if (!earlier) return later.buckets;
  return later.buckets.map(([le, count], i) => [le, count - (earlier.buckets[i] ? earlier.buckets[i][1] : 0)]);
}

export function fmtMs(value) {
  return value == null || Number.isNaN(value) ? "–" : `${Math.round(value)} ms`;
}
