#!/usr/bin/env python3
"""The table and plot of scripts/bench_scale.sh from its JSON files.

Each file is one run, named scale-M-MODE.json: MODE exact-f32 | exact-f16 | two-stage (a
bench_score --json object), numpy (bench_score_numpy.py --json) or upload (bench_upload
--json). Writes a markdown table (one row per size and mode: single and batched latency,
bytes per spec, recall against float32 exact, the exact scan's bandwidth bound) and a PNG
(latency and recall@4 against the number of specs).
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plotting import pyplot  # noqa: E402

MODES = ["exact-f32", "exact-f16", "two-stage", "numpy"]


def load(paths):
    runs = {}
    for p in paths:
        m = re.match(r"scale-(\d+)-([a-z0-9-]+)\.json$", os.path.basename(p))
        if not m:
            sys.exit("scale_report: %s is not named scale-M-MODE.json" % p)
        with open(p) as f:
            runs[(int(m.group(1)), m.group(2))] = json.load(f)
    return runs


def fmt(v, digits=1):
    return "" if v is None else ("%.*f" % (digits, v))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", help="scale-bandwidth.json (the machine's read rate)")
    ap.add_argument("--md", required=True)
    ap.add_argument("--png")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    runs = load(args.runs)
    bw = None
    if args.bandwidth:
        with open(args.bandwidth) as f:
            bw = json.load(f)
    sizes = sorted({m for m, _ in runs})
    lines = ["| specs | search | p50 ms | batch 64, ms/query | bytes/spec | recall@1 | recall@4 | top-4 = exact | "
             "bandwidth bound ms | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in sizes:
        for mode in MODES:
            r = runs.get((m, mode))
            if r is None:
                continue
            if mode == "numpy":
                lines.append("| %d | NumPy packed (f32) | %s | | %d | | | | | |" %
                             (m, fmt(r["packed"]["p50_ms"]), r["bytes"] // m))
                continue
            bound = None
            if bw and mode.startswith("exact"):
                # An exact query reads every reduced point's zx and zt once.
                per_value = 2 if mode.endswith("f16") else 4
                touched = m * r["r"] * (r["d"] + r["dt"]) * per_value
                bound = touched / (bw["read_gb_per_s"] * 1e9) * 1e3
            spec_bytes = r.get("bytes_per_spec", 0) + (r.get("candidate_bytes_per_spec", 0) if mode == "two-stage" else 0)
            lines.append("| %d | %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
                m, mode, fmt(r["p50_ms"]), fmt(r["batch64_ms_per_query"]), spec_bytes,
                fmt(r["recall_at_1"], 4), fmt(r["recall_at_4"], 4), fmt(r.get("top4_identical"), 4),
                fmt(bound), fmt(r.get("peak_rss_gb"), 2)))
    notes = ["", "Exact binary16 and the two-stage search are compared with float32 exact in the same run; "
             "bytes/spec of the two-stage rows include its candidate index."]
    if bw:
        notes.append("Bandwidth bound: bytes an exact query reads / %.1f GB/s (%s)." % (bw["read_gb_per_s"], bw["how"]))
    uploads = [(m, runs[(m, "upload")]) for m in sizes if (m, "upload") in runs]
    if uploads:
        notes += ["", "| specs | upload to visible p50 ms | p90 ms | full load s |", "|---|---|---|---|"]
        for m, u in uploads:
            notes.append("| %d | %s | %s | %s |" % (m, fmt(u["upload_to_visible_ms_p50"], 2),
                                                    fmt(u["upload_to_visible_ms_p90"], 2), fmt(u["load_seconds"], 1)))
    with open(args.md, "w") as f:
        f.write("\n".join(lines + notes) + "\n")
    plt = pyplot("scale_report")
    if plt is None or not args.png:
        return
    fig, (lat, rec) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        xs = [m for m in sizes if (m, mode) in runs]
        if not xs:
            continue
        ys = [runs[(m, mode)]["packed"]["p50_ms"] if mode == "numpy" else runs[(m, mode)]["p50_ms"] for m in xs]
        lat.plot(xs, ys, marker="o", label=mode)
        if mode != "numpy":
            rec.plot(xs, [runs[(m, mode)]["recall_at_4"] for m in xs], marker="o", label=mode)
    lat.set_xscale("log")
    lat.set_yscale("log")
    lat.set_xlabel("specs in the hub")
    lat.set_ylabel("single query, p50 (ms)")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend()
    rec.set_xscale("log")
    rec.set_xlabel("specs in the hub")
    rec.set_ylabel("recall@4 against float32 exact")
    rec.grid(True, alpha=0.3)
    rec.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
