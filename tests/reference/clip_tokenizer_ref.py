#!/usr/bin/python3
"""An independent Python model of CLIP's simple BPE tokenizer, for testing the C++ one.

Written from CLIP's description, with unicodedata.normalize('NFC') standing in for ftfy.
Needs the `regex` module (Debian: python3-regex) for \\p{L} / \\p{N}.

  clip_tokenizer_ref.py --encode MERGES [--context N]   JSON lines in ({"text": ...} or a
                                                        string), {"text", "ids"} lines out
  clip_tokenizer_ref.py --learn-merges CORPUS N OUT     learn N merges (fewer when the corpus
                                                        runs out of pairs); OUT.gz is gzipped
  clip_tokenizer_ref.py --emit-html-entities OUT        writes core/src/html_entities.inc
"""
import argparse
import collections
import gzip
import html
import html.entities
import json
import sys
import unicodedata

import regex

CLIP_MAX_MERGES = 49152 - 256 - 2  # 48,894
START, END = "<|startoftext|>", "<|endoftext|>"
PIECE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
SPACES = regex.compile(r"\s+")


def byte_chars():
    """The 256 byte characters, in vocabulary order: (byte, character) pairs."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) +
                 list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    pairs = [(b, chr(b)) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            pairs.append((b, chr(256 + extra)))
            extra += 1
    return pairs


def clean(text):
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    text = SPACES.sub(" ", text).strip()
    return text.lower()


def pieces(text):
    return PIECE.findall(clean(text))


def read_merges(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start a line
    merges = []
    for line in lines[1:CLIP_MAX_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError("bad merge line %r" % line)
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    def __init__(self, merges):
        chars = [c for _, c in byte_chars()]
        self.byte_to_char = dict(byte_chars())
        self.char_to_byte = {c: b for b, c in byte_chars()}
        self.vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [START, END]
        self.ids = {}
        for i, tok in enumerate(self.vocab):
            self.ids[tok] = i  # a repeated string keeps its last id, as a dict built from a list does
        self.rank = {}
        for r, pair in enumerate(merges):
            self.rank[pair] = r
        self.start_id = len(self.vocab) - 2
        self.end_id = len(self.vocab) - 1

    def bpe(self, symbols):
        """Merges the lowest-ranked adjacent pair, every occurrence left to right, until none is ranked."""
        word = list(symbols)
        while len(word) > 1:
            best = None
            for pair in zip(word, word[1:]):
                r = self.rank.get(pair)
                if r is not None and (best is None or r < best[0]):
                    best = (r, pair)
            if best is None:
                break
            first, second = best[1]
            merged = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text):
        out = []
        for piece in pieces(text):
            chars = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            if chars in (START, END):
                out.append(self.ids[chars])
                continue
            symbols = list(chars)
            symbols[-1] += "</w>"
            out.extend(self.ids[s] for s in self.bpe(symbols))
        return out

    def encode_with_specials(self, text, context):
        ids = [self.start_id] + self.encode(text) + [self.end_id]
        if context > 0 and len(ids) > context:
            ids = ids[:context]
            ids[-1] = self.end_id
        return ids


def learn_merges(corpus_text, n):
    """Plain BPE learning over the corpus's pre-tokenised pieces: the most frequent adjacent pair
    (ties: the smallest pair) becomes the next merge."""
    byte_to_char = dict(byte_chars())
    words = collections.Counter()
    for piece in pieces(corpus_text):
        chars = [byte_to_char[b] for b in piece.encode("utf-8")]
        if "".join(chars) in (START, END):
            continue
        chars[-1] += "</w>"
        words[tuple(chars)] += 1
    words = [list(w) for w in words.items()]  # [symbols, count]
    counts = collections.Counter()
    where = collections.defaultdict(set)
    for k, (w, c) in enumerate(words):
        for pair in zip(w, w[1:]):
            counts[pair] += c
            where[pair].add(k)
    merges = []
    while len(merges) < n:
        best, best_count = None, 0
        for pair, c in counts.items():
            if c > best_count or (c == best_count and c > 0 and pair < best):
                best, best_count = pair, c
        if best is None:
            break
        first, second = best
        merges.append(best)
        for k in sorted(where.pop((first, second), ())):
            w, c = words[k]
            for pair in zip(w, w[1:]):
                counts[pair] -= c
            merged = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == first and w[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[k][0] = merged
            for pair in zip(merged, merged[1:]):
                counts[pair] += c
                where[pair].add(k)
        counts.pop((first, second), None)
    return merges


def c_string(s):
    out = '"'
    for b in s.encode("utf-8"):
        ch = chr(b)
        out += ch if (32 <= b < 127 and ch not in '"\\') else "\\%03o" % b  # octal: never over-long
    return out + '"'


def emit_html_entities(path):
    import html as html_module
    names = sorted(html.entities.html5.items())
    lines = [
        "// Generated by tests/reference/clip_tokenizer_ref.py --emit-html-entities from Python %d.%d's"
        % sys.version_info[:2],
        "// html module: the HTML5 named character references (names with their ';', and the legacy",
        "// ones also without), and the numeric-reference fix-ups html.unescape applies. Do not edit.",
        "",
        "// {name, replacement (UTF-8)}, sorted by name (bytewise).",
        "static constexpr HtmlEntity kHtmlEntities[] = {",
    ]
    for name, value in names:
        lines.append("    {%s, %s}," % (c_string(name), c_string(value)))
    lines.append("};")
    lines.append("")
    lines.append("// Numeric references that html.unescape replaces rather than decodes: {code, replacement}.")
    lines.append("static constexpr HtmlNumericFix kHtmlInvalidCharrefs[] = {")
    for num, value in sorted(html_module._invalid_charrefs.items()):
        lines.append("    {0x%x, %s}," % (num, c_string(value)))
    lines.append("};")
    lines.append("")
    lines.append("// Code points that numeric references decode to nothing.")
    lines.append("static constexpr char32_t kHtmlInvalidCodepoints[] = {")
    cps = sorted(html_module._invalid_codepoints)
    for i in range(0, len(cps), 8):
        lines.append("    " + " ".join("0x%x," % c for c in cps[i:i + 8]))
    lines.append("};")
    assert sorted(n.encode() for n, _ in names) == [n.encode() for n, _ in names]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encode", metavar="MERGES")
    ap.add_argument("--context", type=int, default=77)
    ap.add_argument("--learn-merges", nargs=3, metavar=("CORPUS", "N", "OUT"))
    ap.add_argument("--emit-html-entities", metavar="OUT")
    a = ap.parse_args()
    if a.emit_html_entities:
        emit_html_entities(a.emit_html_entities)
    elif a.learn_merges:
        corpus, n, out = a.learn_merges
        with open(corpus, encoding="utf-8") as f:
            merges = learn_merges(f.read(), int(n))
        data = ("#version: 0.2 (learned by clip_tokenizer_ref.py)\n" +
                "".join("%s %s\n" % m for m in merges)).encode("utf-8")
        if out.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        with open(out, "wb") as f:
            f.write(data)
        print("%d merges" % len(merges), file=sys.stderr)
    elif a.encode:
        tok = Tokenizer(read_merges(a.encode))
        for line in sys.stdin:
            if not line.strip():
                continue
            item = json.loads(line)
            text = item["text"] if isinstance(item, dict) else item
            print(json.dumps({"text": text, "ids": tok.encode_with_specials(text, a.context)}))
    else:
        ap.error("give --encode, --learn-merges or --emit-html-entities")


if __name__ == "__main__":
    main()
