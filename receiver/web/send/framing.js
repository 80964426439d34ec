// Face framing in the browser: sender/framing.py's square, with the face found by the keypoint
// detector itself instead of dlib (which a page does not have; Chromium's FaceDetector API is not
// available on Linux or Windows).
//
// The shipped detector ties keypoint 9 to the image-left eye, 4 to the image-right eye, 5 to the
// mouth and 0 to the chin (models/fomm/anchors.py). On frames framed like the training clips those
// four sit where a face's features sit, so they give both a face box and a "is this a face" test:
//
// - face box: measured against dlib's HOG box on every frame of assets/demo_face.mp4, its width is
//   1.44 x the eyes-to-chin distance d (sd 0.04) and its centre lies 0.20 d from the eyes' midpoint
//   towards the chin; the training square is then sender/framing.face_square's (1.9 x the width,
//   centred 10 % of the box height above the box centre, clamped to the frame);
// - plausibility: the same clip's geometry (eyes 0.37 apart in [-1, 1] units, mouth 0.64 d and chin
//   d below the eyes, eyes level); a blank wall, a hand, or a face far too small for the square
//   breaks these ratios.
//
// The detector only finds a face that roughly fills the square it is shown, so a loose webcam view
// is first searched (scan()): squares of several sizes and places, the most face-like wins. After
// that every frame's own keypoints refine the square, which is kept while the face stays inside a
// margin (FramingDecision, as sender/framing.py), so head motion stays motion and a re-frame happens
// once, with a new source image.

export const FACE = Object.freeze({
  boxWidth: 1.44, boxCentre: 0.20, // face box from the eyes-to-chin distance d
  eyes: 0.372, mouth: 0.64, eyeRatio: 0.46, // mean geometry on framed faces
});
export const SQUARE = Object.freeze({ scale: 1.9, lift: 0.10, maxShift: 0.15, maxScaleChange: 1.3, confirm: 2,
  minChange: 0.03 });

const LE = 9, RE = 4, MOUTH = 5, CHIN = 0;

function pt(kp, i) { return [kp[2 * i], kp[2 * i + 1]]; }

/** How unlike a framed face the keypoints are (0: the mean face; Infinity: not a face). */
export function faceScore(kp) {
  const [lx, ly] = pt(kp, LE), [rx, ry] = pt(kp, RE), [mx, my] = pt(kp, MOUTH), [cx, cy] = pt(kp, CHIN);
  const ex = (lx + rx) / 2, ey = (ly + ry) / 2;
  const eyes = Math.hypot(rx - lx, ry - ly), d = Math.hypot(cx - ex, cy - ey);
  if (!(rx > lx) || d < 1e-3 || eyes < 1e-3) return Infinity;
  const tilt = Math.abs(ry - ly) / eyes, mouth = (my - ey) / d, ratio = eyes / d, chin = (cy - my) / d;
  // wide bounds: tilted heads, open mouths, framings from 0.5x to 2x the training one
  if (tilt > 0.5 || mouth < 0.40 || mouth > 0.90 || chin < 0.10 || chin > 0.60 || ratio < 0.28 || ratio > 0.80) return Infinity;
  if (eyes < 0.18 || eyes > 0.80) return Infinity;
  return Math.log(eyes / FACE.eyes) ** 2 + Math.log(mouth / FACE.mouth) ** 2 + Math.log(ratio / FACE.eyeRatio) ** 2 + tilt ** 2;
}

/** Face box [left, top, right, bottom] in frame pixels from keypoints detected on `square` [x0, y0, side]. */
export function faceBox(kp, square) {
  const [x0, y0, s] = square;
  const px = (v) => x0 + (v + 1) / 2 * s, py = (v) => y0 + (v + 1) / 2 * s;
  const [lx, ly] = pt(kp, LE), [rx, ry] = pt(kp, RE), [cx, cy] = pt(kp, CHIN);
  const ex = px((lx + rx) / 2), ey = py((ly + ry) / 2), chx = px(cx), chy = py(cy);
  const d = Math.hypot(chx - ex, chy - ey);
  const mx = ex + FACE.boxCentre * (chx - ex), my = ey + FACE.boxCentre * (chy - ey);
  const w = FACE.boxWidth * d;
  return [mx - w / 2, my - w / 2, mx + w / 2, my + w / 2];
}

