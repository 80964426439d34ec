"""Fuzz the wire protocol and a live call session with random and mutated-valid messages.

Every input goes through ``shared.protocol.decode`` (which may only raise ``ProtocolError``)
and through ``CallSession.on_message`` of a real session (tiny model renderer, null sink,
immediate playout, a stand-in peer connection), which must never raise, never log an
``internal`` rejection and never leave a failed background task. Inputs are valid messages,
mutations of valid encodings (bit flips, truncation, junk, field swaps, wrong types, huge
ints, NaN/inf floats, wrong version/type/arity) and random msgpack structures or bytes.

Usage:
  python -m bench.fuzz --messages 100000 [--seed S] [--json out/bench/fuzz.json]

Exit status 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import math
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import msgpack
import numpy as np

from bench.common import format_table, write_json
from shared import kpvector as V
from shared import protocol as P
from shared import source_image as S
from shared.kpcodec import PredictiveConfig, PredictiveEncoder

log = logging.getLogger(__name__)

MODEL_SIZE = 64
HUGE_INTS = [2 ** 63 - 1, -(2 ** 63), 2 ** 64 - 1, 2 ** 62 + 1, -1, 0, 2 ** 31, -(2 ** 31) - 1]
WEIRD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 0.5]


class FakePeerConnection:
    """What CallSession.close() touches of an RTCPeerConnection: no transport, a close()."""

    sctp = None

    async def close(self) -> None:
        pass


def tiny_model():
    """The tiny random model every fuzzed session renders with (seeded: the same every time)."""
    import torch

    from models.fomm import FommConfig, MotionModel

    torch.manual_seed(0)
    return MotionModel(FommConfig.tiny(MODEL_SIZE)).eval()


@functools.cache
def tiny_detector_id() -> str:
    """What a sender using the tiny model puts in its Hello."""
    from models.fomm.io import detector_id

    return detector_id(tiny_model())


def make_session(executor: ThreadPoolExecutor, index: int = 0, **config: Any):
    """A real CallSession (tiny random model, null sink) fed by hand instead of by aiortc."""
    from receiver.render import Renderer
    from receiver.session import CallSession, SessionConfig

    model = tiny_model()
    cfg = SessionConfig(**{"sink": "null", "playout": "immediate", **config})
    return CallSession(f"fuzz{index}", index, FakePeerConnection(), Renderer(model), executor, cfg)


# --------------------------------------------------------------------------- input generators


class Inputs:
    """A seeded stream of (generator name, message bytes or str): the same seed, the same inputs (what
    the session makes of them also depends on timing: source decoding and closing run concurrently)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.seq = 0
        self.image_id = 0
        self.ts_us = 1_700_000_000_000_000  # a fixed fake clock: the same seed gives the same inputs
        img = (self.np.random((MODEL_SIZE, MODEL_SIZE, 3)) * 255).astype(np.uint8)
        self.jpeg = cv2.imencode(".jpg", img)[1].tobytes()
        self.pending: list[bytes] = []
        self.pred = PredictiveConfig(tolerance=0.002)
        self.encoder = PredictiveEncoder(self.pred)
        self.pred_seq = 0
        self.last_coded = None  # the stream's previous coded frame (a RedundantFrame's material)

    def preamble(self) -> None:
        """A call's normal start (Hello, then a whole source image) before the fuzzing resumes, so
        the keypoints that follow reach the renderer too."""
        self.image_id += 1
        self.encoder, self.pred_seq = PredictiveEncoder(self.pred), 0  # a new stream starts with a keyframe
        self.last_coded = None
        self.pending = [P.encode(self._hello(tiny_detector_id(), MODEL_SIZE, 30.0, self.r.choice(list(P.Codec)), 1)),
                        *(P.encode(c) for c in S.split_source(self.jpeg, self.image_id, chunk_bytes=1024))]

    # valid messages -------------------------------------------------------
    def valid_message(self) -> P.Message:
        r = self.r
        k = r.random()
        if k < 0.25:
            return self._coded()
        if k < 0.45:
            n = r.choice([1, 1, 1, 2, 4, 16])
            vecs = [self._vector() for _ in range(n)]
            self.seq += r.choice([1, 1, 1, 2, 0, -3])  # mostly forward, some duplicates and reorders
            self.seq = max(self.seq, 0)
            self.ts_us += 33_333
            return P.KeypointBatch.build(self.seq, self.ts_us, vecs, r.choice(V.VECTOR_CODECS),
                                         step=r.choice([1, 1, 2]), interval_us=33_333)
        if k < 0.60:
            return P.Heartbeat(self.ts_us)
        if k < 0.72:
            detector = r.choice([tiny_detector_id()] * 9 + ["kp-000000000000"])
            if detector != tiny_detector_id():
                self.preamble()  # this Hello ends the call: the next one starts normally
            return self._hello(detector, r.choice([MODEL_SIZE, 128, 256]), r.choice([25.0, 30.0, 15.0]),
                               r.choice(list(P.Codec)), r.choice([1, 1, 2]))
        if k < 0.90:
            self.image_id += r.choice([1, 1, 0])
            chunks = S.split_source(self.jpeg, self.image_id, chunk_bytes=r.choice([256, 1024, 16384]))
            return r.choice(chunks)
        if k < 0.92:
            return P.SourceRequest(r.choice(["", "scene change", "x" * 300]))
        if k < 0.94:
            return P.SourceReady(r.choice([self.image_id, 0, -1, 2**31]))  # a receiver's message, sent to one
        if k < 0.97:
            return P.KeyframeRequest(r.choice([-1, 0, self.pred_seq]))
        self.preamble()  # this Bye may end the call: the next one starts normally
        return P.Bye(r.choice(["done", "", "ü" * 10]))

    def _hello(self, detector: str, size: int, fps: float, codec: P.Codec, kp_every: int) -> P.Hello:
        """A Hello of ``codec``; a predictive one restarts the coded stream (its decoder starts over)."""
        if codec != P.Codec.PRED:
            return P.Hello(detector, size, fps, int(codec), kp_every)
        self.encoder, self.pred_seq, self.last_coded = PredictiveEncoder(self.pred), 0, None
        return P.Hello(detector, size, fps, int(codec), 1, ts_base_us=self.ts_us, pred=self.pred.params())

    def _coded(self) -> P.CodedKeypoints:
        """The next frame of a real predictive stream (skipped frames advance it silently)."""
        r = self.r
        while True:
            seq, self.pred_seq = self.pred_seq, self.pred_seq + 1
            if r.random() < 0.05:
                self.encoder.request_keyframe()  # as after a receiver's request
            f = self.encoder.encode(seq, self._vector() if r.random() < 0.3 else self._still())
            if f is None:
                continue
            prev, self.last_coded = self.last_coded, f
            if r.random() < 0.5:  # untagged, as a version-2 sender's
                return P.CodedKeypoints(f.seq, f.prev_seq, f.key, 33_333 * f.seq, f.payload)
            # tagged with its source image (the current one, or another), and some carrying the previous
            # coded frame once more (sender --bundle / redundancy): real, stale or mismatched
            image_id = self.image_id if r.random() < 0.8 else r.choice([0, self.image_id + 1, 2**20])
            redundant = None
            if prev is not None and r.random() < 0.5:
                redundant = P.RedundantFrame(prev.prev_seq, prev.key, prev.payload)
            return P.CodedKeypoints(f.seq, f.prev_seq, f.key, 33_333 * f.seq, f.payload, image_id, redundant)

    def _still(self) -> np.ndarray:
        """A face that barely moves: most frames are skipped, the rest are small residuals."""
        v = np.concatenate([np.linspace(-0.5, 0.5, 20), np.tile([1, 0, 0, 1], 10)]).astype(np.float32)
        return v + self.np.normal(0, 0.003, V.KP_DIM).astype(np.float32)

    def _vector(self) -> np.ndarray:
        v = np.empty(V.KP_DIM, np.float32)
        v[:20] = self.np.uniform(-1, 1, 20)
        v[20:] = np.tile([1, 0, 0, 1], 10) + self.np.normal(0, 0.2, 40)
        return v

    # mutations ---------------------------------------------------------------
    def bit_flips(self, b: bytes) -> bytes:
        a = bytearray(b)
        for _ in range(self.r.randint(1, 8)):
            i = self.r.randrange(len(a))
            a[i] ^= 1 << self.r.randrange(8)
        return bytes(a)

    def truncate(self, b: bytes) -> bytes:
        return b[: self.r.randrange(len(b))]

    def splice(self, b: bytes) -> bytes:
        r = self.r
        i = r.randrange(len(b) + 1)
        junk = bytes(r.getrandbits(8) for _ in range(r.randint(1, 16)))
        return b[:i] + junk + b[i + r.randint(0, 4):]

    def structural(self, msg: P.Message) -> Any:
        """Decode-level mutation of a valid message's array: returns a Python object to pack."""
        r = self.r
        obj = msgpack.unpackb(P.encode(msg), raw=False)
        op = r.choice(["swap", "type", "huge", "float", "version", "msgtype", "drop", "add", "nest", "neg"])
        idx = r.randrange(len(obj))
        if op == "swap" and len(obj) > 3:
            i, j = r.sample(range(2, len(obj)), 2)
            obj[i], obj[j] = obj[j], obj[i]
        elif op == "type":
            obj[idx] = r.choice([None, True, "str", b"bytes", 1.5, [], {}, {"a": 1}, [1, 2]])
        elif op == "huge":
            obj[idx] = r.choice(HUGE_INTS)
        elif op == "float":
            obj[idx] = r.choice(WEIRD_FLOATS)
        elif op == "version":
            obj[0] = r.choice([0, 1, 3, 255, -1, 2.0, True, "2", None])  # 1: an old peer (the call ends)
        elif op == "msgtype":
            obj[1] = r.choice([0, 9, 99, -1, 1.0, 3.0, 7, True, "3", None])
        elif op == "drop":
            del obj[idx]
        elif op == "add":
            obj.append(r.choice([0, b"", "x", None]))
        elif op == "nest":
            obj[idx] = obj[:]
        else:
            obj[idx] = -abs(obj[idx]) - 1 if isinstance(obj[idx], int) and not isinstance(obj[idx], bool) else -1
        return obj

    def random_structure(self, depth: int = 0) -> Any:
        r = self.r
        kinds = ["int", "huge", "float", "str", "bytes", "bool", "none"]
        if depth < 3:
            kinds += ["list", "map"]
        k = r.choice(kinds)
        if k == "int":
            return r.randint(-300, 300)
        if k == "huge":
            return r.choice(HUGE_INTS)
        if k == "float":
            return r.choice(WEIRD_FLOATS + [r.uniform(-1e6, 1e6)])
        if k == "str":
            return "".join(chr(r.randint(32, 0x2FFF)) for _ in range(r.randint(0, 20)))
        if k == "bytes":
            return bytes(r.getrandbits(8) for _ in range(r.randint(0, 200)))
        if k == "bool":
            return r.random() < 0.5
        if k == "none":
            return None
        if k == "list":
            items = [self.random_structure(depth + 1) for _ in range(r.randint(0, 10))]
            if items and r.random() < 0.5:  # look like a message header more often than chance
                items[0] = P.PROTOCOL_VERSION
                if len(items) > 1:
                    items[1] = r.randint(0, 9)
            return items
        return {r.choice(["a", "seq", "sdp", "1"]) + str(i): self.random_structure(depth + 1)
                for i in range(r.randint(0, 5))}

    def next(self) -> tuple[str, bytes | str]:
        r = self.r
        if self.pending:
            return "valid", self.pending.pop(0)
        k = r.random()
        if k < 0.20:
            return "valid", P.encode(self.valid_message())
        if k < 0.35:
            return "bit_flip", self.bit_flips(P.encode(self.valid_message()))
        if k < 0.45:
            return "truncate", self.truncate(P.encode(self.valid_message()))
        if k < 0.52:
            return "splice", self.splice(P.encode(self.valid_message()))
        if k < 0.75:
            obj = self.structural(self.valid_message())
            return "structural", msgpack.packb(obj, use_bin_type=True)
        if k < 0.90:
            return "random_msgpack", msgpack.packb(self.random_structure(), use_bin_type=True)
        if k < 0.96:
            return "random_bytes", bytes(r.getrandbits(8) for _ in range(r.randint(0, 300)))
        if k < 0.98:
            return "text", r.choice(["", "hello", "[1,3,0]", "\x00" * 10])
        return "oversized", bytes(r.randint(P.MAX_MESSAGE_BYTES + 1, P.MAX_MESSAGE_BYTES + 5000))


