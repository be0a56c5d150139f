"""probflow.distributed: outputs independent of the world size, the failure protocol, threads, precision.

The torchrun jobs (world size 2 on one "node", world size 3 as two torchrun "nodes" on 127.0.0.1 with 2 + 1
processes, and a failing world of 3) start together when the module starts and run beside the in-process
world-size-1 reference; each is a small script (WORKER below) over `probflow.distributed`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import probflow
from probflow import distributed as dist
from probflow import grids, models
from probflow.precision import Precision

ROOT = Path(__file__).resolve().parents[1]
N, CHUNK, SEED, STEPS = 12, 4, 5, 10

# One job: the same 12 digits sampled with euler, dpmpp_2m (10 DDIM steps) and dopri5 (adaptive, batch-wide
# error norm; σ_max → 20 at tol 1e-2 to keep it short), and 12 test digits encoded and decoded with
# reversible_heun (with its state): chunks of 4; rank 0 writes one safetensors file atomically.
WORKER = textwrap.dedent('''
    import sys, time, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from probflow import distributed as dist
    from probflow.io.atomic import atomic_write
    mode, out = sys.argv[1], sys.argv[2]
    w = dist.world()
    if mode == "fail":   # rank 1 raises in its second chunk while the others are mid-chunk
        import probflow

        def model(x, sigma):  # ~10 ms a call, light on a shared CPU; ε = 0 keeps x (so x[0, 0] = chunk start)
            time.sleep(0.01)
            return torch.zeros_like(x)

        def fn(field, x, sigmas, method, state=None):
            a = int(x[0, 0])
            if w.rank == 1 and a > 4:  # its chunks: 4:8, then 16:20
                print(f"FAILED-AT {time.time():.3f}", file=sys.stderr, flush=True)
                raise RuntimeError(f"injected failure in chunk {a}:{a + len(x)}")
            return probflow.sample(field, x, sigmas, method)

        steps = 100 if w.rank == 1 else 6000  # 1 s of model calls per chunk on rank 1, 60 s on the others
        g = torch.linspace(10.0, 0.0, steps + 1, dtype=torch.float64)
        try:
            dist.solve_chunks(fn, model, 36, lambda a, b: torch.full((b - a, 2), float(a), dtype=torch.float64), g,
                              chunk=4)
            dist.on_rank0(lambda: atomic_write(out, lambda tmp: open(tmp, "w").write("new"), force=True))
        except dist.RankFailed as e:
            print(f"RANK {w.rank} EXIT-AT {time.time():.3f} {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        sys.exit(0)
    sys.path.insert(0, sys.argv[3])
    from test_distributed import run_cli, run_matrix
    res = run_matrix(w)
    dist.on_rank0(lambda: atomic_write(out, lambda tmp: save_file(res, tmp)))
    assert run_cli(out.removesuffix(".st"), sys.argv[4]) == [0, 0]
    print(f"RANK {w.rank} OF {w.size} OK", file=sys.stderr, flush=True)
    dist.finish()
''')


def run_matrix(w=None, chunk: int = CHUNK) -> dict[str, torch.Tensor] | None:
    """The determinism matrix's outputs (on rank 0; None elsewhere)."""
    from probflow.digits import load_split

    m = models.load("digits")
    g = grids.ddim(m.schedule, STEPS)
    adaptive = torch.tensor([m.schedule.sigma_max, 20.0], dtype=torch.float64)
    res = {}
    for meth, grid, kw in (("euler", g, {}), ("dpmpp_2m", g, {}), ("dopri5", adaptive, {"rtol": 1e-2, "atol": 1e-2})):
        s = dist.sample(m, N, grid, meth, chunk=chunk, seed=SEED, w=w, **kw)
        if s is not None:
            res[meth], res[meth + "_nfe"] = s.x, torch.tensor(s.nfe)
    x0 = load_split()["x_test"][:N].double()
    e = dist.solve("encode", m, x0, g, "reversible_heun", chunk=chunk, w=w, everywhere=True)
    d = dist.solve("decode", m, e.x, g, "reversible_heun", chunk=chunk, state=e.state, w=w)
    if d is None:
        return None
    res.update(encode=e.x, encode_xhat=e.state.xhat, decode=d.x, x0=x0)
    return {k: v.contiguous() for k, v in res.items()}


