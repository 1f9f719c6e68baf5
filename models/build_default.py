"""Recipe for the embedded default model ``models/default/shapes_cnn.onnx``.

Run it with either of::

    python -m onnx_saliency.models.build_default
    python models/build_default.py

It needs the ``parity`` extra (torch) plus onnxruntime, numpy and opencv. It is fully
self-contained (no network, no downloaded data) and deterministic for a given torch build
with 2 threads:

1. generates a procedural, seeded dataset: 64x64 RGB images of one coloured shape
   (circle, square, triangle, cross, star) on a textured, noisy background of varied
   colour, with a few soft distractor blobs. Every sample's box and binary mask are known.
   Scenes are rendered at 64..128 px and resized to 64 px, so the model is robust to the
   resize step of the preprocessing;
2. trains a tiny CNN (Conv-BN-ReLU stem, a residual block whose Add joins two ReLU outputs,
   an overlapping MaxPool k3 s2 p1, a second conv stage, global average pooling, a Linear
   head) on CPU: about 10 s of data generation plus ~60 s of training on 2 idle cores
   (much longer when the cores are shared);
3. exports it with the legacy (TorchScript) ONNX exporter at opset 17 with
   ``TrainingMode.PRESERVE`` so the BatchNormalization nodes stay in the graph (the
   ``EVAL`` mode would fold them into the convolutions);
4. writes the preprocessing contract into ``metadata_props`` (``onnx_saliency.*`` keys),
   checks onnxruntime against torch, renders the sample images with their annotations and
   updates the embedded model's entry (keyed by sha256) in ``models/manifest.json``.

The preprocessing contract (preset ``tf``): RGB, resize the shorter side to 64 (bilinear),
centre-crop 64x64, ``x = pixel / 127.5 - 1``, NCHW float32. The output is raw logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "default"
MODEL_PATH = OUT_DIR / "shapes_cnn.onnx"
SAMPLES_DIR = OUT_DIR / "samples"
MANIFEST_PATH = HERE / "manifest.json"

MODEL_NAME = "shapes_cnn"
CLASSES = ["circle", "square", "triangle", "cross", "star"]
SIZE = 64  # network input size (and the 64-px design space of the generator)

SEED = 20240607
N_TRAIN = 10_000
EPOCHS = 6
N_HELDOUT = 2_000
BATCH = 64
LR = 1e-2
OPSET = 17
MAX_IR_VERSION = 10


# ---------------------------------------------------------------------------------------------
# procedural data
# ---------------------------------------------------------------------------------------------
def _shape_polygon(cls: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray | None:
    """Vertices (K, 2) of a shape of "radius" r (px) centred at (cx, cy); None for a circle."""
    if cls == "circle":
        return None
    if cls == "square":
        ang = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full(4, r * 1.25)  # half side ~ 0.88 r
    elif cls == "triangle":
        ang = theta + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r * 1.3)
    elif cls == "cross":
        w, L = 0.36 * r, 1.08 * r  # half arm width, arm length
        pts = np.array([(w, w), (L, w), (L, -w), (w, -w), (w, -L), (-w, -L),
                        (-w, -w), (-L, -w), (-L, w), (-w, w), (-w, L), (w, L)], np.float64)
        c, s = np.cos(theta), np.sin(theta)
        rot = pts @ np.array([[c, s], [-s, c]])
        return rot + np.array([cx, cy])
    elif cls == "star":
        ang = theta + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r * 1.2, r * 0.5)
    else:
        raise ValueError(cls)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _draw_shape_alpha(h: int, w: int, cls: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (h, w)."""
    shift = 4
    m = np.zeros((h, w), np.uint8)
    poly = _shape_polygon(cls, cx, cy, r, theta)
    if poly is None:
        cv2.circle(m, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), 255, -1, cv2.LINE_AA, shift)
    else:
        cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, shift)
    return m.astype(np.float32) / 255.0


