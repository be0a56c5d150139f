"""The command line's arguments, read once into typed requests.

Each command's `argparse.Namespace` is turned into one frozen dataclass by `*_request(args)`; every value is
checked there, once (ranges, bounds, the flags that cannot go together), and the commands read only the
request afterwards — `args` is never written to. What depends on the model (the sample shape) is checked by
`probflow.cli.common.check_sizes` once the model is loaded, before anything of that size is allocated.

**Bounds.** Flags whose value sets how much memory or work a run takes are bounded (`BOUNDS`); a value above
its bound is refused with a line naming the flag and the bound, and `--no-limits` lifts every bound (the
caller then owns the cost). The PNG a command writes is bounded by `probflow.files.images.MAX_PIXELS`, which
bounds `--n`, `--frames` and `--scale` together; the arrays the CLI holds by `MAX_BYTES`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from probflow.integrate import MAX_STEPS
from probflow.precision import Precision
from probflow.solvers import Method, get_method

# Names the CLI accepts for methods besides the registry's (DDIM is Euler on Eq. 12, docs/MATH.md §3).
ALIASES = {"ddim": "euler"}
TOL_FLOOR = 1e-10  # --rtol/--atol below this are refused unless --no-limits
MAX_BYTES = 4 * 2**30  # arrays of samples the CLI holds at once (float64 state and result)
BOUNDS = {  # flag: largest value accepted without --no-limits
    "--steps": 100_000,  # a grid of 100 000 steps is 800 kB and 100 000 model calls per sample
    "--max-steps": 10_000_000,
    "--frames": 1_000,
    "--draws": 1_000,
    "--probes": 1_000,
    "--samples": 65_536,  # bench
    "--nfe": 10_000,  # bench
    "--eval-samples": 100_000,  # train
    "--train-steps": 1_000_000,  # train --steps
    "--demo-n": 100_000,  # demo --n: the study solves every sample with 10 solvers and DOP853 at 1e-10
}
SEED_BOUND = 2**63  # seeds are 64-bit
DEVICE_TYPES = ("cpu", "cuda", "mps")


def bounded(flag: str, value: int | float | None, limits: bool, key: str | None = None, lo: int = 1,
            why: str = "") -> None:
    """Refuse `value` below `lo` (always) or above `BOUNDS[key or flag]` (unless `limits` is off)."""
    if value is None:
        return
    if value < lo:
        raise ValueError(f"{flag}: expected an integer >= {lo}, got {value}")
    bound = BOUNDS[key or flag] if limits else None
    if bound is not None and value > bound:
        raise ValueError(f"{flag}: {value} is above the bound of {bound}{why} (pass --no-limits to lift it)")


def check_threads(threads: int | None, limits: bool) -> None:
    """--threads: a positive integer, at most this machine's CPUs unless --no-limits (torch's thread pool
    fails or oversubscribes past them)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {threads}")
    cpus = os.cpu_count() or 1
    if limits and threads > cpus:
        raise ValueError(f"--threads: {threads} is above the bound of {cpus} (this machine's CPUs; pass --no-limits "
                         "to lift it)")


