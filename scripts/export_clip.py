#!/usr/bin/python3
"""Exports a CLIP model's image and text towers to TorchScript, with the tokenizer's merges
file and the two encoder cards (schemas/encoder-card.md).

Sources of weights:
  --source open_clip --arch ViT-B-32|ViT-L-14 [--pretrained TAG | --checkpoint FILE]
      With the open_clip package importable, open_clip builds the model (and downloads the
      pretrained tag); without it, --checkpoint FILE is read directly (torch.load, an OpenAI
      TorchScript archive, or .safetensors when the safetensors package is importable). Keys
      use open_clip / OpenAI naming (visual.conv1.weight, visual.transformer.resblocks.N...,
      token_embedding.weight, transformer.resblocks.N..., ln_final, text_projection ...),
      possibly wrapped in "state_dict" and/or carrying "module." prefixes.
  --source transformers --checkpoint DIR_OR_FILE
      A Hugging Face CLIPModel folder (config.json + pytorch_model.bin or model.safetensors)
      or a bare weights file; HF names are mapped onto the same towers.
  --random-init [--tiny]
      No download. --tiny: a small model of the same interface (224 px, patch 32, width 64,
      2 layers, 2 heads, embed dim 32, quick_gelu) and its own learned BPE merges (~1000).
      Without --tiny: a full-size architecture (--arch, ViT-B-32 by default) with random
      weights, for throughput checks; its merges file is --vocab FILE or the tiny learned one.

Outputs under --out DIR:
  image.pt         forward(x: float32 [N,3,S,S], already (x/255-mean)/std) -> [N,D] projected
                   image features, not L2-normalised
  text.pt          forward(ids: int64 [N,context], <start> ... <end> then 0-padding) -> [N,D]
                   projected text features at the <end> position (argmax of ids, as CLIP does)
  <merges>.txt.gz  the BPE merges file (CLIP format: gzip, a "#version" header line, then one
                   "a b" merge per line)
  image.card.json, text.card.json (and with --captioner-tiny: captioner.pt, captioner.card.json)

The text tower's vocabulary is CLIP's: 256 byte symbols, the same 256 with "</w>", one symbol
per merge (the first vocab_size - 514 merges of the file), then <start> and <end> (the last two
ids). Every export is checked: the source model (open_clip / transformers when those were used,
otherwise the eager module) and the saved-and-reloaded TorchScript modules must agree on a
random batch to max abs diff < 1e-4.

Needs python3-torch (Debian: /usr/bin/python3; also runs on torch 2.x) and numpy.
Progress lines go to stderr. Exit status: 0 done, 1 the export check failed, 2 bad usage
(bad arch, checkpoint, vocab or options).
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CLIP_MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2"'
TINY_MERGES_NAME = "bpe_tiny_vocab.txt.gz"
CLIP_MAX_MERGES = 49152 - 256 - 2  # what CLIP's tokenizer reads of its merges file
TOLERANCE = 1e-4
DEFAULT_GAMMA = 2.0

# Known architectures: the sizes a checkpoint for --arch must have.
ARCHS = {
    "ViT-B-32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     vision_heads=12, embed_dim=512, context_length=77, vocab_size=49408,
                     text_width=512, text_layers=12, text_heads=8),
    "ViT-L-14": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16, embed_dim=768, context_length=77, vocab_size=49408,
                     text_width=768, text_layers=12, text_heads=12),
}
TINY = dict(image_size=224, patch_size=32, vision_width=64, vision_layers=2, vision_heads=2,
            embed_dim=32, context_length=77, vocab_size=None, text_width=64, text_layers=2,
            text_heads=2)
TINY_MERGES = 1000


class UsageError(Exception):
    """Bad arch / checkpoint / vocab / options: exit status 2."""


class CheckError(Exception):
    """The exported modules disagree with the source model: exit status 1."""


def log(msg: str) -> None:
    print("export_clip: " + msg, file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Tokenizer side: CLIP's byte alphabet, a small BPE learner, merges files, a reference encoder
# ----------------------------------------------------------------------------------------

def bytes_to_unicode() -> Dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Order matters for vocabulary ids: printable bytes first, then the remapped ones.
    order = printable + [b for b in range(256) if b not in printable]
    return OrderedDict((b, table[b]) for b in order)


def basic_clean(text: str) -> str:
    import html
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# CLIP's pattern uses \p{L} / \p{N} (the `regex` module); this is the nearest `re` form.
_PRETOKEN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+",
                       re.IGNORECASE)


def pretokenize(text: str) -> List[str]:
    table = bytes_to_unicode()
    out = []
    for tok in _PRETOKEN.findall(basic_clean(text).lower()):
        out.append("".join(table[b] for b in tok.encode("utf-8")))
    return out


# A few KB of prompt-like English: what the tiny vocabulary is learned from.
TINY_CORPUS = """
a photo of a cat sitting on a wooden table next to a window, soft morning light
a portrait of an old man with a white beard, oil painting, highly detailed
a cyberpunk city street at night, neon lights, rain, reflections, cinematic lighting
a watercolor painting of a small village in the mountains, autumn colors
an astronaut riding a horse on the moon, digital art, trending on artstation
a close up photograph of a red rose with water drops, macro, shallow depth of field
a fantasy castle on a cliff above the sea, dramatic clouds, sunset, epic landscape
a cute corgi puppy wearing a tiny hat, studio photo, white background
a bowl of ramen with egg and green onions, food photography, steam rising
the interior of a cozy library with tall bookshelves and a fireplace, warm light
a futuristic car parked in front of a glass building, concept art, octane render
a black and white photo of a busy train station in the nineteen fifties
an ancient temple in the jungle covered with vines, mist, volumetric light
a girl with long red hair reading a book under a tree, anime style, studio ghibli
a still life of apples, pears and grapes on a plate, classical painting
a robot playing the violin on a stage, spotlight, dark background, 3d render
a snowy forest at dawn with a frozen lake, pastel sky, peaceful, wide angle
a medieval knight in shining armor holding a sword, full body, character design
a colorful hot air balloon festival over green hills, aerial view, bright day
a lighthouse on a rocky coast during a storm, huge waves, moody atmosphere
a pencil sketch of a sleeping dog curled up on a blanket, simple lines
an underwater scene with coral reefs, tropical fish and sun rays, vibrant colors
a steampunk airship flying over a victorian city, brass and copper, intricate details
a minimalist poster of a mountain range, flat design, orange and blue palette
a young woman in a yellow raincoat walking in the rain, street photography, bokeh
a dragon sleeping on a pile of gold coins in a cave, fantasy illustration
a modern kitchen with white cabinets and marble countertops, interior design photo
a field of sunflowers under a blue sky with fluffy white clouds, summer
a samurai standing in a bamboo forest, ink painting, japanese art
an owl perched on a branch at night, full moon, detailed feathers, wildlife photo
a vintage poster advertising a trip to paris, art deco style, eiffel tower
a spaceship landing on an alien planet with two suns, science fiction, matte painting
a glass of red wine on a table in a restaurant, candle light, blurred background
a child building a sandcastle on the beach, golden hour, film grain, kodak portra
a portrait of a tiger in the snow, national geographic, sharp focus, eight k
a surreal landscape with floating islands and waterfalls, dreamlike, by salvador dali
a pixel art scene of a small house with a garden, retro video game, sixteen bit
a detailed map of a fantasy kingdom with rivers, forests and castles, parchment
a bustling market in marrakech with spices and lanterns, travel photography
a sculpture of a horse made of driftwood standing on a beach, overcast sky
a mountain cabin with smoke rising from the chimney, winter evening, cozy
a man in a suit walking a dog through central park in new york, autumn leaves
a bouquet of wildflowers in a blue vase, impressionist painting, thick brush strokes
a close up of a mechanical watch movement with gears and jewels, product photo
a frog wearing a crown sitting on a lily pad, children's book illustration
a desert highway at sunset with a lone motorcycle, long exposure, road trip
a group of friends having a picnic in a park, candid photo, happy, summer day
an abandoned factory with broken windows and overgrown plants, urban exploration
a koi pond in a japanese garden with a red bridge, cherry blossoms, spring
a galaxy swirling with stars and nebula, deep space, hubble telescope image
a chef preparing sushi in a restaurant kitchen, motion blur, documentary photo
a logo of a fox head, vector, simple, geometric shapes, white background
a stained glass window showing a sun and a moon, church, colorful light
a polar bear walking on sea ice, arctic, blue tones, wildlife documentary
a tree house in a giant oak tree with rope ladders, whimsical, fairy tale
a cup of coffee with latte art on a rustic wooden table, top view
a comic book panel of a superhero flying over the city, bold lines, halftone
a foggy harbor with fishing boats at dawn, muted colors, oil on canvas
a marble statue of a greek goddess in a museum, dramatic side lighting
an isometric illustration of a tiny office with computers and plants, low poly
a wolf howling at the moon on a hill, silhouette, starry night sky
a plate of pancakes with berries and maple syrup, breakfast, natural light
a busy street in tokyo with signs and crowds, evening, shot on thirty five mm film
a cat and a dog sleeping together on a sofa, cozy living room, warm tones
a sailboat on a calm lake reflecting the mountains, serene, wide shot
a haunted house on a hill with bats and a full moon, halloween, spooky
an elephant walking across the savanna at sunset, dust, golden light, safari
a portrait photo of a smiling woman with freckles, natural makeup, eighty five mm lens
a bridge over a river in a small european town, cobblestone streets, flowers
a colorful parrot sitting on a branch in the rainforest, high resolution photo
a knight fighting a giant monster in a ruined city, dark fantasy, highly detailed
a loaf of fresh bread on a cutting board with butter and a knife, bakery
a train crossing a stone viaduct in the highlands, steam, scotland, landscape photo
a painting of a woman with an umbrella in a garden, by claude monet
a realistic render of a sports car on a race track, motion blur, sunny day
a bear catching salmon in a waterfall, alaska, wildlife photography, action shot
"""


def learn_bpe(corpus: str, num_merges: int) -> List[Tuple[str, str]]:
    """Plain BPE over the corpus' words (CLIP pre-tokenisation, byte symbols, "</w>" on each
    word's final symbol). Ties break by first occurrence order, so the result is deterministic."""
    freqs: Dict[Tuple[str, ...], int] = OrderedDict()
    for line in corpus.strip().splitlines():
        for tok in pretokenize(line):
            word = tuple(tok[:-1]) + (tok[-1] + "</w>",)
            freqs[word] = freqs.get(word, 0) + 1
    words = [list(w) for w in freqs]
    counts = list(freqs.values())
    merges: List[Tuple[str, str]] = []
    base = list(bytes_to_unicode().values())
    symbols = set(base) | {b + "</w>" for b in base}
    banned = set()  # pairs whose joined symbol exists already: a vocabulary entry must be unique
    while len(merges) < num_merges:
        pair_counts: Dict[Tuple[str, str], int] = {}
        for w, c in zip(words, counts):
            for i in range(len(w) - 1):
                p = (w[i], w[i + 1])
                if p not in banned:
                    pair_counts[p] = pair_counts.get(p, 0) + c
        if not pair_counts:
            break
        best = max(pair_counts.items(), key=lambda kv: kv[1])[0]  # first max = first seen
        if best[0] + best[1] in symbols:
            banned.add(best)
            continue
        symbols.add(best[0] + best[1])
        merges.append(best)
        joined = best[0] + best[1]
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == best[0] and w[i + 1] == best[1]:
                    w[i:i + 2] = [joined]
                i += 1
    return merges