_NOISE_POOL: np.ndarray | None = None


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Unit Gaussian noise (h, w, 3) float32: a random window of a fixed, seeded noise field.

    Drawing fresh normals for every image dominated the generation time; windows of one large
    field are just as good as pixel noise and ~10x cheaper.
    """
    global _NOISE_POOL
    if _NOISE_POOL is None:
        _NOISE_POOL = np.random.default_rng(12345).standard_normal((512, 512, 3), dtype=np.float32)
    y0 = int(rng.integers(0, _NOISE_POOL.shape[0] - h + 1))
    x0 = int(rng.integers(0, _NOISE_POOL.shape[1] - w + 1))
    return _NOISE_POOL[y0:y0 + h, x0:x0 + w]


def _background(rng: np.random.Generator, h: int, w: int, k: float) -> np.ndarray:
    """Textured background, float32 (h, w, 3) in [0, 255]; k = pixels per 64-space unit."""
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    c2 = np.clip(c1 + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    phi = rng.uniform(0, 2 * np.pi)
    t = xx * np.float32(np.cos(phi)) + yy * np.float32(np.sin(phi))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1 + (c2 - c1) * t[..., None]
    kind = rng.integers(0, 4)
    if kind == 0:  # low-frequency colour noise
        g = int(rng.integers(2, 7))
        grid = rng.normal(0, rng.uniform(15, 45), (g, g, 3)).astype(np.float32)
        img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes
        f = rng.uniform(0.08, 0.5) / k
        a = rng.uniform(0, np.pi)
        amp = rng.uniform(8, 30)
        s = np.sin((xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a))) * np.float32(f * 2 * np.pi)
                   + np.float32(rng.uniform(0, 6.3)))
        img += s[..., None] * (amp * rng.uniform(0.3, 1.0, 3)).astype(np.float32)
    elif kind == 2:  # checker / grid texture
        p = rng.uniform(3, 10) * k
        s = ((np.floor(xx / p) + np.floor(yy / p)) % 2) * 2 - 1
        img += np.float32(rng.uniform(5, 20)) * s[..., None]
    # kind 3: plain gradient
    # fine grain: blurred noise
    grain = _noise(rng, h, w) * np.float32(rng.uniform(3, 12))
    img += cv2.GaussianBlur(grain, (0, 0), 0.7 * k)
    return np.clip(img, 0, 255, out=img)


def _distractors(rng: np.random.Generator, img: np.ndarray, k: float, n: int) -> None:
    """Soft irregular blobs (in place): unions of small ellipses, blurred, alpha-blended."""
    h, w = img.shape[:2]
    R = int(np.ceil(20 * k))  # half size of the local patch that holds one blob and its blur
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        px0, py0 = int(cx) - R, int(cy) - R  # patch origin (may lie outside the image)
        m = np.zeros((2 * R, 2 * R), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            ex, ey = cx + rng.normal(0, 3 * k), cy + rng.normal(0, 3 * k)
            ax = (max(1, int(rng.uniform(1.5, 5.5) * k)), max(1, int(rng.uniform(1.5, 5.5) * k)))
            cv2.ellipse(m, (int(ex) - px0, int(ey) - py0), ax, float(rng.uniform(0, 180)), 0, 360, 255, -1,
                        cv2.LINE_AA)
        a = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), rng.uniform(0.8, 2.0) * k)
        a = a[..., None] * np.float32(rng.uniform(0.5, 1.0))
        col = rng.uniform(0, 255, 3).astype(np.float32)
        x0, y0, x1, y1 = max(px0, 0), max(py0, 0), min(px0 + 2 * R, w), min(py0 + 2 * R, h)
        if x1 <= x0 or y1 <= y0:
            continue
        sub = img[y0:y1, x0:x1]
        sub += (col - sub) * a[y0 - py0:y1 - py0, x0 - px0:x1 - px0]


def _object_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(30):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - local_mean))
        if d > best_d:
            best, best_d = c, d
        if d >= 100:
            break
    return best.astype(np.float32)


def render_scene(rng: np.random.Generator, w: int, h: int, objects: list[dict], k: float,
                 n_distractors: int | None = None):
    """Render objects {cls, cx, cy, r, theta} (file pixels) on a random background.

    Returns (uint8 RGB image (h, w, 3), list of binary masks (h, w) bool, list of boxes
    [x0, y0, x1, y1] with x1/y1 exclusive).
    """
    img = _background(rng, h, w, k)
    if n_distractors is None:
        n_distractors = int(rng.integers(1, 5))
    _distractors(rng, img, k, n_distractors)
    masks, boxes = [], []
    for ob in objects:
        a = _draw_shape_alpha(h, w, ob["cls"], ob["cx"], ob["cy"], ob["r"], ob["theta"])
        sel = a > 0.5
        col = _object_colour(rng, img[sel].mean(axis=0) if sel.any() else img.mean(axis=(0, 1)))
        # mild shading across the object so it is not a perfectly flat colour
        yy = np.arange(h, dtype=np.float32)[:, None]
        xx = np.arange(w, dtype=np.float32)[None, :]
        phi = rng.uniform(0, 2 * np.pi)
        g = rng.uniform(0, 0.2) / max(ob["r"], 1)
        shade = 1 + (xx - np.float32(ob["cx"])) * np.float32(g * np.cos(phi)) \
            + (yy - np.float32(ob["cy"])) * np.float32(g * np.sin(phi))
        fill = np.clip(col * shade[..., None], 0, 255)
        img += (fill - img) * a[..., None]
        ys, xs = np.nonzero(sel)
        masks.append(sel)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    img += _noise(rng, h, w) * np.float32(rng.uniform(1, 8))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks, boxes


def _random_object(rng: np.random.Generator, cls: str, size: int, k: float, r_range=(9.0, 20.0)) -> dict:
    r = rng.uniform(*r_range)
    ext = r * 1.3 + 2  # conservative half extent of any shape
    cx = rng.uniform(ext, SIZE - ext)
    cy = rng.uniform(ext, SIZE - ext)
    return {"cls": cls, "cx": cx * k, "cy": cy * k, "r": r * k, "theta": rng.uniform(0, 2 * np.pi)}


def make_sample(rng: np.random.Generator, label: int):
    """One 64x64 training/eval sample: (uint8 RGB (64,64,3), label, box, mask (64,64) bool)."""
    s = int(rng.integers(SIZE, 2 * SIZE + 1)) if rng.random() < 0.7 else SIZE
    k = s / SIZE
    ob = _random_object(rng, CLASSES[label], s, k)
    img, masks, boxes = render_scene(rng, s, s, [ob], k)
    mask = masks[0]
    if s != SIZE:
        interp = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_AREA
        img = cv2.resize(img, (SIZE, SIZE), interpolation=interp)
        mask = cv2.resize(mask.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST).astype(bool)
        ys, xs = np.nonzero(mask)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    else:
        box = boxes[0]
    return img, label, box, mask


def make_dataset(seed: int, n: int):
    """n samples with balanced labels: images uint8 (n,64,64,3), labels, boxes (n,4), masks."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    imgs = np.empty((n, SIZE, SIZE, 3), np.uint8)
    boxes = np.empty((n, 4), np.int32)
    masks = np.empty((n, SIZE, SIZE), bool)
    for i, y in enumerate(labels):
        imgs[i], _, boxes[i], masks[i] = make_sample(rng, int(y))
    return imgs, labels.astype(np.int64), boxes, masks


