"""Bad and adversarial inputs, each run under a time and memory bound and classified (issue 27).

    python benchmarks/probes.py --out benchmarks/PROBES.md            # about 10 minutes on 1 thread
    python benchmarks/probes.py --only api.noise --out /tmp/p.md      # a subset (id prefix)

Every probe is one call of the Python API (run in a forked child of this process, which has imported torch
and probflow once) or one `python -m probflow …` command (a subprocess), with a wall-clock timeout, an
address-space limit (RLIMIT_AS) and its peak resident memory measured (`wait4`'s ru_maxrss; for a forked
child, above this process's own resident size at the fork). Each ends in one class:

  one-line error   refused as it should be: ValueError/TypeError/FileNotFoundError/FileExistsError with a
                   one-line message holding the expected fragment (API), or exit 2 with one `error:` line and
                   no traceback (CLI)
  ok               a valid input gave the right result (the probe's own check: bytes, shapes, messages)
  traceback        any other exception or exit status, a multi-line message, or a message without the
                   expected fragment
  silent wrong     a bad input was accepted, or a valid one gave a wrong result (the check failed)
  hang             still running at the probe's timeout (API: TIMEOUT_API, CLI: TIMEOUT_CLI seconds)
  allocation       peak RSS above MEM_BOUND, or an allocation refused by the address-space limit
  partial output   an output file or a temporary file left behind by a refused or interrupted run

The fixtures (a tiny random digits checkpoint, a tiny diffusers folder, images, latent files) are made in a
temporary folder first. Probes run one at a time (parallelism 1) with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's probflow, not an installed one
TIMEOUT_API, TIMEOUT_CLI = 30.0, 90.0
MEM_BOUND = 1 << 30  # 1 GiB of resident memory above the probe's starting point
AS_EXTRA = 2 << 30  # address space a probe may reserve beyond its parent's (RLIMIT_AS), so nothing can thrash
CLASSES = ("one-line error", "ok", "traceback", "silent wrong", "hang", "allocation", "partial output")
# MaxStepsError: an adaptive solve stopped at its max_steps bound, naming it and the σ reached
GOOD_ERRORS = ("ValueError", "TypeError", "FileNotFoundError", "FileExistsError", "MaxStepsError")


@dataclass
class Probe:
    id: str
    what: str
    run: Callable | list  # API: a zero-argument callable; CLI: argv after `python -m probflow`
    expect: str = "error"  # "error" (must be refused) or "ok" (run/check must return True)
    frag: str = ""  # a fragment the one-line message must hold
    check: Callable | None = None  # CLI "ok" probes: check(rc, stdout, stderr) -> bool
    outs: list = field(default_factory=list)  # CLI: paths that must not exist after a refused run
    timeout: float | None = None
    interrupt: tuple | None = None  # CLI: (seconds, signal) sent once
    allow_tmp: bool = False  # a SIGKILLed run may leave its hidden temporary file (never the output)


# ---------------------------------------------------------------- running one probe


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _vm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    return 0


def _child_result(fn: Callable) -> dict:
    sys.stderr = io.StringIO()  # notes the library prints; the probe's checks may read them
    try:
        value = fn()
        return {
            "raised": None,
            "value": bool(value) if not isinstance(value, str) else value,
            "stderr": sys.stderr.getvalue()[-2000:],
        }
    except BaseException as e:  # noqa: BLE001 - every outcome is classified
        return {"raised": type(e).__name__, "msg": str(e)[:3000], "mro": [c.__name__ for c in type(e).__mro__]}


def run_api(fn: Callable, timeout: float) -> dict:
    """fn() in a forked child with RLIMIT_AS; its result, wall time and peak RSS above ours."""
    r, w = os.pipe()
    base, vm = _rss_kb(), _vm_kb()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: bounded address space, one result on the pipe, no cleanup handlers
        os.close(r)
        limit = vm * 1024 + AS_EXTRA
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            data = json.dumps(_child_result(fn)).encode()
        except BaseException:  # noqa: BLE001
            data = b'{"raised": "ProbeCrash", "msg": "", "mro": []}'
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
        os._exit(0)
    os.close(w)
    chunks, timed_out = [], False
    while True:
        left = t0 + timeout - time.time()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    os.close(r)
    _, status, ru = os.wait4(pid, 0)
    out = {"wall": time.time() - t0, "rss": max(0, ru.ru_maxrss - base) * 1024, "timed_out": timed_out}
    if not timed_out:
        try:
            out.update(json.loads(b"".join(chunks)))
        except json.JSONDecodeError:
            out.update({"raised": f"died (status {status})", "msg": "", "mro": []})
    return out


def _cli_limit() -> None:
    limit = 3 << 30  # a fresh interpreter with torch and probflow reserves about 0.7 GiB of address space
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.setsid()


def run_cli(argv: list, timeout: float, cwd: Path, interrupt: tuple | None = None) -> dict:
    """`python -m probflow ARGV` with a timeout and an address-space limit; rc, stdout, stderr, peak RSS.
    interrupt = (after_seconds, signal) sends that signal to the run once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(
            [sys.executable, "-m", "probflow", *map(str, argv)],
            stdout=fo,
            stderr=fe,
            cwd=cwd,
            env=env,
            preexec_fn=_cli_limit,
        )
        timed_out, sent = False, False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            el = time.time() - t0
            if interrupt and not sent and el >= interrupt[0]:
                os.kill(p.pid, interrupt[1])
                sent = True
            if el > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return {
            "rc": p.returncode,
            "stdout": fo.read().decode(errors="replace"),
            "stderr": fe.read().decode(errors="replace"),
            "wall": time.time() - t0,
            "rss": ru.ru_maxrss * 1024,
            "timed_out": timed_out,
        }


def _alloc_refused(msg: str) -> bool:
    m = msg.lower()
    return "can't allocate memory" in m or "cannot allocate memory" in m or "out of memory" in m


def classify_api(p: Probe, res: dict) -> tuple[str, str]:
    if res["timed_out"]:
        return "hang", f"still running after {TIMEOUT_API if p.timeout is None else p.timeout:g} s"
    if res["rss"] > MEM_BOUND:
        return "allocation", f"peak RSS +{res['rss'] / 2**20:.0f} MiB"
    raised, msg = res.get("raised"), res.get("msg", "")
    if raised is not None and (raised == "MemoryError" or _alloc_refused(msg)):
        return "allocation", f"{raised}: {msg.splitlines()[0][:100] if msg else ''}"
    if p.expect == "ok":
        if raised is not None:
            return "traceback", f"{raised}: {msg.splitlines()[0][:140] if msg else ''}"
        return ("ok", "") if res.get("value") is True else ("silent wrong", f"check returned {res.get('value')!r}")
    if raised is None:
        return "silent wrong", "accepted"
    good = any(c in GOOD_ERRORS for c in res.get("mro", []))
    if good and "\n" not in msg.strip() and p.frag in msg:
        return "one-line error", f"{raised}: {msg[:140]}"
    return "traceback", f"{raised}: {msg.splitlines()[0][:140] if msg else ''}"


def _partial(outs: list, allow_tmp: bool = False) -> list[str]:
    left = []
    for o in outs:
        o = Path(o)
        if o.exists() or o.is_symlink():
            left.append(o.name)
        if o.parent.is_dir() and not allow_tmp:
            left += [
                q.name
                for q in o.parent.iterdir()
                if q.name.startswith(f".{o.name}") or q.name.endswith(".tmp") or q.name.startswith(".tmp")
            ]
    return left


def classify_cli(p: Probe, res: dict) -> tuple[str, str]:
    err = res["stderr"]
    if res["timed_out"]:
        return "hang", f"still running after {TIMEOUT_CLI if p.timeout is None else p.timeout:g} s"
    if res["rss"] > MEM_BOUND + (600 << 20):  # a fresh interpreter with torch and probflow: about 400-600 MiB
        return "allocation", f"peak RSS {res['rss'] / 2**20:.0f} MiB"
    if _alloc_refused(err) or "MemoryError" in err:
        return "allocation", err.strip().splitlines()[-1][:140]
    if p.expect == "error" and res["rc"] == 0:
        out = res["stdout"].strip().splitlines()
        return "silent wrong", f"accepted: {out[-1][:120] if out else ''}"
    left = _partial(p.outs, p.allow_tmp)
    if left:
        return "partial output", f"left {left[:3]}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    killed = p.interrupt is not None and p.interrupt[1] == signal.SIGKILL and res["rc"] == -9
    if "Traceback" in err or (res["rc"] not in (0, 2, 130, 143) and not killed):
        return "traceback", f"exit {res['rc']}: {last[:140]}"
    if p.expect == "ok":
        if res["rc"] != 0 and not p.check:
            return "traceback", f"exit {res['rc']}: {last[:140]}"
        ok = p.check(res["rc"], res["stdout"], err) if p.check else True
        return ("ok", "") if ok else ("silent wrong", f"exit {res['rc']}: {(last or res['stdout'].strip())[:140]}")
    if res["rc"] == 0:
        return (
            "silent wrong",
            f"accepted: {res['stdout'].strip().splitlines()[-1][:120] if res['stdout'].strip() else ''}",
        )
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    if res["rc"] == 2 and len(errors) == 1 and p.frag in errors[0]:
        return "one-line error", errors[0][:160]
    return "traceback", f"exit {res['rc']}: {last[:140]}"


