#!/usr/bin/python3
"""Parity of the gmi-mnv2-style TorchScript rebuild with the original nsfwjs model in TF.js.

    /usr/bin/python3 tests/reference/test_mobilenet_parity.py [--encoder-dir DIR] [--node NODE]

DIR (default $GMI_ENCODER_DIR, else ${XDG_DATA_HOME:-~/.local/share}/gmi/encoders) is what
scripts/install-encoders.sh wrote. Real photos shipped by python3-skimage are centre-cropped,
resized to 224x224 and fed to both sides (tests/reference/tfjs_reference.mjs runs TF.js).
Checks: logits, softmax probabilities, the pooled 1280-d features, the block_2 / block_5 feature
maps, the top class, forward()'s shapes, and the card's sha256. Exit 0 all pass, 1 a check failed,
2 a prerequisite is missing (torch, node, skimage, the encoder dir): this test fails, never skips.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "gmi-mnv2-style"
IMAGES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle", "camera"]
CLASSES = ["drawing", "hentai", "neutral", "porn", "sexy"]   # nsfwjs' label order
SIZE = 224

# Tolerances, absolute; the block_* feature maps (values up to ~50) relative to max|TF.js value|.
# Measured on the 9 images (tfjs 4.22.0 cpu, torch 1.13 float32): logits 4.8e-6, probs 5.9e-7,
# pooled 3.6e-6, block_2 1.7e-4 (rel 3.5e-6), block_5 1.0e-4 (rel 2.5e-6): float32 rounding, the
# same size as this module's own float32-vs-float64 difference. Dequantising the weights in
# float32 instead of TF.js' double (q * scale + min) alone would give ~1.6e-4 on the logits.
TOL = {"logits": 2e-5, "probs": 5e-6, "pooled": 2e-5, "block_2": 2e-5, "block_5": 2e-5}
RELATIVE = {"block_2", "block_5"}


def missing(msg):
    print("FAIL (prerequisite): " + msg, file=sys.stderr)
    sys.exit(2)


def default_dir():
    d = os.environ.get("GMI_ENCODER_DIR")
    if d:
        return d
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "gmi", "encoders")


def load_images(np):
    try:
        import skimage.data
        from skimage.transform import resize
    except ImportError as e:
        missing("%s (apt-get install python3-skimage)" % e)
    batch = []
    for name in IMAGES:
        try:
            img = getattr(skimage.data, name)()
        except Exception as e:   # noqa: BLE001 (a data file Debian did not ship, ...)
            missing("skimage.data.%s: %s" % (name, e))
        if isinstance(img, tuple):          # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = img[top:top + s, left:left + s].astype(np.float64) / 255.0
        small = resize(crop, (SIZE, SIZE, 3), order=1, anti_aliasing=True, mode="reflect")
        batch.append(np.clip(small, 0.0, 1.0).astype(np.float32))
    return np.stack(batch)       # NHWC float32 in [0,1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder-dir", default=default_dir())
    ap.add_argument("--node", default=shutil.which("node"))
    args = ap.parse_args()

    try:
        import numpy as np
        import torch
    except ImportError as e:
        missing("%s (run with Debian's /usr/bin/python3; apt-get install python3-torch)" % e)
    if not args.node or not os.path.exists(args.node):
        missing("node not found")
    enc = os.path.abspath(args.encoder_dir)
    card_path = os.path.join(enc, NAME, "card.json")
    if not os.path.isfile(card_path):
        missing("%s not found (run scripts/install-encoders.sh --dir %s)" % (card_path, enc))

    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    # --- the card ---------------------------------------------------------------------------
    with open(card_path, encoding="utf-8") as f:
        card = json.load(f)
    check(card.get("name") == NAME and card.get("backend") == "torchscript" and card.get("dim") == 828,
          "card: name %s, backend %s, dim %s" % (card.get("name"), card.get("backend"), card.get("dim")))
    module_path = None
    for fe in card.get("files", []):
        p = os.path.join(enc, NAME, fe["path"])
        with open(p, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        check(digest == fe["sha256"], "card: sha256 of %s" % fe["path"])
        if fe.get("role") == "module":
            module_path = p
    if module_path is None:
        missing("%s lists no module file" % card_path)

    # --- inputs and the TF.js reference ---------------------------------------------------------
    x_nhwc = load_images(np)
    n = x_nhwc.shape[0]
    tmp = tempfile.mkdtemp(prefix="gmi-parity-")
    try:
        inp = os.path.join(tmp, "input.f32")
        x_nhwc.astype("<f4").tofile(inp)
        t0 = time.time()
        r = subprocess.run([args.node, os.path.join(HERE, "tfjs_reference.mjs"), "--encoder-dir", enc,
                            "--input", inp, "--n", str(n), "--out", os.path.join(tmp, "ref")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t_js = time.time() - t0
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            missing("tfjs_reference.mjs failed (exit %d)" % r.returncode)
        sys.stdout.write(r.stdout)
        with open(os.path.join(tmp, "ref", "meta.json")) as f:
            meta = json.load(f)
        ref = {k: np.fromfile(os.path.join(tmp, "ref", k + ".f32"), dtype="<f4").reshape(shape)
               for k, shape in meta["shapes"].items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # --- TorchScript ----------------------------------------------------------------------------
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    m = torch.jit.load(module_path)
    m.eval()
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        t0 = time.time()
        logits = m.classify(x)
        t_pt = time.time() - t0
        pooled = m.pooled(x)
        b2, b5 = m(x)
    ours = {"logits": logits.numpy(), "probs": torch.softmax(logits.double(), dim=1).numpy(),
            "pooled": pooled.numpy(), "block_2": b2.numpy(), "block_5": b5.numpy()}
    print("tfjs %s (%s backend) %.2f s, torchscript %.2f s for %d images"
          % (meta["tfjs"], meta["backend"], t_js, t_pt, n))

    for i, name in enumerate(IMAGES):
        print("torch image %d (%s): logits [%s] top %s" % (
            i, name, ", ".join("%.5f" % v for v in ours["logits"][i]), CLASSES[int(ours["logits"][i].argmax())]))

    for k in ["logits", "probs", "pooled", "block_2", "block_5"]:
        a, b = ours[k].astype(np.float64), ref[k].astype(np.float64)
        if a.shape != b.shape:
            check(False, "%s: shape %s vs TF.js %s" % (k, list(a.shape), list(b.shape)))
            continue
        d = np.abs(a - b)
        rel = d.max() / max(np.abs(b).max(), 1e-30)
        ok = (rel if k in RELATIVE else d.max()) < TOL[k]
        check(bool(ok), "%-8s max|diff| %.3g (mean %.3g, max|ref| %.3g, rel %.2g), tol %g%s"
              % (k, d.max(), d.mean(), np.abs(b).max(), rel, TOL[k], " relative" if k in RELATIVE else ""))
    top_ours = ours["logits"].argmax(1)
    top_ref = ref["probs"].argmax(1)
    check(bool((top_ours == top_ref).all()), "top class agrees on all %d images: %s"
          % (n, ", ".join(CLASSES[c] for c in top_ref)))

    # --- forward geometry -------------------------------------------------------------------
    check(list(b2.shape) == [n, 24, 56, 56] and list(b5.shape) == [n, 32, 28, 28],
          "forward shapes %s %s at 224" % (list(b2.shape), list(b5.shape)))
    outs = card.get("outputs", [])
    check([o.get("channels") for o in outs] == [b2.shape[1], b5.shape[1]], "card outputs match forward channels")
    # other sizes: the topology pads stride-2 layers by a fixed (0,1) (ZeroPadding2D, then a
    # 'valid' 3x3 conv), so each halving is floor((h - 1) / 2) + 1 - 1 ... i.e. (h - 2) // 2 + 1
    def down(h):
        return (h + 1 - 3) // 2 + 1
    for hh, ww in [(255, 301), (32, 32)]:
        with torch.no_grad():
            c2, c5 = m(torch.rand(1, 3, hh, ww))
        e2 = [1, 24, down(down(hh)), down(down(ww))]
        e5 = [1, 32, down(down(down(hh))), down(down(down(ww)))]
        check(list(c2.shape) == e2 and list(c5.shape) == e5 and bool(torch.isfinite(c5).all()),
              "forward at %dx%d: %s %s" % (hh, ww, list(c2.shape), list(c5.shape)))

    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
