#!/usr/bin/env python3
"""A straightforward NumPy implementation of gmi's RKME fit, for the speed comparison.

Same algorithm as core/src/rkme.cpp (shared METHOD.md, "The specification"):
k-means++ seeding with the same std::mt19937_64 draws (re-implemented below, so the
initialisation is identical) + Lloyd steps; then alternate a beta step (simplex QP by
FISTA with restart, warm-started) and 3 gradient steps on z with an Armijo backtracking
line search (step x2 after a success, /2 on a failure); stop on relative improvement <
tol or after max_iterations. Every line-search trial recomputes the kernels from z, as
a direct transcription of the maths would.

This is gmi's original optimiser (RkmeOptimizer::kGradient); the C++ default is now one
L-BFGS step per iteration with tol 1e-3, so compare like with like:

Usage (same data as the C++ benchmark):
  build/bench/bench_fit --runs 3 --optimizer gradient --tolerance 1e-5 --dump /tmp/fit.bin
  /usr/bin/python3 scripts/bench_fit_numpy.py --data /tmp/fit.bin --gamma <gamma>
"""
import argparse
import time

import numpy as np

MASK64 = (1 << 64) - 1


class MT19937_64:
    """std::mt19937_64, bit for bit."""

    def __init__(self, seed):
        self.mt = [0] * 312
        self.mt[0] = seed & MASK64
        for i in range(1, 312):
            prev = self.mt[i - 1]
            self.mt[i] = (6364136223846793005 * (prev ^ (prev >> 62)) + i) & MASK64
        self.index = 312

    def _twist(self):
        mt = self.mt
        for i in range(312):
            x = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % 312] & 0x7FFFFFFF)
            xa = x >> 1
            if x & 1:
                xa ^= 0xB5026F5AA96619E9
            mt[i] = mt[(i + 156) % 312] ^ xa
        self.index = 0

    def __call__(self):
        if self.index >= 312:
            self._twist()
        x = self.mt[self.index]
        self.index += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & MASK64


def kernel(a, b, gamma):
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-gamma * np.maximum(d2, 0.0))


def objective(u, z, beta, gamma, self_term):
    k_uz = kernel(u, z, gamma)
    k_zz = kernel(z, z, gamma)
    c = k_uz.mean(0)
    return self_term - 2.0 * beta @ c + beta @ k_zz @ beta, k_uz, k_zz, c


def gradient(u, z, beta, gamma, k_uz, k_zz):
    # dJ/dz_j = -(4 gamma/n) beta_j sum_i k(u_i,z_j)(u_i - z_j)
    #           + 4 gamma beta_j sum_l beta_l k(z_j,z_l)(z_l - z_j)
    n = u.shape[0]
    c = k_uz.sum(0) / n
    kb = k_zz @ beta
    inner = -(k_uz.T @ u) / n + c[:, None] * z + (k_zz * beta[None, :]) @ z - kb[:, None] * z
    return 4 * gamma * beta[:, None] * inner


def project_to_simplex(v):
    s = np.sort(v)[::-1]
    cs = np.cumsum(s)
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(s - (cs - 1) / k > 0)[0][-1]
    theta = (cs[rho] - 1) / (rho + 1)
    return np.maximum(v - theta, 0.0)


def simplex_qp(k, c, start, max_iterations=2000, tol=1e-12):
    step = 1.0 / (2.0 * np.linalg.eigvalsh(k).max())
    x = project_to_simplex(start)
    y = x.copy()
    t = 1.0
    for _ in range(max_iterations):
        x_next = project_to_simplex(y - step * 2.0 * (k @ y - c))
        change = np.abs(x_next - x).max()
        t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        if (y - x_next) @ (x_next - x) > 0:
            t_next = 1.0
            y = x_next
        else:
            y = x_next + ((t - 1) / t_next) * (x_next - x)
        x, t = x_next, t_next
        if change <= tol:
            break
    return x


