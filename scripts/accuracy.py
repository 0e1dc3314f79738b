#!/usr/bin/python3
"""Top-k accuracy of `gmi identify --batch` outputs.

usage: accuracy.py [--json OUT.json] [--png OUT.png] SCORER=RESULTS.jsonl ...

Each RESULTS.jsonl holds one line per query with the query's true "model" and the
ranked "results" (use --top 0 so every model is ranked). Prints a table; lines that
carry an "error" count as misses.
"""
import argparse
import json
import sys

from plotting import pyplot


def topk(path, kmax):
    hits = [0] * kmax
    total = errors = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            total += 1
            if "results" not in q:
                errors += 1
                continue
            ranked = [r["model"] for r in q["results"]]
            if q.get("model") in ranked:
                pos = ranked.index(q["model"])
                for k in range(pos, kmax):
                    hits[k] += 1
    return [h / max(total, 1) for h in hits], total, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="SCORER=RESULTS.jsonl")
    ap.add_argument("--kmax", type=int, default=4)
    ap.add_argument("--models", type=int, default=0, help="hub size, for the chance line")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--png", help="write a top-k plot here (needs python3-matplotlib)")
    args = ap.parse_args()
    table = {}
    print("%-12s" % "scorer" + "".join("%8s" % ("top-%d" % (k + 1)) for k in range(args.kmax)) + "  queries")
    for run in args.runs:
        name, path = run.split("=", 1)
        acc, total, errors = topk(path, args.kmax)
        table[name] = {"topk": acc, "queries": total, "errors": errors}
        print("%-12s" % name + "".join("%8.3f" % a for a in acc) + "  %d%s" %
              (total, " (%d errors)" % errors if errors else ""))
    if args.models:
        print("%-12s" % "chance" + "".join("%8.3f" % ((k + 1) / args.models) for k in range(args.kmax)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": args.models, "scorers": table}, f, indent=1)
    if args.png:
        plt = pyplot("accuracy.py")
        if plt is None:
            return
        ks = list(range(1, args.kmax + 1))
        plt.figure(figsize=(5, 3.5))
        for name, row in table.items():
            plt.plot(ks, row["topk"], marker="o", label=name)
        if args.models:
            plt.plot(ks, [k / args.models for k in ks], "k--", label="chance")
        plt.xlabel("k")
        plt.ylabel("top-k accuracy")
        plt.xticks(ks)
        plt.ylim(0, 1.02)
        plt.grid(alpha=0.3)
        plt.legend(fontsize=8)
        plt.tight_layout()
        plt.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
