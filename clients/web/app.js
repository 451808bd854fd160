// osum-live browser client: microphone (AudioWorklet -> 16 kHz PCM16) or a dropped file -> /v1/listen.
// No build step, no dependencies. Protocol: docs/protocol.md.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null, ctx: null, source: null, node: null, stream: null,
  resumeToken: null, lastSeq: -1, sentSeconds: 0, stopping: false, retries: 0,
  utterances: new Map(), // utterance id -> {el, start}
  latencies: [],
};

function tasks() {
  return [...document.querySelectorAll("input[name=task]:checked")].map((e) => e.value);
}

function setStatus(text, live) {
  $("status").textContent = text;
  $("status").className = live ? "live" : "";
}

function utterance(id) {
  let u = state.utterances.get(id);
  if (!u) {
    const el = document.createElement("p");
    el.className = "utt";
    el.dataset.utterance = id;
    el.innerHTML = '<span class="time"></span><span class="text"></span><span class="unstable"></span><span class="chips"></span>';
    $("transcript").appendChild(el);
    u = { el };
    state.utterances.set(id, u);
  }
  return u;
}

function replyOf(id) {
  const el = utterance(id).el;
  let r = el.querySelector(".reply");
  if (!r) {
    r = document.createElement("span");
    r.className = "reply";
    el.appendChild(r);
  }
  return r;
}

function fmt(t) { return t.toFixed(2).padStart(6, " "); }