def write_merges_gz(path: str, merges: List[Tuple[str, str]]) -> None:
    """CLIP's format: gzip; the header line, then one "a b" merge per line (no trailing newline,
    so that a reader taking lines[1:] gets exactly the merges). mtime 0: byte-reproducible."""
    text = "\n".join([CLIP_MERGES_HEADER] + ["%s %s" % m for m in merges])
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(text.encode("utf-8"))


def read_merges(path: str) -> List[Tuple[str, str]]:
    """Reads a CLIP merges file (.gz) or a HF merges.txt; checks its format (UsageError)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise UsageError("cannot read the merges file %s: %s" % (path, e))
    lines = text.split("\n")
    if not lines or "#version" not in lines[0]:
        raise UsageError("%s is not a BPE merges file: its first line should be a '#version' header, got %r"
                         % (path, lines[0][:80] if lines else ""))
    merges = []
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UsageError("%s line %d is not a merge 'a b': %r" % (path, n, line[:80]))
        merges.append((parts[0], parts[1]))
    if not merges:
        raise UsageError("%s holds no merges" % path)
    return merges


class ClipTokenizer:
    """Reference CLIP BPE encoder (what the C++ clip-bpe tokenizer must reproduce): ids are
    byte symbols (256), byte symbols + "</w>" (256), merges, <start>, <end>."""

    def __init__(self, merges_path: str, num_merges: Optional[int] = None):
        merges = read_merges(merges_path)
        if num_merges is None:
            num_merges = min(len(merges), CLIP_MAX_MERGES)
        if len(merges) < num_merges:
            raise UsageError("%s has %d merges, the text tower needs %d" % (merges_path, len(merges), num_merges))
        merges = merges[:num_merges]
        base = list(bytes_to_unicode().values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.start_id = len(vocab) - 2
        self.end_id = len(vocab) - 1

    def bpe(self, token: str) -> List[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text: str) -> List[int]:
        ids = []
        for tok in pretokenize(text):
            ids.extend(self.encoder[s] for s in self.bpe(tok))
        return ids

    def __call__(self, texts: List[str], context: int = 77) -> torch.Tensor:
        out = torch.zeros(len(texts), context, dtype=torch.long)
        for r, t in enumerate(texts):
            ids = [self.start_id] + self.encode(t)[:context - 2] + [self.end_id]
            out[r, :len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------------------
# The towers (plain torch.nn, scriptable; parameter names are open_clip's)
# ----------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout
    (in_proj_weight [3W, W] = q;k;v, in_proj_bias, out_proj), batch-first input."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads != 0:
            raise UsageError("width %d is not divisible by heads %d" % (width, heads))
        self.heads = heads
        self.head_dim = width // heads
        self.scale = float(self.head_dim) ** -0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        n, l, w = x.shape[0], x.shape[1], x.shape[2]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(n, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [N, H, L, hd]
        att = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if attn_mask is not None:
            att = att + attn_mask
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(n, l, w)
        return self.out_proj(y)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)), ("gelu", act), ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, mlp_width, quick_gelu, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower: x [N,3,S,S] (normalised) -> [N, embed_dim] (not L2-normalised)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_width: int, embed_dim: int, quick_gelu: bool, eps: float = 1e-5):
        super().__init__()
        if image_size % patch_size != 0:
            raise UsageError("image size %d is not a multiple of patch size %d" % (image_size, patch_size))
        grid = image_size // patch_size
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, mlp_width, quick_gelu, eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid^2, W]
        cls = self.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, x.shape[2])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x, None)
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


class TextTransformer(nn.Module):
    """CLIP's text tower: ids [N, context] int64 -> [N, embed_dim] at the argmax (<end>) position."""

    def __init__(self, context_length: int, vocab_size: int, width: int, layers: int, heads: int,
                 mlp_width: int, embed_dim: int, quick_gelu: bool, eps: float = 1e-5):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width, quick_gelu, eps)
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        l = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:l]
        x = self.transformer(x, self.attn_mask[:l, :l].to(x.dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return x @ self.text_projection


class TinyCaptioner(nn.Module):
    """Tiny random captioner (plumbing tests only): image [N,3,S,S] -> ids [N, out_len] int64:
    <start>, greedily decoded tokens, <end>, then 0-padding. A pooled patch feature is the
    first token of a small causal decoder."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 vocab_size: int, max_tokens: int, out_len: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.start_id = vocab_size - 2
        self.end_id = vocab_size - 1
        self.max_tokens = max_tokens
        self.out_len = out_len
        self.patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.img_proj = nn.Linear(width, width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(max_tokens + 3, width))
        self.transformer = Transformer(width, layers, heads, 4 * width, True, 1e-5)
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        allowed = torch.zeros(vocab_size)
        allowed[0] = float("-inf")              # 0 is padding in the output
        allowed[self.start_id] = float("-inf")
        self.register_buffer("logit_mask", allowed)
        n = max_tokens + 3
        self.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        img = self.img_proj(self.patch(x).flatten(2).mean(dim=2)).unsqueeze(1)  # [N,1,W]
        ids = torch.full((n, 1), self.start_id, dtype=torch.long, device=x.device)
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(self.max_tokens):
            h = torch.cat([img, self.token_embedding(ids)], dim=1)
            l = h.shape[1]
            h = h + self.positional_embedding[:l]
            h = self.ln_final(self.transformer(h, self.attn_mask[:l, :l]))
            logits = self.head(h[:, -1, :]) + self.logit_mask
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            done = done | (nxt == self.end_id)
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            if bool(done.all()):
                break
        # Rows that never produced <end>: close them.
        last = torch.where(done, torch.zeros_like(ids[:, 0]), torch.full_like(ids[:, 0], self.end_id))
        ids = torch.cat([ids, last.unsqueeze(1)], dim=1)
        out = torch.zeros((n, self.out_len), dtype=torch.long, device=x.device)
        out[:, :ids.shape[1]] = ids
        return out


# ----------------------------------------------------------------------------------------
# State dicts: reading, unwrapping, HF -> open_clip names, size inference, strict loading
# ----------------------------------------------------------------------------------------

# Keys that carry no tower weights (OpenAI archives' hyper-parameters, HF position ids, the
# contrastive temperature, buffers that are rebuilt).
IGNORED_KEYS = re.compile(r"^(logit_scale|logit_bias|input_resolution|context_length|vocab_size|attn_mask"
                          r"|.*\.position_ids|.*\.attn_mask)$")


ALLOW_PICKLE = False  # --allow-pickle: torch.load(weights_only=False) for trusted full pickles


def read_state_file(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """-> (state dict, how it was read). Raises UsageError when the file cannot be read."""
    if not os.path.isfile(path):
        raise UsageError("checkpoint %s is not a file" % path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError("%s is a .safetensors file but the safetensors module is not importable" % path)
        try:
            return dict(load_file(path, device="cpu")), "safetensors"
        except Exception as e:
            raise UsageError("cannot read %s as safetensors: %s" % (path, e))
    errors = []
    try:
        obj = torch.load(path, map_location="cpu")
        return obj, "torch.load"
    except Exception as e:  # an OpenAI TorchScript archive, or not a checkpoint at all
        errors.append("torch.load: %s" % (str(e).splitlines()[0] if str(e) else type(e).__name__))
    try:
        return torch.jit.load(path, map_location="cpu").state_dict(), "torch.jit.load"
    except Exception as e:
        errors.append("torch.jit.load: %s" % (str(e).splitlines()[0] if str(e) else type(e).__name__))
    if ALLOW_PICKLE:
        try:
            return torch.load(path, map_location="cpu", weights_only=False), "torch.load(weights_only=False)"
        except Exception as e:
            errors.append("torch.load(weights_only=False): %s" % (str(e).splitlines()[0] if str(e) else type(e).__name__))
    hint = "" if ALLOW_PICKLE else "; if it is a trusted full pickle (torch >= 2.6 refuses those), pass --allow-pickle"
    raise UsageError("cannot read checkpoint %s (%s)%s" % (path, "; ".join(errors), hint))


def unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UsageError("the checkpoint holds a %s, not a state dict" % type(obj).__name__)
    out = OrderedDict()
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        while k.startswith("module."):
            k = k[len("module."):]
        if isinstance(v, torch.Tensor):
            out[k] = v
    if not out:
        raise UsageError("the checkpoint holds no tensors")
    return out


def _hf_layer_map(src: str, dst: str, sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor],
                  used: set) -> None:
    layer_re = re.compile(re.escape(src) + r"\.(\d+)\.")
    idx = sorted({int(m.group(1)) for k in sd for m in [layer_re.match(k)] if m})
    for i in idx:
        s, d = "%s.%d." % (src, i), "%s.%d." % (dst, i)
        q, k, v = (s + "self_attn.%s_proj." % n for n in "qkv")
        if all(p + "weight" in sd for p in (q, k, v)):
            out[d + "attn.in_proj_weight"] = torch.cat([sd[q + "weight"], sd[k + "weight"], sd[v + "weight"]], 0)
            used.update(p + "weight" for p in (q, k, v))
        if all(p + "bias" in sd for p in (q, k, v)):
            out[d + "attn.in_proj_bias"] = torch.cat([sd[q + "bias"], sd[k + "bias"], sd[v + "bias"]], 0)
            used.update(p + "bias" for p in (q, k, v))
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                if s + a + "." + p in sd:
                    out[d + b + "." + p] = sd[s + a + "." + p]
                    used.add(s + a + "." + p)


def hf_to_open_clip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames a HF CLIPModel state dict to open_clip naming. Keys it does not know are kept
    as they are, so that strict loading reports them."""
    sd = OrderedDict((k[len("clip."):] if k.startswith("clip.") else k, v) for k, v in sd.items())
    out: Dict[str, torch.Tensor] = OrderedDict()
    used: set = set()

    def take(src: str, dst: str, fn=None):
        if src in sd:
            out[dst] = fn(sd[src]) if fn else sd[src]
            used.add(src)

    take("vision_model.embeddings.class_embedding", "visual.class_embedding")
    take("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
    take("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding")
    for p in ("weight", "bias"):
        take("vision_model.pre_layrnorm." + p, "visual.ln_pre." + p)
        take("vision_model.post_layernorm." + p, "visual.ln_post." + p)
        take("text_model.final_layer_norm." + p, "ln_final." + p)
    take("visual_projection.weight", "visual.proj", lambda t: t.t().contiguous())
    take("text_projection.weight", "text_projection", lambda t: t.t().contiguous())
    take("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    take("text_model.embeddings.position_embedding.weight", "positional_embedding")
    take("logit_scale", "logit_scale")
    _hf_layer_map("vision_model.encoder.layers", "visual.transformer.resblocks", sd, out, used)
    _hf_layer_map("text_model.encoder.layers", "transformer.resblocks", sd, out, used)
    for k, v in sd.items():
        if k not in used:
            out[k] = v
    return out


def _count_layers(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def infer_sizes(sd: Dict[str, torch.Tensor], vision_heads: Optional[int] = None,
                text_heads: Optional[int] = None) -> Dict[str, int]:
    """Tower sizes from an open_clip-named state dict (heads: given, else width / 64)."""
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise UsageError("the state dict is not a CLIP ViT checkpoint in open_clip/OpenAI naming; missing: %s"
                         % ", ".join(missing))
    conv = sd["visual.conv1.weight"]
    vw, patch = conv.shape[0], conv.shape[-1]
    grid = int(round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)))
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise UsageError("visual.positional_embedding has %d rows, not grid^2 + 1"
                         % sd["visual.positional_embedding"].shape[0])
    tw = sd["token_embedding.weight"].shape[1]
    sizes = dict(
        image_size=grid * patch, patch_size=patch, vision_width=vw,
        vision_layers=_count_layers(sd, "visual.transformer.resblocks."),
        vision_heads=vision_heads or max(1, vw // 64),
        vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        embed_dim=sd["visual.proj"].shape[1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], text_width=tw,
        text_layers=_count_layers(sd, "transformer.resblocks."),
        text_heads=text_heads or max(1, tw // 64),
        text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    )
    if sd["text_projection"].shape[1] != sizes["embed_dim"]:
        raise UsageError("visual.proj gives embed dim %d but text_projection gives %d"
                         % (sizes["embed_dim"], sd["text_projection"].shape[1]))
    return sizes


def check_arch(sizes: Dict[str, int], arch: Optional[str]) -> None:
    if not arch:
        return
    expected = ARCHS[arch]
    bad = ["%s %s (expected %s)" % (k, sizes[k], v) for k, v in expected.items()
           if v is not None and k in sizes and sizes[k] != v and not k.endswith("heads")]
    if bad:
        raise UsageError("the checkpoint does not match --arch %s: %s" % (arch, ", ".join(bad)))


def arch_for(sizes: Dict[str, int]) -> Optional[str]:
    for name, spec in ARCHS.items():
        if all(sizes.get(k) == v for k, v in spec.items()):
            return name
    return None


def build_towers(sizes: Dict[str, int], quick_gelu: bool, eps: float = 1e-5) -> Tuple[nn.Module, nn.Module]:
    vis = VisionTransformer(sizes["image_size"], sizes["patch_size"], sizes["vision_width"], sizes["vision_layers"],
                            sizes["vision_heads"], sizes.get("vision_mlp", 4 * sizes["vision_width"]),
                            sizes["embed_dim"], quick_gelu, eps)
    txt = TextTransformer(sizes["context_length"], sizes["vocab_size"], sizes["text_width"], sizes["text_layers"],
                          sizes["text_heads"], sizes.get("text_mlp", 4 * sizes["text_width"]),
                          sizes["embed_dim"], quick_gelu, eps)
    return vis, txt


def load_towers(sd: Dict[str, torch.Tensor], vis: nn.Module, txt: nn.Module) -> None:
    """Strict load of an open_clip-named state dict into the two towers: any missing or
    unexpected key is an error that lists them all."""
    vsd, tsd, unexpected = OrderedDict(), OrderedDict(), []
    vkeys, tkeys = set(vis.state_dict().keys()), set(txt.state_dict().keys())
    for k, v in sd.items():
        if k.startswith("visual.") and k[len("visual."):] in vkeys:
            vsd[k[len("visual."):]] = v
        elif k in tkeys:
            tsd[k] = v
        elif not IGNORED_KEYS.match(k):
            unexpected.append(k)
    missing = ["visual." + k for k in sorted(vkeys - set(vsd))] + sorted(tkeys - set(tsd))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append("missing keys: " + ", ".join(missing))
        if unexpected:
            msg.append("unexpected keys: " + ", ".join(unexpected))
        raise UsageError("the state dict does not fit the CLIP towers; " + "; ".join(msg))
    for name, module, part in (("image", vis, vsd), ("text", txt, tsd)):
        own = module.state_dict()
        bad = ["%s%s %s (expected %s)" % ("visual." if name == "image" else "", k, tuple(v.shape), tuple(own[k].shape))
               for k, v in part.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise UsageError("shape mismatch in the %s tower: %s" % (name, ", ".join(bad)))
        module.load_state_dict(OrderedDict((k, v.float()) for k, v in part.items()), strict=True)


def random_init(vis: VisionTransformer, txt: TextTransformer, seed: int) -> None:
    """open_clip-like initialisation from one seeded generator (deterministic)."""
    g = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g) * std)

    for tower in (vis, txt):
        width = tower.transformer.resblocks[0].ln_1.weight.shape[0]
        layers = len(tower.transformer.resblocks)
        attn_std, proj_std, fc_std = width ** -0.5, (width ** -0.5) * ((2 * layers) ** -0.5), (2 * width) ** -0.5
        for blk in tower.transformer.resblocks:
            normal_(blk.attn.in_proj_weight, attn_std)
            normal_(blk.attn.in_proj_bias, 0.02)
            normal_(blk.attn.out_proj.weight, proj_std)
            normal_(blk.attn.out_proj.bias, 0.02)
            normal_(blk.mlp.c_fc.weight, fc_std)
            normal_(blk.mlp.c_fc.bias, 0.02)
            normal_(blk.mlp.c_proj.weight, proj_std)
            normal_(blk.mlp.c_proj.bias, 0.02)
            for ln in (blk.ln_1, blk.ln_2):
                normal_(ln.weight, 0.05)
                ln.weight.data += 1.0
                normal_(ln.bias, 0.02)
    vw = vis.class_embedding.shape[0]
    normal_(vis.conv1.weight, (3 * vis.conv1.weight.shape[-1] ** 2) ** -0.5)
    normal_(vis.class_embedding, vw ** -0.5)
    normal_(vis.positional_embedding, vw ** -0.5)
    normal_(vis.proj, vw ** -0.5)
    tw = txt.text_projection.shape[0]
    normal_(txt.token_embedding.weight, 0.02)
    normal_(txt.positional_embedding, 0.01)
    normal_(txt.text_projection, tw ** -0.5)
    for ln in (vis.ln_pre, vis.ln_post, txt.ln_final):
        normal_(ln.weight, 0.05)
        ln.weight.data += 1.0
        normal_(ln.bias, 0.02)


# ----------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------

class Source:
    """What an export needs: the towers (loaded), the reference functions to compare against,
    card metadata."""

    def __init__(self):
        self.vis: Optional[VisionTransformer] = None
        self.txt: Optional[TextTransformer] = None
        self.sizes: Dict[str, int] = {}
        self.quick_gelu = True
        self.ref_image = None   # callable x -> [N,D]
        self.ref_text = None    # callable ids -> [N,D]
        self.ref_name = "eager module"
        self.name = ""
        self.version = ""
        self.source_info: Dict = {}
        self.mean, self.std = list(CLIP_MEAN), list(CLIP_STD)
        self.filter = "bicubic"
        self.vocab_src: Optional[str] = None  # merges file to copy
        self.merges: Optional[List[Tuple[str, str]]] = None  # merges to write (tiny vocab)


def resolve_act(args, default: Optional[bool], what: str) -> bool:
    if args.act == "quick_gelu":
        return True
    if args.act == "gelu":
        return False
    if default is None:
        log("warning: %s does not say which activation it uses; assuming quick_gelu (OpenAI weights). "
            "Pass --act gelu for open_clip's LAION/DataComp-trained ViT-B-32/L-14." % what)
        return True
    return default


def ckpt_version(path: str) -> str:
    return "sha256-" + sha256_file(path)[:12]


def name_for(sizes: Dict[str, int], arch: Optional[str]) -> str:
    arch = arch or arch_for(sizes)
    return "clip-" + (arch or "ViT-w%d-p%d-l%d" % (sizes["vision_width"], sizes["patch_size"], sizes["vision_layers"]))


def source_open_clip(args) -> Source:
    if args.pretrained and args.checkpoint:
        raise UsageError("give --pretrained TAG or --checkpoint FILE, not both")
    if not args.pretrained and not args.checkpoint:
        raise UsageError("--source open_clip needs --pretrained TAG or --checkpoint FILE")
    if args.pretrained and not args.arch:
        raise UsageError("--pretrained needs --arch (%s)" % " | ".join(ARCHS))
    src = Source()
    try:
        import open_clip  # noqa: F401
    except ImportError:
        open_clip = None
    if open_clip is None or not args.arch:
        if not args.checkpoint:
            raise UsageError("the open_clip module is not importable: pass --checkpoint FILE "
                             "(open_clip / OpenAI naming), or install open_clip for --pretrained")
        log("%s; reading %s directly" % ("open_clip is not importable" if open_clip is None else "no --arch",
                                        args.checkpoint))
        obj, how = read_state_file(args.checkpoint)
        sd = unwrap_state_dict(obj)
        from_openai_archive = how == "torch.jit.load"
        src.quick_gelu = resolve_act(args, True if from_openai_archive else None, args.checkpoint)
        src.sizes = infer_sizes(sd, args.vision_heads, args.text_heads)
        check_arch(src.sizes, args.arch)
        src.name = name_for(src.sizes, args.arch)
        src.vis, src.txt = build_towers(src.sizes, src.quick_gelu)
        load_towers(sd, src.vis, src.txt)
        src.version = ckpt_version(args.checkpoint)
        src.source_info = {"kind": "open_clip-checkpoint", "arch": args.arch or arch_for(src.sizes),
                           "checkpoint": os.path.basename(args.checkpoint),
                           "sha256": sha256_file(args.checkpoint), "read_with": how}
        src.vocab_src = args.vocab
        if not src.vocab_src:
            raise UsageError("without the open_clip package, pass --vocab FILE (CLIP's bpe_simple_vocab_16e6.txt.gz)")
        return src

    src.name = "clip-" + args.arch
    version = getattr(open_clip, "__version__", "?")
    log("building %s with open_clip %s" % (args.arch, version))
    preprocess = {}
    if args.pretrained:
        quick = None
        try:
            pcfg = open_clip.get_pretrained_cfg(args.arch, args.pretrained) or {}
        except Exception:
            pcfg = {}
        if not pcfg and not os.path.isfile(args.pretrained):
            try:
                tags = open_clip.list_pretrained_tags_by_model(args.arch)
            except Exception:
                tags = []
            raise UsageError("open_clip knows no pretrained tag %r for %s%s" % (
                args.pretrained, args.arch, (" (known: %s)" % ", ".join(tags)) if tags else ""))
        if "quick_gelu" in pcfg:
            quick = bool(pcfg["quick_gelu"])
        elif args.pretrained == "openai":
            quick = True
        quick = resolve_act(args, quick if quick is not None else False, "pretrained tag " + args.pretrained)
        preprocess = pcfg
        log("downloading / loading pretrained weights %r (quick_gelu=%s)" % (args.pretrained, quick))
        try:
            model = open_clip.create_model(args.arch, pretrained=args.pretrained, force_quick_gelu=quick)
        except Exception as e:
            raise UsageError("open_clip could not create %s with pretrained %r: %s" % (args.arch, args.pretrained, e))
        src.version = args.pretrained if not os.path.isfile(args.pretrained) else ckpt_version(args.pretrained)
        src.source_info = {"kind": "open_clip", "open_clip_version": version, "arch": args.arch,
                           "pretrained": args.pretrained}
        if os.path.isfile(args.pretrained):
            src.source_info["sha256"] = sha256_file(args.pretrained)
    elif args.checkpoint:
        obj, how = read_state_file(args.checkpoint)
        sd = unwrap_state_dict(obj)
        quick = resolve_act(args, True if how == "torch.jit.load" else None, args.checkpoint)
        try:
            model = open_clip.create_model(args.arch, pretrained=None, force_quick_gelu=quick)
        except Exception as e:
            raise UsageError("open_clip could not create %s: %s" % (args.arch, e))
        own = model.state_dict()
        sd = OrderedDict((k, v) for k, v in sd.items() if k in own or not IGNORED_KEYS.match(k))
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            raise UsageError("checkpoint %s does not fit open_clip %s: missing keys: %s; unexpected keys: %s" % (
                args.checkpoint, args.arch, ", ".join(missing) or "none", ", ".join(unexpected) or "none"))
        model.load_state_dict(OrderedDict((k, v.float()) for k, v in sd.items()), strict=True)
        src.version = ckpt_version(args.checkpoint)
        src.source_info = {"kind": "open_clip-checkpoint", "open_clip_version": version, "arch": args.arch,
                           "checkpoint": os.path.basename(args.checkpoint), "sha256": sha256_file(args.checkpoint)}
    model = model.float().eval()
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(model, "token_embedding"):
        raise UsageError("%s is not a CLIP ViT with the built-in text tower; this exporter supports those only" % args.arch)
    for attr, want in (("pool_type", "tok"), ("final_ln_after_pool", False), ("attn_pool", None),
                       ("global_average_pool", False)):
        if hasattr(visual, attr) and getattr(visual, attr) != want:
            raise UsageError("unsupported open_clip image tower: %s=%r" % (attr, getattr(visual, attr)))
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise UsageError("unsupported open_clip text pooling %r" % model.text_pool_type)
    act = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    src.quick_gelu = act == "QuickGELU"
    sd = model.state_dict()
    heads_v = getattr(visual.transformer.resblocks[0].attn, "num_heads", None)
    heads_t = getattr(model.transformer.resblocks[0].attn, "num_heads", None)
    src.sizes = infer_sizes(sd, heads_v, heads_t)
    check_arch(src.sizes, args.arch)
    src.vis, src.txt = build_towers(src.sizes, src.quick_gelu)
    load_towers(sd, src.vis, src.txt)
    src.ref_image = model.encode_image
    src.ref_text = model.encode_text
    src.ref_name = "open_clip model"
    mean = preprocess.get("mean") or getattr(visual, "image_mean", None)
    std = preprocess.get("std") or getattr(visual, "image_std", None)
    if mean and std:
        src.mean, src.std = [float(v) for v in mean], [float(v) for v in std]
    if preprocess.get("interpolation") in ("bicubic", "bilinear"):
        src.filter = preprocess["interpolation"]
    if preprocess.get("resize_mode") not in (None, "shortest"):
        log("warning: pretrained tag %r was trained with resize_mode %r; the card says shorter_side"
            % (args.pretrained, preprocess["resize_mode"]))
    if args.vocab:
        src.vocab_src = args.vocab
    else:
        pkg = os.path.join(os.path.dirname(open_clip.__file__), CLIP_MERGES_NAME)
        if not os.path.isfile(pkg):
            raise UsageError("open_clip ships no %s at %s; pass --vocab FILE" % (CLIP_MERGES_NAME, pkg))
        src.vocab_src = pkg
    return src


def source_transformers(args) -> Source:
    if not args.checkpoint:
        raise UsageError("--source transformers needs --checkpoint DIR_OR_FILE")
    path = args.checkpoint
    cfg: Dict = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except ValueError as e:
                    raise UsageError("%s is not valid JSON: %s" % (cfg_path, e))
        weights = None
        for name in ("model.safetensors", "pytorch_model.bin"):
            cand = os.path.join(path, name)
            if os.path.isfile(cand) and (name.endswith(".bin") or _has_safetensors()):
                weights = cand
                break
        if weights is None:
            raise UsageError("%s holds no pytorch_model.bin (or model.safetensors with the safetensors module)" % path)
        if not args.vocab and os.path.isfile(os.path.join(path, "merges.txt")):
            args.vocab = os.path.join(path, "merges.txt")
    else:
        weights = path
    obj, how = read_state_file(weights)
    sd = hf_to_open_clip(unwrap_state_dict(obj))
    vcfg = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    tcfg = cfg.get("text_config") or cfg.get("text_config_dict") or {}
    acts = {vcfg.get("hidden_act"), tcfg.get("hidden_act")} - {None}
    if len(acts) > 1:
        raise UsageError("the two towers use different activations (%s); not supported" % ", ".join(sorted(acts)))
    act = acts.pop() if acts else ("quick_gelu" if cfg else None)  # CLIPConfig's default is quick_gelu
    if act not in (None, "quick_gelu", "gelu"):
        raise UsageError("unsupported hidden_act %r" % act)
    quick = resolve_act(args, None if act is None else act == "quick_gelu", weights)
    eps = float(vcfg.get("layer_norm_eps", tcfg.get("layer_norm_eps", 1e-5)))
    sizes = infer_sizes(sd, args.vision_heads or vcfg.get("num_attention_heads"),
                        args.text_heads or tcfg.get("num_attention_heads"))
    check_arch(sizes, args.arch)
    src = Source()
    src.sizes, src.quick_gelu = sizes, quick
    src.name = name_for(sizes, args.arch)
    src.vis, src.txt = build_towers(sizes, quick, eps)
    load_towers(sd, src.vis, src.txt)
    src.version = ckpt_version(weights)
    src.source_info = {"kind": "transformers", "checkpoint": os.path.basename(os.path.normpath(path)),
                       "weights": os.path.basename(weights), "sha256": sha256_file(weights), "read_with": how}
    if cfg.get("_name_or_path"):
        src.source_info["name_or_path"] = cfg["_name_or_path"]
    if os.path.isdir(path):
        try:
            from transformers import CLIPModel
            hf = CLIPModel.from_pretrained(path).float().eval()
            src.ref_image = lambda x: _features(hf.get_image_features(pixel_values=x))
            src.ref_text = lambda ids: _features(hf.get_text_features(input_ids=ids))
            src.ref_name = "transformers CLIPModel"
        except ImportError:
            pass
        except Exception as e:
            log("warning: transformers could not load %s (%s); checking against the eager module" % (path, e))
    if not args.vocab:
        raise UsageError("--source transformers needs --vocab FILE (CLIP's merges .gz or HF merges.txt)")
    src.vocab_src = args.vocab
    return src


def _has_safetensors() -> bool:
    try:
        import safetensors  # noqa: F401
        return True
    except ImportError:
        return False


def _features(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return out[0]


def source_random(args) -> Source:
    src = Source()
    torch.manual_seed(args.seed)
    if args.tiny:
        log("learning the tiny BPE vocabulary (%d merges)" % TINY_MERGES)
        src.merges = learn_bpe(TINY_CORPUS, TINY_MERGES)
        sizes = dict(TINY)
        sizes["vocab_size"] = 512 + len(src.merges) + 2
        src.name = "clip-tiny-random"
        if args.vocab:
            raise UsageError("--tiny writes its own merges file; drop --vocab")
    else:
        arch = args.arch or "ViT-B-32"
        sizes = dict(ARCHS[arch])
        src.name = "clip-%s-random" % arch
        if args.vocab:
            src.vocab_src = args.vocab
            n = len(read_merges(args.vocab))
            sizes["vocab_size"] = 512 + min(n, sizes["vocab_size"] - 514) + 2
        else:
            log("no --vocab: using the tiny learned vocabulary (%d merges)" % TINY_MERGES)
            src.merges = learn_bpe(TINY_CORPUS, TINY_MERGES)
            sizes["vocab_size"] = 512 + len(src.merges) + 2
    sizes["vision_mlp"] = 4 * sizes["vision_width"]
    sizes["text_mlp"] = 4 * sizes["text_width"]
    src.sizes = sizes
    src.quick_gelu = args.act != "gelu"
    src.vis, src.txt = build_towers(sizes, src.quick_gelu)
    random_init(src.vis, src.txt, args.seed)
    src.version = "seed%d" % args.seed
    src.source_info = {"kind": "random-init", "seed": args.seed, "tiny": bool(args.tiny)}
    return src


# ----------------------------------------------------------------------------------------
# Export, check, cards
# ----------------------------------------------------------------------------------------

def random_batch(sizes: Dict[str, int], vocab_size: int, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 12345)
    s = sizes["image_size"]
    x = torch.randn(n, 3, s, s, generator=g)
    ctx = sizes["context_length"]
    ids = torch.zeros(n, ctx, dtype=torch.long)
    for r in range(n):
        length = int(torch.randint(1, ctx - 1, (1,), generator=g))
        ids[r, 0] = vocab_size - 2
        ids[r, 1:1 + length] = torch.randint(1, vocab_size - 2, (length,), generator=g)
        ids[r, 1 + length] = vocab_size - 1
    return x, ids


def script_and_save(module: nn.Module, path: str) -> torch.jit.ScriptModule:
    module = module.eval()
    scripted = torch.jit.script(module)
    scripted.save(path)
    return torch.jit.load(path, map_location="cpu")


def compare(what: str, ref: torch.Tensor, got: torch.Tensor, ref_name: str) -> float:
    if tuple(ref.shape) != tuple(got.shape):
        raise CheckError("%s: %s gives shape %s, the export %s" % (what, ref_name, tuple(ref.shape), tuple(got.shape)))
    diff = float((ref.float() - got.float()).abs().max())
    log("check %s: max |%s - exported| = %.3g" % (what, ref_name, diff))
    if not diff < TOLERANCE:
        raise CheckError("%s: the export differs from the %s by %.3g (limit %g)" % (what, ref_name, diff, TOLERANCE))
    return diff


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export(args, src: Source) -> Dict:
    os.makedirs(args.out, exist_ok=True)
    sizes = src.sizes
    vocab_size = sizes["vocab_size"]
    n_merges = vocab_size - 514
    if n_merges < 0:
        raise UsageError("vocab size %d is smaller than CLIP's 514 base symbols" % vocab_size)

    # The merges file.
    if src.merges is not None:
        vocab_name = TINY_MERGES_NAME
        write_merges_gz(os.path.join(args.out, vocab_name), src.merges[:n_merges])
    else:
        merges = read_merges(src.vocab_src)
        if len(merges) < n_merges:
            raise UsageError("%s has %d merges; the text tower's vocabulary (%d ids) needs %d"
                             % (src.vocab_src, len(merges), vocab_size, n_merges))
        base = os.path.basename(src.vocab_src)
        dst_name = base if base.endswith(".gz") else base + ".gz"
        vocab_name = dst_name
        dst = os.path.join(args.out, dst_name)
        with open(src.vocab_src, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            if os.path.abspath(src.vocab_src) != os.path.abspath(dst):
                shutil.copyfile(src.vocab_src, dst)
        else:  # HF merges.txt: same content, gzip-compressed like CLIP's file
            with open(dst, "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    gz.write(data)
    log("merges file %s (%d merges used of the file)" % (vocab_name, n_merges))

    # The towers.
    t0 = time.time()
    src.vis.eval()
    src.txt.eval()
    image_path, text_path = os.path.join(args.out, "image.pt"), os.path.join(args.out, "text.pt")
    log("scripting the image tower -> %s" % image_path)
    image_mod = script_and_save(src.vis, image_path)
    log("scripting the text tower -> %s" % text_path)
    text_mod = script_and_save(src.txt, text_path)

    x, ids = random_batch(sizes, vocab_size, args.check_batch, args.seed)
    with torch.no_grad():
        ref_img = src.ref_image(x) if src.ref_image else src.vis(x)
        ref_txt = src.ref_text(ids) if src.ref_text else src.txt(ids)
        got_img, got_txt = image_mod(x), text_mod(ids)
        diffs = {"image": compare("image", ref_img, got_img, src.ref_name),
                 "text": compare("text", ref_txt, got_txt, src.ref_name)}
        if src.ref_image:  # also the eager copy of the towers, so a mismatch is easy to place
            compare("image", src.vis(x), got_img, "eager module")
            compare("text", src.txt(ids), got_txt, "eager module")
    dim = sizes["embed_dim"]
    if tuple(got_img.shape) != (x.shape[0], dim) or tuple(got_txt.shape) != (ids.shape[0], dim):
        raise CheckError("unexpected output shapes %s / %s" % (tuple(got_img.shape), tuple(got_txt.shape)))
    log("export checked in %.1f s" % (time.time() - t0))

    arch = {k: int(v) for k, v in sizes.items()}
    arch.update({"activation": "quick_gelu" if src.quick_gelu else "gelu", "merges": n_merges,
                 "start_id": vocab_size - 2, "end_id": vocab_size - 1})
    source = dict(src.source_info)
    source["checked_against"] = src.ref_name
    source["check_max_abs_diff"] = {k: float("%.3g" % v) for k, v in diffs.items()}
    source["torch"] = torch.__version__.split("+")[0]
    s = sizes["image_size"]
    input_block = {"size": s, "resize": "shorter_side", "filter": src.filter, "min_side": s, "scale": 255.0,
                   "mean": src.mean, "std": src.std}
    outputs = [{"name": "embedding", "channels": dim, "reduce": "none", "weight": 1.0}]
    vocab_file = {"role": "vocab", "path": vocab_name, "sha256": sha256_file(os.path.join(args.out, vocab_name))}
    image_card = OrderedDict([
        ("card_version", 1), ("name", src.name), ("version", src.version), ("modality", "image"),
        ("backend", "torchscript"), ("dim", dim),
        # CLIP features are L2-normalised by the C++ side; for unit vectors a median-heuristic
        # width lands near 1-2 (pairwise squared distances are 2 - 2cos); 2.0 is a fixed choice.
        ("default_gamma", DEFAULT_GAMMA),
        ("input", input_block), ("outputs", outputs),
        ("files", [{"role": "module", "path": "image.pt", "sha256": sha256_file(image_path)}]),
        ("arch", arch), ("source", source)])
    text_card = OrderedDict([
        ("card_version", 1), ("name", src.name + "-text"), ("version", src.version), ("modality", "text"),
        ("backend", "torchscript"), ("dim", dim), ("default_gamma", DEFAULT_GAMMA),
        ("text", {"context": sizes["context_length"], "tokenizer": "clip-bpe"}), ("outputs", outputs),
        ("files", [{"role": "module", "path": "text.pt", "sha256": sha256_file(text_path)}, vocab_file]),
        ("arch", arch), ("source", dict(source, image_card="image.card.json"))])
    image_card["source"] = dict(source, text_card="text.card.json")
    write_json(os.path.join(args.out, "image.card.json"), image_card)
    write_json(os.path.join(args.out, "text.card.json"), text_card)
    written = ["image.pt", "text.pt", vocab_name, "image.card.json", "text.card.json"]

    if args.captioner_tiny:
        log("building the tiny captioner")
        torch.manual_seed(args.seed + 1)
        cap = TinyCaptioner(s, sizes["patch_size"], 64, 2, 2, vocab_size, max_tokens=20,
                            out_len=sizes["context_length"]).eval()
        g = torch.Generator().manual_seed(args.seed + 2)
        with torch.no_grad():
            for name, p in cap.named_parameters():
                is_ln_weight = name.endswith("weight") and ("ln_" in name)
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() < 2 else p.shape[-1] ** -0.5)
                        + (1.0 if is_ln_weight else 0.0))
        cap_path = os.path.join(args.out, "captioner.pt")
        cap_mod = script_and_save(cap, cap_path)
        with torch.no_grad():
            a, b = cap(x), cap_mod(x)
        if not torch.equal(a, b):
            raise CheckError("captioner: the scripted module disagrees with the eager one")
        cap_card = OrderedDict([
            ("card_version", 1), ("name", src.name + "-captioner"), ("version", src.version),
            ("modality", "captioner"), ("backend", "torchscript"), ("input", input_block),
            ("text", {"context": sizes["context_length"], "tokenizer": "clip-bpe"}),
            ("files", [{"role": "module", "path": "captioner.pt", "sha256": sha256_file(cap_path)}, vocab_file]),
            ("arch", {"width": 64, "layers": 2, "heads": 2, "max_tokens": 20, "vocab_size": vocab_size,
                      "start_id": vocab_size - 2, "end_id": vocab_size - 1}),
            ("source", {"kind": "random-init", "seed": args.seed, "purpose": "captioner plumbing tests"})])
        write_json(os.path.join(args.out, "captioner.card.json"), cap_card)
        written += ["captioner.pt", "captioner.card.json"]
    return {"written": written, "diffs": diffs}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="export_clip.py",
        description="Export a CLIP model's image and text towers to TorchScript, with the BPE merges "
                    "file and encoder cards (schemas/encoder-card.md).",
        epilog="Examples:\n"
               "  export_clip.py --source open_clip --arch ViT-B-32 --pretrained openai --out enc/clip-b32\n"
               "  export_clip.py --source open_clip --arch ViT-L-14 --checkpoint ViT-L-14.pt --vocab bpe_simple_vocab_16e6.txt.gz --out enc/l14\n"
               "  export_clip.py --source transformers --checkpoint clip-vit-base-patch32/ --out enc/hf-b32\n"
               "  export_clip.py --random-init --tiny --out enc/tiny --captioner-tiny\n"
               "Exit status: 0 done, 1 the export check failed, 2 bad usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["open_clip", "transformers"], help="where the weights come from")
    p.add_argument("--arch", help="ViT-B-32 | ViT-L-14 (open_clip naming): needed with --pretrained; with "
                                  "--checkpoint it is checked against the checkpoint's sizes (and names the cards)")
    p.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights file (open_clip) or HF CLIPModel folder/file (transformers)")
    p.add_argument("--vocab", metavar="FILE", help="CLIP merges file (bpe_simple_vocab_16e6.txt.gz) or HF merges.txt")
    p.add_argument("--random-init", action="store_true", help="random weights, no download")
    p.add_argument("--tiny", action="store_true", help="with --random-init: the tiny test model and its own vocabulary")
    p.add_argument("--captioner-tiny", action="store_true", help="also write a tiny random captioner.pt + card")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init and the check batch (default 0)")
    p.add_argument("--act", choices=["auto", "quick_gelu", "gelu"], default="auto",
                   help="MLP activation; auto: from open_clip / the HF config, else quick_gelu (with a warning)")
    p.add_argument("--vision-heads", type=int, help="override the image tower's head count (default width/64)")
    p.add_argument("--text-heads", type=int, help="override the text tower's head count (default width/64)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let torch.load unpickle arbitrary objects (trusted checkpoints only; torch >= 2.6)")
    p.add_argument("--check-batch", type=int, default=2, help="batch size of the export check (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    args = p.parse_args(argv)
    if args.arch and args.arch not in ARCHS:
        raise UsageError("unknown --arch %r (supported: %s)" % (args.arch, ", ".join(ARCHS)))
    if args.random_init and args.source:
        raise UsageError("--random-init and --source exclude each other")
    if not args.random_init and not args.source:
        raise UsageError("give --source open_clip|transformers, or --random-init")
    if args.tiny and not args.random_init:
        raise UsageError("--tiny goes with --random-init")
    if args.tiny and args.arch:
        raise UsageError("--tiny has its own architecture; drop --arch")
    if args.random_init and (args.pretrained or args.checkpoint):
        raise UsageError("--random-init takes no --pretrained/--checkpoint")
    if args.source == "transformers" and args.pretrained:
        raise UsageError("--source transformers takes --checkpoint, not --pretrained")
    if args.check_batch < 1:
        raise UsageError("--check-batch must be at least 1")
    if args.vocab and not os.path.isfile(args.vocab):
        raise UsageError("--vocab %s is not a file" % args.vocab)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise UsageError("--checkpoint %s does not exist" % args.checkpoint)
    return args


def main(argv=None) -> int:
    t0 = time.time()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        global ALLOW_PICKLE
        ALLOW_PICKLE = args.allow_pickle
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        with torch.no_grad():
            if args.random_init:
                src = source_random(args)
            elif args.source == "open_clip":
                src = source_open_clip(args)
            else:
                src = source_transformers(args)
        s = src.sizes
        log("model %s %s: image %d/%d width %d x %d layers (%d heads), text ctx %d vocab %d width %d x %d layers "
            "(%d heads), embed %d, %s" % (src.name, src.version, s["image_size"], s["patch_size"], s["vision_width"],
                                          s["vision_layers"], s["vision_heads"], s["context_length"], s["vocab_size"],
                                          s["text_width"], s["text_layers"], s["text_heads"], s["embed_dim"],
                                          "quick_gelu" if src.quick_gelu else "gelu"))
        result = export(args, src)
    except UsageError as e:
        print("export_clip: error: %s" % e, file=sys.stderr)
        return 2
    except CheckError as e:
        print("export_clip: export check FAILED: %s" % e, file=sys.stderr)
        return 1
    log("wrote %s to %s in %.1f s" % (", ".join(result["written"]), args.out, time.time() - t0))
    return 0


if __name__ == "__main__":
    # TorchScript archives list some module constants in set order: with a fixed hash seed the
    # same export gives byte-identical files (and so the same sha256s in the cards).
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    sys.exit(main())