/** sender/framing.face_square: the training clips' square for a face box, clamped to the frame. */
export function faceSquare(box, frameW, frameH, scale = SQUARE.scale, lift = SQUARE.lift) {
  const [l, t, r, b] = box;
  const fw = r - l, fh = b - t;
  const cx = (l + r) / 2, cy = (t + b) / 2 - lift * fh;
  const side = Math.max(1, Math.round(Math.min(scale * fw, frameH, frameW)));
  const x0 = Math.round(Math.min(Math.max(cx - side / 2, 0), frameW - side));
  const y0 = Math.round(Math.min(Math.max(cy - side / 2, 0), frameH - side));
  return [x0, y0, side];
}

export function centreSquare(frameW, frameH) {
  const s = Math.min(frameW, frameH);
  return [Math.floor((frameW - s) / 2), Math.floor((frameH - s) / 2), s];
}

/** Squares a scan tries (about 20 for 4:3): the largest centred ones and smaller ones on a half-side grid. */
export function scanSquares(frameW, frameH) {
  const out = [];
  const full = Math.min(frameW, frameH);
  // the detector tolerates a face some 0.7x-1.4x the training size, so steps of ~0.75x cover the range
  for (const f of [1, 0.75, 0.56]) {
    const s = Math.round(full * f);
    const stepX = Math.max(1, Math.round(s / 2)), stepY = Math.max(1, Math.round(s / 2));
    const xs = [], ys = [];
    for (let x = 0; x <= frameW - s; x += stepX) xs.push(x);
    for (let y = 0; y <= frameH - s; y += stepY) ys.push(y);
    if (xs[xs.length - 1] !== frameW - s) xs.push(frameW - s);
    if (ys[ys.length - 1] !== frameH - s) ys.push(frameH - s);
    for (const y of ys) for (const x of xs) out.push([x, y, s]);
  }
  return out;
}

function centre(box) { return [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]; }
function moved(a, b) { return Math.max(Math.abs(a[0] - b[0]), Math.abs(a[1] - b[1]), Math.abs(a[2] - b[2])) / Math.max(a[2], b[2]); }

/** sender/framing.FramingDecision: keeps a square while the face stays inside the margin. */
export class FramingDecision {
  constructor(frameW, frameH, cfg = SQUARE) {
    this.cfg = cfg;
    this.frameW = frameW;
    this.frameH = frameH;
    this.square = centreSquare(frameW, frameH);
    this.anchor = null;
    this.outOfMargin = 0;
    this.detections = 0;
    this.noFace = 0;
    this.faceLost = false;
    this.reframes = 0;
  }

  inside(face) {
    const side = this.square[2];
    const [ax, ay] = centre(this.anchor), [fx, fy] = centre(face);
    const aw = this.anchor[2] - this.anchor[0], fw = face[2] - face[0];
    const shift = Math.max(Math.abs(fx - ax), Math.abs(fy - ay)) / side;
    const change = Math.max(fw / Math.max(aw, 1), aw / Math.max(fw, 1));
    return shift <= this.cfg.maxShift && change <= this.cfg.maxScaleChange;
  }

  /** One detection (a face box, or null): the new square when the framing changes, else null. */
  update(face) {
    this.detections += 1;
    if (face === null) {
      this.noFace += 1;
      this.faceLost = true;
      return null;
    }
    this.faceLost = false;
    if (this.anchor !== null && this.inside(face)) { this.outOfMargin = 0; return null; }
    if (this.anchor !== null && ++this.outOfMargin < this.cfg.confirm) return null;
    this.outOfMargin = 0;
    const first = this.anchor === null;
    this.anchor = face;
    const next = faceSquare(face, this.frameW, this.frameH, this.cfg.scale, this.cfg.lift);
    if (!first && moved(this.square, next) <= this.cfg.minChange) return null;
    this.square = next;
    if (!first) this.reframes += 1;
    return next;
  }
}
