#!/usr/bin/python3
"""Rebuild nsfwjs' pre-trained MobileNetV2 (TF.js layers model) in PyTorch and save it as TorchScript.

    /usr/bin/python3 scripts/tfjs_to_torchscript.py --package DIR --out OUT_DIR

DIR is an unpacked `npm pack nsfwjs@4.4.0` (the folder holding package.json, or its parent with
`package/`). The model bundle dist/models/mobilenet_v2/model.min.js and its weight shard
group1-shard1of1.min.js are JavaScript modules; they are parsed here as DATA (a strict parser for
the JavaScript object literal / string they export), never executed.

Writes OUT_DIR/gmi-mnv2-style/{mobilenet_v2_style.pt,card.json} (card: schemas/encoder-card.md).
The scripted module:
  forward(x)  -> (block_2, block_5): x [N,3,H,W] float32 RGB in [0,1]; only blocks 0-5 run
  classify(x) -> logits [N,5] (the topology's final softmax is left out)
  pooled(x)   -> [N,1280] average-pooled final feature map (the classifier head's input)

Exit codes: 0 done, 2 malformed bundle / unexpected topology (the message names the file),
1 environment failure (I/O, torch missing).
"""

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

ENCODER_NAME = "gmi-mnv2-style"
MODULE_FILE = "mobilenet_v2_style.pt"
NPM_NAME = "nsfwjs"
NPM_VERSION = "4.4.0"
BUNDLE_DIR = "dist/models/mobilenet_v2"
MODEL_JS = "model.min.js"


class BundleError(Exception):
    """A malformed bundle or a topology this converter does not understand (exit 2)."""


# ----------------------------------------------------------------------------------------------
# A strict parser for the JavaScript literal a minified bundle exports. Accepts: objects with
# identifier / string / number keys, arrays, double- or single-quoted strings, numbers (".5",
# "-1e-3", hex), true/false/null, the minifier's !0 / !1, `void 0` (undefined -> None) and the
# 1/0, -1/0, 0/0 spellings of Infinity/NaN. Anything else (a call, a variable) is an error.
# ----------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_IDENT_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0",
            "\\": "\\", "'": "'", '"': '"', "/": "/", "\n": ""}


class _LiteralParser:
    def __init__(self, text, pos, where):
        self.s = text
        self.i = pos
        self.where = where

    def fail(self, msg):
        lo = max(0, self.i - 40)
        raise BundleError("%s: %s at offset %d (near %r)" % (self.where, msg, self.i, self.s[lo:self.i + 40]))

    def ws(self):
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif s.startswith("/*", self.i):
                j = s.find("*/", self.i + 2)
                if j < 0:
                    self.fail("unterminated comment")
                self.i = j + 2
            elif s.startswith("//", self.i):
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j + 1
            else:
                break

    def peek(self):
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def expect(self, c):
        if self.peek() != c:
            self.fail("expected %r" % c)
        self.i += 1

    def value(self, depth=0):
        if depth > 200:
            self.fail("nesting too deep")
        c = self.peek()
        if c == "{":
            return self.obj(depth)
        if c == "[":
            return self.arr(depth)
        if c in "\"'":
            return self.string()
        if c == "!":
            self.i += 1
            c2 = self.peek()
            if c2 in "01" and not self.s[self.i + 1:self.i + 2].isdigit():
                self.i += 1
                return c2 == "0"          # !0 -> true, !1 -> false
            self.fail("unsupported '!' expression")
        if c == "-" or c == "+" or c.isdigit() or c == ".":
            return self.number()
        m = _IDENT_RE.match(self.s, self.i)
        if m:
            word = m.group(0)
            if word in ("true", "false", "null"):
                self.i = m.end()
                return {"true": True, "false": False, "null": None}[word]
            if word == "void":
                self.i = m.end()
                self.ws()
                if self.s[self.i:self.i + 1] == "0":
                    self.i += 1
                    return None
            if word in ("Infinity", "NaN"):
                self.i = m.end()
                return float("inf") if word == "Infinity" else float("nan")
            self.fail("unsupported identifier %r (the bundle must be a plain literal)" % word)
        self.fail("unexpected character")

    def number(self):
        sign = 1.0
        c = self.s[self.i]
        if c in "+-":
            sign = -1.0 if c == "-" else 1.0
            self.i += 1
            self.ws()
        m = _NUM_RE.match(self.s, self.i)
        if not m:
            self.fail("bad number")
        tok = m.group(0)
        self.i = m.end()
        v = float(int(tok, 16)) if tok[:2] in ("0x", "0X") else float(tok)
        # 1/0, 0/0 (Infinity, NaN) as minifiers write them
        if self.peek() == "/" and not self.s.startswith("//", self.i) and not self.s.startswith("/*", self.i):
            self.i += 1
            self.ws()
            m2 = _NUM_RE.match(self.s, self.i)
            if not m2 or float(m2.group(0)) != 0.0:
                self.fail("unsupported division")
            self.i = m2.end()
            v = float("nan") if v == 0.0 else float("inf")
        v *= sign
        if v == int(v) and abs(v) < 2 ** 53 and "." not in tok and "e" not in tok.lower():
            return int(v)
        return v

    def string(self):
        q = self.s[self.i]
        self.i += 1
        out = []
        s, n = self.s, len(self.s)
        start = self.i
        while True:
            if self.i >= n:
                self.fail("unterminated string")
            c = s[self.i]
            if c == q:
                out.append(s[start:self.i])
                self.i += 1
                return "".join(out)
            if c == "\n":
                self.fail("newline in string")
            if c == "\\":
                out.append(s[start:self.i])
                e = s[self.i + 1:self.i + 2]
                if e == "x":
                    out.append(chr(int(s[self.i + 2:self.i + 4], 16)))
                    self.i += 4
                elif e == "u":
                    if s[self.i + 2:self.i + 3] == "{":
                        j = s.index("}", self.i)
                        out.append(chr(int(s[self.i + 3:j], 16)))
                        self.i = j + 1
                    else:
                        out.append(chr(int(s[self.i + 2:self.i + 6], 16)))
                        self.i += 6
                elif e in _ESCAPES:
                    out.append(_ESCAPES[e])
                    self.i += 2
                else:
                    out.append(e)
                    self.i += 2
                start = self.i
            else:
                self.i += 1

    def key(self):
        c = self.peek()
        if c in "\"'":
            return self.string()
        m = _IDENT_RE.match(self.s, self.i)
        if m:
            self.i = m.end()
            return m.group(0)
        m = _NUM_RE.match(self.s, self.i)
        if m:
            self.i = m.end()
            return m.group(0)
        self.fail("bad object key")

    def obj(self, depth):
        self.expect("{")
        out = {}
        if self.peek() == "}":
            self.i += 1
            return out
        while True:
            k = self.key()
            self.expect(":")
            out[k] = self.value(depth + 1)
            c = self.peek()
            self.i += 1
            if c == "}":
                return out
            if c != ",":
                self.i -= 1
                self.fail("expected ',' or '}'")
            if self.peek() == "}":        # trailing comma
                self.i += 1
                return out

    def arr(self, depth):
        self.expect("[")
        out = []
        if self.peek() == "]":
            self.i += 1
            return out
        while True:
            out.append(self.value(depth + 1))
            c = self.peek()
            self.i += 1
            if c == "]":
                return out
            if c != ",":
                self.i -= 1
                self.fail("expected ',' or ']'")
            if self.peek() == "]":
                self.i += 1
                return out