def run_cli(prefix: str, pngs: str) -> list[int]:
    """`probflow sample` and `probflow encode` through the CLI (under torchrun: spread over its ranks)."""
    from probflow.cli import main

    common = ["--steps", str(STEPS), "--chunk", str(CHUNK), "--threads", "1", "--quiet"]
    files = sorted(str(p) for p in Path(pngs).glob("*.png"))
    return [main(["sample", "--samples", str(N), "--seed", str(SEED), "--method", "dpmpp_2m", "--out",
                  f"{prefix}_sample.png", *common]),
            main(["encode", *files, "--out", f"{prefix}_latents.safetensors", *common])]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], worker: Path, *rest: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(worker), *rest]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start every torchrun job at once; yield (folder, {name: Popen})."""
    d = tmp_path_factory.mktemp("dist")
    worker = d / "worker.py"
    worker.write_text(WORKER)
    (d / "fail_out.txt").write_text("old")
    from probflow.digits import load_split
    from probflow.io.images import save_images

    save_images(load_split()["x_test"][:N].double(), d / "pngs", names=[f"d{i:02d}" for i in range(N)])
    tests = str(Path(__file__).parent)
    p2, rdzv, pf = _port(), _port(), _port()
    nodes = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--rdzv-id", "t"]
    procs = {
        "ws2": _torchrun(["--nproc-per-node", "2", "--master-port", str(p2)], worker, "run", str(d / "ws2.st"),
                         tests, str(d / "pngs")),
        "node0": _torchrun([*nodes, "--nproc-per-node", "2", "--node-rank", "0"], worker, "run",
                           str(d / "ws3.st"), tests, str(d / "pngs")),
        "node1": _torchrun([*nodes, "--nproc-per-node", "1", "--node-rank", "1"], worker, "run",
                           str(d / "ws3.st"), tests, str(d / "pngs")),
        "fail": _torchrun(["--nproc-per-node", "3", "--master-port", str(pf)], worker, "fail",
                          str(d / "fail_out.txt")),
    }
    yield d, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _wait(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


@pytest.fixture(scope="module")
def reference(jobs):
    """World size 1, in this process, without torchrun or a process group (threads 1, like the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert dist.world().size == 1 and not torch.distributed.is_initialized()
        d, _ = jobs
        assert run_cli(str(d / "ws1"), str(d / "pngs")) == [0, 0]
        return run_matrix()
    finally:
        torch.set_num_threads(threads)


def _latents(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_bit_identical_for_world_sizes_1_2_3(jobs, reference):
    d, procs = jobs
    rc, out = _wait(procs["ws2"])
    assert rc == 0, out[-3000:]
    assert out.count(" OF 2 OK") == 2
    rcs = [_wait(procs[k]) for k in ("node0", "node1")]
    assert all(rc == 0 for rc, _ in rcs), rcs[0][1][-3000:] + rcs[1][1][-3000:]
    assert sum(o.count(" OF 3 OK") for _, o in rcs) == 3  # 3 ranks over the two "nodes"
    for ws in ("ws2", "ws3"):
        got = _load(d / f"{ws}.st")
        assert set(got) == set(reference)
        for k, v in reference.items():
            assert torch.equal(got[k], v), f"{ws} {k}: max diff {(got[k] - v).abs().max().item():.3g}"
        # the CLI's files: the PNG byte for byte; the latent file's tensors bit for bit and the same metadata
        # (safetensors writes its metadata map in an order that varies from process to process)
        assert (d / f"{ws}_sample.png").read_bytes() == (d / "ws1_sample.png").read_bytes()
        assert _latents(d / f"{ws}_latents.safetensors") == _latents(d / "ws1_latents.safetensors")
    assert not any(p.name.startswith(".") for p in d.iterdir()), "a temporary file was left behind"
    # the outputs are real: finite, distinct samples, an exact round trip
    for k in ("euler", "dpmpp_2m", "dopri5"):
        assert torch.isfinite(reference[k]).all() and reference[k].std(0).mean() > 0.05
    assert torch.equal(reference["decode"], reference["x0"])


def test_failure_stops_every_rank_within_seconds(jobs):
    d, procs = jobs
    rc, out = _wait(procs["fail"])
    assert rc != 0
    t_fail = float(next(line for line in out.splitlines() if "FAILED-AT" in line).split("FAILED-AT ")[1])
    exits = {int(line.split("RANK ")[1].split()[0]): line for line in out.splitlines() if " EXIT-AT " in line}
    assert sorted(exits) == [0, 1, 2], out[-3000:]
    lags = []
    for line in exits.values():
        assert "rank 1 of 3 failed: RuntimeError: injected failure in chunk 16:20" in line
        lags.append(float(line.split("EXIT-AT ")[1].split()[0]) - t_fail)
    print(f"failure → RankFailed on every rank after {max(lags):.2f} s (ranks 0 and 2 had ~60 s of work left)")
    assert max(lags) < 20, lags  # without the early abort ranks 0 and 2 would work on for ~60 s
    assert (d / "fail_out.txt").read_text() == "old"
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("fail_out") or p.name.startswith(".fail")) == [
        "fail_out.txt"]


def test_across_chunk_sizes_round_off_and_same_png(reference, capsys):
    """Another chunk size changes batch-mates: fixed-grid methods differ by the network's round-off only and
    give the same 8-bit images; the adaptive dopri5 follows another step sequence (differences up to its
    tolerance), which is why the unit of work is a chunk of fixed size."""
    from probflow.io.images import to_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        other = {12: run_matrix(chunk=12)}  # one batch of 12 against three of 4
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        for c, res in other.items():
            diffs = {k: (res[k] - reference[k]).abs().max().item() for k in ("euler", "dpmpp_2m", "dopri5", "encode")}
            print(f"\nchunk {c} vs {CHUNK}: max |Δx| " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
            for k in ("euler", "dpmpp_2m", "encode"):
                assert diffs[k] < 1e-5
                assert np.array_equal(to_uint8(res[k]), to_uint8(reference[k])), k
            assert torch.equal(res["decode"], reference["x0"])  # the exact round trip holds for any chunk
    # dopri5 with one batch of 12 is not the same computation as three batches of 4
    assert not torch.equal(other[12]["dopri5"], reference["dopri5"])


# ---------------------------------------------------------------- the parts, in one process


def test_chunk_bounds_and_noise_offsets():
    assert dist.chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="--chunk"):
        dist.chunk_bounds(10, 0)
    with pytest.raises(ValueError, match="n:"):
        dist.chunk_bounds(0, 4)
    z = probflow.noise(10, (3,), seed=7)
    assert torch.equal(probflow.noise(4, (3,), seed=7, start=4), z[4:8])


def test_world_of_one_maps_chunks_in_order():
    w = dist.world()
    assert (w.rank, w.size, w.grouped) == (0, 1, False)
    assert dist.map_chunks(lambda a, b: list(range(a, b)), 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert dist.map_cells(lambda i: i * i, 4) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="boom"):  # one process: the error as is
        dist.map_chunks(lambda a, b: (_ for _ in ()).throw(ValueError("boom")), 4, 2)
    with pytest.raises(OSError, match="disk"):
        dist.on_rank0(lambda: (_ for _ in ()).throw(OSError("disk full")))


def test_concat_and_slice_reversible_state():
    m = models.default_mixture()
    g = grids.ddim(probflow.schedules.linear(), 8)
    x = probflow.noise(6, (2,), seed=1)
    whole = probflow.encode(m, x, g, "reversible_heun")
    parts = [probflow.encode(m, x[a:b], g, "reversible_heun") for a, b in dist.chunk_bounds(6, 4)]
    cat = dist.concat_solutions(parts)
    assert torch.equal(cat.x, whole.x)
    # NFE per sample: each sample's path made its chunk's model calls; the batched total beside it
    assert cat.nfe == parts[0].nfe == whole.nfe and cat.info["nfe_total"] == sum(p.nfe for p in parts)
    back = dist.solve("decode", m, cat.x, g, "reversible_heun", chunk=4, state=cat.state)
    assert torch.equal(back.x, probflow.decode(m, whole.x, g, "reversible_heun", state=whole.state).x)
    assert (back.x - x).abs().max() < 1e-12  # the exact inverse, to the fixed point's 2⁻⁴² (reversible.py)
    sliced = dist.slice_state(cat.state, 2, 5)
    assert torch.equal(sliced.xbar, cat.state.xbar[2:5]) and sliced.sigma == cat.state.sigma


def test_default_threads_never_oversubscribe():
    for cores in range(1, 9):
        for ranks in range(1, 9):
            t = dist.default_threads(local_size=ranks, cores=cores)
            assert t >= 1 and (ranks * t <= cores or t == 1)
    assert dist.default_threads(local_size=1, cores=2) == 2
    assert dist.default_threads(local_size=2, cores=2) == 1
    with pytest.raises(ValueError, match="--threads"):
        dist.set_threads(0)


# ---------------------------------------------------------------- precision policy


def test_precision_parse_and_refusals():
    p = Precision.parse("model=bfloat16,state=float32")
    assert (p.model, p.state) == (torch.bfloat16, torch.float32) and str(p) == "model=bfloat16,state=float32"
    assert Precision.parse("float32") == Precision(torch.float32, torch.float32)
    assert Precision.parse("model=fp16") == Precision(torch.float16, torch.float64)
    for bad, msg in (("state=bfloat16", "state dtype must be float64 or float32"),
                     ("bfloat16", "name both"),
                     ("model=float64,state=float32", "rounds the float64"),
                     ("model=int8", "unknown model dtype"),
                     ("model=float32,model=float64", "expected 'model=DTYPE,state=DTYPE'")):
        with pytest.raises(ValueError, match=msg):
            Precision.parse(bad)
    with pytest.raises(ValueError, match="model=float16 is not supported on meta"):
        Precision(torch.float16, torch.float32).check_device("meta")


def test_precision_in_sample_matches_manual_casts_and_bounds_the_error():
    m = models.load("digits")
    g = grids.ddim(m.schedule, 10)
    z = probflow.noise(4, (1, 8, 8), seed=2)
    ref = probflow.sample(m, z, g, "euler", precision="model=float64,state=float64")
    assert ref.x.dtype == torch.float64 and next(m.net.parameters()).dtype == torch.float32  # model not mutated
    f32 = probflow.sample(m, z, g, "euler", precision="float32")
    assert f32.x.dtype == torch.float32
    assert torch.equal(f32.x, probflow.sample(m, z.float(), g, "euler").x)  # = float32 noise, the old way
    bf = probflow.sample(m, z, g, "euler", precision="model=bfloat16,state=float32")
    e32, ebf = ((s.x.double() - ref.x).abs().max().item() for s in (f32, bf))
    assert 0 < e32 < 1e-4  # float32 round-off
    assert 10 * e32 < ebf < 0.2  # bfloat16: 8-bit mantissa, visibly worse, still the same digits


# ---------------------------------------------------------------- the CLI's runtime flags, in one process


def test_cli_runtime_flags(tmp_path, capsys):
    from probflow.cli import main

    base = ["sample", "--n", "8", "--steps", "5", "--method", "euler", "--quiet", "--threads", "1"]
    for bad, msg in ((["--chunk", "0"], "--chunk: expected a positive integer"),
                     (["--threads", "0"], "--threads: expected a positive integer"),
                     (["--precision", "model=bfloat16,state=bfloat16"], "state dtype must be float64 or float32")):
        try:
            rc = main([*base, *bad, "--out", str(tmp_path / "x.png")])
        except SystemExit as e:  # argparse's refusal of a flag's type (--precision)
            rc = e.code
        assert rc == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # stochastic DDIM: sample i's path noise is stream i whatever its chunk, so chunks of 4 = one batch of 8
    for c in ("4", "8"):
        assert main([*base, "--eta", "1", "--chunk", c, "--out", str(tmp_path / f"eta{c}.png")]) == 0
    assert (tmp_path / "eta4.png").read_bytes() == (tmp_path / "eta8.png").read_bytes()
    assert main([*base, "--precision", "model=bfloat16,state=float32", "--out", str(tmp_path / "bf.png")]) == 0
    from probflow.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert all("--threads" in p._option_string_actions for p in sub.choices.values())


def test_bench_over_two_ranks_gives_the_single_process_tables(tmp_path):
    """`torchrun … -m probflow bench` spreads the (method, grid, NFE) cells over ranks; the rows (and so
    RESULTS.md's tables) are those of one process."""
    import json

    args = ["bench", "--model", "mixture2d", "--quick", "--methods", "euler,rk4,dopri5", "--grids", "uniform,quadratic",
            "--nfe", "5,10", "--samples", "16", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "probflow", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_port()), "-m", "probflow", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stdout[-2000:])

    def rows(folder):
        r = json.loads((folder / "results.json").read_text())
        return sorted((w, str(row.get("method")), str(row.get("grid")), str(row.get("nfe")), row.get("rmse"))
                      for w, wl in r["workloads"].items() for row in wl["rows"])

    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(a) >= 10 and a == b