# ---------------------------------------------------------------- fixtures


def _png_raw(path: Path, w: int, h: int, data: bytes | None = b"", depth: int = 8, color: int = 0) -> Path:
    def chunk(kind: bytes, d: bytes) -> bytes:
        return len(d).to_bytes(4, "big") + kind + d + zlib.crc32(kind + d).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([depth, color, 0, 0, 0])
    body = chunk(b"IDAT", zlib.compress(data)) if data is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b""))
    return path


def make_fixtures(d: Path) -> dict:
    """A tiny digits checkpoint (random weights), a tiny diffusers folder, three 8×8 PNGs, latent files."""
    from PIL import Image

    from probflow import grids
    from probflow.digits import train as digits_train
    from probflow.io.images import save_images
    from probflow.io.latents import save_latents
    from probflow.models import digits as digits_model
    from probflow.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=(8, 16), blocks=1)
    with torch.no_grad():
        for q in net.parameters():
            q.copy_(0.3 * torch.randn(q.shape) / max(1, q[0].numel()) ** 0.5)
    model_dir = d / "model"
    digits_train.save(net, {"name": "digits", "fingerprint": digits_model.as_model(net).fingerprint}, model_dir)
    model = digits_model.load_model(model_dir)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x = torch.stack([2 * torch.exp(-((yy - c) ** 2 + (xx - 7 + c) ** 2) / 4) - 1 for c in (2.0, 4.0, 5.0)])
    imgs = save_images(x.unsqueeze(1).double(), d / "in", names=["a", "b", "c"])
    g = grids.named("quadratic_open", model.schedule, 4)
    fx = {"dir": d, "model": model_dir, "imgs": imgs, "x": x.unsqueeze(1).double()}
    fx["plain"] = save_latents(
        d / "plain.safetensors",
        torch.randn(3, 1, 8, 8, dtype=torch.float64),
        g,
        model,
        method="euler",
        nfe=4,
        grid="quadratic_open",
        sources=["a.png", "b.png", "c.png"],
        extra={"invert": "false"},
    )
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(d / "gray.png")
    try:
        import diffusers

        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        unet.save_pretrained(d / "diff")
        diffusers.DDPMScheduler().save_config(d / "diff")
        fx["diff"] = d / "diff"
    except Exception:  # noqa: BLE001 - diffusers is optional; its probes then report the missing fixture
        fx["diff"] = None
    return fx


def make_exact_latents(fx: dict) -> None:
    """An exact latent (the CLI's default encode) and a reversible one, written by the CLI itself."""
    d = fx["dir"]
    for name, extra in (("exact", []), ("pair", ["--method", "reversible_heun", "--steps", "4"])):
        res = run_cli(
            [
                "encode",
                *fx["imgs"],
                "--model",
                fx["model"],
                "--quiet",
                "--steps",
                "4",
                *extra,
                "--out",
                d / f"{name}.safetensors",
            ],
            TIMEOUT_CLI,
            d,
        )
        fx[name] = d / f"{name}.safetensors" if res["rc"] == 0 else None
        if res["rc"] != 0:
            print(f"fixture {name}: encode failed: {res['stderr'].strip()[-300:]}", file=sys.stderr)


# ---------------------------------------------------------------- the probes


def _e(pid: str, what: str, fn: Callable, frag: str = "") -> Probe:
    return Probe(pid, what, fn, "error", frag)


def _ok(pid: str, what: str, fn: Callable) -> Probe:
    return Probe(pid, what, fn, "ok")


def _gm():
    from probflow.models import default_mixture

    return default_mixture()


def _g(*v: float):
    return torch.tensor(v or (80.0, 1.0, 0.0), dtype=torch.float64)


def _x(n: int = 3, d: int = 2):
    return torch.zeros(n, d, dtype=torch.float64)


def grid_probes() -> list[Probe]:
    from probflow import grids, schedules

    out = []
    sch = schedules.linear()
    bad_steps = [
        (0, "0"),
        (-1, "-1"),
        (2.5, "2.5"),
        (True, "True"),
        ("10", "'10'"),
        (None, "None"),
        (10**9, "10**9"),
        (2**70, "2**70"),
    ]
    for name in grids.NAMED:
        for v, shown in bad_steps:
            out.append(
                _e(
                    f"api.grids.{name}.steps={shown}",
                    f"`grids.named({name!r}, linear(), {shown})`",
                    lambda n=name, v=v: grids.named(n, sch, v),
                    "steps",
                )
            )
        for k in (1, 3, 50):

            def good(n=name, k=k):
                g = grids.named(n, sch, k)
                return (
                    len(g) == k + 1
                    and bool((g.diff() < 0).all())
                    and float(g[0]) == sch.sigma_max
                    and float(g[-1]) >= 0
                )

            out.append(
                _ok(
                    f"api.grids.{name}.ok{k}",
                    f"`grids.named({name!r}, linear(), {k})`: {k + 1} decreasing points from σ_max",
                    good,
                )
            )
    for rho in (0, -1, float("nan"), float("inf"), "7", True, 1e9):
        out.append(
            _e(
                f"api.grids.karras.rho={rho}",
                f"`grids.karras(80, 0.002, 10, rho={rho!r})`",
                lambda r=rho: grids.karras(80.0, 0.002, 10, rho=r),
                "rho",
            )
        )
    for hi, lo in (
        (0.002, 80.0),
        (1.0, float("nan")),
        (float("inf"), 0.002),
        (80.0, -1.0),
        (80.0, 0.0),
        ("a", 0.002),
        (1e300, 1.0),
    ):
        for fn in ("karras", "log_uniform"):
            out.append(
                _e(
                    f"api.grids.{fn}.range={hi},{lo}",
                    f"`grids.{fn}({hi!r}, {lo!r}, 10)`",
                    lambda f=fn, a=hi, b=lo: getattr(grids, f)(a, b, 10),
                    "sigma_m",
                )
            )
    for val, shown in (
        ("abc", "'abc'"),
        ([1.0], "[1.0]"),
        ([[1.0, 0.0]], "[[1, 0]]"),
        ([float("nan"), 0.0], "[nan, 0]"),
        ([-1.0, 0.0], "[-1, 0]"),
        ([1.0, 2.0, 1.0], "[1, 2, 1]"),
        (torch.tensor([2, 1]), "int tensor"),
        ([1e300, 0.0], "[1e300, 0]"),
        ([], "[]"),
        (None, "None"),
    ):
        out.append(
            _e(
                f"api.grids.check_grid={shown}",
                f"`grids.check_grid({shown})`",
                lambda v=val: grids.check_grid(v),
                "sigmas",
            )
        )
    out.append(
        _e(
            "api.grids.ddim.spacing",
            "`grids.ddim(linear(), 5, spacing='x')`",
            lambda: grids.ddim(sch, 5, "x"),
            "spacing",
        )
    )
    out.append(
        _e(
            "api.grids.ddim.steps>T",
            "`grids.ddim(linear(10), 50)`",
            lambda: grids.ddim(schedules.linear(10), 50),
            "steps",
        )
    )
    out.append(_e("api.grids.ddim.schedule=None", "`grids.ddim(None, 5)`", lambda: grids.ddim(None, 5), "schedule"))
    for end in (0.5, float("nan"), 1e9, "3"):
        out.append(
            _e(
                f"api.grids.log_snr_tuned.end={end}",
                f"`grids.log_snr_tuned(linear(), 5, end={end!r})`",
                lambda e=end: grids.log_snr_tuned(sch, 5, e),
                "end",
            )
        )
    out.append(
        _e("api.grids.named.unknown", "`grids.named('nope', linear(), 5)`", lambda: grids.named("nope", sch, 5), "grid")
    )
    out.append(
        _e(
            "api.grids.named.schedule=str",
            "`grids.named('uniform', 'linear', 5)`",
            lambda: grids.named("uniform", "linear", 5),
            "schedule",
        )
    )
    out.append(
        _ok(
            "api.grids.max_steps=None",
            "`grids.named('karras', linear(), 2_000_000, max_steps=None)` (the bound lifted)",
            lambda: len(grids.named("karras", sch, 2_000_000, max_steps=None)) == 2_000_001,
        )
    )
    return out