def check_device(spec: str) -> str:
    """--device: a torch device that holds data and exists here (cpu, cuda[:N] with CUDA, mps with MPS)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device: {spec!r} is not a torch device; expected one of cpu, cuda, cuda:N, mps") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"--device: {spec!r} cannot run a model (expected one of cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: {spec!r} but this torch build or machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device: {spec!r} but this machine has {count} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device: {spec!r} but MPS is not available here")
    return str(dev)


def _typed(convert):
    """An argparse `type=` from a converter that raises ValueError (argparse would hide its message)."""
    def typed(text: str):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    typed.__name__ = convert.__name__
    return typed


def _method_of(name: str) -> Method:
    return get_method(ALIASES.get(name, name))


def _precision_of(spec: str) -> Precision:
    return Precision.parse(spec)


# the converters argparse applies while it parses (`probflow.cli.common.add_solver_arguments`): --method is a
# Method (aliases resolved), --device a checked device string, --precision a Precision
method_arg, device_arg, precision_arg = _typed(_method_of), _typed(check_device), _typed(_precision_of)


def check_out_file(out: str, flag: str = "--out") -> Path:
    """A file name for an output (its folder and --force are checked by `probflow.files.atomic` before work)."""
    if not out or out.endswith(("/", os.sep)) or os.path.basename(out) in ("", ".", ".."):
        raise ValueError(f"{flag}: {out!r} names a folder; expected a file name (e.g. {out.rstrip('/') or '.'}"
                         "/out.png)")
    return Path(out)


# ---------------------------------------------------------------- the parts every image command shares


@dataclass(frozen=True)
class Solver:
    """What to integrate with: `method` (resolved, aliases applied; None for decode = the file's), `grid` (a
    name, None = the method's default), `steps` (None = the command's or file's), tolerances, `max_steps`,
    and the stochastic knobs `eta`/`gamma` (which replace the method by a seeded stochastic one)."""

    method: Method | None
    grid: str | None
    steps: int | None
    rtol: float | None
    atol: float | None
    max_steps: int
    eta: float | None = None
    gamma: float | None = None

    @property
    def name(self) -> str:
        return self.method.name if self.method is not None else ""


@dataclass(frozen=True)
class Condition:
    """The condition a conditional model is loaded with (`probflow.models.load`): --class (an index or a
    name from the folder's card), --prompt or --prompt-embeds (a safetensors or torch file), --negative (the
    class or prompt guided against) and --guidance (w; None: the loader's default 1). What the model itself
    accepts (a class in range, a text encoder for --prompt, the embedding's width) is checked where it is
    loaded (`probflow.cli.common.load_image_model`)."""

    class_label: str | None = None
    prompt: str | None = None
    prompt_embeds: Path | None = None
    negative: str | None = None
    guidance: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.class_label, self.prompt, self.prompt_embeds, self.negative,
                                           self.guidance))


EMBED_SUFFIXES = (".safetensors", ".pt", ".pth")


def condition(args: argparse.Namespace) -> Condition:
    """--class/--prompt/--prompt-embeds/--negative/--guidance, checked once (what needs no model)."""
    g = getattr(args, "guidance", None)
    if g is not None and not math.isfinite(g):
        raise ValueError(f"--guidance: expected a finite number (the CFG weight w), got {g!r}")
    prompt, embeds = getattr(args, "prompt", None), getattr(args, "prompt_embeds", None)
    if prompt is not None and embeds is not None:
        raise ValueError("--prompt: pass --prompt or --prompt-embeds, not both")
    if embeds is not None:
        if not Path(embeds).is_file():
            raise FileNotFoundError(f"--prompt-embeds: {embeds}: no such file")
        if Path(embeds).suffix.lower() not in EMBED_SUFFIXES:
            raise ValueError(f"--prompt-embeds: {embeds}: expected a .safetensors or torch (.pt, .pth) file holding "
                             "'prompt_embeds'")
    return Condition(getattr(args, "class_label", None), prompt, Path(embeds) if embeds is not None else None,
                     getattr(args, "negative", None), g)


@dataclass(frozen=True)
class Run:
    """How to run: the model spec and its condition, device, precision (None: the model's own dtype, state
    float64), samples per chunk, threads (None: `probflow.distributed.default_threads`), progress, --force,
    and the bounds."""

    model: str
    device: str
    precision: Precision | None
    chunk: int
    threads: int | None
    quiet: bool
    force: bool
    limits: bool
    condition: Condition = Condition()


def _tolerance(flag: str, v: float | None, limits: bool) -> None:
    if v is None:
        return
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{flag}: expected a positive number, got {v!r}")
    if limits and v < TOL_FLOOR:
        raise ValueError(f"{flag}: {v:g} is below the floor {TOL_FLOOR:g} that an adaptive solve can reach "
                         "(pass --no-limits to try anyway)")


def solver(args: argparse.Namespace, default_method: str | None, default_steps: int | None) -> Solver:
    """--method/--grid/--steps/--rtol/--atol/--max-steps/--eta/--gamma, checked once."""
    limits = not args.no_limits
    eta, gamma = getattr(args, "eta", None), getattr(args, "gamma", None)
    knob = "--eta" if eta is not None else "--gamma" if gamma is not None else None
    method = args.method  # a Method (argparse's `method_arg`) or None
    if knob is not None and method is not None and method.name != "euler":
        raise ValueError(f"{knob}: the stochastic sampler replaces the method; it cannot run with --method "
                         f"{method.name} (drop --method, or {knob})")
    method = method or (get_method(default_method) if default_method else None)
    for flag, v in (("--eta", eta), ("--gamma", gamma)):
        if v is not None and not (math.isfinite(v) and 0 <= v <= 1):
            raise ValueError(f"{flag}: expected a number in [0, 1], got {v!r}")
    if knob is not None:
        method = get_method("euler")  # the grid rule of DDIM; the stochastic step itself is built per chunk
    if method is not None and method.adaptive and args.steps is not None:  # said, not silently dropped
        print(f"probflow: note: --steps {args.steps} is not used: {method.name} is adaptive and chooses its own steps "
              "(--rtol/--atol set them)", file=sys.stderr)
    bounded("--steps", args.steps, limits)
    bounded("--max-steps", args.max_steps, limits)
    _tolerance("--rtol", args.rtol, limits)
    _tolerance("--atol", args.atol, limits)
    if method is not None and method.uniform_steps and args.grid not in (None, "sigma_uniform"):
        raise ValueError(f"--grid: {method.name} assumes equal steps in σ; use --grid sigma_uniform")
    return Solver(method, args.grid, args.steps if args.steps is not None else default_steps, args.rtol, args.atol,
                  args.max_steps, eta, gamma)


def run(args: argparse.Namespace) -> Run:
    """--model/--device/--precision/--chunk/--threads/--quiet/--force/--no-limits, checked once (--device and
    --precision were converted and checked by argparse; whether the device runs the precision's dtypes is
    checked where the solve starts, `probflow.distributed.solve_chunks`)."""
    limits = not args.no_limits
    chunk = getattr(args, "chunk", 64)
    if chunk < 1:
        raise ValueError(f"--chunk: expected a positive integer, got {chunk}")
    check_threads(args.threads, limits)
    return Run(args.model, args.device, args.precision, chunk, args.threads, args.quiet, args.force, limits,
               condition(args))


def seed(seed: int) -> int:
    """--seed: a non-negative 64-bit integer."""
    if not 0 <= seed < SEED_BOUND:
        raise ValueError(f"--seed: expected a non-negative integer below 2**63, got {seed}")
    return seed


# ---------------------------------------------------------------- one request per command


@dataclass(frozen=True)
class SampleRequest:
    out: Path
    n: int
    seed: int
    scale: int | None
    solver: Solver
    run: Run


def sample_request(args: argparse.Namespace) -> SampleRequest:
    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of samples, got {args.n}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale: expected a positive integer, got {args.scale}")
    return SampleRequest(check_out_file(args.out), args.n, seed(args.seed), args.scale,
                         solver(args, "rk4", 25), run(args))


@dataclass(frozen=True)
class EncodeRequest:
    images: tuple[str, ...]
    out: Path
    invert: bool
    plain: bool
    solver: Solver
    run: Run

    @property
    def mode(self) -> str:
        """'pair' (reversible), 'plain' (explicit or adaptive encode, --plain) or 'exact' (`encode_exact`)."""
        m = self.solver.method
        if m.reversible:
            return "pair"
        return "plain" if (m.adaptive or self.plain) else "exact"


def encode_request(args: argparse.Namespace) -> EncodeRequest:
    return EncodeRequest(tuple(args.images), check_out_file(args.out), args.invert, args.plain,
                         solver(args, "euler", 20), run(args))


@dataclass(frozen=True)
class DecodeRequest:
    latents: str
    out: Path
    solver: Solver  # method/steps/rtol/atol None: as the file records
    run: Run  # run.condition not given: the class and w the file records
    any_condition: bool = False  # decode latents made under another condition or w (then NOT exact)


def decode_request(args: argparse.Namespace) -> DecodeRequest:
    if not args.out:
        raise ValueError("--out: expected a folder name")
    return DecodeRequest(args.latents, Path(args.out), solver(args, None, None), run(args), args.any_condition)


@dataclass(frozen=True)
class InterpolateRequest:
    a: str
    b: str
    frames: int
    kind: str
    out: Path
    invert: bool
    scale: int | None
    plain: bool
    solver: Solver
    run: Run

    @property
    def encode(self) -> EncodeRequest:
        return EncodeRequest((self.a, self.b), self.out, self.invert, self.plain, self.solver, self.run)


def interpolate_request(args: argparse.Namespace) -> InterpolateRequest:
    s = solver(args, "euler", 20)
    if s.method.reversible:
        raise ValueError(f"--method: {s.name}'s inner frames have no partner state, and without it it is unstable on "
                         "image networks; interpolate with the default exact latents (or --method heun2, dpmpp_2m)")
    bounded("--frames", args.frames, not args.no_limits, lo=2)
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale: expected a positive integer, got {args.scale}")
    return InterpolateRequest(args.a, args.b, args.frames, args.kind, check_out_file(args.out), args.invert,
                              args.scale, args.plain, s, run(args))


def with_file_defaults(s: Solver, meta: dict, steps: int) -> Solver:
    """A decode's solver with what the user left out taken from the latent file's metadata."""
    def tol(v: float | None, k: str) -> float:
        return v if v is not None else (float(meta[k]) if meta[k] not in ("None", "") else 1e-6)

    return replace(s, method=s.method or get_method(meta["method"]), rtol=tol(s.rtol, "rtol"),
                   atol=tol(s.atol, "atol"), steps=s.steps if s.steps is not None else steps)


__all__ = ["ALIASES", "BOUNDS", "MAX_BYTES", "MAX_STEPS", "TOL_FLOOR", "Solver", "Run", "SampleRequest",
           "EncodeRequest", "DecodeRequest", "InterpolateRequest", "sample_request", "encode_request",
           "Condition", "condition", "decode_request", "interpolate_request", "solver", "run", "bounded",
           "check_threads", "check_device", "check_out_file", "seed", "with_file_defaults",
           "method_arg", "device_arg", "precision_arg"]
