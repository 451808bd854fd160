// AudioWorklet: microphone float samples at the context's rate -> 16 kHz PCM16 chunks of 100 ms.
// Runs on the audio rendering thread; posts Int16Array buffers (transferred, not copied).
class Pcm16Downsampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000; // input samples per output sample
    this.pos = 0; // fractional read position into this.tail + the next block
    this.tail = new Float32Array(0);
    this.out = new Int16Array(1600);
    this.n = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    // mix down to mono
    const len = channels[0].length;
    const x = new Float32Array(this.tail.length + len);
    x.set(this.tail);
    for (let c = 0; c < channels.length; c++) {
      const ch = channels[c];
      for (let i = 0; i < len; i++) x[this.tail.length + i] += ch[i] / channels.length;
    }
    // average over each output sample's span (a box low-pass), then take it at 16 kHz
    const half = Math.max(0, Math.floor(this.ratio / 2));
    while (this.pos + half + 1 < x.length) {
      const centre = Math.floor(this.pos);
      let acc = 0, count = 0;
      for (let k = Math.max(0, centre - half); k <= centre + half; k++) { acc += x[k]; count++; }
      const v = Math.max(-1, Math.min(1, acc / count));
      this.out[this.n++] = v < 0 ? v * 32768 : v * 32767;
      if (this.n === this.out.length) {
        this.port.postMessage(this.out.buffer, [this.out.buffer]);
        this.out = new Int16Array(1600);
        this.n = 0;
      }
      this.pos += this.ratio;
    }
    const keep = Math.max(0, Math.floor(this.pos) - half);
    this.tail = x.slice(keep);
    this.pos -= keep;
    return true;
  }
}

registerProcessor("pcm16-downsampler", Pcm16Downsampler);
