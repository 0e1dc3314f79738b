#!/usr/bin/env python3
"""Tables and a plot from bench_fit --trace JSON files (scripts/bench_fit_plateau.sh).

usage: fit_plateau_report.py [--md OUT.md] [--png OUT.png] [--rule TOL,WINDOW,CAP] RUN.json ...

For each run: the converged MMD^2, today's fit (three gradient steps per iteration, tol 1e-5, cap 100),
where the traced (L-BFGS) fit stops under --rule (default: the fit's defaults), the fraction of
today's time it takes and of the converged MMD^2 it reaches, and the peer's MMD^2.
"""
import argparse
import json
import sys

from plotting import pyplot


def stop(trace, tol, window, cap):
    for i, (it, _, j) in enumerate(trace):
        if it >= cap:
            return i
        if it < window:
            continue
        before = trace[i - window][2]
        if before - j < tol * before or j <= 0:
            return i
    return len(trace) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--md")
    ap.add_argument("--png")
    ap.add_argument("--rule", default="1e-3,1,100",
                    help="TOL,WINDOW,CAP of the rule to report beside today's (default: the fit's)")
    args = ap.parse_args()
    tol, window, cap = args.rule.split(",")
    tol, window, cap = float(tol), int(window), int(cap)
    runs = [json.load(open(p)) for p in args.runs]
    lines = [
        "| n | r | converged MMD² | today: iterations, s | rule: iterations, s | of today's time | "
        "rule J / converged | peer MMD² | peer / rule J |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst_ratio, worst_time, peer_below = 0.0, 0.0, True
    for run in runs:
        tr = run["trace"]
        today = run["today"]
        r_i = stop(tr, tol, window, cap)
        conv = run["converged_j"]
        ratio = tr[r_i][2] / conv
        frac = tr[r_i][1] / today["seconds"]
        peer = run["peer"]["mmd2"]
        worst_ratio, worst_time = max(worst_ratio, ratio), max(worst_time, frac)
        peer_below = peer_below and tr[r_i][2] < peer
        lines.append("| %d | %d | %.3e | %d, %.3f | %d, %.3f | %.2f | %.3f | %.3e | %.1f× |" % (
            run["n"], run["r"], conv, today["iterations"], today["seconds"], tr[r_i][0], tr[r_i][1], frac, ratio,
            peer, peer / tr[r_i][2]))
    lines.append("")
    lines.append("rule tol %g over %d iteration(s), cap %d: worst J / converged %.3f, worst fraction "
                 "of today's time %.2f, below the peer's MMD² in every run: %s" % (
                     tol, window, cap, worst_ratio, worst_time, "yes" if peer_below else "no"))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.png:
        plt = pyplot("fit_plateau_report.py")
        if plt is None:
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in runs:
            tr = run["trace"]
            conv = run["converged_j"]
            line, = ax.plot([p[1] for p in tr], [p[2] / conv for p in tr], lw=1,
                            label="n=%d r=%d" % (run["n"], run["r"]))
            today = run["today"]
            ax.plot([today["seconds"]], [today["mmd2"] / conv], "s", color=line.get_color(), ms=5)
            i = stop(tr, tol, window, cap)
            ax.plot([tr[i][1]], [tr[i][2] / conv], "o", color=line.get_color(), ms=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.1, color="k", ls="--", lw=0.8)
        ax.set_xlabel("seconds (k-means included)")
        ax.set_ylabel("MMD² / converged MMD²")
        ax.set_title("spec fit (L-BFGS trace): ■ today's fit, ● tol %g over %d, cap %d" % (tol, window, cap))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
