// The realtime page: microphone -> input_audio_buffer.append (24 kHz PCM16), server VAD ends the turn, the answer
// plays as response.output_audio.delta arrive; speaking during the answer interrupts it (the server cancels the
// response, this page stops playback and truncates the answer to what was heard).
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);
// What tests read (headless Chromium): counters and the last figures.
window.state = { connected: false, events: {}, ttfaMs: null, answers: 0, interruptions: 0, audioDeltas: 0,
                 playedSamples: 0, errors: [] };

let ws, ctx, mic, capture, playback, turnEndAt = null, firstAudio = false;
let current = null; // { itemId, playedAtStart }
let playedTotal = 0;

function log(text) {
  const el = $("log");
  el.textContent += text + "\n";
  el.scrollTop = el.scrollHeight;
}

function line(cls, text) {
  const p = document.createElement("p");
  p.className = cls;
  p.textContent = text;
  $("transcript").appendChild(p);
  return p;
}

function b64(buf) {
  let s = "";
  const bytes = new Uint8Array(buf);
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function pcmFloats(b64data) {
  const raw = atob(b64data);
  const n = raw.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

async function start() {
  $("start").disabled = true;
  $("status").textContent = "starting microphone...";
  ctx = new AudioContext({ sampleRate: RATE });
  await ctx.audioWorklet.addModule("/static/worklet.js");
  mic = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true,
                                                             noiseSuppression: true } });
  const source = ctx.createMediaStreamSource(mic);
  capture = new AudioWorkletNode(ctx, "capture");
  playback = new AudioWorkletNode(ctx, "playback");
  playback.connect(ctx.destination);
  source.connect(capture);
  const meter = document.querySelector("#meter div");
  capture.port.onmessage = (e) => {
    const pcm = new Int16Array(e.data);
    let peak = 0;
    for (let i = 0; i < pcm.length; i += 8) peak = Math.max(peak, Math.abs(pcm[i]));
    meter.style.width = Math.min(100, (100 * peak) / 12000) + "%";
    send({ type: "input_audio_buffer.append", audio: b64(e.data) });
  };
  playback.port.onmessage = (e) => {
    playedTotal = e.data.played;
    window.state.playedSamples = playedTotal;
    $("played").textContent = (playedTotal / RATE).toFixed(1) + " s";
  };
  await ctx.resume();
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime?model=moss-speech";
  ws = new WebSocket(url);
  ws.onopen = () => {
    window.state.connected = true;
    $("status").textContent = "listening";
    $("stop").disabled = false;
    send({ type: "session.update", session: { type: "realtime", output_modalities: ["audio"],
      audio: { input: { format: { type: "audio/pcm", rate: RATE },
                        turn_detection: { type: "server_vad", silence_duration_ms: 500 } },
               output: { format: { type: "audio/pcm", rate: RATE } } } } });
  };
  ws.onclose = () => { window.state.connected = false; $("status").textContent = "disconnected"; };
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
}

let answerLine = null;
function onEvent(e) {
  const s = window.state;
  s.events[e.type] = (s.events[e.type] || 0) + 1;
  if (e.type !== "response.output_audio.delta") log(e.type);
  switch (e.type) {
    case "input_audio_buffer.speech_started":
      $("status").textContent = "hearing you";
      if (current) { // barge-in: stop playback and cut the answer to what was heard
        const heardMs = Math.floor((1000 * (playedTotal - current.playedAtStart)) / RATE);
        playback.port.postMessage("clear");
        send({ type: "conversation.item.truncate", item_id: current.itemId, content_index: 0,
               audio_end_ms: Math.max(0, Math.min(heardMs, current.sentMs)) });
        line("cut", "(interrupted after " + (heardMs / 1000).toFixed(1) + " s)");
        s.interruptions++;
        $("interruptions").textContent = s.interruptions;
        current = null;
      }
      break;
    case "input_audio_buffer.speech_stopped":
      turnEndAt = performance.now();
      firstAudio = false;
      $("status").textContent = "thinking";
      line("user", "you: (spoken turn, " + (e.audio_end_ms / 1000).toFixed(1) + " s into the session)");
      break;
    case "response.created":
      answerLine = line("assistant", "model: ");
      break;
    case "response.output_item.added":
      current = { itemId: e.item.id, playedAtStart: playedTotal, sentMs: 0 };
      break;
    case "response.output_audio.delta": {
      s.audioDeltas++;
      if (!firstAudio && turnEndAt !== null) {
        firstAudio = true;
        s.ttfaMs = performance.now() - turnEndAt;
        $("ttfa").textContent = Math.round(s.ttfaMs) + " ms";
      }
      const pcm = pcmFloats(e.delta);
      if (current && current.itemId === e.item_id) current.sentMs += (1000 * pcm.length) / RATE;
      playback.port.postMessage(pcm.buffer, [pcm.buffer]);
      $("status").textContent = "answering";
      break;
    }
    case "response.output_audio_transcript.delta":
      if (answerLine) answerLine.textContent += e.delta;
      break;
    case "response.done":
      s.answers++;
      $("answers").textContent = s.answers;
      if (e.response.status === "cancelled") current = null;
      $("status").textContent = "listening";
      break;
    case "error":
      s.errors.push(e.error.code);
      log("error: " + e.error.code + ": " + e.error.message);
      break;
  }
}

function stop() {
  if (ws) ws.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("start").onclick = () => start().catch((err) => { $("status").textContent = "error: " + err; });
$("stop").onclick = stop;
if (new URLSearchParams(location.search).get("autostart") === "1") $("start").click();