# ---------------------------------------------------------------- no module state; Ctrl-C under the launcher


def test_distributed_keeps_no_module_state_and_starts_no_thread():
    """The World is read from torch.distributed and torchrun's variables, never kept here; an early abort is
    looked for by the main thread itself (no watcher thread interrupting it)."""
    import threading
    import types

    from probflow import chunks, ranks

    mutable = {f"{m.__name__}.{k}": type(v).__name__ for m in (dist, ranks, chunks) for k, v in vars(m).items()
               if not k.startswith("__") and not isinstance(v, (types.ModuleType, type, types.FunctionType))
               and isinstance(v, (list, dict, set, dist.World))}
    assert mutable == {}, mutable
    before = threading.active_count()
    m = models.default_mixture()
    g = grids.ddim(probflow.schedules.linear(), 4)
    sol = dist.sample(m, 6, g, "euler", chunk=4, shape=(2,))
    assert threading.active_count() == before and sol.nfe == 4 and sol.info["nfe_total"] == 8
    assert dist.world() == dist.World() and not dist.joined()


def test_ctrl_c_under_the_launcher_prints_one_line_and_exits_130(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, while two ranks sample: one line from rank 0,
    no traceback (torchrun's or a rank's), exit status 130, no output file."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "big.png"
    p = subprocess.Popen([sys.executable, "-m", "probflow.cli.launch", "--nproc-per-node", "2", "--master-port",
                          str(_port()), "sample", "--samples", "512", "--steps", "900", "--chunk", "8", "--threads",
                          "1", "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    time.sleep(15)  # the ranks are sampling (512 samples × 900 rk4 steps take minutes)
    assert p.poll() is None
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 130, err[-3000:]
    assert lines == ["probflow sample: interrupted; nothing half-written was left behind"], err[-3000:]
    assert not out.exists() and not [q for q in tmp_path.iterdir()]


def test_launcher_passes_bad_input_on_as_one_line_and_status_2(tmp_path):
    """A rank's refusal: its one line and status 2, not torchrun's failure report; probflow's own options
    reach probflow only (`--n` is not taken for torchrun's --nnodes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "probflow.cli.launch", "--nproc-per-node", "2", "--master-port",
                        str(_port()), "sample", "--n", "4", "--steps", "1e9", "--out", str(tmp_path / "x.png")],
                       env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines == ["probflow sample: error: --steps: 1000000000 is above the bound of 100000 "
                                           "(pass --no-limits to lift it)"], r.stderr[-3000:]
    from probflow.cli.launch import split

    assert split(["--nproc-per-node", "2", "sample", "--n", "4"]) == (["--nproc-per-node", "2"], ["sample", "--n", "4"])
    with pytest.raises(ValueError, match="expected a probflow command"):
        split(["--nproc-per-node", "2"])


def test_a_rank_other_than_0_refusing_input_waits_for_rank_0_to_say_it(monkeypatch):
    """Under torchrun rank 0 says a refusal's one line; a rank that refuses first waits (torchrun would otherwise
    stop rank 0 before it has said it, on a busy machine: an exit status 2 with no line), and a signal ends the
    wait quietly. Rank 0 and a single process do not wait."""
    import probflow.cli as cli

    slept = []

    def fake_sleep(s):
        slept.append(s)
        raise KeyboardInterrupt  # torchrun's SIGTERM arriving during the wait

    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    monkeypatch.setenv("RANK", "1")
    assert cli._run(["sample", "--n", "4", "--steps", "1e9", "--out", "/nonexistent-dir/x.png"]) == 2
    assert slept == [30.0]
    for rank in ("0", None):
        slept.clear()
        if rank is None:
            monkeypatch.delenv("RANK")
        else:
            monkeypatch.setenv("RANK", rank)
        assert cli._run(["sample", "--n", "4", "--steps", "1e9", "--out", "/nonexistent-dir/x.png"]) == 2
        assert slept == []