def schedule_probes() -> list[Probe]:
    from probflow import schedules

    out = []
    for T in (0, 1, 2.5, True, 10**9, -5, "1000", None):
        out.append(
            _e(f"api.schedules.linear.T={T}", f"`schedules.linear({T!r})`", lambda t=T: schedules.linear(t), "T")
        )
    for b in (0, 1, float("nan"), -1, "a", 2.0):
        out.append(
            _e(
                f"api.schedules.linear.beta_start={b}",
                f"`schedules.linear(1000, {b!r})`",
                lambda v=b: schedules.linear(1000, v),
                "beta_start",
            )
        )
    for s in (-1, float("nan"), float("inf")):
        out.append(
            _e(f"api.schedules.cosine.s={s}", f"`schedules.cosine(s={s!r})`", lambda v=s: schedules.cosine(s=v), "s:")
        )
    for m in (0, 2, float("nan")):
        out.append(
            _e(
                f"api.schedules.cosine.max_beta={m}",
                f"`schedules.cosine(max_beta={m!r})`",
                lambda v=m: schedules.cosine(max_beta=v),
                "max_beta",
            )
        )
    for n in ("x", None):
        out.append(
            _e(
                f"api.schedules.by_name={n}",
                f"`schedules.by_name({n!r})`",
                lambda v=n: schedules.by_name(v),
                "schedule",
            )
        )
    for betas, shown in (
        ([], "[]"),
        ([0.5], "[0.5]"),
        ([float("nan"), 0.1], "[nan, 0.1]"),
        ([1.0, 0.1], "[1, 0.1]"),
        ("abc", "'abc'"),
        ([[0.1, 0.2]], "[[0.1, 0.2]]"),
    ):
        out.append(
            _e(
                f"api.schedules.from_betas={shown}",
                f"`schedules.from_betas({shown})`",
                lambda v=betas: schedules.from_betas(v, "betas"),
                "betas",
            )
        )
    lin = schedules.linear()
    for t in (-1, 1000, float("nan")):
        out.append(_e(f"api.schedules.sigma(t={t})", f"`linear().sigma({t!r})`", lambda v=t: lin.sigma(v), "t"))
    out.append(
        _ok(
            "api.schedules.linear.ok",
            "`schedules.linear(10)`: ᾱ decreasing in (0, 1)",
            lambda: bool(((a := schedules.linear(10).alpha_bar).diff() < 0).all() and (a > 0).all()),
        )
    )
    return out


def noise_probes() -> list[Probe]:
    import probflow

    out = []
    cases = [("n", a, f) for a, f in ((0, "n"), (-1, "n"), (2.5, "n"), (True, "n"), ("3", "n"), (None, "n"))]
    cases += [("shape", a, "shape") for a in ((-1,), (0,), (2.5,), "ab", None, (2, -3))]
    cases += [("seed", a, "seed") for a in (-1, 2**63, 2**70, 1.5, "1", None, True)]
    cases += [("dtype", a, "dtype") for a in (torch.int64, torch.bool, "float33", torch.complex64, "int8")]
    cases += [("device", a, "device") for a in ("foo", 5, "cuda:99")]
    cases += [("start", a, "start") for a in (-1, 2**63, 1.5)]
    for arg, v, frag in cases:
        kw = {"n": 4, "shape": (2,), arg: v}
        shown = getattr(v, "__name__", None) or repr(v)
        out.append(
            _e(
                f"api.noise.{arg}={shown}",
                f"`probflow.noise({', '.join(f'{k}={w!r}' for k, w in kw.items())})`",
                lambda kw=kw: probflow.noise(**kw),
                frag,
            )
        )
    out.append(
        _e(
            "api.noise.n=1e9",
            "`probflow.noise(10**9, (3, 32, 32))` (23 TiB)",
            lambda: probflow.noise(10**9, (3, 32, 32)),
            "above the limit",
        )
    )
    out.append(
        _e(
            "api.noise.shape=1e6x1e6",
            "`probflow.noise(1, (10**6, 10**6))`",
            lambda: probflow.noise(1, (10**6, 10**6)),
            "above the limit",
        )
    )
    out.append(
        _ok(
            "api.noise.same-seed-same-bytes",
            "`noise(5, (3, 4), seed=7)` twice: equal bytes",
            lambda: torch.equal(probflow.noise(5, (3, 4), 7), probflow.noise(5, (3, 4), 7)),
        )
    )
    out.append(
        _ok(
            "api.noise.chunk",
            "`noise(8, (3,))[3:5] == noise(2, (3,), start=3)`",
            lambda: torch.equal(probflow.noise(8, (3,))[3:5], probflow.noise(2, (3,), start=3)),
        )
    )
    out.append(
        _ok(
            "api.noise.seeds-differ",
            "`noise(2, (3,), seed=1) != noise(2, (3,), seed=2)`",
            lambda: not torch.equal(probflow.noise(2, (3,), 1), probflow.noise(2, (3,), 2)),
        )
    )
    out.append(
        _ok(
            "api.noise.float32",
            "`noise(2, (3,), dtype=torch.float32)` is the float64 draw rounded",
            lambda: torch.equal(probflow.noise(2, (3,), dtype=torch.float32), probflow.noise(2, (3,)).float()),
        )
    )
    out.append(
        _ok(
            "api.noise.max-seed",
            "`noise(1, (2,), seed=2**63 - 1)` works",
            lambda: probflow.noise(1, (2,), seed=2**63 - 1).shape == (1, 2),
        )
    )
    return out


def field_probes(fx: dict) -> list[Probe]:
    import probflow
    from probflow.models import digits

    out = []
    for md in ("float33", torch.int64, 5, "int32"):
        out.append(
            _e(
                f"api.field.model_dtype={md}",
                f"`DDIMField(gm, model_dtype={md!r})`",
                lambda v=md: probflow.DDIMField(_gm(), model_dtype=v),
                "model_dtype",
            )
        )
    out.append(
        _ok(
            "api.field.model_dtype='float32'",
            "`DDIMField(gm, model_dtype='float32')` samples in float64 state",
            lambda: probflow.sample(probflow.DDIMField(_gm(), "float32"), _x(), _g()).x.dtype == torch.float64,
        )
    )
    out.append(_e("api.field.not-callable", "`DDIMField(3)`", lambda: probflow.DDIMField(3), "model"))
    returns = {
        "None": lambda x, s: None,
        "int": lambda x, s: x.long(),
        "shape": lambda x, s: x[:, :1],
        "list": lambda x, s: x.tolist(),
        "numpy": lambda x, s: x.numpy(),
        "complex": lambda x, s: x.to(torch.complex128),
        "scalar": lambda x, s: x.sum(),
        "nan": lambda x, s: x * float("nan"),
        "inf": lambda x, s: x + float("inf"),
        "nan-below-50": lambda x, s: x * (float("nan") if s < 50 else 1.0),
    }
    for rname, fn in returns.items():
        for m in ("euler", "heun2", "dopri5", "scipy_dop853", "dpmpp_2m"):
            if rname not in ("None", "nan", "nan-below-50") and m not in ("euler", "dopri5"):
                continue
            out.append(
                _e(
                    f"api.field.returns-{rname}.{m}",
                    f"`probflow.sample(model returning {rname}, x, g, {m!r})`",
                    lambda f=fn, m=m: probflow.sample(f, _x(), _g(), m),
                    "model",
                )
            )
    for shape in ((3, 3), (3,), (3, 2, 2), (3, 1)):
        out.append(
            _e(
                f"api.field.x-shape={shape}",
                f"`probflow.sample(gm (D = 2), zeros{shape}, g)`",
                lambda s=shape: probflow.sample(_gm(), torch.zeros(s, dtype=torch.float64), _g()),
                "x",
            )
        )
    m = digits.load_model(fx["model"])
    for shape in ((2, 1, 9, 9), (2, 3, 8, 8), (2, 64)):
        out.append(
            _e(
                f"api.field.digits-x-shape={shape}",
                f"`probflow.sample(digits, zeros{shape}, g)`",
                lambda s=shape: probflow.sample(m, torch.zeros(s, dtype=torch.float64), _g()),
                "x",
            )
        )
    for name, x in (
        ("nan", torch.full((3, 2), float("nan"), dtype=torch.float64)),
        ("int", torch.zeros(3, 2).long()),
        ("empty", torch.zeros(0, 2, dtype=torch.float64)),
        ("list", [[0.0, 0.0]]),
    ):
        out.append(
            _e(
                f"api.field.x-{name}",
                f"`probflow.sample(gm, x {name}, g)`",
                lambda v=x: probflow.sample(_gm(), v, _g()),
                "x",
            )
        )
    return out


def tol_probes() -> list[Probe]:
    import probflow

    out = []
    for m in ("dopri5", "scipy_dop853", "bosh3"):
        vals = (
            (float("inf"), float("nan"), 0.0, -1.0, 1e-30, 2.0, "1e-3", True)
            if m == "dopri5"
            else (1e-30, float("inf"))
        )
        for v in vals:
            out.append(
                _e(
                    f"api.tol.{m}.rtol={v}",
                    f"`probflow.sample(gm, x, g, {m!r}, rtol={v!r})`",
                    lambda m=m, v=v: probflow.sample(_gm(), _x(), _g(), m, rtol=v),
                    "rtol",
                )
            )
    for v in (float("inf"), 1e-30, -1.0):
        out.append(
            _e(
                f"api.tol.dopri5.atol={v}",
                f"`probflow.sample(gm, x, g, 'dopri5', atol={v!r})`",
                lambda v=v: probflow.sample(_gm(), _x(), _g(), "dopri5", atol=v),
                "atol",
            )
        )

    def close():
        x = probflow.noise(4, (2,), 3)
        a = probflow.sample(_gm(), x, _g(80.0, 0.0), "dopri5", rtol=1e-8, atol=1e-8).x
        b = probflow.sample(_gm(), x, _g(80.0, 0.0), "scipy_dop853", rtol=1e-12, atol=1e-12).x
        return float((a - b).abs().max()) < 1e-5

    out.append(_ok("api.tol.dopri5-vs-scipy", "dopri5 at 1e-8 agrees with scipy_dop853 at 1e-12 to 1e-5", close))
    out.append(
        _ok(
            "api.tol.floor-ok",
            "`sample(gm, x, g, 'dopri5', rtol=1e-13, atol=1e-13)` returns",
            lambda: probflow.sample(_gm(), _x(), _g(80.0, 0.0), "dopri5", rtol=1e-13, atol=1e-13).x.shape == (3, 2),
        )
    )
    return out


