#!/usr/bin/python3
"""Makes small TorchScript encoders with their cards, plus reference embeddings, for the
C++ tests of the TorchScript backend. Run with Debian's python3-torch:

    /usr/bin/python3 tests/reference/make_tiny_encoders.py --out DIR

Writes DIR/maps/ (a conv net returning two feature maps: card reduces them with
gram_upper and mean_std), DIR/vector/ (returns one [N, D] tensor, as CLIP's image tower),
test images DIR/images/*.png at the module's input size, and DIR/expected.json: the rows
the card's recipe gives, computed here with torch, independently of the C++ code.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
SIZE = 64


class Maps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.tanh(self.b(a))
        return a, b


class Vector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def card(name, module_file, outputs, dim, folder):
    return {
        "card_version": 1, "name": name, "version": "test1", "modality": "image",
        "backend": "torchscript", "dim": dim, "default_gamma": 1.5,
        "input": {"size": SIZE, "resize": "shorter_side", "filter": "bicubic", "min_side": SIZE,
                  "scale": 255.0, "mean": MEAN, "std": STD},
        "outputs": outputs,
        "files": [{"role": "module", "path": module_file, "sha256": sha256(os.path.join(folder, module_file))}],
    }


def l2(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reduce(t, out):
    if out["reduce"] == "none":
        return t.flatten(1)
    f = t.flatten(2)
    if out["reduce"] == "gram_upper":
        g = f @ f.transpose(1, 2) / f.shape[2]
        c = g.shape[1]
        rows = [g[:, i, j] for i in range(c) for j in range(i, c)]
        return torch.stack(rows, dim=1)
    return torch.cat([f.mean(2), f.std(2, unbiased=False)], dim=1)


def row(module, outputs, x):
    ys = module(x)
    if isinstance(ys, torch.Tensor):
        ys = (ys,)
    total = sum(o["weight"] for o in outputs)
    parts = []
    for y, o in zip(ys, outputs):
        r = reduce(y, o)
        p = o.get("power", 1.0)
        if p != 1.0:
            r = torch.sign(r) * r.abs() ** p
        parts.append(l2(r) * (o["weight"] / total) ** 0.5)
    return l2(torch.cat(parts, dim=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    pixels = []
    for i in range(a.images):
        im = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(im).save(os.path.join(a.out, "images", f"{i}.png"))
        pixels.append(im)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = {}
    specs = {
        "maps": (Maps(), [{"name": "a", "channels": 8, "reduce": "gram_upper", "weight": 2.0, "power": 0.5},
                          {"name": "b", "channels": 12, "reduce": "mean_std", "weight": 1.0}], 8 * 9 // 2 + 24),
        "vector": (Vector(), [{"name": "embedding", "reduce": "none", "weight": 1.0}], 16),
    }
    for name, (module, outputs, dim) in specs.items():
        folder = os.path.join(a.out, name)
        os.makedirs(folder, exist_ok=True)
        module.eval()
        scripted = torch.jit.script(module)
        scripted.save(os.path.join(folder, "module.pt"))
        with open(os.path.join(folder, "card.json"), "w") as f:
            json.dump(card("tiny-" + name, "module.pt", outputs, dim, folder), f, indent=2)
        with torch.no_grad():
            expected[name] = row(module, outputs, x).tolist()
    with open(os.path.join(a.out, "expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
