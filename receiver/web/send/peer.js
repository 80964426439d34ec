// The browser sender's WebRTC peer: sender/peer.py's channels and options, and shared/signaling.py's
// offer/answer over HTTP.
//
// - "control": ordered, reliable (Hello, source image, heartbeats, Bye);
// - "kp": unordered, maxRetransmits 0 (a late keypoint is worth nothing); above 32 KiB buffered the
//   link is congested and keypoints are dropped, not queued;
// - no trickle ICE: the offer is POSTed once every candidate is in it, as the receiver requires.

import * as P from "./protocol.js";

export const CONTROL_LABEL = "control";
export const KEYPOINT_LABEL = "kp";
export const MAX_BUFFERED_BYTES = 32 * 1024;
const CONTROL_HIGH_WATER = 256 * 1024;

/** A failure the page explains to a person; `kind` picks the message. */
export class CallError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { clearTimeout(t); resolve(); } };
    const t = setTimeout(resolve, timeoutMs); // send what has been gathered by then
    pc.addEventListener("icegatheringstatechange", done);
  });
}

function opened(channel) {
  if (channel.readyState === "open") return Promise.resolve();
  return new Promise((resolve, reject) => {
    channel.addEventListener("open", resolve, { once: true });
    channel.addEventListener("close", () => reject(new CallError("connect", "the data channel closed while opening")), { once: true });
  });
}

// A busy receiver's answer is retried on the Python sender's schedule (shared/signaling.py).
const BUSY_BACKOFF_S = [0.5, 1.0, 2.0, 4.0];
const BUSY_MIN_WAIT_S = 0.1;
const BUSY_MARGIN_S = 0.01;

/** A 503's retry_after_s, if it is a sane number of seconds; else null. */
async function retryAfter(resp) {
  try {
    const v = (await resp.json()).retry_after_s;
    return typeof v === "number" && Number.isFinite(v) && v >= 0 && v <= 3600 ? v : null;
  } catch (e) {
    return null;
  }
}

export class SenderPeer {
  constructor({ onMessage = () => {}, onClosed = () => {}, iceServers = [] } = {}) {
    this.pc = new RTCPeerConnection({ iceServers });
    this.control = this.pc.createDataChannel(CONTROL_LABEL, { ordered: true });
    this.kp = this.pc.createDataChannel(KEYPOINT_LABEL, { ordered: false, maxRetransmits: 0 });
    this.control.binaryType = "arraybuffer";
    this.kp.binaryType = "arraybuffer";
    this.bytesSent = { control: 0, kp: 0 };
    this.messagesSent = { control: 0, kp: 0 };
    this.kpDroppedCongestion = 0;
    this.rejected = {};
    this.closed = false;
    this.control.addEventListener("message", (ev) => {
      const msg = this.decode(ev.data);
      if (msg) onMessage(msg);
    });
    // The receiver repeats each KeyframeRequest on this unreliable channel (a control copy can wait ~1 s
    // behind a lost chunk); nothing else may arrive here. The second copy of a request is ignored by the
    // call (SenderCall.onMessage).
    this.kp.addEventListener("message", (ev) => {
      const msg = this.decode(ev.data);
      if (msg && msg.type !== "KeyframeRequest") this.rejected.channel = (this.rejected.channel || 0) + 1;
      else if (msg) onMessage(msg);
    });
    this.pc.addEventListener("connectionstatechange", () => {
      if (["failed", "closed"].includes(this.pc.connectionState) && !this.closed) {
        this.closed = true;
        onClosed(`connection ${this.pc.connectionState}`);
      }
    });
  }

  /** A received message, or null (counted by reason) when it does not decode. */
  decode(data) {
    try {
      return P.decode(new Uint8Array(data));
    } catch (e) {
      const reason = e instanceof P.ProtocolError ? e.reason : "malformed";
      this.rejected[reason] = (this.rejected[reason] || 0) + 1;
      return null;
    }
  }

