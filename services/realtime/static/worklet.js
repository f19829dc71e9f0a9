// AudioWorklet processors of the realtime page. The page's AudioContext runs at 24 kHz, the protocol's rate, so
// the browser resamples the microphone for us and the answer plays without conversion.

// Microphone -> int16 pieces of 20 ms (480 samples) posted to the page.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buf = new Int16Array(480);
    this.n = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        const s = Math.max(-1, Math.min(1, ch[i]));
        this.buf[this.n++] = s < 0 ? s * 32768 : s * 32767;
        if (this.n === this.buf.length) {
          this.port.postMessage(this.buf.slice(0).buffer, []);
          this.n = 0;
        }
      }
    }
    return true;
  }
}

// The answer: a queue of float pieces; reports how many samples of each item were played (for truncation).
class Playback extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0;
    this.played = 0;
    this.port.onmessage = (e) => {
      if (e.data === "clear") {
        this.queue = [];
        this.offset = 0;
      } else if (e.data === "reset") {
        this.played = 0;
      } else {
        this.queue.push(new Float32Array(e.data));
      }
    };
    this.lastReport = 0;
  }
  process(_inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const take = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + take), i);
      i += take;
      this.offset += take;
      this.played += take;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, i);
    if (this.played !== this.lastReport) {
      this.lastReport = this.played;
      this.port.postMessage({ played: this.played, queued: this.queue.length });
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("playback", Playback);
