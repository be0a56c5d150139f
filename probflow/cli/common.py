"""What the image commands share: the model argument, the solver arguments (method, grid, steps,
tolerances, stochastic knobs, device) and a solve with a progress bar through the Python API."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.grids import NAMED
from probflow.integrate import MAX_STEPS
from probflow.solvers import Method, get_method

# Names the CLI accepts for methods besides the registry's (DDIM is Euler on Eq. 12, MATH.md §3).
ALIASES = {"ddim": "euler"}
GRID_NAMES = (*NAMED, "calibrated")
TOL_FLOOR = 1e-10  # --rtol/--atol below this are refused unless --no-limits


def say(msg: str) -> None:
    """A message to the user on stderr (progress and notes; results go to stdout)."""
    print(f"probflow: {msg}", file=sys.stderr)


def load_image_model(spec: str, device: str = "cpu", limits: bool = True):
    """An image ε-model by `--model`: "digits", a digits checkpoint folder or a local diffusers folder
    (`probflow.models.load`); it must have a sample shape (C, H, W). `limits`: refuse a checkpoint whose
    network or noise table is beyond `probflow.models.adapters.MAX_PARAMETERS` / `MAX_TIMESTEPS` before
    building it (`--no-limits` lifts this)."""
    from probflow import models

    try:
        model = _load_checked(spec, limits) if os.path.isdir(spec) else models.load(spec)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"--model: {spec!r} is not an image model (no (C, H, W) sample shape)")
    if device != "cpu":
        if not hasattr(model, "to"):
            raise ValueError(f"--device: model {spec!r} cannot be moved to {device}")
        model.to(device)
    return model


def _load_checked(folder: str, limits: bool):
    """A checkpoint folder as `probflow.models.load` reads it, with the resource limits on or off."""
    from probflow.models import adapters, digits

    big = {} if limits else {"max_parameters": None}
    if os.path.isfile(os.path.join(folder, "digits.safetensors")):
        return digits.load_model(folder, **big)
    return adapters.from_diffusers(folder, **big, **({} if limits else {"max_timesteps": None}))


def add_solver_arguments(p: argparse.ArgumentParser, method: str | None, steps: int | None,
                         stochastic: bool = False, chunked: bool = True) -> None:
    """--model, --method, --grid, --steps, --rtol/--atol, --device, --force, --quiet (and --eta/--gamma), and
    `add_runtime_arguments` (--threads, --precision, and --chunk when `chunked`)."""
    p.add_argument("--model", default="digits",
                   help="'digits' (default), a digits checkpoint folder, or a local diffusers folder")
    p.add_argument("--method", default=method, help=f"solver name (probflow.solvers.method_names(); 'ddim' is "
                   f"'euler'); default {method}")
    p.add_argument("--grid", default=None, choices=GRID_NAMES, help="σ grid for fixed-grid methods (probflow.grids."
                   "NAMED; 'calibrated' = probflow.calibrate.calibrated_builder for this model and method); "
                   "default uniform (DDIM trailing)")
    p.add_argument("--steps", type=int, default=steps, help=f"steps of the σ grid (fixed-grid methods); "
                   f"default {steps}")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (adaptive methods); default 1e-6")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (adaptive methods); default 1e-6")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="adaptive methods: stop with an error naming the "
                   f"σ reached after this many steps (default {MAX_STEPS})")
    if stochastic:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--eta", type=float, default=None,
                       help="stochastic DDIM (Eq. 11 with σ_{s,t}(η); η = 1 is DDPM's ancestral sampler) on the grid")
        g.add_argument("--gamma", type=float, default=None,
                       help="reverse-SDE family by Euler–Maruyama (γ = 1 the reverse SDE, γ = 0 Eq. 12)")
    p.add_argument("--device", default="cpu", help="torch device for the model and the state (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_limit_arguments(p)
    add_runtime_arguments(p, precision=True, chunk=chunked)


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """--no-limits: lift the resource and sanity bounds (see `check_limits`)."""
    p.add_argument("--no-limits", action="store_true",
                   help=f"lift the bounds on model size (parameters), noise-table length, input image pixels and the "
                        f"tolerance floor (--rtol/--atol >= {TOL_FLOOR:g})")


def check_limits(args: argparse.Namespace) -> None:
    """The sanity floor on the tolerances: below TOL_FLOOR an adaptive solve cannot meet them in float64 with a
    float32 network (ε is only resolved to ~1e-7), so it would shrink its steps without end."""
    if getattr(args, "no_limits", False):
        return
    for k in ("rtol", "atol"):
        v = getattr(args, k, None)
        if isinstance(v, float) and 0 < v < TOL_FLOOR:
            raise ValueError(f"--{k}: {v:g} is below the floor {TOL_FLOOR:g} that an adaptive solve can reach "
                             "(pass --no-limits to try anyway)")


def check_solver_args(args: argparse.Namespace) -> None:
    """Validate and normalise the solver arguments in place (aliases resolved)."""
    args.method = ALIASES.get(args.method, args.method)
    try:
        get_method(args.method)
    except ValueError as e:
        raise ValueError(f"--method: {e}") from None
    for k in ("rtol", "atol"):
        v = getattr(args, k)
        if not (isinstance(v, float) and math.isfinite(v) and v > 0):
            raise ValueError(f"--{k}: expected a positive number, got {v!r}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {args.steps}")
    if getattr(args, "max_steps", 1) < 1:
        raise ValueError(f"--max-steps: expected a positive integer, got {args.max_steps}")
    check_limits(args)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {args.device!r} is not a usable torch device ({str(e).splitlines()[0]})") from None


def solver_method(args: argparse.Namespace, seed: int = 0, indices: range | None = None) -> Method:
    """The method the arguments name: `--eta`/`--gamma` build a seeded stochastic method (noise stream
    (seed, i) for sample i of `indices`, default 0 … B−1), else the registry's."""
    from probflow import sde

    if getattr(args, "eta", None) is not None:
        return sde.stochastic_ddim(args.eta, seed=seed, indices=indices)
    if getattr(args, "gamma", None) is not None:
        return sde.reverse_sde(args.gamma, seed=seed, indices=indices)
    return get_method(args.method)