def normalise(imgs_uint8_nhwc: np.ndarray) -> np.ndarray:
    """The ``tf`` preset: x = pixel / 127.5 - 1, NHWC uint8 RGB -> NCHW float32."""
    x = imgs_uint8_nhwc.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_file(path: Path) -> np.ndarray:
    """Exactly the metadata contract: RGB, shorter side -> 64 (bilinear), centre crop 64, tf."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    sc = SIZE / min(h, w)
    nw, nh = max(SIZE, int(round(w * sc))), max(SIZE, int(round(h * sc)))
    if (nw, nh) != (w, h):
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x0, y0 = (nw - SIZE) // 2, (nh - SIZE) // 2
    return normalise(rgb[None, y0:y0 + SIZE, x0:x0 + SIZE])


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def build_model(num_classes: int):
    import torch.nn as nn

    def cbr(i, o, s=1):
        return nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()

    class ResidualBlock(nn.Module):
        """out = x + relu(bn2(conv2(relu(bn1(conv1(x)))))): the Add joins two ReLU outputs."""

        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1, self.relu1 = cbr(c, c)
            self.conv2, self.bn2, self.relu2 = cbr(c, c)

        def forward(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            y = self.relu2(self.bn2(self.conv2(y)))
            return x + y

    class ShapesCNN(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv1, self.bn1, self.relu1 = cbr(3, 16, 2)         # 64 -> 32
            self.block = ResidualBlock(16)                           # 32
            self.pool = nn.MaxPool2d(3, 2, 1)                        # 32 -> 16, overlapping windows
            self.conv2, self.bn2, self.relu2 = cbr(16, 32)           # 16
            self.conv3, self.bn3, self.relu3 = cbr(32, 48)           # 16: last spatial feature map
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(48, num_classes)

        def forward(self, x):
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.block(x)
            x = self.pool(x)
            x = self.relu2(self.bn2(self.conv2(x)))
            x = self.relu3(self.bn3(self.conv3(x)))
            return self.fc(self.flatten(self.gap(x)))

    return ShapesCNN(num_classes)


def train(model, seed: int):
    import torch
    import torch.nn.functional as F

    t0 = time.time()
    imgs, labels, _, _ = make_dataset(seed + 1000, N_TRAIN)
    print(f"generated {N_TRAIN} training images in {time.time() - t0:.1f} s", flush=True)
    x_all = torch.from_numpy(normalise(imgs))
    y_all = torch.from_numpy(labels)
    del imgs

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps_per_epoch = N_TRAIN // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch,
                                                pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    for ep in range(EPOCHS):
        t0 = time.time()
        perm = torch.randperm(len(y_all), generator=g)
        model.train()
        tot, correct, loss_sum = 0, 0, 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            xb, yb = x_all[idx], y_all[idx]
            # the classes are invariant under flips and 90-degree rotations: free augmentation
            aug = int(torch.randint(0, 8, (), generator=g))
            if aug & 1:
                xb = xb.flip(3)
            if aug >> 1:
                xb = torch.rot90(xb, aug >> 1, (2, 3))
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(yb)
        print(f"epoch {ep + 1}/{EPOCHS}: loss {loss_sum / tot:.4f}  train acc {correct / tot:.4f}  "
              f"({time.time() - t0:.1f} s)", flush=True)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export_onnx(model, path: Path, meta: dict[str, str]) -> str:
    """Legacy export with BN kept; returns the default layer tensor name."""
    import torch

    model.eval()
    dummy = torch.zeros(1, 3, SIZE, SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # "legacy TorchScript-based ONNX export" (deliberate), and the constant-folding advice,
        # which is for models in training mode (ours is in eval(); folding is harmless here)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        _export(torch, model, dummy, path)
    return _finish_export(path, meta)


def _export(torch, model, dummy, path: Path) -> None:
    torch.onnx.export(
        model, (dummy,), str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        # PRESERVE + eval(): BatchNormalization is exported (in inference mode) instead of being
        # folded into the Conv weights by the EVAL-mode peephole pass.
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )


def _finish_export(path: Path, meta: dict[str, str]) -> str:
    import onnx

    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    if "BatchNormalization" not in ops:
        raise RuntimeError("the export folded BatchNormalization; expected it to be kept")
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            for a in n.attribute:
                if a.name == "training_mode" and a.i != 0:
                    raise RuntimeError(f"{n.name} exported in training mode")
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    opsets = {o.domain: o.version for o in m.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise RuntimeError(f"unexpected opset {opsets}")

    producers = {o: n for n in m.graph.node for o in n.output}
    gaps = [n for n in m.graph.node if n.op_type in ("GlobalAveragePool", "AveragePool", "ReduceMean")]
    if len(gaps) != 1:
        raise RuntimeError(f"expected one global pooling node, found {[n.op_type for n in gaps]}")
    default_layer = gaps[0].input[0]
    if producers[default_layer].op_type != "Relu":
        raise RuntimeError(f"the pooling input {default_layer} is not a Relu output")

    meta = dict(meta, **{"onnx_saliency.default_layer": default_layer})
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.doc_string = ("Tiny CNN trained on procedurally generated shapes; the embedded default model of "
                    "onnx-saliency. Recipe: onnx_saliency.models.build_default")
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return default_layer


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
# (file W, file H, alternatives for the classes in the image, index). The file is named
# "<classes>_<index>.png" after the first alternative that the model gets right. Files are larger
# than 64 px so the resize step is exercised; the wide one also exercises the centre crop (its
# objects sit inside the crop). Two-object scenes: a model trained on single shapes with global
# average pooling does not rank every pair top-2 (circle is learned as "no corners", and
# triangle + cross looks like a star), hence the alternatives.
SAMPLE_SPECS = [
    (96, 96, [["circle"]], 0),
    (96, 96, [["square"]], 0),
    (96, 96, [["triangle"]], 0),
    (96, 96, [["cross"]], 0),
    (96, 96, [["star"]], 0),
    (64, 64, [["circle"]], 1),
    (128, 96, [["circle", "square"], ["square", "triangle"], ["triangle", "cross"]], 0),
]


def _sample_objects(rng: np.random.Generator, w: int, h: int, classes: list[str]) -> list[dict]:
    k = min(w, h) / SIZE
    crop_x0 = (w - min(w, h)) / 2  # centre square of the file = the network's crop
    if len(classes) == 1:
        ob = _random_object(rng, classes[0], min(w, h), k, r_range=(12.0, 18.0))
        ob["cx"] += crop_x0
        return [ob]
    # two objects: left and right halves of the crop, moderately sized, not overlapping
    obs = []
    for j, cls in enumerate(classes):
        r = rng.uniform(9.0, 11.0)
        ext = r * 1.3 + 1
        cx = rng.uniform(ext, SIZE / 2 - 1) if j == 0 else rng.uniform(SIZE / 2 + 1, SIZE - ext)
        cy = rng.uniform(ext, SIZE - ext)
        obs.append({"cls": cls, "cx": crop_x0 + cx * k, "cy": cy * k, "r": r * k,
                    "theta": rng.uniform(0, 2 * np.pi)})
    return obs


def write_samples(sess, seed: int) -> dict:
    import tempfile

    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for old in SAMPLES_DIR.glob("*.png"):
        old.unlink()
    rng = np.random.default_rng(seed)
    images = {}
    for w, h, alternatives, index in SAMPLE_SPECS:
        found = None
        for classes in alternatives:
            name = "_".join(classes) + f"_{index}.png"
            for attempt in range(100):
                obs = _sample_objects(rng, w, h, classes)
                img, masks, boxes = render_scene(rng, w, h, obs, min(w, h) / SIZE,
                                                 n_distractors=int(rng.integers(2, 4)))
                with tempfile.TemporaryDirectory() as td:
                    tmp = Path(td) / name
                    cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                    logits = sess.run(None, {"input": preprocess_file(tmp)})[0][0]
                p = np.exp(logits - logits.max())
                p /= p.sum()
                want = sorted(CLASSES.index(c) for c in classes)
                top = sorted(np.argsort(-p)[:len(classes)].tolist())
                if top != want:
                    continue
                if len(classes) == 1 and p[want[0]] < 0.95:
                    continue
                if len(classes) > 1 and min(p[want]) < 0.2:
                    continue
                found = classes
                break
            if found:
                break
        if not found:
            raise RuntimeError(f"could not render a correctly classified image of {alternatives}")
        cv2.imwrite(str(SAMPLES_DIR / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images[name] = {
            "file_size_wh": [w, h],
            "objects": [{"label": c, "class_index": CLASSES.index(c), "box": b} for c, b in zip(classes, boxes)],
        }
        print(f"  {name} ({w}x{h}, attempt {attempt + 1}): "
              + ", ".join(f"{c}={p[CLASSES.index(c)]:.3f}" for c in classes), flush=True)
    ann = {
        "_about": ("Procedurally rendered by onnx_saliency.models.build_default (seeded); exact ground truth. "
                   "box = [x0, y0, x1, y1] in file pixels, x1/y1 exclusive (the tight bounding box of the "
                   "object's binary mask, coverage > 0.5). class_index indexes onnx_saliency.labels of "
                   "shapes_cnn.onnx. The model input is RGB, shorter side resized to 64, centre crop 64, "
                   "x = pixel/127.5 - 1; every object lies inside the centre crop. Each file is "
                   "classified correctly by the shipped model (multi-object files: the top-k classes are "
                   "exactly the k objects' classes)."),
        "images": images,
    }
    (SAMPLES_DIR / "annotations.json").write_text(json.dumps(ann, indent=1) + "\n")
    return ann


# ---------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------
def update_manifest(sha: str, default_layer: str, acc: float) -> None:
    doc = json.loads(MANIFEST_PATH.read_text()) if MANIFEST_PATH.exists() else {"models": {}}
    models = {k: v for k, v in doc.get("models", {}).items() if v.get("name") != MODEL_NAME}
    models[sha] = {
        "name": MODEL_NAME,
        "preset": "tf",
        "resize": SIZE,
        "crop": SIZE,
        "resize_mode": "shorter",
        "layout": "NCHW",
        "default_layer": default_layer,
        "labels": "embedded",
        "output": "logits",
        "notes": (f"Embedded default model (models/default/shapes_cnn.onnx), built by "
                  f"onnx_saliency.models.build_default. {len(CLASSES)} classes {CLASSES} in metadata "
                  f"onnx_saliency.labels; held-out accuracy {acc:.4f}. Conv/BN/ReLU, residual Add, "
                  f"MaxPool k3 s2 p1, GlobalAveragePool, Gemm; BatchNormalization kept (not folded)."),
    }
    # embedded model first, then the rest in their previous order
    doc["models"] = {sha: models.pop(sha), **models}
    MANIFEST_PATH.write_text(json.dumps(doc, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
def _samples_only() -> int:
    """Re-render the samples and the manifest entry for the existing model (no torch needed)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(MODEL_PATH))
    meta = {p.key: p.value for p in m.metadata_props}
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    x_eval, y_eval, _, _ = make_dataset(SEED + 7, N_HELDOUT)
    xe = normalise(x_eval)
    logits = np.concatenate([sess.run(None, {"input": xe[i:i + 500]})[0] for i in range(0, len(xe), 500)])
    acc = float((logits.argmax(1) == y_eval).mean())
    print(f"held-out accuracy (ORT): {acc:.4f} on {N_HELDOUT} images", flush=True)
    print("samples:", flush=True)
    write_samples(sess, SEED + 99)
    sha = sha256_file(MODEL_PATH)
    update_manifest(sha, meta["onnx_saliency.default_layer"], acc)
    print(f"manifest entry {sha}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples-only", action="store_true",
                    help="keep the existing shapes_cnn.onnx; only re-render the samples and the manifest entry")
    args = ap.parse_args(argv)
    if args.samples_only:
        return _samples_only()

    import onnx
    import onnxruntime as ort
    import torch

    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)

    model = build_model(len(CLASSES))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ShapesCNN: {n_params} parameters; classes {CLASSES}", flush=True)
    t0 = time.time()
    train(model, SEED)
    t_train = time.time() - t0
    print(f"training took {t_train:.1f} s", flush=True)

    x_eval, y_eval, _, _ = make_dataset(SEED + 7, N_HELDOUT)
    xe = normalise(x_eval)
    with torch.no_grad():
        logits_t = torch.cat([model(torch.from_numpy(xe[i:i + 500])) for i in range(0, len(xe), 500)]).numpy()
    acc = float((logits_t.argmax(1) == y_eval).mean())
    per_class = {c: float((logits_t.argmax(1)[y_eval == i] == i).mean()) for i, c in enumerate(CLASSES)}
    print(f"held-out accuracy (torch): {acc:.4f} on {N_HELDOUT} images; per class "
          + ", ".join(f"{c} {a:.3f}" for c, a in per_class.items()), flush=True)
    if acc < 0.95:
        raise SystemExit(f"accuracy {acc:.4f} < 0.95")

    meta = {
        "onnx_saliency.preset": "tf",
        "onnx_saliency.resize": str(SIZE),
        "onnx_saliency.crop": str(SIZE),
        "onnx_saliency.resize_mode": "shorter",
        "onnx_saliency.layout": "NCHW",
        "onnx_saliency.labels": json.dumps(CLASSES),
        "source": (f"onnx_saliency.models.build_default: procedurally generated shapes dataset "
                   f"(seed {SEED}, {N_TRAIN} 64x64 training images x {EPOCHS} epochs with flip/rot90 augmentation, shapes "
                   f"{CLASSES} on textured noisy backgrounds with distractor blobs), trained with "
                   f"torch {torch.__version__} on CPU, exported with the legacy exporter "
                   f"(opset {OPSET}, TrainingMode.PRESERVE, BN kept); held-out accuracy {acc:.4f} "
                   f"on {N_HELDOUT} images. Preprocessing: RGB, resize shorter side to 64 "
                   f"(bilinear), centre-crop 64, x = pixel/127.5 - 1, NCHW float32. Output: logits."),
    }
    default_layer = export_onnx(model, MODEL_PATH, meta)

    m = onnx.load(str(MODEL_PATH))
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    logits_o = np.concatenate([sess.run(None, {"input": xe[i:i + 500]})[0] for i in range(0, len(xe), 500)])
    max_diff = float(np.abs(logits_o - logits_t).max())
    acc_o = float((logits_o.argmax(1) == y_eval).mean())
    print(f"ONNX: ir_version {m.ir_version}, opset {[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}, "
          f"ops {ops}", flush=True)
    print(f"ONNX vs torch: max |dlogit| {max_diff:.2e} over {len(xe)} images; ORT held-out accuracy {acc_o:.4f}",
          flush=True)
    if max_diff >= 1e-4:
        raise SystemExit(f"ORT/torch mismatch {max_diff:.2e} >= 1e-4")
    print(f"default layer: {default_layer}", flush=True)

    print("samples:", flush=True)
    write_samples(sess, SEED + 99)

    sha = sha256_file(MODEL_PATH)
    update_manifest(sha, default_layer, acc)
    size = MODEL_PATH.stat().st_size
    print(f"wrote {MODEL_PATH} ({size} bytes, sha256 {sha})", flush=True)
    if size > 500_000:
        raise SystemExit("model file larger than 500 kB")
    print(f"total {time.time() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