def flow_probes() -> list[Probe]:
    import probflow

    out = []
    calls = {
        "increasing-grid": lambda: probflow.sample(_gm(), _x(), _g(0.0, 1.0, 80.0)),
        "grid-1e300": lambda: probflow.sample(_gm(), _x(), _g(1e300, 0.0)),
        "grid-one-point": lambda: probflow.sample(_gm(), _x(), _g(80.0)),
        "grid-nan": lambda: probflow.sample(_gm(), _x(), _g(80.0, float("nan"), 0.0)),
        "method-rk5": lambda: probflow.sample(_gm(), _x(), _g(), "rk5"),
        "method-None": lambda: probflow.sample(_gm(), _x(), _g(), None),
        "method-5": lambda: probflow.sample(_gm(), _x(), _g(), 5),
        "max_steps-0": lambda: probflow.sample(_gm(), _x(), _g(), "dopri5", max_steps=0),
        "max_steps-2.5": lambda: probflow.sample(_gm(), _x(), _g(), "dopri5", max_steps=2.5),
        "max_steps-1": lambda: probflow.sample(_gm(), _x(), _g(80.0, 0.0), "dopri5", max_steps=1),
        "precision-bad": lambda: probflow.sample(_gm(), _x(), _g(), precision="model=float33"),
        "state-for-euler": lambda: probflow.sample(_gm(), _x(), _g(), "dopri5", state=object()),
        "adams-nonuniform": lambda: probflow.sample(_gm(), _x(), _g(80.0, 1.0, 0.0), "explicit_adams"),
        "interp-frames-1": lambda: probflow.interpolate(_gm(), _x(1), _x(1), _g(), frames=1),
        "interp-frames-2.5": lambda: probflow.interpolate(_gm(), _x(1), _x(1), _g(), frames=2.5),
        "interp-kind": lambda: probflow.interpolate(_gm(), _x(1), _x(1), _g(), kind="x"),
        "interp-shapes": lambda: probflow.interpolate(_gm(), _x(1), _x(2), _g()),
        "interp-weights-nan": lambda: probflow.interpolate(
            _gm(), _x(1), _x(1), _g(), weights=torch.tensor([float("nan")])
        ),
        "slerp-shapes": lambda: probflow.slerp(_x(1), _x(2), torch.tensor([0.5])),
        "encode-increasing": lambda: probflow.encode(_gm(), _x(), _g(0.0, 80.0)),
    }
    frags = {
        "method-": "method",
        "max_steps": "max_steps",
        "precision": "precision",
        "state": "state",
        "adams": "sigmas",
        "interp-frames": "frames",
        "interp-kind": "kind",
        "interp-shapes": "z0",
        "interp-weights": "weights",
        "slerp": "z0",
        "grid": "sigmas",
        "encode": "sigmas",
    }
    for name, fn in calls.items():
        frag = next((f for k, f in frags.items() if name.startswith(k)), "")
        out.append(_e(f"api.flows.{name}", f"`{name}`", fn, frag))

    def roundtrip():
        x = probflow.noise(3, (2,), 5)
        g = probflow.grids.karras(80.0, 0.002, 30)
        z = probflow.encode(_gm(), x, g, "reversible_heun")
        y = probflow.decode(_gm(), z.x, g, "reversible_heun", state=z.state).x
        return float((y - x).abs().max()) < 1e-12

    out.append(_ok("api.flows.reversible-roundtrip", "reversible_heun encode → decode returns x to 1e-12", roundtrip))
    return out


def _retag_latents(src: Path, dst: Path, edit=None, tensors_edit=None, rehash=False) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["probflow"])
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(meta)
    if tensors_edit:
        tensors_edit(ts)
    if rehash and "content_sha256" in meta:
        meta["content_sha256"] = _rehash(ts, meta)
    save_file(ts, str(dst), metadata={"probflow": json.dumps(meta)})
    return dst


def latent_probes(fx: dict) -> list[Probe]:
    from probflow.io.latents import load_latents

    out, d = [], fx["dir"]
    src = fx["plain"]
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"]["probflow"])
    fields = sorted(meta)
    for i, k in enumerate(fields):

        def changed(k=k, i=i):
            v = meta[k]
            new = v[:-1] + ("0" if not v.endswith("0") else "1") if v else "x"
            return load_latents(_retag_latents(src, d / f"chg{i}.safetensors", lambda m: m.update({k: new})))

        def deleted(k=k, i=i):
            lf = load_latents(_retag_latents(src, d / f"del{i}.safetensors", lambda m: m.pop(k)))
            if k == "content_sha256":  # loads, but is never exact
                return "unverified, not exact" if not lf.verified and not lf.meta.get("exact_for") else "claims exact"
            return lf

        out.append(
            _e(
                f"api.latents.changed.{k}",
                f"latent file, field `{k}` changed, hash not recomputed",
                changed,
                "" if k == "format" else "content_sha256",
            )
        )
        if k == "content_sha256":
            out.append(
                Probe(
                    f"api.latents.deleted.{k}",
                    "latent file, `content_sha256` deleted: loads unverified, never exact",
                    lambda f=deleted: f() == "unverified, not exact",
                    "ok",
                )
            )
        else:
            out.append(
                _e(f"api.latents.deleted.{k}", f"latent file, field `{k}` deleted, hash not recomputed", deleted)
            )
    bad_values = {
        "data_range": "[1, -1]",
        "invert": '"yes"',
        "method": "nope",
        "exact_for": "heun2",
        "rtol": "-1",
        "nfe": "ten",
        "steps": "9",
        "shape": "[1]",
        "dtype": "float16",
        "sources": "[1]",
        "env_threads": "0",
        "model_fingerprint": "abc",
        "format": "probflow-latents/9",
        "sigma_max": "nan",
        "schedule_T": "-3",
        "guidance": "inf",
        "condition_sha256": "zz",
        "env_deterministic": "maybe",
    }
    for i, (k, v) in enumerate(bad_values.items()):
        out.append(
            _e(
                f"api.latents.rehashed.{k.strip() or 'blank'}={v}",
                f"latent file, `{k}` = `{v}`, hash recomputed",
                lambda k=k, v=v, i=i: load_latents(
                    _retag_latents(src, d / f"bad{i}.safetensors", lambda m: m.update({k: v}), rehash=True)
                ),
                "" if k == "sources " else k.strip(),
            )
        )
    tens = {
        "latents-nan": lambda t: t.update(latents=t["latents"] * float("nan")),
        "latents-int": lambda t: t.update(latents=t["latents"].long()),
        "sigmas-float32": lambda t: t.update(sigmas=t["sigmas"].float()),
        "sigmas-up": lambda t: t.update(sigmas=t["sigmas"].flip(0)),
        "sigmas-missing": lambda t: t.pop("sigmas"),
        "latents-missing": lambda t: t.pop("latents"),
    }
    for i, (k, fn) in enumerate(tens.items()):
        out.append(
            _e(
                f"api.latents.tensor.{k}",
                f"latent file, tensor edit `{k}`, hash recomputed",
                lambda fn=fn, i=i: load_latents(
                    _retag_latents(src, d / f"t{i}.safetensors", tensors_edit=fn, rehash=True)
                ),
            )
        )
        out.append(
            _e(
                f"api.latents.tensor.{k}.nohash",
                f"latent file, tensor edit `{k}`, hash not recomputed",
                lambda fn=fn, i=i: load_latents(_retag_latents(src, d / f"u{i}.safetensors", tensors_edit=fn)),
            )
        )
    raw = {
        "empty": b"",
        "text": b"hello",
        "huge-header": (1 << 40).to_bytes(8, "little") + b"{}",
        "truncated": src.read_bytes()[:-10],
        "zero-header": (0).to_bytes(8, "little"),
        "deep-json": None,
        "meta-not-object": None,
    }
    for k, data in raw.items():
        p = d / f"raw-{k}.safetensors"
        if k == "deep-json":
            data = _retag_bytes(src, lambda m: m.update(sources="[" * 100_000 + "]" * 100_000))
        if k == "meta-not-object":
            data = _retag_bytes(src, None, whole="[1, 2]")
        p.write_bytes(data)
        out.append(_e(f"api.latents.file.{k}", f"latent file: {k}", lambda p=p: load_latents(p)))
    out.append(
        _e("api.latents.file.missing", "latent file that does not exist", lambda: load_latents(d / "nope.safetensors"))
    )
    out.append(_e("api.latents.file.folder", "latent file that is a folder", lambda: load_latents(d)))
    out += exactness_probes(fx)
    return out


def _rehash(tensors: dict, meta: dict) -> str:
    """The content hash this checkout's probflow computes (an older one hashed the tensors only)."""
    from probflow.io import latents

    if hasattr(latents, "content_sha256"):
        return latents.content_sha256(tensors, meta)
    return latents._content_sha256(tensors)


def _retag_bytes(src: Path, edit, whole: str | None = None) -> bytes:
    """The file's bytes with its probflow metadata edited (or replaced by `whole`), hash recomputed."""

    b = src.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["probflow"])
    if edit:
        edit(meta)
        from safetensors.torch import load_file

        meta["content_sha256"] = _rehash(load_file(str(src)), meta)
    header["__metadata__"]["probflow"] = whole if whole is not None else json.dumps(meta)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b[8 + n :]