def grid(args: argparse.Namespace, model, method: Method) -> Tensor:
    """The decreasing sampling grid: [σ_max, 0] for adaptive methods (they choose their own steps), else the
    `--grid` builder with `--steps` steps."""
    from probflow.grids import named

    if method.adaptive:
        return torch.tensor([model.schedule.sigma_max, 0.0], dtype=torch.float64)
    name = args.grid or ("sigma_uniform" if method.uniform_steps else "uniform")
    if method.uniform_steps and name != "sigma_uniform":
        raise ValueError(f"--grid: {method.name} assumes equal steps in σ; use --grid sigma_uniform")
    if name == "calibrated":
        from probflow.calibrate import calibrated_builder

        say(f"calibrating a {args.steps}-step grid for {method.name} on this model (16 calibration samples)")
        return calibrated_builder(model, tuple(model.sample_shape), method.name)(model.schedule, args.steps)
    return named(name, model.schedule, args.steps)


class _Progress:
    """The ε-model with a tqdm bar that advances at each evaluation (one NFE)."""

    def __init__(self, model, bar) -> None:
        self.model, self.bar = model, bar

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.model(x, sigma)
        self.bar.update(1)
        return out


def solve(args: argparse.Namespace, model, fn: Callable, x: Tensor, sigmas: Tensor, method: Method,
          what: str, **kw):
    """Run `fn` (probflow.sample/encode/decode/interpolate) on the model wrapped with a progress bar."""
    from tqdm import tqdm

    total = None if method.adaptive else (len(sigmas) - 1) * method.stages
    if method.adaptive and getattr(args, "max_steps", None) is not None:
        kw.setdefault("max_steps", args.max_steps)
    with tqdm(total=total, desc=f"{what} ({method.name})", unit="NFE", file=sys.stderr,
              disable=True if getattr(args, "quiet", False) else None, leave=False) as bar:
        field = DDIMField(_Progress(_Finite(model), bar), model_dtype=getattr(model, "model_dtype", None))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            out = guarded(fn, method)(field, x, sigmas=sigmas, method=method, rtol=args.rtol, atol=args.atol, **kw)
    for w in caught:  # an unstable solve is refused, not written (probflow.reversible: stability limits)
        if issubclass(w.category, RuntimeWarning) and "unstable" in str(w.message):
            raise ValueError(f"--method: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


class _Finite:
    """The ε-model, refusing a NaN/Inf ε (broken weights) with the σ where it appeared."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.model(x, sigma)
        if not torch.isfinite(out).all():
            raise ValueError(f"--model: the network returned NaN or Inf for ε at σ = {float(sigma):.6g} "
                             "(broken weights or an input out of its range)")
        return out


def guarded(fn: Callable, method: Method) -> Callable:
    """`fn` with a solver's internal failures (torchdiffeq's "underflow in dt" assertion, a NaN/Inf result)
    turned into a ValueError naming the method."""

    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except AssertionError as e:
            raise ValueError(f"--method {method.name}: the solver failed ({str(e) or 'assertion'}): its step "
                             "size collapsed; the model's ε is not smooth or not finite here") from None
        except FloatingPointError as e:
            raise ValueError(f"--method {method.name}: {e}") from None

    return run


def load_inputs(args: argparse.Namespace, model, paths: list[str], name: str) -> Tensor:
    """Images → x in the model's range, shape and channels (converted with a message)."""
    from probflow.io.images import load_images

    c, h, w = model.sample_shape
    x = load_images(paths, (h, w), c, data_range=getattr(model, "data_range", (-1.0, 1.0)), invert=args.invert,
                    name=name, **({"max_pixels": None} if getattr(args, "no_limits", False) else {}))
    return x.to(args.device)