def kmeans(u, r, seed, iterations):
    n = u.shape[0]
    rng = MT19937_64(seed)
    sq = (u * u).sum(1)
    chosen = np.zeros(n, bool)
    z = np.empty((r, u.shape[1]))
    pick = rng() % n
    min_d2 = np.full(n, np.inf)
    for k in range(r):
        if k > 0:
            cum = np.cumsum(min_d2)
            pick = -1
            if cum[-1] > 0:
                target = (rng() >> 11) * 2.0**-53 * cum[-1]
                pick = min(int(np.searchsorted(cum, target, side="right")), n - 1)
            if pick < 0 or chosen[pick]:
                pick = int(np.argmin(chosen))
        chosen[pick] = True
        z[k] = u[pick]
        min_d2 = np.minimum(min_d2, np.maximum(sq + sq[pick] - 2 * u @ u[pick], 0))
    assign = None
    for _ in range(iterations):
        d2 = sq[:, None] + (z * z).sum(1)[None, :] - 2 * u @ z.T
        new = d2.argmin(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        for j in range(r):
            members = assign == j
            if members.any():
                z[j] = u[members].mean(0)
    return z


def fit(x, t, r, gamma, lam, seed=0x9E3779B97F4A7C15, kmeans_iterations=10,
        max_iterations=100, tol=1e-5, steps_per_iteration=3):
    u = np.hstack([x, lam * t]).astype(np.float64)
    n = u.shape[0]
    self_term = kernel(u, u, gamma).mean()
    z = kmeans(u, r, seed, kmeans_iterations)
    jitter = 1e-10 * np.eye(r)
    j, k_uz, k_zz, c = objective(u, z, np.full(r, 1.0 / r), gamma, self_term)
    beta = simplex_qp(k_zz + jitter, c, np.full(r, 1.0 / r))
    j, k_uz, k_zz, c = objective(u, z, beta, gamma, self_term)
    initial = j
    eta = 1.0 / (4 * gamma * max(np.abs(beta).max(), 1e-12))
    iterations = 0
    for it in range(1, max_iterations + 1):
        j_prev = j
        for _ in range(steps_per_iteration):
            g = gradient(u, z, beta, gamma, k_uz, k_zz)
            g2 = (g * g).sum()
            if not g2 > 0:
                break
            eta_start, accepted = eta, False
            for _ in range(60):
                zt = z - eta * g
                jt, kt_uz, kt_zz, ct = objective(u, zt, beta, gamma, self_term)
                if jt <= j - 1e-4 * eta * g2:
                    z, j, k_uz, k_zz, c = zt, jt, kt_uz, kt_zz, ct
                    eta *= 2
                    accepted = True
                    break
                eta *= 0.5
            if not accepted:
                eta = eta_start
                break
        nb = simplex_qp(k_zz + jitter, c, beta)
        jn = self_term - 2 * nb @ c + nb @ k_zz @ nb
        if jn <= j:
            beta, j = nb, jn
        iterations = it
        if j_prev - j < tol * j_prev or j <= 0:
            break
    # Residual of what would be stored (float32), as the C++ fit reports it.
    zx = z[:, : x.shape[1]].astype(np.float32).astype(np.float64)
    zt = (z[:, x.shape[1]:] / lam).astype(np.float32).astype(np.float64)
    bf = beta.astype(np.float32).astype(np.float64)
    residual = objective(u, np.hstack([zx, lam * zt]), bf, gamma, self_term)[0]
    return residual, initial, iterations


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="raw float32 x (n x d) then t (n x dt), from bench_fit --dump")
    ap.add_argument("--gamma", type=float, help="kernel width (bench_fit prints it)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dt", type=int, default=256)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()

    assert MT19937_64(5489).__call__() == 14514284786278117030  # std::mt19937_64's first draw
    if args.data:
        raw = np.fromfile(args.data, dtype=np.float32)
        x = raw[: args.n * args.d].reshape(args.n, args.d)
        t = raw[args.n * args.d:].reshape(args.n, args.dt)
    else:
        rng = np.random.default_rng(42)
        def clustered(dim):
            centres = rng.standard_normal((16, dim))
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
            m = centres[rng.integers(0, 16, args.n)] + 0.6 / np.sqrt(dim) * rng.standard_normal((args.n, dim))
            return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
        x, t = clustered(args.d), clustered(args.dt)
    gamma = args.gamma
    if gamma is None:
        xd = x.astype(np.float64)
        sq = (xd * xd).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2 * xd @ xd.T
        gamma = 1.0 / np.median(d2[np.triu_indices(args.n, 1)])

    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        residual, initial, iterations = fit(x, t, args.r, gamma, args.lam)
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"bench_fit_numpy: n={args.n} d={args.d} dt={args.dt} r={args.r} gamma={gamma:.17g}")
    print(f"fit time: median {times[len(times) // 2]:.4f} s ({args.runs} runs)")
    print(f"iterations: {iterations}")
    print(f"initial MMD^2 (k-means + beta): {initial:.8e}")
    print(f"residual MMD^2: {residual:.8e}")


if __name__ == "__main__":
    main()