def exactness_probes(fx: dict) -> list[Probe]:
    from probflow import grids
    from probflow.io.latents import load_latents
    from probflow.models import digits

    out = []
    if fx.get("exact") is None:
        return out
    model = digits.load_model(fx["model"])

    def decode_exactness(*a, **kw):
        from probflow.io.latents import decode_exactness as f

        return f(*a, **kw)

    def claim(method, grid=None, **kw):
        lf = load_latents(fx["exact"])
        c, notes = decode_exactness(lf, method, lf.sigmas if grid is None else grid, model=model, **kw)
        return c, notes

    out.append(
        _ok(
            "api.exact.own-method",
            "exact latent, its own method and grid: claimed exact",
            lambda: claim("euler")[0].startswith(", exact inverse"),
        )
    )
    out.append(
        _ok(
            "api.exact.other-method",
            "exact latent decoded with heun2: not exact, a WARNING",
            lambda: (c := claim("heun2"))[0] == "" and c[1][0].startswith("WARNING: NOT EXACT"),
        )
    )
    out.append(
        _ok(
            "api.exact.other-grid",
            "exact latent decoded on another grid: not exact, a WARNING",
            lambda: (
                (c := claim("euler", grids.named("uniform", model.schedule, 4)))[0] == "" and "another grid" in c[1][0]
            ),
        )
    )
    out.append(
        _ok(
            "api.exact.other-condition",
            "exact latent decoded with a condition it was not made with",
            lambda: claim("euler", condition_sha256="ab" * 32)[0] == "",
        )
    )
    out.append(
        _e(
            "api.exact.strict",
            "`decode_exactness(..., 'dpmpp_2m', strict=True)` refuses",
            lambda: claim("dpmpp_2m", strict=True),
            "method",
        )
    )

    def plain_relabelled():
        p = _retag_latents(fx["plain"], fx["dir"] / "relabel.safetensors", lambda m: m.update(exact_for="euler"))
        return load_latents(p)

    out.append(
        _e(
            "api.exact.plain-relabelled",
            "plain latent relabelled `exact_for: euler` (hash not recomputed)",
            plain_relabelled,
            "content_sha256",
        )
    )

    def no_hash_changed():
        p = _retag_latents(
            fx["exact"],
            fx["dir"] / "nohash.safetensors",
            lambda m: m.pop("content_sha256"),
            lambda t: t.update(latents=t["latents"] + 0.25),
        )
        lf = load_latents(p)
        return decode_exactness(lf, "euler", lf.sigmas, model=model)[0] == ""

    out.append(
        _ok("api.exact.no-hash-data-changed", "exact latent, hash deleted and data changed: not exact", no_hash_changed)
    )
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _digits_variant(fx: dict, name: str, card=None, cfg_edit=None, sd_edit=None, raw_weights=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = _copy(fx["model"], fx["dir"] / "variants" / name)
    if card is not None:
        (folder / "digits.json").write_text(card)
    w = folder / "digits.safetensors"
    if cfg_edit or sd_edit:
        with safe_open(str(w), framework="pt") as f:
            cfg = json.loads(f.metadata()["unet_config"])
        sd = load_file(str(w))
        if cfg_edit:
            cfg_edit(cfg)
        if sd_edit:
            sd_edit(sd)
        save_file(sd, str(w), metadata={"unet_config": cfg if isinstance(cfg, str) else json.dumps(cfg)})
    if raw_weights is not None:
        w.write_bytes(raw_weights(w.read_bytes()))
    return folder


def _diff_variant(fx: dict, name: str, unet=None, sched=None, raw_config=None, weights=None) -> Path:
    folder = _copy(fx["diff"], fx["dir"] / "dvariants" / name)
    for fname, new in (("config.json", unet), ("scheduler_config.json", sched)):
        if new:
            cfg = json.loads((folder / fname).read_text())
            cfg.update(new)
            (folder / fname).write_text(json.dumps(cfg))
    if raw_config is not None:
        (folder / "config.json").write_text(raw_config)
    if weights is not None:
        w = folder / "diffusion_pytorch_model.safetensors"
        w.write_bytes(weights(w.read_bytes()))
    return folder


def model_probes(fx: dict) -> list[Probe]:
    from probflow.models import adapters, digits

    out = []
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cards = {
        "list": "[1, 2]",
        "bad-json": "{oops",
        "deep": deep,
        "big": '{"a": "' + "x" * (2 << 20) + '"}',
        "fingerprint-int": '{"fingerprint": 5}',
        "fingerprint-wrong": '{"fingerprint": "' + "0" * 64 + '"}',
        "binary": "\udcff",
    }
    for k, text in cards.items():

        def load(k=k, text=text):
            try:
                folder = _digits_variant(fx, f"card-{k}", card=text)
            except UnicodeEncodeError:
                folder = _copy(fx["model"], fx["dir"] / "variants" / f"card-{k}")
                (folder / "digits.json").write_bytes(b"\xff\xfe{")
            return digits.load_model(folder)

        out.append(
            _e(
                f"api.models.digits.card-{k}",
                f"digits checkpoint, card `digits.json`: {k}",
                load,
                "card" if k not in ("fingerprint-wrong",) else "fingerprint",
            )
        )
    cfgs = {
        "unknown-key": lambda c: c.update(foo=1),
        "channels-str": lambda c: c.update(channels="x"),
        "channels-huge": lambda c: c.update(channels=[4096, 8192]),
        "blocks-1e6": lambda c: c.update(blocks=10**6),
        "channels-1e5-levels": lambda c: c.update(channels=[8] * 100_000),
        "levels-5": lambda c: c.update(channels=[8] * 5),
        "in-channels-3": lambda c: c.update(in_channels=3),
        "blocks-0": lambda c: c.update(blocks=0),
        "blocks-bool": lambda c: c.update(blocks=True),
        "emb-neg": lambda c: c.update(emb_dim=-4),
        "channels-float": lambda c: c.update(channels=[8.5, 16]),
    }
    for k, edit in cfgs.items():
        out.append(
            _e(
                f"api.models.digits.config-{k}",
                f"digits checkpoint, unet_config: {k}",
                lambda k=k, e=edit: digits.load_model(_digits_variant(fx, f"cfg-{k}", cfg_edit=e)),
                "unet_config",
            )
        )
    out.append(
        _e(
            "api.models.digits.config-deep",
            "digits checkpoint, unet_config nested 100 000 deep",
            lambda: _deep_unet_cfg(fx),
            "unet_config",
        )
    )
    weights = {
        "missing-key": dict(sd_edit=lambda sd: sd.pop("inp.weight")),
        "nan": dict(sd_edit=lambda sd: sd["inp.weight"].fill_(float("nan"))),
        "truncated": dict(raw_weights=lambda b: b[:-100]),
        "garbage": dict(raw_weights=lambda b: b"\0" * 64),
        "extra-key": dict(sd_edit=lambda sd: sd.update(extra=torch.zeros(1))),
    }
    for k, kw in weights.items():
        out.append(
            _e(
                f"api.models.digits.weights-{k}",
                f"digits checkpoint, weights: {k}",
                lambda k=k, kw=kw: digits.load_model(_digits_variant(fx, f"w-{k}", **kw)),
                "weights",
            )
        )
    out.append(
        _e(
            "api.models.digits.missing-folder",
            "digits checkpoint folder that does not exist",
            lambda: digits.load_model(fx["dir"] / "no-such-folder"),
            "digits model",
        )
    )
    if fx["diff"] is None:
        return out
    uc = {
        "sample_size-1e6": {"sample_size": 10**6},
        "sample_size-9": {"sample_size": 9},
        "sample_size-0": {"sample_size": 0},
        "sample_size-str": {"sample_size": "8"},
        "sample_size-list3": {"sample_size": [8, 8, 8]},
        "layers-1e6": {"layers_per_block": 10**6},
        "boc-1e5": {"block_out_channels": [8] * 100_000},
        "boc-huge": {"block_out_channels": [2048, 4096]},
        "boc-empty": {"block_out_channels": []},
        "boc-neg": {"block_out_channels": [-8, 16]},
        "out-channels-3": {"out_channels": 3},
        "in-channels-0": {"in_channels": 0},
        "down-types-3": {"down_block_types": ["DownBlock2D"] * 3},
        "class-embed": {"num_class_embeds": 10},
        "not-unet": {"_class_name": "UNet2DConditionModel"},
        "groups-3": {"norm_num_groups": 3},
        "layers-2": {"layers_per_block": 2},
    }
    for k, cfg in uc.items():
        out.append(
            _e(
                f"api.models.diffusers.config-{k}",
                f"diffusers folder, config.json: {k}",
                lambda k=k, c=cfg: adapters.from_diffusers(_diff_variant(fx, f"c-{k}", unet=c)),
            )
        )
    sc = {
        "T-neg": {"num_train_timesteps": -5},
        "T-str": {"num_train_timesteps": "abc"},
        "T-3e8": {"num_train_timesteps": 3e8},
        "betas-str": {"trained_betas": ["a", "b"]},
        "betas-1e6": {"trained_betas": [0.01] * 1_000_000},
        "schedule-x": {"beta_schedule": "x"},
        "beta-nan": {"beta_start": float("nan")},
        "zero-snr": {"rescale_betas_zero_snr": True},
        "prediction-x": {"prediction_type": "x"},
        "prediction-int": {"prediction_type": 5},
    }
    for k, cfg in sc.items():
        out.append(
            _e(
                f"api.models.diffusers.scheduler-{k}",
                f"diffusers folder, scheduler_config.json: {k}",
                lambda k=k, c=cfg: adapters.from_diffusers(_diff_variant(fx, f"s-{k}", sched=c)),
            )
        )
    raws = {
        "deep": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "list": "[1]",
        "bad": "{oops",
        "big": '{"a": "' + "x" * (2 << 20) + '"}',
    }
    for k, text in raws.items():
        out.append(
            _e(
                f"api.models.diffusers.raw-{k}",
                f"diffusers folder, config.json: {k}",
                lambda k=k, t=text: adapters.from_diffusers(_diff_variant(fx, f"r-{k}", raw_config=t)),
                "config",
            )
        )
    out.append(
        _e(
            "api.models.diffusers.weights-truncated",
            "diffusers folder, weights truncated",
            lambda: adapters.from_diffusers(_diff_variant(fx, "w-trunc", weights=lambda b: b[:-64])),
            "weights",
        )
    )
    out.append(
        _e(
            "api.models.diffusers.not-a-folder",
            "`from_diffusers('no/such/folder')`",
            lambda: adapters.from_diffusers(fx["dir"] / "nope"),
            "folder",
        )
    )
    out.append(
        _ok(
            "api.models.diffusers.ok",
            "the tiny diffusers folder loads with sample shape (1, 8, 8)",
            lambda: adapters.from_diffusers(fx["diff"]).sample_shape == (1, 8, 8),
        )
    )
    return out


def _deep_unet_cfg(fx: dict) -> object:
    from probflow.models import digits

    folder = _digits_variant(fx, "cfg-deep", cfg_edit=lambda c: c.update(emb_dim="DEEP"))
    w = folder / "digits.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(w), framework="pt") as f:
        text = f.metadata()["unet_config"].replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    save_file(load_file(str(w)), str(w), metadata={"unet_config": text})
    return digits.load_model(folder)


def image_probes(fx: dict) -> list[Probe]:
    from PIL import Image

    from probflow.io.images import load_images

    out, d = [], fx["dir"] / "imgs"
    d.mkdir(exist_ok=True)
    files = {
        "header-20000": lambda p: _png_raw(p, 20000, 20000),
        "header-13000": lambda p: _png_raw(p, 13000, 13000),
        "header-2p31": lambda p: _png_raw(p, 2**31 - 1, 2**31 - 1),
        "truncated-1x16M": lambda p: _png_raw(p, 1, 1 << 24, b"\0\x80" * 100),
        "truncated-4096sq": lambda p: _png_raw(p, 4096, 4096, b"\0" * 4097 * 10),
        "truncated-rgb": lambda p: _png_raw(p, 64, 64, b"\0" * 100, color=2),
        "no-idat": lambda p: _png_raw(p, 8, 8, None),
        "empty": lambda p: p.write_bytes(b""),
        "text": lambda p: p.write_text("not an image"),
        "bad-crc": lambda p: p.write_bytes(_bad_crc(fx["imgs"][0])),
        "cut-half": lambda p: p.write_bytes(Path(fx["imgs"][0]).read_bytes()[:40]),
        "jpeg-cut": lambda p: p.write_bytes(_jpeg(fx)[:200]),
    }
    for k, make in files.items():
        p = d / f"{k}.png"
        out.append(
            _e(
                f"api.images.{k}",
                f"`load_images([{k}.png], 8)`",
                lambda p=p, m=make: (m(p), load_images([p], 8, verbose=False))[1],
                "images",
            )
        )
    out.append(
        _e(
            "api.images.2p31-no-limit",
            "`load_images([2^31×2^31 PNG], 8, max_pixels=None)`",
            lambda: load_images([_png_raw(d / "h2.png", 2**31 - 1, 2**31 - 1)], 8, max_pixels=None, verbose=False),
            "images",
        )
    )
    out.append(
        _e(
            "api.images.missing",
            "`load_images(['missing.png'], 8)`",
            lambda: load_images([d / "missing.png"], 8),
            "images",
        )
    )
    out.append(_e("api.images.folder", "`load_images([folder], 8)`", lambda: load_images([d], 8), "images"))
    out.append(_e("api.images.none", "`load_images([], 8)`", lambda: load_images([], 8), "images"))
    out.append(
        _e(
            "api.images.channels",
            "`load_images([a.png], 8, channels=2)`",
            lambda: load_images(fx["imgs"][:1], 8, channels=2),
            "channels",
        )
    )
    out.append(_e("api.images.size", "`load_images([a.png], 0)`", lambda: load_images(fx["imgs"][:1], 0), "size"))

    def same_pixels():
        x = load_images(fx["imgs"], 8, verbose=False)
        return float((x - fx["x"]).abs().max()) < 1 / 255

    out.append(_ok("api.images.roundtrip", "saved PNGs read back to the same pixels", same_pixels))
    for mode, shape in (("RGBA", (8, 8, 4)), ("RGB", (16, 16, 3)), ("P", (8, 8)), ("I;16", (8, 8))):

        def conv(mode=mode, shape=shape):
            a = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
            img = (
                Image.fromarray(a).convert(mode)
                if mode == "P"
                else Image.fromarray(a, mode if mode != "I;16" else None)
            )
            p = d / f"conv-{mode.replace(';', '')}.png"
            img.save(p)
            return load_images([p], 8, verbose=False).shape == (1, 1, 8, 8)

        out.append(_ok(f"api.images.convert-{mode}", f"a {mode} PNG is converted to 1×8×8", conv))
    for inter in (0, 1):

        def interlaced(inter=inter):
            a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
            p = d / f"inter{inter}.png"
            Image.fromarray(a).save(p, interlace=inter)
            return torch.equal(
                load_images([p], 8, verbose=False, data_range=(0.0, 255.0)).reshape(8, 8).to(torch.uint8),
                torch.from_numpy(a),
            )

        out.append(
            _ok(f"api.images.interlace{inter}", f"an 8×8 PNG (interlace={inter}) reads back exactly", interlaced)
        )
    return out


def _bad_crc(path) -> bytes:
    b = bytearray(Path(path).read_bytes())
    b[29] ^= 0xFF  # IHDR's CRC
    return bytes(b)


def _jpeg(fx: dict) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8) + 100).save(buf, format="JPEG")
    return buf.getvalue()