# The bundles are browserify "UMD" wrappers: {1:[function(a,b,c){b.exports=<LITERAL>},{}]},{},[1]
_EXPORT_RE = re.compile(r"\{\s*1\s*:\s*\[\s*function\s*\(\s*([A-Za-z_$][\w$]*)\s*,\s*([A-Za-z_$][\w$]*)\s*,"
                        r"\s*([A-Za-z_$][\w$]*)\s*\)\s*\{\s*(?:\2\.exports|module\.exports)\s*=")


def parse_bundle(path):
    """The literal exported by a bundle file, parsed as data."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise BundleError("%s: file not found" % path)
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError("%s: cannot read: %s" % (path, e))
    found = list(_EXPORT_RE.finditer(text))
    if len(found) != 1:
        raise BundleError("%s: expected exactly one 'exports=' literal in the module wrapper, found %d"
                          % (path, len(found)))
    p = _LiteralParser(text, found[0].end(), path)
    v = p.value()
    p.ws()
    if p.s[p.i:p.i + 1] not in ("}", ";"):
        p.fail("literal not followed by the end of the module function")
    return v


# ----------------------------------------------------------------------------------------------
# Topology + weights
# ----------------------------------------------------------------------------------------------

def load_model(pkg_dir):
    """Returns (layers, weights {name: np.float32 array}, info) from the unpacked package."""
    import numpy as np

    bdir = os.path.join(pkg_dir, BUNDLE_DIR)
    model_path = os.path.join(bdir, MODEL_JS)
    mj = parse_bundle(model_path)
    if not isinstance(mj, dict) or "modelTopology" not in mj or "weightsManifest" not in mj:
        raise BundleError("%s: the literal has no modelTopology / weightsManifest" % model_path)
    topo = mj["modelTopology"]
    try:
        mc = topo["model_config"]
        layers = mc["config"]["layers"]
        if mc["class_name"] not in ("Model", "Functional"):
            raise BundleError("%s: model_config.class_name %r is not a functional Model" % (model_path, mc["class_name"]))
    except (KeyError, TypeError):
        raise BundleError("%s: modelTopology.model_config.config.layers missing" % model_path)

    weights = {}
    manifest = mj["weightsManifest"]
    if not isinstance(manifest, list) or not manifest:
        raise BundleError("%s: weightsManifest is not a non-empty list" % model_path)
    for group in manifest:
        try:
            paths, specs = group["paths"], group["weights"]
        except (KeyError, TypeError):
            raise BundleError("%s: weightsManifest group without paths/weights" % model_path)
        blob = bytearray()
        for p in paths:
            shard_path = os.path.join(bdir, os.path.basename(str(p)) + ".min.js")
            s = parse_bundle(shard_path)
            if not isinstance(s, str):
                raise BundleError("%s: the shard module does not export a string" % shard_path)
            try:
                blob += base64.b64decode(s, validate=True)
            except (ValueError, base64.binascii.Error) as e:
                raise BundleError("%s: the shard is not valid base64: %s" % (shard_path, e))
        where = "%s (shard %s)" % (model_path, ",".join(map(str, paths)))
        off = 0
        for spec in specs:
            try:
                name, shape, dtype = spec["name"], [int(d) for d in spec["shape"]], spec["dtype"]
            except (KeyError, TypeError, ValueError):
                raise BundleError("%s: malformed weight entry %r" % (where, spec))
            if dtype != "float32":
                raise BundleError("%s: weight %s has dtype %r (float32 expected)" % (where, name, dtype))
            count = 1
            for d in shape:
                if d < 0:
                    raise BundleError("%s: weight %s has a negative dimension" % (where, name))
                count *= d
            q = spec.get("quantization")
            if q is None:
                nbytes = 4 * count
                raw = np.frombuffer(bytes(blob[off:off + nbytes]), dtype="<f4") if off + nbytes <= len(blob) else None
                conv = lambda a: a.astype(np.float32)
            else:
                qd = q.get("dtype")
                if qd not in ("uint8", "uint16") or "scale" not in q or "min" not in q:
                    raise BundleError("%s: weight %s: unsupported quantization %r (affine uint8/uint16 expected)"
                                      % (where, name, q))
                width = 1 if qd == "uint8" else 2
                nbytes = width * count
                raw = (np.frombuffer(bytes(blob[off:off + nbytes]), dtype="u1" if width == 1 else "<u2")
                       if off + nbytes <= len(blob) else None)
                scale, mn = float(q["scale"]), float(q["min"])
                # as TF.js does (tfjs-core decodeWeights): q * scale + min in double precision,
                # then stored as float32
                conv = lambda a, s=scale, m=mn: (a.astype(np.float64) * s + m).astype(np.float32)
            if raw is None:
                raise BundleError("%s: weight %s needs bytes %d..%d but the shard has %d bytes"
                                  % (where, name, off, off + nbytes, len(blob)))
            if name in weights:
                raise BundleError("%s: weight %s listed twice" % (where, name))
            weights[name] = conv(raw).reshape(shape)
            off += nbytes
        if off != len(blob):
            raise BundleError("%s: the manifest covers %d bytes but the shard has %d" % (where, off, len(blob)))
    info = {"keras_version": topo.get("keras_version"), "backend": topo.get("backend"),
            "shards": [os.path.basename(str(p)) for g in manifest for p in g["paths"]],
            "n_layers": len(layers), "n_weights": len(weights)}
    return layers, weights, info


def _inbound(layer, where):
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise BundleError("%s: layer %s is shared (%d inbound nodes)" % (where, layer.get("name"), len(nodes)))
    if not nodes:
        return []
    out = []
    for ref in nodes[0]:
        if not isinstance(ref, list) or len(ref) < 3 or ref[1] != 0 or ref[2] != 0:
            raise BundleError("%s: layer %s has an unsupported inbound reference %r" % (where, layer.get("name"), ref))
        out.append(ref[0])
    return out


def build_plan(layers, weights, where):
    """Checks the layer list (every weight's shape against the layer config) and returns
    (ops, input layer name, channels per layer): ops are dicts in file order (topological), with
    the weights already in PyTorch layout."""
    import numpy as np

    ops = []
    produced = set()
    used_weights = set()
    input_name = None

    def W(name, shape):
        if name not in weights:
            raise BundleError("%s: weight %s (layer needs it) is not in the manifest" % (where, name))
        a = weights[name]
        if list(a.shape) != list(shape):
            raise BundleError("%s: weight %s has shape %s, the topology implies %s" % (where, name, list(a.shape), list(shape)))
        used_weights.add(name)
        return a

    channels = {}
    for L in layers:
        try:
            name, cls, cfg = L["name"], L["class_name"], L["config"]
        except (KeyError, TypeError):
            raise BundleError("%s: malformed layer entry" % where)
        ins = _inbound(L, where)
        for i in ins:
            if i not in produced:
                raise BundleError("%s: layer %s uses %s before it is defined" % (where, name, i))
        df = cfg.get("data_format", "channels_last")
        if df not in (None, "channels_last"):
            raise BundleError("%s: layer %s: data_format %r unsupported" % (where, name, df))
        op = {"name": name, "kind": cls, "inputs": ins}
        act = cfg.get("activation", "linear")
        if cls == "InputLayer":
            shp = cfg.get("batch_input_shape")
            if input_name is not None or not shp or len(shp) != 4 or shp[3] != 3:
                raise BundleError("%s: input layer %s with shape %r (one [N,H,W,3] input expected)" % (where, name, shp))
            input_name = name
            channels[name] = 3
            op["size"] = shp[1:3]
        elif cls == "ZeroPadding2D":
            pad = cfg["padding"]
            if isinstance(pad, int):
                pad = [[pad, pad], [pad, pad]]
            elif isinstance(pad[0], int):
                pad = [[pad[0], pad[0]], [pad[1], pad[1]]]
            op["pad"] = [int(pad[1][0]), int(pad[1][1]), int(pad[0][0]), int(pad[0][1])]  # l, r, t, b
            channels[name] = channels[ins[0]]
        elif cls in ("Conv2D", "DepthwiseConv2D"):
            cin = channels[ins[0]]
            kh, kw = cfg["kernel_size"]
            if cfg.get("dilation_rate", [1, 1]) not in ([1, 1], 1):
                raise BundleError("%s: layer %s: dilation unsupported" % (where, name))
            if cls == "Conv2D":
                if cfg.get("groups", 1) != 1:
                    raise BundleError("%s: layer %s: grouped Conv2D unsupported" % (where, name))
                cout = int(cfg["filters"])
                k = W(name + "/kernel", [kh, kw, cin, cout])
                op["weight"] = np.ascontiguousarray(k.transpose(3, 2, 0, 1))          # [O, I, kh, kw]
                op["groups"] = 1
            else:
                mult = int(cfg.get("depth_multiplier", 1))
                cout = cin * mult
                k = W(name + "/depthwise_kernel", [kh, kw, cin, mult])
                op["weight"] = np.ascontiguousarray(k.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None])  # [C*m,1,kh,kw]
                op["groups"] = cin
            op["bias"] = W(name + "/bias", [cout]) if cfg.get("use_bias", True) else None
            op["stride"] = [int(s) for s in cfg["strides"]]
            op["padding"] = cfg["padding"]
            op["k"] = [kh, kw]
            if op["padding"] not in ("valid", "same"):
                raise BundleError("%s: layer %s: padding %r" % (where, name, op["padding"]))
            if act not in ("linear", "relu", None):
                raise BundleError("%s: layer %s: activation %r unsupported" % (where, name, act))
            op["act"] = act or "linear"
            channels[name] = cout
        elif cls == "BatchNormalization":
            c = channels[ins[0]]
            axis = cfg.get("axis", -1)
            if axis not in (-1, 3, [3], [-1]):
                raise BundleError("%s: layer %s: BN axis %r" % (where, name, axis))
            op["gamma"] = W(name + "/gamma", [c]) if cfg.get("scale", True) else np.ones(c, np.float32)
            op["beta"] = W(name + "/beta", [c]) if cfg.get("center", True) else np.zeros(c, np.float32)
            op["mean"] = W(name + "/moving_mean", [c])
            op["var"] = W(name + "/moving_variance", [c])
            op["eps"] = float(cfg.get("epsilon", 1e-3))
            channels[name] = c
        elif cls == "ReLU":
            mv = cfg.get("max_value")
            if cfg.get("negative_slope", 0) not in (0, 0.0) or cfg.get("threshold", 0) not in (0, 0.0):
                raise BundleError("%s: layer %s: leaky / thresholded ReLU unsupported" % (where, name))
            op["max"] = None if mv is None else float(mv)
            channels[name] = channels[ins[0]]
        elif cls == "Add":
            if len(ins) != 2 or channels[ins[0]] != channels[ins[1]]:
                raise BundleError("%s: layer %s: Add of %r" % (where, name, ins))
            channels[name] = channels[ins[0]]
        elif cls in ("AveragePooling2D", "GlobalAveragePooling2D"):
            if cls == "AveragePooling2D":
                op["pool"] = [int(p) for p in cfg["pool_size"]]
                op["stride"] = [int(s) for s in (cfg.get("strides") or cfg["pool_size"])]
                if cfg.get("padding", "valid") != "valid":
                    raise BundleError("%s: layer %s: pooling padding %r" % (where, name, cfg.get("padding")))
            channels[name] = channels[ins[0]]
        elif cls == "Flatten":
            channels[name] = channels[ins[0]]
        elif cls == "Dropout":
            channels[name] = channels[ins[0]]        # identity at inference
        elif cls == "Dense":
            cin = channels[ins[0]]
            units = int(cfg["units"])
            op["weight"] = np.ascontiguousarray(W(name + "/kernel", [cin, units]).T)
            op["bias"] = W(name + "/bias", [units]) if cfg.get("use_bias", True) else None
            if act not in ("linear", "relu", "softmax", None):
                raise BundleError("%s: layer %s: activation %r unsupported" % (where, name, act))
            op["act"] = act or "linear"
            channels[name] = units
        elif cls == "Activation":
            op["act"] = act
            if act not in ("relu", "softmax", "linear"):
                raise BundleError("%s: layer %s: activation %r unsupported" % (where, name, act))
            channels[name] = channels[ins[0]]
        else:
            raise BundleError("%s: layer %s: class %s unsupported" % (where, name, cls))
        ops.append(op)
        produced.add(name)

    unused = sorted(set(weights) - used_weights)
    if unused:
        raise BundleError("%s: weights not used by any layer: %s" % (where, ", ".join(unused[:5])))
    return ops, input_name, channels


# ----------------------------------------------------------------------------------------------
# The PyTorch module
# ----------------------------------------------------------------------------------------------

def make_module(ops, channels, where):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from typing import List, Tuple

    by_name = {op["name"]: op for op in ops}
    consumers = {}
    for op in ops:
        for i in op["inputs"]:
            consumers.setdefault(i, []).append(op["name"])

    # --- locate the pieces the module exposes ---------------------------------------------------
    for nm in ("block_2_add", "block_5_add"):
        if nm not in by_name or by_name[nm]["kind"] != "Add":
            raise BundleError("%s: no Add layer %s (MobileNetV2 block naming expected)" % (where, nm))
    if channels["block_2_add"] != 24 or channels["block_5_add"] != 32:
        raise BundleError("%s: block_2_add / block_5_add have %d / %d channels (24 / 32 expected)"
                          % (where, channels["block_2_add"], channels["block_5_add"]))
    outputs = [op["name"] for op in ops if op["name"] not in consumers]
    if len(outputs) != 1:
        raise BundleError("%s: the model has %d outputs %r (one expected)" % (where, len(outputs), outputs))
    # the head: the first pooling layer (its output, flattened, is "pooled")
    pools = [op for op in ops if op["kind"] in ("AveragePooling2D", "GlobalAveragePooling2D")]
    if len(pools) != 1:
        raise BundleError("%s: %d pooling layers (one expected)" % (where, len(pools)))
    pool = pools[0]
    pool_idx = ops.index(pool)
    trunk_ops = ops[:pool_idx]
    head_ops = ops[pool_idx + 1:]
    # the trunk ops must not be used after the pooling layer except through it
    for op in head_ops:
        for i in op["inputs"]:
            if i != pool["name"] and i not in [h["name"] for h in head_ops]:
                raise BundleError("%s: head layer %s reads trunk tensor %s" % (where, op["name"], i))
    last = by_name[outputs[0]]
    strip_softmax = last["kind"] in ("Dense", "Activation") and last.get("act") == "softmax"

    # --- the generated module ------------------------------------------------------------------
    class Conv(nn.Module):
        """A Keras Conv2D / DepthwiseConv2D: for padding 'same', explicit zero padding computed
        from the input size the way TF does (the odd pixel on the right / bottom), then a 'valid'
        conv. (This topology pads its stride-2 layers with ZeroPadding2D layers instead.)"""

        def __init__(self, op):
            super().__init__()
            w = torch.from_numpy(op["weight"].copy())
            self.conv = nn.Conv2d(w.shape[1] * op["groups"], w.shape[0], tuple(op["k"]), stride=tuple(op["stride"]),
                                  padding=0, groups=op["groups"], bias=op["bias"] is not None)
            with torch.no_grad():
                self.conv.weight.copy_(w)
                if op["bias"] is not None:
                    self.conv.bias.copy_(torch.from_numpy(op["bias"].copy()))
            self.same = op["padding"] == "same"
            self.kh, self.kw = op["k"]
            self.sh, self.sw = op["stride"]
            self.relu = op["act"] == "relu"

        def forward(self, x):
            if self.same:
                h, w = x.shape[2], x.shape[3]
                oh = (h + self.sh - 1) // self.sh
                ow = (w + self.sw - 1) // self.sw
                ph = max((oh - 1) * self.sh + self.kh - h, 0)
                pw = max((ow - 1) * self.sw + self.kw - w, 0)
                if ph > 0 or pw > 0:
                    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            x = self.conv(x)
            if self.relu:
                x = torch.relu(x)
            return x

    class BN(nn.Module):
        def __init__(self, op):
            super().__init__()
            # inference BN: (x - mean) / sqrt(var + eps) * gamma + beta = x * a + b, computed in float32
            # the way TF.js does (tfjs-core batchNorm: (x - mean) * (gamma / sqrt(var + eps)) + beta)
            g = torch.from_numpy(op["gamma"].copy())
            b = torch.from_numpy(op["beta"].copy())
            m = torch.from_numpy(op["mean"].copy())
            v = torch.from_numpy(op["var"].copy())
            # scale and shift are computed in double precision, then stored as float32; the layer
            # is then one fused multiply-add pass: x * scale + (beta - mean * scale)
            inv = g.double() / torch.sqrt(v.double() + op["eps"])
            self.register_buffer("scale", inv.float().view(1, -1, 1, 1))
            self.register_buffer("shift", (b.double() - m.double() * inv).float().view(1, -1, 1, 1))

        def forward(self, x):
            return torch.addcmul(self.shift, x, self.scale)

    class Pad(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.pad: List[int] = list(op["pad"])

        def forward(self, x):
            return F.pad(x, self.pad)

    class ReLU(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.has_max = op["max"] is not None
            self.max = float(op["max"]) if op["max"] is not None else 0.0

        def forward(self, x):
            if self.has_max:
                return torch.clamp(x, 0.0, self.max)
            return torch.relu(x)

    class Ident(nn.Module):
        def forward(self, x):
            return x

    def module_for(op):
        k = op["kind"]
        if k in ("Conv2D", "DepthwiseConv2D"):
            return Conv(op)
        if k == "BatchNormalization":
            return BN(op)
        if k == "ZeroPadding2D":
            return Pad(op)
        if k == "ReLU":
            return ReLU(op)
        if k in ("Dropout", "Flatten"):
            return Ident()
        raise BundleError("%s: layer %s (%s) cannot be in the trunk" % (where, op["name"], k))

    class Segment(nn.Module):
        """A chain of single-input layers; with `residual`, its input is added to its output
        (the Keras block_N_add layers)."""

        def __init__(self, mods, residual: bool):
            super().__init__()
            self.body = nn.Sequential(*mods)
            self.residual = residual

        def forward(self, x):
            y = self.body(x)
            if self.residual:
                y = x + y
            return y

    # Cut the trunk (input .. the pooling layer's input) into segments. The graph must be a chain
    # of single-input layers plus Adds of the form Add(segment input, chain end), which is how
    # Keras' MobileNetV2 is built. Segments also end at the tensors the module returns.
    if trunk_ops[0]["kind"] != "InputLayer":
        raise BundleError("%s: the first layer is not the input" % where)
    want_ends = {"block_2_add", "block_5_add", pool["inputs"][0]}
    segments = []          # (mods, residual, out_name)
    seg_in = trunk_ops[0]["name"]
    cur = seg_in
    mods = []
    for op in trunk_ops[1:]:
        if op["kind"] == "Add":
            a, b = op["inputs"]
            if b == seg_in and a == cur:
                a, b = b, a
            if a != seg_in or b != cur or not mods:
                raise BundleError("%s: %s adds %s + %s, not (block input %s) + (block output %s)"
                                  % (where, op["name"], op["inputs"][0], op["inputs"][1], seg_in, cur))
            segments.append((mods, True, op["name"]))
            mods = []
            seg_in = cur = op["name"]
        else:
            (a,) = op["inputs"]
            if a != cur:
                raise BundleError("%s: layer %s reads %s, not the previous layer %s" % (where, op["name"], a, cur))
            # a tensor read twice (by the next layer and by a later Add) starts a residual segment
            if cur != seg_in and len(consumers.get(cur, [])) > 1:
                segments.append((mods, False, cur))
                mods = []
                seg_in = cur
            mods.append(module_for(op))
            cur = op["name"]
        if cur in want_ends and mods:
            segments.append((mods, False, cur))
            mods = []
            seg_in = cur
        elif cur in want_ends:
            seg_in = cur
    if mods:
        segments.append((mods, False, cur))
    if cur != pool["inputs"][0]:
        raise BundleError("%s: the trunk ends at %s, the pooling layer reads %s" % (where, cur, pool["inputs"][0]))
    seg_names = [s[2] for s in segments]
    i_b2 = seg_names.index("block_2_add")
    i_b5 = seg_names.index("block_5_add")
    early = [Segment(m, r) for m, r, _ in segments[:i_b5 + 1]]
    late = [Segment(m, r) for m, r, _ in segments[i_b5 + 1:]]
    n_residual = sum(1 for s in segments if s[1])

    # Head: pooling -> flatten -> dense... (all single-input, in order)
    class Dense(nn.Module):
        def __init__(self, op):
            super().__init__()
            w = torch.from_numpy(op["weight"].copy())
            self.fc = nn.Linear(w.shape[1], w.shape[0], bias=op["bias"] is not None)
            with torch.no_grad():
                self.fc.weight.copy_(w)
                if op["bias"] is not None:
                    self.fc.bias.copy_(torch.from_numpy(op["bias"].copy()))
            self.relu = op["act"] == "relu"

        def forward(self, x):
            x = self.fc(x)
            if self.relu:
                x = torch.relu(x)
            return x

    head_mods = []
    chain = [pool["name"]]
    for op in head_ops:
        if len(op["inputs"]) != 1 or op["inputs"][0] != chain[-1]:
            raise BundleError("%s: head layer %s is not a simple chain" % (where, op["name"]))
        chain.append(op["name"])
        k = op["kind"]
        if k == "Dense":
            if op is last and strip_softmax:
                head_mods.append(Dense(dict(op, act="linear")))
            elif op.get("act") == "softmax":
                raise BundleError("%s: softmax inside the head at %s" % (where, op["name"]))
            else:
                head_mods.append(Dense(op))
        elif k in ("Dropout", "Flatten"):
            pass
        elif k == "Activation":
            if op is last and strip_softmax:
                pass
            elif op["act"] == "relu":
                head_mods.append(ReLU({"max": None}))
            elif op["act"] != "linear":
                raise BundleError("%s: activation %s inside the head" % (where, op["name"]))
        else:
            raise BundleError("%s: head layer %s (%s) unsupported" % (where, op["name"], k))
    if pool["kind"] == "AveragePooling2D":
        pool_k, pool_s = pool["pool"], pool["stride"]
    else:
        pool_k, pool_s = [0, 0], [0, 0]

    class MobileNetV2Style(nn.Module):
        """nsfwjs MobileNetV2 (Keras layout), rebuilt. See scripts/tfjs_to_torchscript.py."""
        i_b2: int

        def __init__(self):
            super().__init__()
            self.early = nn.ModuleList(early)     # stem .. block_5_add
            self.late = nn.ModuleList(late)       # block_6 .. out_relu
            self.head = nn.Sequential(*head_mods)
            self.i_b2 = i_b2
            self.pool_k: List[int] = list(pool_k)
            self.pool_s: List[int] = list(pool_s)

        def _check(self, x: torch.Tensor):
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError("expected [N,3,H,W] float32 RGB in [0,1]")

        def _early(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            b2 = x
            for i, seg in enumerate(self.early):
                x = seg(x)
                if i == self.i_b2:
                    b2 = x
            return b2, x

        def _trunk(self, x: torch.Tensor) -> torch.Tensor:
            self._check(x)
            x = self._early(x)[1]
            for seg in self.late:
                x = seg(x)
            return x

        def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            """(block_2_add [N,24,H/4,W/4], block_5_add [N,32,H/8,W/8]); runs blocks 0-5 only."""
            self._check(x)
            return self._early(x)

        @torch.jit.export
        def pooled(self, x: torch.Tensor) -> torch.Tensor:
            """[N,1280] global average of the final feature map (out_relu). At 224 input (a 7x7
            map) this is the topology's AveragePooling2D(7x7) + Flatten: the head's input."""
            return self._trunk(x).mean(dim=[2, 3])

        @torch.jit.export
        def classify(self, x: torch.Tensor) -> torch.Tensor:
            """[N,5] logits (dense_3 before its softmax), following the topology's pooling
            (AveragePooling2D 7x7 stride 7, Flatten in channels-last order): 224x224 input."""
            f = self._trunk(x)
            if self.pool_k[0] > 0:
                f = F.avg_pool2d(f, self.pool_k, self.pool_s)
            else:
                f = f.mean(dim=[2, 3], keepdim=True)
            f = f.permute(0, 2, 3, 1).reshape(f.shape[0], -1)
            return self.head(f)

    meta = {"strip_softmax": strip_softmax, "pool": pool["name"], "pool_input": pool["inputs"][0],
            "n_classes": channels[outputs[0]], "output": outputs[0], "segments": len(segments),
            "residual_adds": n_residual,
            "head": chain, "pooled_dim": channels[pool["inputs"][0]]}
    return MobileNetV2Style(), meta


# ----------------------------------------------------------------------------------------------

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_package_root(d):
    for cand in (d, os.path.join(d, "package")):
        if os.path.isfile(os.path.join(cand, BUNDLE_DIR, MODEL_JS)):
            return cand
    raise BundleError("%s: file not found (is --package an unpacked nsfwjs@%s?)"
                      % (os.path.join(d, BUNDLE_DIR, MODEL_JS), NPM_VERSION))


def _reexec_with_fixed_hash_seed():
    """TorchScript writes some module constants in set order (string hashing): with a fixed
    PYTHONHASHSEED the saved .pt, and so its sha256, is the same on every run."""
    if os.environ.get("PYTHONHASHSEED") != "0" and not os.environ.get("GMI_TFJS_NO_REEXEC"):
        env = dict(os.environ, PYTHONHASHSEED="0", GMI_TFJS_NO_REEXEC="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", required=True, help="unpacked nsfwjs package (folder with dist/models/)")
    ap.add_argument("--out", required=True, help="encoder folder; writes OUT/%s/" % ENCODER_NAME)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()

    def log(msg):
        if not args.quiet:
            print("tfjs_to_torchscript: " + msg, file=sys.stderr, flush=True)

    try:
        import numpy
        import torch
    except ImportError as e:
        print("tfjs_to_torchscript: %s (run with Debian's /usr/bin/python3 and python3-torch installed)" % e,
              file=sys.stderr)
        return 1

    log("torch %s, numpy %s" % (torch.__version__, numpy.__version__))
    try:
        pkg = find_package_root(args.package)
        pkg_version = None
        try:
            with open(os.path.join(pkg, "package.json"), encoding="utf-8") as f:
                pj = json.load(f)
            pkg_version = pj.get("version")
            if pj.get("name") != NPM_NAME:
                raise BundleError("%s: package name %r, %r expected" % (os.path.join(pkg, "package.json"), pj.get("name"), NPM_NAME))
        except FileNotFoundError:
            pass
        except json.JSONDecodeError as e:
            raise BundleError("%s: not JSON: %s" % (os.path.join(pkg, "package.json"), e))
        where = os.path.join(pkg, BUNDLE_DIR, MODEL_JS)
        layers, weights, info = load_model(pkg)
        log("parsed %s: %d layers, %d weight tensors (keras %s)" % (where, info["n_layers"], info["n_weights"], info["keras_version"]))
        ops, input_name, channels = build_plan(layers, weights, where)
        model, meta = make_module(ops, channels, where)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        scripted = torch.jit.script(model)
        # sanity: scripted == eager, and the shapes the card promises
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.rand(2, 3, 224, 224, generator=g)
            b2, b5 = scripted(x)
            if list(b2.shape) != [2, 24, 56, 56] or list(b5.shape) != [2, 32, 28, 28]:
                raise BundleError("%s: forward gives %s / %s" % (where, list(b2.shape), list(b5.shape)))
            lg = scripted.classify(x)
            pe = model.classify(x)
            if lg.shape[1] != meta["n_classes"] or not torch.allclose(lg, pe, atol=1e-5):
                raise BundleError("%s: scripted classify disagrees with eager" % where)
            if list(scripted.pooled(x).shape) != [2, meta["pooled_dim"]]:
                raise BundleError("%s: pooled shape %s" % (where, list(scripted.pooled(x).shape)))
            # fully convolutional: odd sizes work
            scripted(torch.rand(1, 3, 37, 45, generator=g))
    except BundleError as e:
        print("tfjs_to_torchscript: error: %s" % e, file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # a field missing or of the wrong type somewhere in the topology / manifest
        print("tfjs_to_torchscript: error: %s: malformed model description (%s: %s)"
              % (os.path.join(args.package, BUNDLE_DIR, MODEL_JS), type(e).__name__, e), file=sys.stderr)
        return 2

    out_parent = os.path.abspath(args.out)
    final = os.path.join(out_parent, ENCODER_NAME)
    try:
        os.makedirs(out_parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + ENCODER_NAME + ".", dir=out_parent)
        try:
            pt = os.path.join(tmp, MODULE_FILE)
            scripted.save(pt)
            card = {
                "card_version": 1,
                "name": ENCODER_NAME,
                "version": "3",
                "modality": "image",
                "backend": "torchscript",
                "dim": 24 * 25 // 2 + 32 * 33 // 2,
                "default_gamma": 1.0,
                "input": {"size": 224, "resize": "none", "filter": "bilinear", "min_side": 1024,
                          "scale": 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
                "outputs": [
                    # signed square roots of the Gram entries: measured better on the
                    # evaluation hubs than the raw Gram (README, "The composite encoder")
                    {"name": "block_2", "channels": 24, "reduce": "gram_upper", "weight": 1.0, "power": 0.5},
                    {"name": "block_5", "channels": 32, "reduce": "gram_upper", "weight": 1.0, "power": 0.5},
                ],
                "files": [{"role": "module", "path": MODULE_FILE, "sha256": sha256_file(pt)}],
                "source": {
                    "npm": NPM_NAME,
                    "version": pkg_version or NPM_VERSION,
                    "license": "MIT",
                    "bundle": "%s/%s" % (BUNDLE_DIR, MODEL_JS),
                    "shards": ["%s/%s.min.js" % (BUNDLE_DIR, p) for p in info["shards"]],
                    "bundle_sha256": sha256_file(where),
                    "shard_sha256": [sha256_file(os.path.join(pkg, BUNDLE_DIR, p + ".min.js")) for p in info["shards"]],
                    "architecture": "MobileNetV2 alpha 1.0 (Keras %s), %d classes; module methods: "
                                    "forward -> (block_2_add, block_5_add), classify -> logits, pooled -> %d-d"
                                    % (info["keras_version"], meta["n_classes"], meta["pooled_dim"]),
                },
            }
            with open(os.path.join(tmp, "card.json"), "w", encoding="utf-8") as f:
                json.dump(card, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o755)
            for fn in os.listdir(tmp):
                os.chmod(os.path.join(tmp, fn), 0o644)
            if os.path.isdir(final):
                old = final + ".old-%d" % os.getpid()
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        print("tfjs_to_torchscript: error: cannot write %s: %s" % (final, e), file=sys.stderr)
        return 1
    log("%d segments (%d residual adds), head %s" % (meta["segments"], meta["residual_adds"], " -> ".join(meta["head"])))
    log("wrote %s (%s, %.1f MB) in %.1f s" % (os.path.join(final, MODULE_FILE), "softmax stripped" if meta["strip_softmax"] else "no softmax",
                                           os.path.getsize(os.path.join(final, MODULE_FILE)) / 1e6, time.time() - t0))
    return 0


if __name__ == "__main__":
    _reexec_with_fixed_hash_seed()
    sys.exit(main())
