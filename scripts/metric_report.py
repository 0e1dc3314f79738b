#!/usr/bin/python3
"""Summarises scripts/eval_metric.sh's runs: accuracy against k (with a PNG plot) and the
generalisation of a metric learnt on half of the models.

usage: metric_report.py --out OUT --half-a DIR --dims "8 16 ..."
"""
import argparse
import json
import os
import sys

from plotting import pyplot


def ranks(path):
    """(true model, 0-based rank of the true model or None) per answered query."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            ranked = [r["model"] for r in q.get("results", [])]
            out.append((q.get("model"), ranked.index(q["model"]) if q.get("model") in ranked else None))
    return out


def acc(rows, keep=lambda m: True):
    rows = [r for r in rows if keep(r[0])]
    n = max(len(rows), 1)
    return {"top1": sum(1 for _, r in rows if r is not None and r < 1) / n,
            "top4": sum(1 for _, r in rows if r is not None and r < 4) / n,
            "queries": len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--half-a", required=True, help="the store the half-metric was learnt from")
    ap.add_argument("--dims", required=True)
    ap.add_argument("--title", default="", help="what the plot is of (the hub)")
    a = ap.parse_args()
    seen = {f[:-len(".gmispec")] for f in os.listdir(a.half_a) if f.endswith(".gmispec")}
    p = lambda name: os.path.join(a.out, name)
    report = {"k": {}, "halves": {}}
    report["k"]["raw"] = acc(ranks(p("k-raw.jsonl")))
    report["k"]["full"] = acc(ranks(p("k-full.jsonl")))
    dims = [int(k) for k in a.dims.split()]
    for k in dims:
        report["k"][str(k)] = acc(ranks(p("k-%d.jsonl" % k)))
    grown = ranks(p("grown.jsonl"))
    report["halves"] = {
        "grown_all": acc(grown),
        "grown_seen_models": acc(grown, lambda m: m in seen),
        "grown_unseen_models": acc(grown, lambda m: m not in seen),
        "raw_all": acc(ranks(p("k-raw.jsonl"))),
        "raw_seen_models": acc(ranks(p("k-raw.jsonl")), lambda m: m in seen),
        "raw_unseen_models": acc(ranks(p("k-raw.jsonl")), lambda m: m not in seen),
        "full_all": acc(ranks(p("k-full.jsonl"))),
        "unseen_hub_learnt_on_other_half": acc(ranks(p("unseen-learnt-on-a.jsonl")), lambda m: m not in seen),
        "unseen_hub_raw": acc(ranks(p("unseen-raw.jsonl")), lambda m: m not in seen),
        "unseen_hub_learnt_on_itself": acc(ranks(p("unseen-own.jsonl")), lambda m: m not in seen),
    }
    with open(p("metric.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("%-34s %6s %6s %8s" % ("run", "top-1", "top-4", "queries"))
    for group in ("k", "halves"):
        for name, r in report[group].items():
            label = ("k=" + name) if group == "k" else name
            print("%-34s %6.3f %6.3f %8d" % (label, r["top1"], r["top4"], r["queries"]))
    plt = pyplot("metric_report.py")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, style in (("top1", "o-"), ("top4", "s-")):
        ax.plot(dims, [report["k"][str(k)][key] for k in dims], style, label=key.replace("top", "top-") + " (k dims)")
        ax.axhline(report["k"]["full"][key], linestyle="--", linewidth=1,
                   color=ax.lines[-1].get_color(), label=key.replace("top", "top-") + ", all dims")
        ax.axhline(report["k"]["raw"][key], linestyle=":", linewidth=1,
                   color=ax.lines[-1].get_color(), label=key.replace("top", "top-") + ", no metric")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mapped dimension k (discriminant directions kept)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("hub-learned metric: accuracy against k" + (" (" + a.title + ")" if a.title else ""))
    fig.tight_layout()
    fig.savefig(p("metric-k.png"), dpi=120)


if __name__ == "__main__":
    main()
