"""What a sender call is asked to do: :class:`SenderConfig`, one field per ``python -m sender`` option."""

from __future__ import annotations

from dataclasses import dataclass

from models.fomm.io import DEFAULT_WEIGHTS
from sender.refresh import RefreshConfig
from shared.ice_servers import IceServerOptions
from shared.kpcodec import DEFAULT_STREAM, PredictiveConfig


@dataclass
class SenderConfig:
    receiver: str = "http://127.0.0.1:8080"
    camera: int | None = None
    video: str | None = None
    fps: float | None = None
    loop: bool = False
    max_frames: int | None = None
    mirror: bool = False
    token: str | None = None
    weights: str = str(DEFAULT_WEIGHTS)
    # Captured frames and the source image are this size; keypoints are detected at the
    # detector's 64x64 whatever it is, so it only sets the sharpest output a receiver can show.
    size: int = 256
    # pred: closed-loop predictive coding (shared.kpcodec): only frames the receiver cannot
    # predict are sent, no added delay. q8 (80 B/frame) / f16 (120 B/frame): every (k-th) frame.
    codec: str = "pred"
    # pred: skip a frame predicted this close (the starting value with --target-kbps); the defaults
    # are shared.kpcodec.DEFAULT_STREAM's
    tolerance: float = DEFAULT_STREAM.tolerance
    skip_rule: str = DEFAULT_STREAM.skip_rule  # pred: mean (capped) or max error within the tolerance
    predictor: str = DEFAULT_STREAM.predictor  # pred: last | linear
    max_gap: int = DEFAULT_STREAM.max_gap  # pred: at most this many frames skipped in a row
    keyframe_interval: int = DEFAULT_STREAM.keyframe_interval  # pred: an absolute frame at least this often
    # pred: a coded frame waits one frame period so that two consecutive ones share a message (half the
    # per-message transport bytes, one period of added delay for the frame that waited)
    bundle: bool = False
    kp_every: int = 1  # q8/f16: send every k-th frame's keypoints; the receiver fills the rest
    batch: int = 1  # q8/f16: keypoint frames per message (fewer messages, more latency)
    target_kbps: float | None = None  # pred: adjust the tolerance to this rate; q8/f16: pick kp_every and batch
    ice_address: list[str] | None = None  # restrict ICE host candidates (default: 127.0.0.1 for a loopback receiver)
    ice_server: list[str] | None = None  # STUN/TURN server URLs (shared.ice_servers)
    ice_username: str | None = None
    ice_credential: str | None = None
    ice_relay_only: bool = False
    # "face": the training clips' square around the face (sender.framing), re-framed when the face
    # leaves it; "centre": the frame's centre square (input that is already a face crop). Face is the
    # default for files too: on a pre-cropped clip the face square covers the whole frame anyway.
    framing: str = "face"
    # render: rebuild the receiver's picture at 64x64 every 0.5 s and send a new source image when
    # it has drifted (sender.refresh); keypoints: the cheaper keypoint-distance estimate; off: never.
    # Always off with --source-image (the picture is not the camera's).
    refresh: str = "render"
    refresh_min_interval: float = RefreshConfig.min_interval_s
    # ICE + DTLS + both data channels open within this; over a lossy path the DTLS and SCTP
    # handshakes back off (1, 2, 4, 8 s) on every lost flight, so benches of lossy links give more
    connect_timeout: float = 15.0
    stats_json: str | None = None
    truth_out: str | None = None  # save every frame's true keypoints (npz) for evaluation
    source_quality: int = 90
    source_image: str | None = None  # send this file as the source image instead of the first frame
    list_cameras: bool = False
    # auto: time the extraction before the call and keep every k-th frame when one frame's does not
    # fit this machine (sender.pacing), announced in the Hello; off: always the asked rate.
    pacing: str = "auto"
    # extraction threads: 1 here for a sender sharing its cores with a renderer (kpcast call);
    # `python -m sender`, alone on its machine, asks for 2
    threads: int = 1
    # the sending half's worker threads (extraction, framing, refresh) run this many nice steps below the
    # rest of the process: kpcast call's renderer gets the shared cores first (sender.priority)
    nice: int = 0
    replay_keypoints: str | None = None  # send keypoints from a --truth-out file instead of detecting them

    def ice_options(self) -> IceServerOptions:
        return IceServerOptions(self.ice_server, self.ice_username, self.ice_credential, self.ice_relay_only)

    def pred_config(self) -> PredictiveConfig:
        """The predictive codec's parameters (ValueError when out of range)."""
        return PredictiveConfig(predictor=self.predictor, tolerance=self.tolerance, max_gap=self.max_gap,
                                keyframe_interval=self.keyframe_interval, skip_rule=self.skip_rule)
