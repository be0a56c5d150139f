"""Scaling out: world-size determinism, 2-rank speed-up, threads and the precision table (benchmarks/SCALING.md).

    python benchmarks/scaling.py determinism   # 256 digits: euler, dpmpp_2m, dopri5 and encode at world size 1/2/3
    python benchmarks/scaling.py speedup       # 1,024 samples × 20 steps, 1 rank vs 2 ranks, 1 thread per rank
    python benchmarks/scaling.py threads       # `probflow sample --n 64 --steps 50`: torch's default vs ours
    python benchmarks/scaling.py precision     # x_0 error and speed of each (model, state) dtype pair (DDIM)
    python benchmarks/scaling.py report        # rewrite SCALING.md from scaling.json

Each section stores its figures (with the machine's load average before and after) in benchmarks/scaling.json
and rewrites benchmarks/SCALING.md. Every run goes through `torchrun` (`python -m torch.distributed.run`) and
the `probflow` command or `probflow.distributed`, exactly as a user would run them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JSON, MD = HERE / "scaling.json", HERE / "SCALING.md"
PY = sys.executable
DET = {"n": 256, "chunk": 64, "steps": 20, "seed": 0}


def _env(threads: int | None = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout + p.stderr


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_port()), *args]


def _save(section: str, data: dict) -> None:
    from probflow.io.atomic import atomic_write

    allres = json.loads(JSON.read_text()) if JSON.exists() else {}
    allres[section] = data
    atomic_write(JSON, lambda tmp: Path(tmp).write_text(json.dumps(allres, indent=1) + "\n"), force=True)
    report()


# ---------------------------------------------------------------- determinism: world sizes 1, 2, 3


def _worker_determinism(out: str) -> None:
    """Under torchrun: the 256-sample matrix by probflow.distributed; rank 0 writes the tensors."""
    import torch
    from safetensors.torch import save_file

    from probflow import distributed as dist
    from probflow import grids, models
    from probflow.digits import load_split
    from probflow.io.atomic import atomic_write

    torch.set_num_threads(1)
    dist.world()
    m = models.load("digits")
    g = grids.ddim(m.schedule, DET["steps"])
    whole = torch.tensor([m.schedule.sigma_max, 0.0], dtype=torch.float64)
    res, nfe = {}, {}
    for meth, grid, kw in (("euler", g, {}), ("dpmpp_2m", g, {}), ("dopri5", whole, {"rtol": 1e-4, "atol": 1e-4})):
        s = dist.sample(m, DET["n"], grid, meth, chunk=DET["chunk"], seed=DET["seed"], **kw)
        if s is not None:
            res[meth], nfe[meth] = s.x, s.nfe
    x0 = load_split()["x_test"][:DET["n"]].double()
    e = dist.solve("encode", m, x0, g, "reversible_heun", chunk=DET["chunk"])
    if e is not None:
        res["encode"], nfe["encode"] = e.x, e.nfe
    dist.on_rank0(lambda: atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in res.items()}, tmp,
                                                                   metadata={k: str(v) for k, v in nfe.items()})))
    dist.finish()


def determinism() -> None:
    from safetensors import safe_open

    rows, load0 = {}, _load()
    with tempfile.TemporaryDirectory() as d:
        for ws in (1, 2, 3):
            out = f"{d}/ws{ws}.st"
            wall, _ = _run(_torchrun(ws, [__file__, "_worker_determinism", out]), _env(1))
            with safe_open(out, "pt") as f:
                rows[ws] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata(), wall)
    ref, meta, _ = rows[1]
    table = {}
    for k in ref:
        table[k] = {"nfe": int(meta[k]),
                    **{f"ws{ws}": bool((rows[ws][0][k] == ref[k]).all()) and rows[ws][0][k].shape == ref[k].shape
                       for ws in (2, 3)},
                    **{f"maxdiff_ws{ws}": float((rows[ws][0][k] - ref[k]).abs().max()) for ws in (2, 3)}}
    _save("determinism", {**DET, "table": table, "wall_s": {ws: round(r[2], 1) for ws, r in rows.items()},
                          "load_before": load0, "load_after": _load()})


# ---------------------------------------------------------------- speed-up: 2 ranks vs 1


def speedup(reps: int = 2) -> None:
    """End-to-end `torchrun ... -m probflow sample --samples 1024 --steps 20 --method euler --threads 1`."""
    args = ["-m", "probflow", "sample", "--samples", "1024", "--steps", "20", "--method", "euler", "--threads", "1",
            "--chunk", "64", "--quiet", "--force"]
    res = {"runs": []}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(reps):
            for ws in ((1, 2) if rep % 2 == 0 else (2, 1)):
                load0 = _load()
                wall, _ = _run(_torchrun(ws, [*args, "--out", f"{d}/s{ws}.png"]), _env(1))
                res["runs"].append({"ranks": ws, "wall_s": round(wall, 2), "load_before": load0, "load_after": _load()})
                print(res["runs"][-1], flush=True)
        res["same_png"] = Path(f"{d}/s1.png").read_bytes() == Path(f"{d}/s2.png").read_bytes()
    best = {ws: min(r["wall_s"] for r in res["runs"] if r["ranks"] == ws) for ws in (1, 2)}
    res.update(best_s=best, speedup=round(best[1] / best[2], 2), cores=os.cpu_count(),
               command="torchrun --nproc-per-node N -m probflow " + " ".join(args[2:]) + " --out s.png")
    _save("speedup", res)


# ---------------------------------------------------------------- threads: torch's default vs probflow's


def threads() -> None:
    """`probflow sample --n 64 --steps 50`: with --threads = torch's own default, then with probflow's default."""
    probe = "import torch; from probflow.distributed import default_threads; " \
            "print(torch.get_num_threads(), default_threads())"
    res = {"runs": []}
    with tempfile.TemporaryDirectory() as d:
        for label in ("torch default", "probflow default"):
            load0 = _load()
            out = subprocess.run([PY, "-c", probe], env=_env(None), capture_output=True, text=True).stdout.split()
            torch_default, ours = int(out[0]), int(out[1])
            extra = ["--threads", str(torch_default)] if label == "torch default" else []
            cmd = [PY, "-m", "probflow", "sample", "--n", "64", "--steps", "50", "--quiet", "--force", "--out",
                   f"{d}/t.png", *extra]
            wall, _ = _run(cmd, _env(None))
            res["runs"].append({"label": label, "threads": torch_default if extra else ours, "wall_s": round(wall, 2),
                                "load_before": load0, "load_after": _load()})
            print(res["runs"][-1], flush=True)
    _save("threads", res)


# ---------------------------------------------------------------- precision table


PAIRS = [("float64", "float64"), ("float32", "float64"), ("bfloat16", "float64"), ("float16", "float64"),
         ("float32", "float32"), ("bfloat16", "float32"), ("float16", "float32")]


def precision(n: int = 64, pairs: list[tuple[str, str]] | None = None, methods: tuple[str, ...] = ("euler",)) -> None:
    """x_0 of DDIM (euler) at 20 and 100 steps for each (model, state) pair against float64/float64 from the
    same noise (seed 1; the first n samples), one batch of n, 1 thread; speed = wall of the 20-step run (after
    a 1-step warm-up). Rows are merged into scaling.json one by one (a pair measured again replaces its row)."""
    import torch

    import probflow
    from probflow import grids, models
    from probflow.io.images import to_uint8

    torch.set_num_threads(1)
    m = models.load("digits")
    z = probflow.noise(n, tuple(m.sample_shape), seed=1)
    for meth in methods:
        ref = {s: probflow.sample(m, z, grids.ddim(m.schedule, s), meth, precision="float64").x for s in (20, 100)}
        disc = (ref[20] - ref[100]).pow(2).mean().sqrt().item()  # 20-step discretisation error (vs 100 steps)
        for mdt, sdt in pairs or PAIRS:
            p = f"model={mdt},state={sdt}"
            row = {"method": meth, "model": mdt, "state": sdt, "n": n, "disc_rmse_20": disc, "load_before": _load()}
            probflow.sample(m, z, grids.ddim(m.schedule, 1), meth, precision=p)  # warm-up
            for s in (20, 100):
                t = time.perf_counter()
                x = probflow.sample(m, z, grids.ddim(m.schedule, s), meth, precision=p).x.double()
                row[f"s_{s}_steps"] = time.perf_counter() - t
                d = x - ref[s]
                px = (to_uint8(x).astype(int) - to_uint8(ref[s]).astype(int))
                row[f"rmse_{s}"], row[f"max_{s}"] = d.pow(2).mean().sqrt().item(), d.abs().max().item()
                row[f"px_changed_{s}"], row[f"px_max_{s}"] = float((px != 0).mean()), int(abs(px).max())
            row["load_after"] = _load()
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            old = json.loads(JSON.read_text()).get("precision", {}) if JSON.exists() else {}
            rows = [r for r in old.get("rows", []) if (r["method"], r["model"], r["state"]) != (meth, mdt, sdt)]
            order = {pq: i for i, pq in enumerate(PAIRS)}
            rows = sorted([*rows, row], key=lambda r: (r["method"], order.get((r["model"], r["state"]), 99)))
            _save("precision", {"rows": rows, "threads": 1})


# ---------------------------------------------------------------- SCALING.md


def report() -> None:
    from probflow.io.atomic import atomic_write

    r = json.loads(JSON.read_text()) if JSON.exists() else {}
    lines = ["# Scaling out: measured figures", "",
             "Generated by `benchmarks/scaling.py` (each section: `python benchmarks/scaling.py SECTION`) on a "
             f"{os.cpu_count()}-core machine shared with other jobs; the 1-minute load average before and after "
             "each run is given, since every timing here depends on it.", ""]
    lines += _md_determinism(r.get("determinism")) + _md_speedup(r.get("speedup")) + _md_threads(r.get("threads"))
    lines += _md_precision(r.get("precision"))
    atomic_write(MD, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"), force=True)


def _md_determinism(d: dict | None) -> list[str]:
    if not d:
        return []
    out = ["## Determinism across world sizes", "",
           f"`python benchmarks/scaling.py determinism`: {d['n']} digits, chunk {d['chunk']}, {d['steps']} DDIM steps "
           "(dopri5: σ_max → 0 at rtol = atol = 1e-4), seed 0; world size 1, 2 and 3 through torchrun "
           "(gloo), 1 thread per rank; compared element by element with world size 1.", "",
           "| run | NFE (all chunks) | world size 2 bit-identical | world size 3 bit-identical |", "|---|---|---|---|"]
    def cell(v: dict, ws: int) -> str:
        return "yes" if v[f"ws{ws}"] else f"NO (max {v[f'maxdiff_ws{ws}']:.2g})"

    for k, v in d["table"].items():
        out.append(f"| {k} | {v['nfe']} | {cell(v, 2)} | {cell(v, 3)} |")
    out += ["", f"Wall (s, incl. start-up): {d['wall_s']}; load {d['load_before']} → {d['load_after']}.", ""]
    return out


def _md_speedup(d: dict | None) -> list[str]:
    if not d:
        return []
    out = ["## Speed-up: 2 ranks vs 1", "", f"`{d['command']}` (end to end, start-up included).", "",
           "| ranks | wall (s) | load before → after |", "|---|---|---|"]
    out += [f"| {x['ranks']} | {x['wall_s']} | {x['load_before']} → {x['load_after']} |" for x in d["runs"]]
    out += ["", f"Best of each: {d['best_s']} → **speed-up {d['speedup']}×**; the two runs' PNGs are "
                f"{'byte-identical' if d['same_png'] else 'DIFFERENT'}.", ""]
    return out


def _md_threads(d: dict | None) -> list[str]:
    if not d:
        return []
    out = ["## Threads", "", "`probflow sample --n 64 --steps 50` (rk4, 200 NFE on one batch of 64), OMP_NUM_THREADS "
           "unset; first with `--threads` = torch's own default, then with probflow's default (free cores ÷ ranks).",
           "", "| threads | wall (s) | load before → after |", "|---|---|---|"]
    out += [f"| {x['label']}: {x['threads']} | {x['wall_s']} | {x['load_before']} → {x['load_after']} |"
            for x in d["runs"]]
    return out + [""]


def _load1(v) -> str:
    """The 1-minute load average of a [1, 5, 15]-minute triple (or the note recorded instead)."""
    return f"{v[0]:.1f}" if isinstance(v, list) else str(v or "")


def _md_precision(d: dict | None) -> list[str]:
    if not d:
        return []
    out = ["## Precision", "",
           "`python benchmarks/scaling.py precision [N] [MODEL/STATE ...]`: the first N digits of seed 1 sampled by "
           "DDIM (euler) with `probflow.sample(..., precision=...)`, x_0 against the float64/float64 solve at the same "
           "step count; RMSE and max |Δx| on the [−1, 1] scale; 8-bit pixels changed (and the largest change in "
           "levels); wall of the 20-step run as one batch of N, 1 thread, with the 1-minute load average before → "
           "after.", "",
           "| model | state | N | RMSE 20 | max 20 | px changed 20 | RMSE 100 | max 100 | px changed 100 | "
           "s (20 steps) | time vs float32 model | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f32 = {}  # the float32 model's time at the same N (state float64 if measured, else float32)
    for x in sorted(d["rows"], key=lambda r: r["state"] != "float64"):
        if x["model"] == "float32":
            f32.setdefault((x["method"], x["n"]), x["s_20_steps"])
    for x in d["rows"]:
        rel = f32.get((x["method"], x["n"]))
        ratio = f"{x['s_20_steps'] / rel:.1f}×" if rel else "–"
        out.append(f"| {x['model']} | {x['state']} | {x['n']} | {x['rmse_20']:.1e} | {x['max_20']:.1e} | "
                   f"{100 * x['px_changed_20']:.1f} % ({x['px_max_20']}) | {x['rmse_100']:.1e} | "
                   f"{x['max_100']:.1e} | {100 * x['px_changed_100']:.1f} % ({x['px_max_100']}) | "
                   f"{x['s_20_steps']:.1f} | {ratio} | "
                   f"{_load1(x.get('load_before'))} → {_load1(x.get('load_after'))} |")
    disc = {(x["method"], x["n"]): x["disc_rmse_20"] for x in d["rows"]}
    out += ["", "For scale, DDIM's own 20-step discretisation error (float64, 20 vs 100 steps, RMSE): "
            + ", ".join(f"{k[0]} N = {k[1]}: {v:.1e}" for k, v in disc.items()) + ".", ""]
    return out


if __name__ == "__main__":
    sections = {"determinism": determinism, "speedup": speedup, "threads": threads, "precision": precision,
                "report": report}
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker_determinism":
        _worker_determinism(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "precision":  # precision N [MODEL/STATE ...]
        sys.path.insert(0, str(ROOT))
        precision(int(sys.argv[2]), [tuple(a.split("/")) for a in sys.argv[3:]] or None)
    elif len(sys.argv) == 2 and sys.argv[1] in sections:
        sys.path.insert(0, str(ROOT))
        sections[sys.argv[1]]()
    else:
        sys.exit(f"usage: python benchmarks/scaling.py {{{'|'.join(sections)}}}")