def api_probes(fx: dict) -> list[Probe]:
    return (
        grid_probes()
        + schedule_probes()
        + noise_probes()
        + field_probes(fx)
        + tol_probes()
        + flow_probes()
        + latent_probes(fx)
        + model_probes(fx)
        + image_probes(fx)
    )


def _c(pid: str, what: str, argv: list, frag: str = "", **kw) -> Probe:
    return Probe(pid, what, [str(a) for a in argv], kw.pop("expect", "error"), frag, **kw)


def _same_files(*paths) -> Callable:
    def check(rc, out, err):
        data = [Path(p).read_bytes() if Path(p).is_file() else None for p in paths]
        return rc == 0 and data[0] is not None and all(x == data[0] for x in data)

    return check


def _pngs_equal_inputs(folder: Path, fx: dict, n: int = 3) -> bool:
    from probflow.io.images import load_images

    got = sorted(Path(folder).glob("*.png"))
    if len(got) != n:
        return False
    return torch.equal(load_images(got, 8, verbose=False), load_images(fx["imgs"][:n], 8, verbose=False))


def cli_sample_probes(fx: dict, o: Path) -> list[Probe]:
    from probflow import grids

    m = ["--model", fx["model"], "--quiet"]
    out = []
    for g in grids.NAMED:
        out.append(
            _c(
                f"cli.sample.steps1e9.{g}",
                f"`sample --grid {g} --steps 1000000000`",
                ["sample", *m, "--grid", g, "--steps", "1000000000", "--out", o / f"s-{g}.png"],
                "steps",
                outs=[o / f"s-{g}.png"],
            )
        )
    flags = {
        "steps0": ["--steps", "0"],
        "steps-1": ["--steps", "-1"],
        "steps1.5": ["--steps", "1.5"],
        "n1e14": ["--n", "100000000000000"],
        "n0": ["--n", "0"],
        "n-1": ["--n", "-1"],
        "scale1e5": ["--scale", "100000"],
        "scale0": ["--scale", "0"],
        "seed-1": ["--seed", "-1"],
        "seed2p70": ["--seed", str(2**70)],
        "device-cuda": ["--device", "cuda"],
        "device-meta": ["--device", "meta"],
        "device-foo": ["--device", "foo"],
        "threads1e5": ["--threads", "100000"],
        "threads0": ["--threads", "0"],
        "eta-dopri5": ["--eta", "0.5", "--method", "dopri5"],
        "rtol-inf": ["--method", "dopri5", "--rtol", "inf"],
        "rtol-1e-30": ["--method", "dopri5", "--rtol", "1e-30"],
        "rtol-nan": ["--method", "dopri5", "--rtol", "nan"],
        "method-rk5": ["--method", "rk5"],
        "grid-nope": ["--grid", "nope"],
        "max-steps0": ["--method", "dopri5", "--max-steps", "0"],
        "precision-bad": ["--precision", "model=float33"],
        "chunk0": ["--chunk", "0"],
        "model-missing": ["--model", o / "no-model"],
        "gamma-euler": ["--gamma", "-1"],
    }
    frags = {
        "steps": "--steps",
        "n": "--n",
        "scale": "--scale",
        "seed": "--seed",
        "device": "--device",
        "threads": "--threads",
        "eta": "--",
        "rtol": "--rtol",
        "method": "--method",
        "grid": "--grid",
        "max-steps": "--max-steps",
        "precision": "--precision",
        "chunk": "--chunk",
        "model": "--model",
        "gamma": "--gamma",
    }
    for k, extra in flags.items():
        frag = next(f for p, f in frags.items() if k.startswith(p))
        target = o / f"s-{k}.png"
        out.append(
            _c(
                f"cli.sample.{k}",
                f"`sample {' '.join(map(str, extra))}`",
                ["sample", *m, "--steps", "2", "--n", "2", *extra, "--out", target],
                frag,
                outs=[target],
            )
        )
    (o / "newdir").mkdir(exist_ok=True)
    out.append(
        _c(
            "cli.sample.out-trailing-slash",
            "`sample --out newdir/` (an existing folder)",
            ["sample", *m, "--steps", "2", "--out", str(o / "newdir") + "/"],
            "--out",
        )
    )
    out.append(
        _c(
            "cli.sample.out-missing-dir-slash",
            "`sample --out missingdir/`",
            ["sample", *m, "--steps", "2", "--out", str(o / "missingdir") + "/"],
            "--out",
            outs=[o / "missingdir"],
        )
    )
    cards = {
        "deep-card": dict(card='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "million-blocks": dict(cfg_edit=lambda c: c.update(blocks=10**6)),
        "levels-5": dict(cfg_edit=lambda c: c.update(channels=[8] * 5)),
    }
    for k, kw in cards.items():
        folder = _digits_variant(fx, f"cli-{k}", **kw)
        out.append(
            _c(
                f"cli.sample.model-{k}",
                f"`sample --model CKPT`, digits checkpoint with {k}",
                ["sample", "--model", folder, "--quiet", "--steps", "2", "--out", o / f"s-m-{k}.png"],
                "--model",
                outs=[o / f"s-m-{k}.png"],
            )
        )
    if fx["diff"] is not None:
        for k, cfg in {
            "sample_size-1e6": {"sample_size": 10**6},
            "sample_size-9": {"sample_size": 9},
            "layers-1e6": {"layers_per_block": 10**6},
        }.items():
            folder = _diff_variant(fx, f"cli-{k}", unet=cfg)
            out.append(
                _c(
                    f"cli.sample.diffusers-{k}",
                    f"`sample --model DIFF`, diffusers config {k}",
                    ["sample", "--model", folder, "--quiet", "--steps", "2", "--out", o / f"s-d-{k}.png"],
                    "--model",
                    outs=[o / f"s-d-{k}.png"],
                )
            )
    a, b, c = o / "det-a.png", o / "det-b.png", o / "det-c.png"
    out.append(
        _c(
            "cli.det.sample-twice",
            "`sample --seed 3` twice: the same bytes",
            ["sample", *m, "--steps", "3", "--n", "4", "--seed", "3", "--out", a],
            expect="ok",
            check=lambda rc, so, se: rc == 0,
        )
    )
    out.append(
        _c(
            "cli.det.sample-twice-2",
            "… second run",
            ["sample", *m, "--steps", "3", "--n", "4", "--seed", "3", "--out", b],
            expect="ok",
            check=_same_files(a, b),
        )
    )
    out.append(
        _c(
            "cli.det.sample-chunked",
            "`sample --chunk 1`: the same bytes as unchunked",
            ["sample", *m, "--steps", "3", "--n", "4", "--seed", "3", "--chunk", "1", "--out", c],
            expect="ok",
            check=_same_files(a, c),
        )
    )
    return out


def cli_latent_probes(fx: dict, o: Path) -> list[Probe]:
    m = ["--model", fx["model"], "--quiet"]
    out = []
    imgs = fx["dir"] / "imgs"
    trunc = _png_raw(o / "trunc.png", 1, 1 << 24, b"\0\x80" * 100)
    huge = _png_raw(o / "huge.png", 2**31 - 1, 2**31 - 1)
    enc = {
        "truncated": [trunc],
        "huge-no-limits": [huge, "--no-limits"],
        "huge": [huge],
        "missing": [o / "missing.png"],
        "folder": [imgs if imgs.is_dir() else o],
        "text": [_text(o)],
        "method-nope": [fx["imgs"][0], "--method", "nope"],
        "steps0": [fx["imgs"][0], "--steps", "0"],
        "steps1e9": [fx["imgs"][0], "--steps", "1000000000"],
    }
    for k, args in enc.items():
        t = o / f"e-{k}.safetensors"
        out.append(_c(f"cli.encode.{k}", f"`encode {k}`", ["encode", *args, *m, "--out", t], "", outs=[t]))
    existing = o / "exists.safetensors"
    existing.write_bytes(b"keep")
    out.append(
        _c(
            "cli.encode.out-exists",
            "`encode --out EXISTING` without --force (left unchanged)",
            ["encode", fx["imgs"][0], *m, "--steps", "2", "--out", existing],
            "--out",
        )
    )
    tamper = {
        "relabelled": (fx["plain"], dict(edit=lambda md: md.update(exact_for="euler"))),
        "data_range": (fx["exact"], dict(edit=lambda md: md.update(data_range="[0, 1]"))),
        "invert": (fx["exact"], dict(edit=lambda md: md.update(invert="true"))),
        "method": (fx["exact"], dict(edit=lambda md: md.update(method="heun2", exact_for="heun2"))),
        "deep-json": (fx["exact"], dict(edit=lambda md: md.update(sources="[" * 100_000 + "]" * 100_000), rehash=True)),
        "latents-changed": (fx["exact"], dict(tensors_edit=lambda t: t.update(latents=t["latents"] + 0.25))),
    }
    for k, (src, kw) in tamper.items():
        if src is None:
            continue
        z = _retag_latents(src, o / f"z-{k}.safetensors", **kw)
        out.append(
            _c(
                f"cli.decode.tampered-{k}",
                f"`decode Z`, Z with {k} edited",
                ["decode", z, *m, "--out", o / f"d-{k}"],
                "latents",
                outs=[o / f"d-{k}"],
            )
        )
    if fx.get("exact") is not None:
        z = _retag_latents(
            fx["exact"],
            o / "z-nohash.safetensors",
            lambda md: md.pop("content_sha256"),
            lambda t: t.update(latents=t["latents"] + 0.25),
        )
        out.append(
            _c(
                "cli.decode.no-hash-changed",
                "`decode Z`, Z's hash deleted and data changed: no 'exact' claim",
                ["decode", z, *m, "--out", o / "d-nohash"],
                expect="ok",
                check=lambda rc, so, se: rc == 0 and "exact" not in so.lower(),
            )
        )
        out.append(
            _c(
                "cli.decode.other-method",
                "`decode EXACT --method heun2`: a warning, no 'exact' claim",
                ["decode", fx["exact"], *m, "--method", "heun2", "--out", o / "d-heun2"],
                expect="ok",
                check=lambda rc, so, se: rc == 0 and "exact inverse" not in so and "not exact" in se.lower(),
            )
        )
        out.append(
            _c(
                "cli.decode.own-method",
                "`decode EXACT`: 'exact inverse' and the input pixels back",
                ["decode", fx["exact"], *m, "--out", o / "d-own"],
                expect="ok",
                check=lambda rc, so, se: rc == 0 and "exact inverse" in so and _pngs_equal_inputs(o / "d-own", fx),
            )
        )
        out.append(
            _c(
                "cli.decode.steps1e9",
                "`decode EXACT --steps 1000000000`",
                ["decode", fx["exact"], *m, "--steps", "1000000000", "--out", o / "d-big"],
                "steps",
                outs=[o / "d-big"],
            )
        )
        out.append(
            _c(
                "cli.decode.other-model",
                "`decode EXACT --model digits` (another model)",
                ["decode", fx["exact"], "--model", "digits", "--quiet", "--out", o / "d-other"],
                "latents",
                outs=[o / "d-other"],
            )
        )
        t2 = o / "e-threads2.safetensors"
        out.append(
            _c(
                "cli.det.encode-threads2",
                "`encode A --threads 2` (exact latent; 2 threads on a shared 2-core machine are slow: 240 s bound)",
                ["encode", fx["imgs"][0], *m, "--steps", "4", "--threads", "2", "--out", t2],
                expect="ok",
                check=lambda rc, so, se: rc == 0,
                timeout=240.0,
            )
        )
        out.append(
            _c(
                "cli.det.decode-threads1",
                "… decoded on 1 thread gives the input pixels back",
                ["decode", t2, *m, "--threads", "1", "--out", o / "d-t1"],
                expect="ok",
                check=lambda rc, so, se: rc == 0 and _pngs_equal_inputs(o / "d-t1", fx, 1),
            )
        )
        e1, e2 = o / "e-twice1.safetensors", o / "e-twice2.safetensors"
        out.append(
            _c(
                "cli.det.encode-twice-1",
                "`encode` twice: the same bytes (1)",
                ["encode", *fx["imgs"], *m, "--steps", "4", "--out", e1],
                expect="ok",
                check=lambda rc, so, se: rc == 0,
            )
        )
        out.append(
            _c(
                "cli.det.encode-twice-2",
                "`encode` twice: the same bytes (2)",
                ["encode", *fx["imgs"], *m, "--steps", "4", "--out", e2],
                expect="ok",
                check=_same_files(e1, e2),
            )
        )
    if fx.get("pair") is not None:
        out.append(
            _c(
                "cli.decode.pair",
                "`decode PAIR` (reversible_heun with its state): exact, pixels back",
                ["decode", fx["pair"], *m, "--out", o / "d-pair"],
                expect="ok",
                check=lambda rc, so, se: rc == 0 and "exact" in so and _pngs_equal_inputs(o / "d-pair", fx),
            )
        )
    out.append(
        _c(
            "cli.decode.missing",
            "`decode missing.safetensors`",
            ["decode", o / "missing.safetensors", *m, "--out", o / "d-miss"],
            "latents",
            outs=[o / "d-miss"],
        )
    )
    return out


def _text(o: Path) -> Path:
    p = o / "text.png"
    p.write_text("not an image")
    return p


def cli_other_probes(fx: dict, o: Path) -> list[Probe]:
    m = ["--model", fx["model"], "--quiet"]
    a, b = fx["imgs"][0], fx["imgs"][1]
    out = []
    other = {
        "interpolate.reversible": (
            ["interpolate", a, b, *m, "--method", "reversible_heun", "--out", o / "i1.png"],
            "--method",
        ),
        "interpolate.frames1": (["interpolate", a, b, *m, "--frames", "1", "--out", o / "i2.png"], "--frames"),
        "interpolate.frames1e8": (
            ["interpolate", a, b, *m, "--frames", "100000000", "--out", o / "i3.png"],
            "--frames",
        ),
        "interpolate.scale1e5": (["interpolate", a, b, *m, "--scale", "100000", "--out", o / "i4.png"], "--scale"),
        "bench.suites-commas": (["bench", "--suites", ",,,", "--out", o / "b1.md"], "--suites"),
        "bench.samples1e9": (["bench", "--samples", "1000000000", "--out", o / "b2.md"], "--samples"),
        "bench.nfe1e9": (["bench", "--nfe", "1000000000", "--out", o / "b3.md"], "--nfe"),
        "bench.methods-nope": (["bench", "--methods", "nope", "--out", o / "b4.md"], "--methods"),
        "demo.n1e9": (["demo", "--n", "1000000000", "--out", o / "demo.png"], "--n"),
        "demo.seed-1": (["demo", "--seed", "-1", "--out", o / "demo2.png"], "--seed"),
        "likelihood.draws1e9": (["likelihood", a, *m, "--draws", "1000000000"], "--draws"),
        "likelihood.probes1e9": (
            ["likelihood", a, *m, "--divergence", "hutchinson", "--probes", "1000000000"],
            "--probes",
        ),
        "likelihood.huge-png": (["likelihood", _png_raw(o / "lh.png", 2**31 - 1, 2**31 - 1), *m], ""),
        "likelihood.truncated-png": (["likelihood", _png_raw(o / "lt.png", 1, 1 << 24, b"\0\x80" * 100), *m], ""),
        "train.threads0": (["train", "digits", "--threads", "0", "--out", o / "tr"], "--threads"),
    }
    for k, (argv, frag) in other.items():
        outs = [argv[argv.index("--out") + 1]] if "--out" in argv else []
        out.append(
            _c(
                f"cli.{k}",
                "`" + " ".join(x.name if isinstance(x, Path) else str(x) for x in argv if x not in m) + "`",
                argv,
                frag,
                outs=outs,
            )
        )
    # still solving 12 s in (startup takes 2-7 s)
    big = ["sample", *m, "--n", "1024", "--grid", "karras", "--steps", "2000"]
    for name, sig, rc in (("sigint", signal.SIGINT, 130), ("sigterm", signal.SIGTERM, 143)):
        t = o / f"int-{name}.png"
        out.append(
            _c(
                f"cli.interrupt.{name}",
                f"{name.upper()} 12 s into a sample: exit {rc}, one line, no output",
                [*big, "--out", t],
                expect="ok",
                outs=[t],
                interrupt=(12.0, sig),
                check=lambda r, so, se, rc=rc: r == rc and "Traceback" not in se and len(se.strip().splitlines()) <= 2,
            )
        )
    t = o / "int-startup.png"
    out.append(
        _c(
            "cli.interrupt.sigint-startup",
            "SIGINT 1 s after start (while Python imports torch): exit 130, one line, no output",
            [*big, "--out", t],
            expect="ok",
            outs=[t],
            interrupt=(1.0, signal.SIGINT),
            check=lambda r, so, se: r == 130 and "Traceback" not in se,
        )
    )
    t = o / "int-kill.png"
    out.append(
        _c(
            "cli.interrupt.sigkill",
            "SIGKILL 12 s into a sample: no output file",
            [*big, "--out", t],
            expect="ok",
            outs=[t],
            interrupt=(12.0, signal.SIGKILL),
            allow_tmp=True,
            check=lambda r, so, se: r == -9,
        )
    )
    if fx.get("exact") is not None:
        old = o / "old-set"
        old.mkdir(exist_ok=True)
        (old / "0000.png").write_bytes(Path(fx["imgs"][0]).read_bytes())
        out.append(
            _c(
                "cli.interrupt.decode-force",
                "SIGINT 9 s into `decode --force` over an old set: old set kept or new set complete",
                ["decode", fx["exact"], *m, "--force", "--out", old],
                expect="ok",
                interrupt=(9.0, signal.SIGINT),
                check=lambda r, so, se: (
                    sorted(q.name for q in old.iterdir()) in (["0000.png"], ["a.png", "b.png", "c.png"])
                ),
            )
        )
    return out


def cli_probes(fx: dict) -> list[Probe]:
    o = fx["dir"] / "cli"
    o.mkdir(exist_ok=True)
    return cli_sample_probes(fx, o) + cli_latent_probes(fx, o) + cli_other_probes(fx, o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="Markdown report to write (e.g. benchmarks/PROBES.md)")
    ap.add_argument("--only", default="", help="run only probes whose id starts with this prefix")
    ap.add_argument("--force", action="store_true", help="overwrite an existing report")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force and out.resolve() != (ROOT / "benchmarks" / "PROBES.md").resolve():
        ap.error(f"--out: {out} exists; pass --force to replace it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the temporary folder is removed
    with tempfile.TemporaryDirectory(prefix="probflow-probes-") as tmp:
        d = Path(tmp)
        fx = make_fixtures(d)
        make_exact_latents(fx)
        probes = [p for p in api_probes(fx) + cli_probes(fx) if p.id.startswith(args.only)]
        ids = [p.id for p in probes]
        assert len(set(ids)) == len(ids), "duplicate probe ids"
        rows, t0 = [], time.time()
        for i, p in enumerate(probes, 1):
            if isinstance(p.run, list):
                res = run_cli(p.run, p.timeout or TIMEOUT_CLI, d, p.interrupt)
                cls, detail = classify_cli(p, res)
            else:
                res = run_api(p.run, p.timeout or TIMEOUT_API)
                cls, detail = classify_api(p, res)
            rows.append((p, cls, detail, res["wall"], res["rss"]))
            print(f"[{i}/{len(probes)}] {cls:15s} {p.id} ({res['wall']:.1f} s) {detail[:100]}", flush=True)
        write_report(out, rows, time.time() - t0)
    bad = sum(1 for _, c, *_ in rows if c not in ("one-line error", "ok"))
    print(f"{len(rows)} probes, {bad} failing; wrote {out}")
    return 0


def write_report(out: Path, rows: list, wall: float) -> None:
    counts = {c: sum(1 for _, k, *_ in rows if k == c) for c in CLASSES}
    lines = [
        "# Probes: bad and adversarial inputs, classified",
        "",
        "Generated by `python benchmarks/probes.py --out benchmarks/PROBES.md` (one thread, one probe at a "
        f"time; {len(rows)} probes in {wall / 60:.1f} min). Bounds: API probes {TIMEOUT_API:g} s, CLI probes "
        f"{TIMEOUT_CLI:g} s; resident memory {MEM_BOUND / 2**30:g} GiB above the starting point (CLI: above "
        "a fresh interpreter's ~0.6 GiB); address space limited so that no probe can take the machine down. "
        "Classes as in the script's docstring.",
        "",
        "| class | probes |",
        "|---|---|",
    ]
    lines += [f"| {c} | {n} |" for c, n in counts.items()]
    groups: dict[str, dict[str, int]] = {}
    for p, c, *_ in rows:
        g = groups.setdefault(".".join(p.id.split(".")[:2]), dict.fromkeys(CLASSES, 0))
        g[c] += 1
    lines += ["", "## By group", "", "| group | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(str(v[c]) for c in CLASSES) + " |" for g, v in groups.items()]
    lines += ["", "## Every probe", "", "| id | input | class | detail | s |", "|---|---|---|---|---|"]
    for p, c, detail, w, _ in rows:
        det = detail.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {p.id} | {p.what.replace('|', chr(92) + '|')} | {c} | {det} | {w:.1f} |")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