# --------------------------------------------------------------------------- harness


def _outcome_of_decode(data: bytes | str) -> tuple[str, str | None]:
    """('accepted', MsgType) or ('rejected', reason); anything else escaping is a crash."""
    try:
        msg = P.decode(data)
    except P.ProtocolError as e:
        return "rejected", e.reason
    return "accepted", type(msg).__name__


async def fuzz(messages: int, seed: int, yield_every: int = 100,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the harness; returns the report (counts add up: tried = accepted + rejected + crashes)."""
    inputs = Inputs(seed)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-render")
    loop = asyncio.get_running_loop()
    async_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: async_errors.append(str(ctx.get("exception") or ctx["message"])))
    # a huge rate limit: the point is to reach the decoder and session logic, not the rate limiter
    new_session = lambda i: make_session(executor, i, max_messages_per_s=1e12)  # noqa: E731
    session = new_session(0)
    session.start()
    inputs.preamble()
    sessions = 1
    rendered = received = 0
    dec = {"accepted": Counter(), "rejected": Counter(), "crashes": 0}
    ses = {"accepted": 0, "rejected": Counter(), "crashes": 0, "internal": 0}
    by_gen: Counter = Counter()
    examples: list[dict[str, str]] = []
    t0 = time.perf_counter()
    for i in range(messages):
        gen, data = inputs.next()
        by_gen[gen] += 1
        what = None
        try:
            kind, what = _outcome_of_decode(data)
            dec[kind][what] += 1
        except Exception as e:  # the decoder promised ProtocolError only
            dec["crashes"] += 1
            if len(examples) < 10:
                examples.append({"where": "decode", "generator": gen, "input": bytes(data)[:200].hex()
                                 if isinstance(data, bytes) else repr(data)[:200],
                                 "error": "".join(traceback.format_exception_only(e)).strip()})
        before = Counter(session.rejects.counts)
        try:
            session.on_message(_label(inputs.r, what), data)
        except Exception as e:  # on_message promised never to raise
            ses["crashes"] += 1
            if len(examples) < 10:
                examples.append({"where": "session", "generator": gen,
                                 "error": "".join(traceback.format_exception_only(e)).strip()})
        else:
            new = session.rejects.counts - before
            if not new:
                ses["accepted"] += 1
            else:
                ses["rejected"][sorted(new)[0]] += 1
                ses["internal"] += new.get("internal", 0)  # a caught bug is still a bug
        if (i + 1) % yield_every == 0:
            # let the session's render loop and source decoding run (now and then long enough to render)
            await asyncio.sleep(0.01 if (i + 1) % (10 * yield_every) == 0 else 0)
            if progress:
                progress(i + 1)
        if session.closed.is_set():  # a Bye or a size-mismatched Hello ended the call: next call
            rendered += session.stats.frames_rendered
            received += session.stats.frames_received
            session = new_session(sessions)
            session.start()
            sessions += 1
    await asyncio.sleep(0.2)
    rendered += session.stats.frames_rendered
    received += session.stats.frames_received
    await session.close("fuzz done")
    executor.shutdown(wait=True)
    elapsed = time.perf_counter() - t0
    dec_rej = sum(dec["rejected"].values())
    dec_acc = sum(dec["accepted"].values())
    ses_rej = sum(ses["rejected"].values())
    crashes = dec["crashes"] + ses["crashes"] + ses["internal"] + len(async_errors)
    return {
        "messages": messages, "seed": seed, "seconds": elapsed, "messages_per_s": messages / elapsed,
        "inputs_by_generator": dict(by_gen),
        "decode": {"tried": messages, "accepted": dec_acc, "accepted_by_type": dict(dec["accepted"]),
                   "rejected": dec_rej, "rejected_by_reason": dict(dec["rejected"]), "crashes": dec["crashes"]},
        "session": {"tried": messages, "accepted": ses["accepted"], "rejected": ses_rej,
                    "rejected_by_reason": dict(ses["rejected"]), "crashes": ses["crashes"],
                    "internal_errors": ses["internal"], "sessions": sessions, "frames_received": received,
                    "frames_rendered": rendered},
        "async_errors": async_errors[:10], "crash_examples": examples, "crashes": crashes,
    }


def _label(r: random.Random, decoded: str | None) -> str:
    """Most messages on the channel they belong to (keypoints on "kp"), one in ten on the wrong one."""
    right = "kp" if decoded in ("KeypointBatch", "CodedKeypoints") else "control"
    return right if r.random() < 0.9 else r.choice(["kp", "control", "other"])


def report_table(rep: dict[str, Any]) -> str:
    d, s = rep["decode"], rep["session"]
    reasons = sorted(set(d["rejected_by_reason"]) | set(s["rejected_by_reason"]))
    rows = [["tried", d["tried"], s["tried"]], ["accepted", d["accepted"], s["accepted"]]]
    rows += [[f"rejected: {k}", d["rejected_by_reason"].get(k, 0), s["rejected_by_reason"].get(k, 0)]
             for k in reasons]
    rows += [["crashes", d["crashes"], s["crashes"] + s["internal_errors"]]]
    return format_table(["outcome", "decode", "session.on_message"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(1)
    rep = asyncio.run(fuzz(a.messages, a.seed))
    print(report_table(rep))
    print(f"\n{rep['messages']} messages in {rep['seconds']:.1f}s ({rep['messages_per_s']:.0f}/s), "
          f"{rep['session']['sessions']} sessions, {rep['session']['frames_received']} keypoint frames accepted, "
          f"{rep['session']['frames_rendered']} rendered; "
          f"inputs: {rep['inputs_by_generator']}")
    print(f"crashes: {rep['crashes']}")
    for ex in rep["crash_examples"]:
        print("  ", ex)
    if a.json:
        write_json(a.json, rep)
    return 1 if rep["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