function onMessage(m) {
  if (typeof m.seq === "number" && m.seq > state.lastSeq) state.lastSeq = m.seq;
  switch (m.type) {
    case "Begin":
      state.resumeToken = m.resume_token;
      state.retries = 0;
      setStatus("listening", true);
      break;
    case "Results": {
      const u = utterance(m.utterance_id);
      u.el.querySelector(".time").textContent = `${fmt(m.start)} – ${fmt(m.end)}`;
      if (m.is_final) {
        u.el.classList.add("final");
        u.el.querySelector(".text").textContent = m.transcript;
        u.el.querySelector(".unstable").textContent = "";
        // how far behind the live edge the final came (audio clock: robust to network jitter)
        const lag = Math.max(0, state.sentSeconds - m.end);
        state.latencies.push(lag);
        const sorted = [...state.latencies].sort((a, b) => a - b);
        const p50 = sorted[Math.floor(sorted.length / 2)];
        $("latency").textContent = `final ${Math.round(lag * 1000)} ms after the end of speech (median ${Math.round(p50 * 1000)} ms over ${sorted.length})`;
      } else if (!u.el.classList.contains("final")) {
        u.el.querySelector(".text").textContent = m.committed;
        u.el.querySelector(".unstable").textContent = m.unstable;
      }
      break;
    }
    case "Analysis": {
      const chips = utterance(m.utterance_id).el.querySelector(".chips");
      chips.textContent = "";
      for (const [kind, tag] of Object.entries(m.tags || {})) {
        const c = document.createElement("span");
        c.className = "chip" + (tag.label === "unsupported" ? " unsupported" : "");
        c.dataset.kind = kind;
        c.textContent = tag.score == null ? `${kind}: ${tag.label}` : `${kind}: ${tag.label} ${Math.round(tag.score * 100)}%`;
        chips.appendChild(c);
      }
      if (m.reply) replyOf(m.utterance_id).textContent = m.reply; // the whole reply replaces the streamed pieces
      break;
    }
    case "ReplyDelta": // voice chat: the reply as the model writes it
      replyOf(m.utterance_id).textContent += m.delta;
      break;
    case "Error": {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = `${m.code}: ${m.message}`;
      $("transcript").appendChild(p);
      break;
    }
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams({ encoding: "linear16", sample_rate: "16000", tasks: tasks().join(",") });
  if (state.resumeToken) { q.set("resume", state.resumeToken); q.set("last_seq", String(state.lastSeq)); }
  const key = $("key").value.trim();
  // browsers cannot set headers on a WebSocket: the key goes in the subprotocol list
  const ws = new WebSocket(`${proto}//${location.host}/v1/listen?${q}`, key ? ["token", key] : []);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => { if (typeof e.data === "string") onMessage(JSON.parse(e.data)); };
  ws.onclose = (e) => {
    state.ws = null;
    const retryable = [1001, 1006, 1011, 1012].includes(e.code);
    if (!state.stopping && retryable && state.resumeToken && state.retries < 5) {
      state.retries++;
      setStatus(`reconnecting (${e.code})…`, false);
      setTimeout(connect, 250 * 2 ** state.retries);
    } else {
      setStatus(e.code === 1000 ? "done" : `closed (${e.code}${e.reason ? ": " + e.reason : ""})`, false);
      stopAudio();
    }
  };
  state.ws = ws;
}

function send(buf) {
  state.sentSeconds += buf.byteLength / 32000;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(buf);
}

async function startMic() {
  reset();
  state.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  state.ctx = new AudioContext();
  await state.ctx.audioWorklet.addModule("pcm-worklet.js");
  state.source = state.ctx.createMediaStreamSource(state.stream);
  state.node = new AudioWorkletNode(state.ctx, "pcm16-downsampler");
  state.node.port.onmessage = (e) => send(e.data);
  state.source.connect(state.node);
  const mute = state.ctx.createGain(); // keeps the node in the rendering graph without playing anything
  mute.gain.value = 0;
  state.node.connect(mute).connect(state.ctx.destination);
  await state.ctx.resume();
  connect();
  $("mic").disabled = true;
  $("stop").disabled = false;
}

async function streamFile(file) {
  reset();
  const bytes = await file.arrayBuffer();
  const decoded = await new AudioContext().decodeAudioData(bytes);
  const off = new OfflineAudioContext(1, Math.ceil(decoded.duration * 16000), 16000); // resample + mix down
  const src = off.createBufferSource();
  src.buffer = decoded;
  src.connect(off.destination);
  src.start();
  const x = (await off.startRendering()).getChannelData(0);
  connect();
  $("stop").disabled = false;
  const t0 = performance.now();
  for (let i = 0; i < x.length && !state.stopping; i += 1600) {
    const chunk = new Int16Array(Math.min(1600, x.length - i));
    for (let k = 0; k < chunk.length; k++) { const v = Math.max(-1, Math.min(1, x[i + k])); chunk[k] = v < 0 ? v * 32768 : v * 32767; }
    const due = t0 + (i / 16000) * 1000 - performance.now(); // real-time pacing
    if (due > 0) await new Promise((r) => setTimeout(r, due));
    while (!state.ws || state.ws.readyState !== WebSocket.OPEN) await new Promise((r) => setTimeout(r, 50));
    send(chunk.buffer);
  }
  stop();
}

function stopAudio() {
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.ctx) state.ctx.close();
  state.stream = state.ctx = state.node = state.source = null;
  $("mic").disabled = false;
  $("stop").disabled = true;
}

function stop() {
  state.stopping = true;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "CloseStream" }));
  stopAudio();
}

function reset() {
  state.stopping = false;
  state.resumeToken = null;
  state.lastSeq = -1;
  state.sentSeconds = 0;
  state.retries = 0;
  state.latencies = [];
  state.utterances.clear();
  $("transcript").textContent = "";
  $("latency").textContent = "";
}

// KeepAlive while the microphone is muted or a file is loading
setInterval(() => { if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "KeepAlive" })); }, 5000);

$("mic").onclick = () => startMic().catch((e) => setStatus(`microphone: ${e.message}`, false));
$("stop").onclick = stop;
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) streamFile(e.dataTransfer.files[0]).catch((err) => setStatus(`file: ${err.message}`, false));
};
if (new URLSearchParams(location.search).get("autostart") === "mic") $("mic").click();
