#!/usr/bin/env python3
"""NumPy baselines for the scoring benchmark (compare with build/bench/bench_score).

Same synthetic sizes as bench_score (M specs, r reduced points, d / dt dimensions) and the
same weighted score (shared METHOD.md, "Identification"):
    w_j  = beta_j exp((cos(zt_j, t) - 1) / tau),  w <- w / sum(w)
    D_m  = 1 - 2 sum_j w_j k(zx_j, x) + w^T K_m w,  k(a, b) = exp(-gamma ||a - b||^2)

Two NumPy versions, both timed per query:
  - "linear scan": a straightforward loop over the models, NumPy inside each model;
  - "packed": all specs in one matrix, one matrix-vector product, then vectorised per-model
    work (the same layout the C++ SpecIndex uses), a stronger baseline.
Keep M modest (1e4 needs ~1.1 GB); the box is shared.
  /usr/bin/python3 scripts/bench_score_numpy.py --models 10000
"""
import argparse
import json
import time

import numpy as np


def unit_rows(m):
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def make_specs(models, r, d, dt, gamma, rng):
    # Rows scattered around one random direction per model, L2-normalised (as bench_score).
    zx = unit_rows(unit_rows(rng.uniform(-1, 1, (models, 1, d)).astype(np.float32))
                   + 0.08 * rng.uniform(-1, 1, (models, r, d)).astype(np.float32))
    zt = unit_rows(unit_rows(rng.uniform(-1, 1, (models, 1, dt)).astype(np.float32))
                   + 0.08 * rng.uniform(-1, 1, (models, r, dt)).astype(np.float32))
    beta = rng.uniform(0.0, 1.0, (models, r)).astype(np.float32)
    beta /= beta.sum(1, keepdims=True)
    sq = (zx * zx).sum(-1)
    gram = np.exp(-gamma * np.maximum(sq[:, :, None] + sq[:, None, :]
                                      - 2 * np.einsum("mjd,mld->mjl", zx, zx), 0)).astype(np.float32)
    return zx, zt, beta, gram


def score_linear_scan(zx, zt, beta, gram, x, t, gamma, tau):
    models = zx.shape[0]
    out = np.empty(models)
    tn = t / np.linalg.norm(t)
    for m in range(models):
        k = np.exp(-gamma * np.sum((zx[m] - x) ** 2, axis=1))
        cos = zt[m] @ tn / np.linalg.norm(zt[m], axis=1)
        w = beta[m] * np.exp((cos - 1) / tau)
        w = w / w.sum()
        out[m] = 1 - 2 * w @ k + w @ gram[m] @ w
    return out


def score_packed(zx_all, zx_sq, zt_all, zt_norm, beta, gram, x, t, gamma, tau, r):
    models = beta.shape[0]
    s = (zx_all @ x).reshape(models, r)
    k = np.exp(-gamma * np.maximum(zx_sq + x @ x - 2 * s, 0))
    cos = (zt_all @ t).reshape(models, r) / (zt_norm * np.linalg.norm(t))
    e = np.log(beta) + (cos - 1) / tau
    w = np.exp(e - e.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return 1 - 2 * (w * k).sum(1) + np.einsum("mj,mjl,ml->m", w, gram, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dt", type=int, default=256)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (per version: p50_ms, p90_ms; bytes of zx+zt) instead of lines")
    ap.add_argument("--packed-only", action="store_true", help="time the packed version only")
    args = ap.parse_args()
    report = {"models": args.models, "r": args.r, "d": args.d, "dt": args.dt, "queries": args.queries}
    rng = np.random.default_rng(7)
    zx, zt, beta, gram = make_specs(args.models, args.r, args.d, args.dt, args.gamma, rng)
    zx_all = zx.reshape(-1, args.d)
    zt_all = zt.reshape(-1, args.dt)
    zx_sq = (zx * zx).sum(-1)
    zt_norm = np.linalg.norm(zt, axis=-1)
    nbytes = zx.nbytes + zt.nbytes
    report["bytes"] = int(nbytes)
    if not args.json:
        print(f"bench_score_numpy: M={args.models} r={args.r} d={args.d} dt={args.dt} "
              f"({nbytes / 1e9:.2f} GB of zx+zt)")

    picks = rng.integers(0, args.models * args.r, args.queries)
    xs = unit_rows(zx_all[picks] + 0.05 * rng.uniform(-1, 1, (args.queries, args.d)).astype(np.float32))
    ts = unit_rows(zt_all[picks] + 0.05 * rng.uniform(-1, 1, (args.queries, args.dt)).astype(np.float32))

    versions = [
        ("linear scan", lambda x, t: score_linear_scan(zx, zt, beta, gram, x, t, args.gamma, args.tau)),
        ("packed", lambda x, t: score_packed(zx_all, zx_sq, zt_all, zt_norm, beta, gram, x, t,
                                             args.gamma, args.tau, args.r)),
    ]
    if args.packed_only:
        versions = versions[1:]
    for name, fn in versions:
        times = []
        for q in range(args.queries):
            start = time.perf_counter()
            scores = fn(xs[q], ts[q])
            np.argsort(scores)[:10]
            times.append(time.perf_counter() - start)
        times.sort()
        med = times[len(times) // 2]
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        report[name.replace(" ", "_")] = {"p50_ms": med * 1e3, "p90_ms": p90 * 1e3}
        if not args.json:
            print(f"weighted {name:11s}: median {med * 1e3:9.3f} ms  p90 {p90 * 1e3:9.3f} ms per query "
                  f"({nbytes / med / 1e9:.1f} GB/s)")
    if not args.packed_only:
        # The two NumPy versions agree (a check on the benchmark itself).
        a = score_linear_scan(zx, zt, beta, gram, xs[0], ts[0], args.gamma, args.tau)
        b = score_packed(zx_all, zx_sq, zt_all, zt_norm, beta, gram, xs[0], ts[0], args.gamma, args.tau, args.r)
        report["max_abs_difference"] = float(np.abs(a - b).max())
        if not args.json:
            print(f"max |linear scan - packed| = {np.abs(a - b).max():.2e}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