# ---------------------------------------------------------------- runtime: threads, precision, chunks, ranks


def add_runtime_arguments(p: argparse.ArgumentParser, precision: bool = False, chunk: bool = False) -> None:
    """--threads (every command), --precision (image commands) and --chunk (those spread over torchrun's ranks:
    sample, encode, decode; probflow.distributed).

    A command that defines its own --threads (train, bench) keeps it; `apply_runtime` then leaves threads
    to the command."""
    if "--threads" not in p._option_string_actions:
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads per process (default: the free cores of this machine divided "
                            "by the ranks on it, at least 1: ranks × threads never exceeds the cores)")
        p.set_defaults(runtime_threads=True)
    if precision:
        p.add_argument("--precision", default=None,
                       help="dtypes of the model and of the ODE state, e.g. model=bfloat16,state=float32, or one of "
                            "float64/float32 for both (probflow.precision); default: the model's own dtype, state "
                            "float64")
    if chunk:
        p.add_argument("--chunk", type=int, default=64,
                       help="samples per batch (default 64): the unit of work spread over torchrun's ranks; the "
                            "same --chunk gives the same bytes on any number of ranks")


@dataclass
class Runtime:
    """What `apply_runtime` set up: the ranks (`probflow.distributed.World`), threads and precision."""

    world: Any
    threads: int | None
    precision: Any


def apply_runtime(args: argparse.Namespace, spread: bool = True) -> Runtime:
    """Set torch's threads, parse and check --precision on --device, check --chunk and join torchrun's ranks
    (world size 1 without torchrun; a command that is not `spread` over ranks refuses more). On a CUDA device
    each rank takes GPU LOCAL_RANK."""
    from probflow import distributed as dist
    from probflow.precision import Precision

    threads = dist.set_threads(args.threads) if getattr(args, "runtime_threads", False) else None
    if getattr(args, "chunk", 1) < 1:
        raise ValueError(f"--chunk: expected a positive integer, got {args.chunk}")
    device = getattr(args, "device", "cpu")
    if not spread and dist.world(device="cpu").size > 1:
        raise ValueError(f"{args.command}: not spread over ranks; run it without torchrun")
    w = dist.world(device="cuda" if str(device).startswith("cuda") else "cpu")
    if w.size > 1 and str(device).startswith("cuda"):
        args.device = w.device
    precision = Precision.parse(getattr(args, "precision", None))
    if precision is not None:
        precision.check_device(args.device)
    return Runtime(w, threads, precision)


def run_chunks(args: argparse.Namespace, rt: Runtime, model, fn: Callable, n: int, inputs: Callable,
               sigmas: Tensor, method: Callable, what: str, state: Any = None):
    """`solve` chunk by chunk over the ranks (`probflow.distributed.map_chunks`, --chunk samples each):
    `inputs(a, b)` and `method(a, b)` give chunk [a, b)'s input x and method (a stochastic method's noise is
    indexed by sample), rows a:b of a reversible `state` go with it; the model runs in --precision. Returns
    the concatenated Solution on rank 0, None on the other ranks."""
    from probflow import distributed as dist

    if rt.precision is not None:
        model = rt.precision.cast_model(model)
    quiet = args.quiet or rt.world.rank != 0

    def one(a: int, b: int):
        x = inputs(a, b).to(args.device)
        x = x if rt.precision is None else rt.precision.state_tensor(x)
        st = dist.slice_state(state, a, b)
        ns = argparse.Namespace(**{**vars(args), "quiet": quiet})
        return solve(ns, model, fn, x, sigmas, method(a, b), what, state=st)

    parts = dist.map_chunks(one, n, args.chunk, w=rt.world)
    return None if parts is None else dist.concat_solutions(parts)
