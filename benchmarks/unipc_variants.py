"""UniPC variants measured against the registry's `unipc_3` on the fair study's tuning problems (issue 26; none
adopted, benchmarks/FAIR.md "Measured, not adopted"):

    python benchmarks/unipc_variants.py [--seeds 100-109] [--samples 64]

- `bh1`: UniPC's B(h) = h instead of e^h − 1 (bh2; Zhao et al. 2023 recommend bh1 below 10 steps), orders 2 and 3;
- `e2`, `e4`: the last step into σ = 0 (E3, docs/MATH.md §9) through 2 or 4 nodes instead of the order's 3;
- `corr`: (E3) with the corrector's displacement carried into its nodes (D_j + x̄_j − x̃_j: ε held fixed across the
  correction, whose x̄ the last step otherwise discards).

Per configuration of the fair study's choices at NFE 10, 20 and 50 (grids of `fair_fewstep.grid_family`), the RMSE
against the DOP853 reference of `probflow.bench.heldout.setup`, as a ratio to `unipc_3` on the same grid: geometric
mean and maximum over the problems. Tuning problems only: nothing here touches the held-out ones.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import numpy as np
import torch
from fair_fewstep import grid_family, problem_by_seed, tuning_seeds

import probflow.exponential as E
from probflow.bench.heldout import rmse, setup
from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.method import Method

CONFIGS = {10: ("t^2/0.05", "t^2/0.1", "logsnr/0.03"), 20: ("t^2/0.02", "t^2.5/s0"), 50: ("t^2.5/s0", "t^2/0.02")}


def _coefficients(h: float, order: int, bh: int) -> tuple[float, float, float, list[float]]:
    """(e^{−h}, 1 − e^{−h}, B(h), ρ's right-hand side) of UniPC (data prediction) with B = bh1 or bh2."""
    hh = -h
    phi1 = math.expm1(hh)
    b_h = phi1 if bh == 2 else hh
    hphi, fact, rhs = phi1 / hh - 1, 1, []
    for i in range(1, order + 1):
        rhs.append(hphi * fact / b_h)
        fact *= i + 1
        hphi = hphi / hh - 1 / fact
    return math.exp(-h), -phi1, -b_h, rhs


def _update(x, h, rks, ds0, nodes, p, bh, corrector):
    decay, a0, b_h, rhs = _coefficients(h, p, bh)
    if p == 1 and not corrector:
        return E._combine([decay, a0], [x, ds0])
    if p == 2 and not corrector:
        rho = [0.5]
    elif p == 1:
        rho = [0.5]
    else:
        k = len(rks)
        r = np.array([[rk ** (m - 1) for rk in rks] for m in range(1, k + 1)])
        rho = [float(v) for v in np.linalg.solve(r, np.array(rhs[:k]))]
    c = [b_h * rho[i] / rks[i] for i in range(len(rks))]
    return E._combine([decay, a0 - sum(c), *c], [x, ds0, *nodes])


def unipc(order: int, bh: int = 2, e3: int | None = None, corr: bool = False):
    """UniPC-`order` as `probflow.exponential.unipc_step` with the variant's B(h), (E3) nodes and correction."""
    keep = max(order + 1, e3 or 0)

    def step(field, xbar, sigma, sigma_next, state):
        s, sn = float(sigma), float(sigma_next)
        state = state or E.ExpState()
        d = E._denoise(field, xbar, sigma)
        pred = xbar
        if state.x_prev is not None:  # UniC from the previous start point with the new D as a node
            lp, p = [E._lam(v) for v in state.sigmas], state.order_prev
            h = E._lam(s) - lp[-1]
            rks = [(lp[-1 - i] - lp[-1]) / h for i in range(1, p)] + [1.0]
            nodes = [state.denoised[-2 - i] for i in range(p - 1)] + [d]
            xbar = _update(state.x_prev, h, rks, state.denoised[-1], nodes, p, bh, True)
        st = state.push(s, d, keep)
        deltas = (*getattr(state, "deltas", ()), xbar - pred)[-keep:]
        if sn == 0.0:
            n = min(e3 or order, len(st.sigmas))
            ds = list(st.denoised[-n:])
            if corr:
                ds = [a + b for a, b in zip(ds, deltas[-n:], strict=True)]
            return E._combine(E.zero_weights(list(st.sigmas[-n:])), ds), st
        p = min(order, len(st.sigmas))
        lams = [E._lam(v) for v in st.sigmas]
        h = E._lam(sn) - lams[-1]
        rks = [(lams[-1 - i] - lams[-1]) / h for i in range(1, p)]
        x_next = _update(xbar, h, rks, st.denoised[-1], [st.denoised[-2 - i] for i in range(p - 1)], p, bh, False)
        out = E.ExpState(st.sigmas, st.denoised, xbar, p)
        out.deltas = deltas
        return x_next, out

    return step


VARIANTS = {"unipc_3 (own)": (3, 2, None, False), "unipc_3 bh1": (3, 1, None, False), "unipc_3 e2": (3, 2, 2, False),
            "unipc_3 e4": (3, 2, 4, False), "unipc_3 corr": (3, 2, None, True), "unipc bh2": (2, 2, None, False),
            "unipc bh1": (2, 1, None, False), "unipc corr": (2, 2, None, True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="100-109", help="tuning problems (default 100-109)")
    ap.add_argument("--samples", type=int, default=64, help="samples per problem (default 64)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = {k: Method(k, 3, 1, step=unipc(*v), multistep=True, description=k) for k, v in VARIANTS.items()}
    ratios = defaultdict(list)
    for seed in tuning_seeds(a.seeds):
        p = problem_by_seed(seed)
        s = setup(p, a.samples)
        for n, names in CONFIGS.items():
            fam = {**grid_family(s.schedule, n, "base"), **grid_family(s.schedule, n, "tpow")}
            for g in names:
                ref = rmse(integrate(DDIMField(p.model), s.xbar, fam[g], "unipc_3").x, s.reference)
                for k, m in methods.items():
                    ratios[(n, g, k)].append(rmse(integrate(DDIMField(p.model), s.xbar, fam[g], m).x,
                                                  s.reference) / ref)
    print("| NFE | grid | " + " | ".join(VARIANTS) + " |\n|---|---|" + "---|" * len(VARIANTS))
    for n, names in CONFIGS.items():
        for g in names:
            cells = [ratios[(n, g, k)] for k in VARIANTS]
            print(f"| {n} | `{g}` | " + " | ".join(
                f"{math.exp(sum(map(math.log, v)) / len(v)):.2f} ({max(v):.2f})" for v in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