  /** Offer, POST it to the receiver, take the answer, wait for both channels. Throws CallError.
   *
   * A busy receiver (HTTP 503) is offered again, as the Python sender does (shared/signaling.py
   * offer_until_answered): slots held by peers that never connect give way to new offers, and a page that
   * gave up at its first 503 was locked out by them. Again when the receiver says a slot gives way
   * (its retry_after_s), else after 0.5, 1, 2, 4, 4 ... s, for up to busyMs. */
  async connect(receiverUrl, token, { gatherMs = 5000, openMs = 15000, busyMs = 15000, onBusy = null } = {}) {
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await gathered(this.pc, gatherMs);
    const url = new URL("offer", receiverUrl.endsWith("/") ? receiverUrl : receiverUrl + "/").href;
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const body = JSON.stringify({ sdp: this.pc.localDescription.sdp, type: "offer" });
    const deadline = performance.now() + busyMs;
    let resp;
    for (let attempt = 1; ; attempt++) {
      try {
        resp = await fetch(url, { method: "POST", headers, body });
      } catch (e) {
        throw new CallError("unreachable", `cannot reach the receiver at ${receiverUrl} (${e.message})`);
      }
      if (resp.status !== 503) break;
      const after = await retryAfter(resp);
      const waitS = after !== null ? Math.max(BUSY_MIN_WAIT_S, after + BUSY_MARGIN_S)
        : BUSY_BACKOFF_S[Math.min(attempt, BUSY_BACKOFF_S.length) - 1];
      if (performance.now() + waitS * 1000 > deadline) {
        throw new CallError("busy", `the receiver is busy: no call slot came free within ${busyMs / 1000} s (${attempt} offers)`);
      }
      this.busyOffers = attempt;
      if (onBusy) onBusy(attempt, waitS);
      await new Promise((r) => setTimeout(r, waitS * 1000));
    }
    if (resp.status === 401) throw new CallError("token", "the receiver refused the call: wrong or missing token");
    if (!resp.ok) {
      const text = (await resp.text()).slice(0, 200);
      throw new CallError("refused", `the receiver answered HTTP ${resp.status}: ${text}`);
    }
    await this.pc.setRemoteDescription(await resp.json());
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new CallError("connect",
        "the connection did not come up (ICE/DTLS): is a firewall between you and the receiver?")), openMs);
    });
    try {
      await Promise.race([Promise.all([opened(this.control), opened(this.kp)]), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** The largest message the receiver takes (its SDP's max-message-size). */
  maxMessageSize() {
    const s = this.pc.sctp && this.pc.sctp.maxMessageSize;
    return s && Number.isFinite(s) ? s : P.MAX_MESSAGE_BYTES;
  }

  sendControl(msg) {
    const data = P.encode(msg);
    this.control.send(data);
    this.bytesSent.control += data.length;
    this.messagesSent.control += 1;
    return data.length;
  }

  /** The source image in chunks under the receiver's max message size, without flooding SCTP. */
  async sendSource(image, imageId) {
    const chunk = Math.min(16 * 1024, this.maxMessageSize() - 256);
    let total = 0;
    for (const part of await P.splitSource(image, imageId, chunk)) {
      total += this.sendControl(part);
      while (this.control.bufferedAmount > CONTROL_HIGH_WATER) await new Promise((r) => setTimeout(r, 5));
    }
    return total;
  }

  /** Encoded size sent, or 0 when dropped (channel not open, or congested). */
  sendKeypoints(msg) {
    if (this.kp.readyState !== "open") return 0;
    if (this.kp.bufferedAmount > MAX_BUFFERED_BYTES) {
      this.kpDroppedCongestion += 1;
      return 0;
    }
    const data = P.encode(msg);
    this.kp.send(data);
    this.bytesSent.kp += data.length;
    this.messagesSent.kp += 1;
    return data.length;
  }

  /** Bytes through the DTLS transport (every channel and handshake), from the browser's own stats. */
  async transportStats() {
    const out = { bytesSent: 0, packetsSent: 0 };
    const report = await this.pc.getStats();
    report.forEach((s) => {
      if (s.type === "transport") { out.bytesSent += s.bytesSent || 0; out.packetsSent += s.packetsSent || 0; }
    });
    return out;
  }

  async close(reason = "done") {
    if (this.control.readyState === "open") {
      try {
        this.sendControl({ type: "Bye", reason });
        // let the Bye leave before the transport goes (sender/peer.py waits up to a second too)
        const t0 = performance.now();
        while (this.control.bufferedAmount > 0 && performance.now() - t0 < 1000) await new Promise((r) => setTimeout(r, 20));
        await new Promise((r) => setTimeout(r, 200));
      } catch { /* a dead transport must not stop the hang-up */ }
    }
    this.closed = true;
    this.pc.close();
  }
}
