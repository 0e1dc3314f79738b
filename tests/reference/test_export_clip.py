#!/usr/bin/python3
"""Tests scripts/export_clip.py with its tiny random CLIP (no download, CPU, ~15 s).

  /usr/bin/python3 tests/reference/test_export_clip.py [-v]

Checks: the tiny export's files and cards (schemas/encoder-card.md, sha256s), shapes
([2,3,224,224] -> [2,32], [2,77] -> [2,32]), determinism in --seed, the merges file's format,
the reference tokenizer, the open_clip/OpenAI and HF naming maps (a state dict renamed from the
tiny model's own weights loads and gives the same outputs), strict loading (a missing key is an
error naming it), the towers against an independent CLIP built on torch.nn.MultiheadAttention,
clear usage errors (exit 2), and the tiny captioner's output format.
Exit status 0 when all pass, 1 when one fails, 77 when torch is not importable (skip).
"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import unittest
from collections import OrderedDict

try:
    import torch
    import torch.nn as nn
except ImportError as e:  # ctest: SKIP_RETURN_CODE 77
    print("test_export_clip: torch is not importable (%s); install python3-torch (Debian)" % e, file=sys.stderr)
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "export_clip.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_clip as ec  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def run_export(*args, expect=0):
    p = subprocess.run([PYTHON, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=600)
    if p.returncode != expect:
        raise AssertionError("export_clip %s: exit %d (expected %d)\nstderr:\n%s"
                             % (" ".join(args), p.returncode, expect, p.stderr))
    return p


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_card(d, name):
    with open(os.path.join(d, name), encoding="utf-8") as f:
        return json.load(f)


def tiny_batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 224, 224, generator=g)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([1512, 320, 564, 522, 1513])
    ids[1, 0] = 1512
    ids[1, 1:40] = torch.randint(1, 1512, (39,), generator=g)
    ids[1, 40] = 1513
    return x, ids


# An independent CLIP (OpenAI's original layout: sequence-first nn.MultiheadAttention), to check
# the exporter's own attention / masking / pooling against PyTorch's.
class RefBlock(nn.Module):
    def __init__(self, w, h):
        super().__init__()
        self.ln_1 = nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, h)
        self.ln_2 = nn.LayerNorm(w)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(w, 4 * w)), ("gelu", ec.QuickGELU()),
                                              ("c_proj", nn.Linear(4 * w, w))]))

    def forward(self, x, mask=None):  # x [L, N, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefCLIP(nn.Module):
    def __init__(self, s):
        super().__init__()
        vw, tw = s["vision_width"], s["text_width"]
        grid = s["image_size"] // s["patch_size"]
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, vw, s["patch_size"], s["patch_size"], bias=False)
        self.visual.class_embedding = nn.Parameter(torch.zeros(vw))
        self.visual.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, vw))
        self.visual.ln_pre = nn.LayerNorm(vw)
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList([RefBlock(vw, s["vision_heads"])
                                                           for _ in range(s["vision_layers"])])
        self.visual.ln_post = nn.LayerNorm(vw)
        self.visual.proj = nn.Parameter(torch.zeros(vw, s["embed_dim"]))
        self.token_embedding = nn.Embedding(s["vocab_size"], tw)
        self.positional_embedding = nn.Parameter(torch.zeros(s["context_length"], tw))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([RefBlock(tw, s["text_heads"]) for _ in range(s["text_layers"])])
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.zeros(tw, s["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding).permute(1, 0, 2)
        for b in v.transformer.resblocks:
            x = b(x)
        return v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj

    def encode_text(self, ids):
        n = ids.shape[1]
        mask = torch.empty(n, n).fill_(float("-inf")).triu_(1)
        x = (self.token_embedding(ids) + self.positional_embedding).permute(1, 0, 2)
        for b in self.transformer.resblocks:
            x = b(x, mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection


def open_clip_state_dict(image_mod, text_mod):
    """The tiny export's weights under open_clip / OpenAI names (what a real checkpoint holds)."""
    sd = OrderedDict(("visual." + k, v.clone()) for k, v in image_mod.state_dict().items())
    sd.update((k, v.clone()) for k, v in text_mod.state_dict().items())
    sd.pop("attn_mask", None)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def hf_state_dict(oc):
    """The same weights under HF CLIPModel names (inverse of the exporter's map, written here
    independently)."""
    out = OrderedDict()
    out["vision_model.embeddings.class_embedding"] = oc["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = oc["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = oc["visual.positional_embedding"]
    out["vision_model.embeddings.position_ids"] = torch.arange(50).unsqueeze(0)
    for hf, o in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                  ("text_model.final_layer_norm", "ln_final")):
        out[hf + ".weight"], out[hf + ".bias"] = oc[o + ".weight"], oc[o + ".bias"]
    out["visual_projection.weight"] = oc["visual.proj"].t().contiguous()
    out["text_projection.weight"] = oc["text_projection"].t().contiguous()
    out["text_model.embeddings.token_embedding.weight"] = oc["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = oc["positional_embedding"]
    out["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    out["logit_scale"] = oc["logit_scale"]
    for hf_pre, oc_pre in (("vision_model.encoder.layers", "visual.transformer.resblocks"),
                           ("text_model.encoder.layers", "transformer.resblocks")):
        for i in range(2):
            s, d = "%s.%d." % (oc_pre, i), "%s.%d." % (hf_pre, i)
            w, b = oc[s + "attn.in_proj_weight"], oc[s + "attn.in_proj_bias"]
            for j, n in enumerate("qkv"):
                out[d + "self_attn.%s_proj.weight" % n] = w.chunk(3, 0)[j].contiguous()
                out[d + "self_attn.%s_proj.bias" % n] = b.chunk(3, 0)[j].contiguous()
            for hf, o in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                          ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[d + hf + ".weight"], out[d + hf + ".bias"] = oc[s + o + ".weight"], oc[s + o + ".bias"]
    return out


HF_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32,
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "max_position_embeddings": 77, "vocab_size": 1514, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}


class ExportClipTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="export_clip_test.")
        cls.out = os.path.join(cls.tmp.name, "tiny")
        import time
        t0 = time.time()
        cls.proc = run_export("--random-init", "--tiny", "--captioner-tiny", "--out", cls.out)
        cls.export_seconds = time.time() - t0
        cls.image = torch.jit.load(os.path.join(cls.out, "image.pt"))
        cls.text = torch.jit.load(os.path.join(cls.out, "text.pt"))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def outputs(self, image_mod, text_mod):
        x, ids = tiny_batch()
        with torch.no_grad():
            return image_mod(x), text_mod(ids)

    # --- files and cards ---------------------------------------------------------------
    def test_cards(self):
        img = load_card(self.out, "image.card.json")
        txt = load_card(self.out, "text.card.json")
        self.assertEqual(img["card_version"], 1)
        self.assertEqual((img["name"], img["version"], img["modality"], img["backend"]),
                         ("clip-tiny-random", "seed0", "image", "torchscript"))
        self.assertEqual((txt["name"], txt["version"], txt["modality"], txt["backend"]),
                         ("clip-tiny-random-text", "seed0", "text", "torchscript"))
        self.assertEqual(img["dim"], 32)
        self.assertEqual(txt["dim"], 32)
        self.assertEqual(img["default_gamma"], 2.0)
        self.assertEqual(img["input"], {"size": 224, "resize": "shorter_side", "filter": "bicubic", "min_side": 224,
                                        "scale": 255.0, "mean": CLIP_MEAN, "std": CLIP_STD})
        self.assertEqual(txt["text"], {"context": 77, "tokenizer": "clip-bpe"})
        for card in (img, txt):
            self.assertEqual([(o["name"], o["reduce"], o["weight"]) for o in card["outputs"]],
                             [("embedding", "none", 1.0)])
            self.assertIn("arch", card)
            self.assertIn("source", card)
            self.assertEqual(card["source"]["kind"], "random-init")
        self.assertEqual([(f["role"], f["path"]) for f in img["files"]], [("module", "image.pt")])
        self.assertEqual([f["role"] for f in txt["files"]], ["module", "vocab"])
        self.assertEqual(txt["files"][0]["path"], "text.pt")
        self.assertEqual(txt["arch"]["vocab_size"], 512 + txt["arch"]["merges"] + 2)

    def test_sha256s(self):
        for name in ("image.card.json", "text.card.json", "captioner.card.json"):
            for f in load_card(self.out, name)["files"]:
                self.assertRegex(f["sha256"], "^[0-9a-f]{64}$")
                self.assertEqual(f["sha256"], sha256(os.path.join(self.out, f["path"])), f["path"])

    def test_shapes(self):
        a, b = self.outputs(self.image, self.text)
        self.assertEqual(tuple(a.shape), (2, 32))
        self.assertEqual(tuple(b.shape), (2, 32))
        self.assertEqual(a.dtype, torch.float32)
        self.assertTrue(torch.isfinite(a).all() and torch.isfinite(b).all())
        self.assertGreater(float(a.norm(dim=1).min()), 0)  # not normalised, but not degenerate
        self.assertFalse(torch.allclose(a[0], a[1]))
        self.assertFalse(torch.allclose(b[0], b[1]))

    def test_text_pools_at_end_token(self):
        # Tokens after <end> (padding) must not change the feature; tokens before it must.
        _, ids = tiny_batch()
        with torch.no_grad():
            base = self.text(ids)
            pad = ids.clone()
            pad[0, 10:20] = 5  # after <end>: ignored (causal mask, argmax pooling)
            self.assertTrue(torch.equal(self.text(pad)[0], base[0]))
            changed = ids.clone()
            changed[0, 1] = 321
            self.assertFalse(torch.allclose(self.text(changed)[0], base[0]))

    def test_determinism(self):
        again = os.path.join(self.tmp.name, "again")
        other = os.path.join(self.tmp.name, "seed1")
        run_export("--random-init", "--tiny", "--seed", "0", "--out", again)
        run_export("--random-init", "--tiny", "--seed", "1", "--out", other)
        a = self.outputs(self.image, self.text)
        b = self.outputs(torch.jit.load(os.path.join(again, "image.pt")), torch.jit.load(os.path.join(again, "text.pt")))
        c = self.outputs(torch.jit.load(os.path.join(other, "image.pt")), torch.jit.load(os.path.join(other, "text.pt")))
        self.assertTrue(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        self.assertFalse(torch.allclose(a[0], c[0]))
        for name in ("image.pt", "text.pt", "bpe_tiny_vocab.txt.gz", "image.card.json", "text.card.json"):
            self.assertEqual(sha256(os.path.join(self.out, name)), sha256(os.path.join(again, name)), name)
        self.assertEqual(load_card(other, "image.card.json")["version"], "seed1")

    # --- vocabulary ----------------------------------------------------------------------
    def test_merges_file_format(self):
        path = os.path.join(self.out, "bpe_tiny_vocab.txt.gz")
        with open(path, "rb") as f:
            self.assertEqual(f.read(2), b"\x1f\x8b")
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        self.assertEqual(lines[0], '"bpe_simple_vocab_16e6.txt#version: 0.2"')
        merges = [tuple(l.split(" ")) for l in lines[1:]]
        self.assertGreaterEqual(len(merges), 900)
        self.assertLessEqual(len(merges), 1000)
        alphabet = set(ec.bytes_to_unicode().values())
        symbols = alphabet | {a + "</w>" for a in alphabet}
        self.assertEqual(len(alphabet), 256)
        for a, b in merges:  # each part exists when its merge comes; </w> only ends a word
            self.assertIn(a, symbols)
            self.assertIn(b, symbols)
            self.assertNotIn("</w>", a)
            self.assertNotIn(a + b, symbols, "duplicate vocabulary entry")
            symbols.add(a + b)
        self.assertEqual(load_card(self.out, "text.card.json")["arch"]["merges"], len(merges))

    def test_bytes_to_unicode_is_clips(self):
        t = ec.bytes_to_unicode()
        self.assertEqual(list(t)[:3], [33, 34, 35])
        self.assertEqual(t[ord(" ")], "\u0120")  # the familiar GPT-2/CLIP space symbol
        self.assertEqual(t[0], "\u0100")
        self.assertEqual(len(set(t.values())), 256)

    def test_tokenizer(self):
        tok = ec.ClipTokenizer(os.path.join(self.out, "bpe_tiny_vocab.txt.gz"))
        self.assertEqual((tok.vocab_size, tok.start_id, tok.end_id), (1514, 1512, 1513))
        ids = tok(["a photo of a cat", "A watercolor painting of a dragon, 35mm!"], 77)
        self.assertEqual(tuple(ids.shape), (2, 77))
        self.assertEqual(ids[:, 0].tolist(), [1512, 1512])
        for row in ids.tolist():
            end = row.index(1513)
            self.assertTrue(all(0 < v < 1512 for v in row[1:end]))
            self.assertTrue(all(v == 0 for v in row[end + 1:]))
        # Frequent corpus words are single tokens ("photo</w>"), unknown ones fall back to bytes.
        self.assertEqual(len(tok.encode("photo")), 1)
        self.assertGreater(len(tok.encode("xqzv")), 1)
        with torch.no_grad():
            self.assertEqual(tuple(self.text(ids).shape), (2, 32))

    # --- naming maps and strict loading --------------------------------------------------
    def test_open_clip_naming(self):
        sd = open_clip_state_dict(self.image, self.text)
        path = os.path.join(self.tmp.name, "oc.pt")
        torch.save({"epoch": 3, "state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())}, path)
        obj, how = ec.read_state_file(path)
        got = ec.unwrap_state_dict(obj)
        sizes = ec.infer_sizes(got, 2, 2)
        self.assertEqual((sizes["image_size"], sizes["patch_size"], sizes["vision_width"], sizes["vision_layers"],
                          sizes["embed_dim"], sizes["context_length"], sizes["vocab_size"], sizes["text_layers"]),
                         (224, 32, 64, 2, 32, 77, 1514, 2))
        vis, txt = ec.build_towers(sizes, True)
        ec.load_towers(got, vis, txt)
        a, b = self.outputs(self.image, self.text)
        c, d = self.outputs(vis.eval(), txt.eval())
        self.assertLess(float((a - c).abs().max()), 1e-6)
        self.assertLess(float((b - d).abs().max()), 1e-6)
        # And end to end: the CLI reads it (no open_clip here; no --arch: named from the sizes).
        out = os.path.join(self.tmp.name, "oc_out")
        run_export("--source", "open_clip", "--checkpoint", path, "--act", "quick_gelu",
                   "--vision-heads", "2", "--text-heads", "2",
                   "--vocab", os.path.join(self.out, "bpe_tiny_vocab.txt.gz"), "--out", out)
        e, f = self.outputs(torch.jit.load(os.path.join(out, "image.pt")), torch.jit.load(os.path.join(out, "text.pt")))
        self.assertLess(float((a - e).abs().max()), 1e-6)
        self.assertLess(float((b - f).abs().max()), 1e-6)
        card = load_card(out, "image.card.json")
        self.assertEqual(card["version"], "sha256-" + sha256(path)[:12])
        self.assertEqual(card["source"]["sha256"], sha256(path))
        self.assertEqual(load_card(out, "text.card.json")["version"], card["version"])

    def test_hf_naming(self):
        hf = hf_state_dict(open_clip_state_dict(self.image, self.text))
        folder = os.path.join(self.tmp.name, "hf_clip")
        os.makedirs(folder)
        torch.save(hf, os.path.join(folder, "pytorch_model.bin"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(HF_CONFIG, f)
        # A HF merges.txt: the same merges, plain text with HF's header.
        lines = gzip.open(os.path.join(self.out, "bpe_tiny_vocab.txt.gz")).read().decode("utf-8").split("\n")
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2"] + lines[1:]) + "\n")
        out = os.path.join(self.tmp.name, "hf_out")
        run_export("--source", "transformers", "--checkpoint", folder, "--out", out)  # merges.txt found in the folder
        a, b = self.outputs(self.image, self.text)
        c, d = self.outputs(torch.jit.load(os.path.join(out, "image.pt")), torch.jit.load(os.path.join(out, "text.pt")))
        self.assertLess(float((a - c).abs().max()), 1e-6)
        self.assertLess(float((b - d).abs().max()), 1e-6)
        txt = load_card(out, "text.card.json")
        self.assertEqual(txt["source"]["kind"], "transformers")
        self.assertEqual(txt["arch"]["activation"], "quick_gelu")
        vocab = [f for f in txt["files"] if f["role"] == "vocab"][0]
        self.assertEqual(vocab["path"], "merges.txt.gz")
        tok = ec.ClipTokenizer(os.path.join(out, vocab["path"]), txt["arch"]["merges"])
        self.assertEqual(tok.vocab_size, 1514)

    def test_missing_key_is_an_error_naming_it(self):
        sd = open_clip_state_dict(self.image, self.text)
        del sd["transformer.resblocks.1.ln_2.bias"]
        sizes = ec.infer_sizes(sd, 2, 2)
        vis, txt = ec.build_towers(sizes, True)
        with self.assertRaises(ec.UsageError) as cm:
            ec.load_towers(sd, vis, txt)
        self.assertIn("missing keys: transformer.resblocks.1.ln_2.bias", str(cm.exception))
        sd = open_clip_state_dict(self.image, self.text)
        sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(64)
        with self.assertRaises(ec.UsageError) as cm:
            ec.load_towers(sd, vis, txt)
        self.assertIn("unexpected keys: visual.transformer.resblocks.0.ls_1.gamma", str(cm.exception))
        # Through the CLI (HF naming): exit 2 and the key named on stderr.
        hf = hf_state_dict(open_clip_state_dict(self.image, self.text))
        del hf["vision_model.encoder.layers.1.mlp.fc2.bias"]
        path = os.path.join(self.tmp.name, "hf_missing.bin")
        torch.save(hf, path)
        p = run_export("--source", "transformers", "--checkpoint", path, "--act", "quick_gelu",
                       "--vision-heads", "2", "--text-heads", "2",
                       "--vocab", os.path.join(self.out, "bpe_tiny_vocab.txt.gz"),
                       "--out", os.path.join(self.tmp.name, "never"), expect=2)
        self.assertIn("visual.transformer.resblocks.1.mlp.c_proj.bias", p.stderr)

    def test_against_multihead_attention_reference(self):
        sd = open_clip_state_dict(self.image, self.text)
        ref = RefCLIP(dict(ec.TINY, vocab_size=1514)).eval()
        ref.load_state_dict(sd, strict=True)
        a, b = self.outputs(self.image, self.text)
        x, ids = tiny_batch()
        with torch.no_grad():
            self.assertLess(float((a - ref.encode_image(x)).abs().max()), 1e-4)
            self.assertLess(float((b - ref.encode_text(ids)).abs().max()), 1e-4)

    # --- usage errors ------------------------------------------------------------------
    def test_usage_errors(self):
        o = os.path.join(self.tmp.name, "bad")
        p = run_export("--source", "open_clip", "--arch", "ViT-H-99", "--pretrained", "x", "--out", o, expect=2)
        self.assertIn("unknown --arch", p.stderr)
        p = run_export("--source", "open_clip", "--arch", "ViT-B-32", "--checkpoint", "/nonexistent.pt",
                       "--out", o, expect=2)
        self.assertIn("does not exist", p.stderr)
        junk = os.path.join(self.tmp.name, "junk.pt")
        with open(junk, "wb") as f:
            f.write(b"not a checkpoint")
        p = run_export("--source", "open_clip", "--arch", "ViT-B-32", "--checkpoint", junk,
                       "--vocab", os.path.join(self.out, "bpe_tiny_vocab.txt.gz"), "--out", o, expect=2)
        self.assertIn("cannot read checkpoint", p.stderr)
        # A tiny checkpoint is not a ViT-B-32.
        path = os.path.join(self.tmp.name, "tiny_oc.pt")
        torch.save(open_clip_state_dict(self.image, self.text), path)
        p = run_export("--source", "open_clip", "--arch", "ViT-B-32", "--checkpoint", path,
                       "--vocab", os.path.join(self.out, "bpe_tiny_vocab.txt.gz"), "--out", o, expect=2)
        self.assertIn("does not match --arch ViT-B-32", p.stderr)
        badvocab = os.path.join(self.tmp.name, "vocab.txt")
        with open(badvocab, "w") as f:
            f.write("hello world\n")
        p = run_export("--source", "open_clip", "--checkpoint", path, "--vocab", badvocab, "--out", o, expect=2)
        self.assertIn("not a BPE merges file", p.stderr)
        p = run_export("--random-init", "--tiny", "--arch", "ViT-B-32", "--out", o, expect=2)
        p = run_export("--out", o, expect=2)
        self.assertIn("--source", p.stderr)
        p = run_export("--help")
        self.assertIn("--random-init", p.stdout)

    # --- captioner ---------------------------------------------------------------------
    def test_captioner(self):
        card = load_card(self.out, "captioner.card.json")
        self.assertEqual((card["modality"], card["backend"]), ("captioner", "torchscript"))
        self.assertEqual(card["input"], load_card(self.out, "image.card.json")["input"])
        self.assertEqual([f["role"] for f in card["files"]], ["module", "vocab"])
        cap = torch.jit.load(os.path.join(self.out, "captioner.pt"))
        x, _ = tiny_batch()
        with torch.no_grad():
            ids = cap(x)
            again = cap(x)
        self.assertEqual(ids.dtype, torch.int64)
        self.assertEqual(ids.shape[0], 2)
        self.assertLessEqual(ids.shape[1], 77)
        self.assertTrue(torch.equal(ids, again))
        for row in ids.tolist():
            self.assertEqual(row[0], 1512)
            end = row.index(1513)
            self.assertGreater(end, 1)
            self.assertTrue(all(0 < v < 1512 for v in row[1:end]))
            self.assertTrue(all(v == 0 for v in row[end + 1:]))


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2 if "-v" in sys.argv else 1)
    if hasattr(ExportClipTest, "export_seconds"):
        print("tiny export took %.1f s" % ExportClipTest.export_seconds, file=sys.stderr)
    sys.exit(0 if prog.result.wasSuccessful() else 1)
