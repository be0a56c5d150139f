"""What the image commands share, after their arguments became a request (`probflow.cli.request`): the
arguments themselves, the model, grid and method a request names, and the one solve (`solve_in_chunks`),
which runs chunk by chunk through `probflow.distributed.solve_chunks` in one process and under torchrun
alike."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probflow.cli.request import (
    MAX_BYTES,
    TOL_FLOOR,
    Condition,
    Run,
    Solver,
    device_arg,
    method_arg,
    precision_arg,
)
from probflow.grids import NAMED
from probflow.integrate import MAX_STEPS
from probflow.precision import Precision
from probflow.solvers import Method

GRID_NAMES = (*NAMED, "calibrated")


def say(msg: str) -> None:
    """A message to the user on stderr (progress and notes; results go to stdout)."""
    print(f"probflow: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- arguments


def add_solver_arguments(p: argparse.ArgumentParser, method: str | None, steps: int | None,
                         stochastic: bool = False, chunked: bool = True) -> None:
    """--model, --method, --grid, --steps, --rtol/--atol, --max-steps, --device, --force, --quiet (and
    --eta/--gamma), --precision and --chunk (when `chunked`). Defaults are None where the request fills them in
    (so that the request knows what the user gave)."""
    p.add_argument("--model", default="digits",
                   help="'digits' (default), a digits checkpoint folder, or a local diffusers folder")
    p.add_argument("--method", type=method_arg, default=None,
                   help=f"solver name (probflow.solvers.method_names(); 'ddim' is "
                   f"'euler'); default {method}")
    p.add_argument("--grid", default=None, choices=GRID_NAMES, help="σ grid for fixed-grid methods (probflow.grids."
                   "NAMED; 'calibrated' = probflow.calibrate.calibrated_builder for this model and method); "
                   "default uniform (DDIM trailing)")
    p.add_argument("--steps", type=int, default=None, help=f"steps of the σ grid (fixed-grid methods); "
                   f"default {steps}")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (adaptive methods); default 1e-6")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (adaptive methods); default 1e-6")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="adaptive methods: stop with an error naming the "
                   f"σ reached after this many steps (default {MAX_STEPS})")
    if stochastic:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--eta", type=float, default=None, help="stochastic DDIM (Eq. 11 with σ_{s,t}(η); η = 1 is "
                       "DDPM's ancestral sampler) on the grid; it is the method (only --method ddim/euler goes "
                       "with it)")
        g.add_argument("--gamma", type=float, default=None, help="reverse-SDE family by Euler–Maruyama (γ = 1 the "
                       "reverse SDE, γ = 0 Eq. 12); it is the method (only --method ddim/euler goes with it)")
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="torch device for the model and the state: cpu (default), cuda, "
                   "cuda:N, mps")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", type=precision_arg, default=None,
                   help="dtypes of the model and of the ODE state, e.g. model=bfloat16,state=float32, or one of "
                        "float64/float32 for both (probflow.precision); default: the model's own dtype, state "
                        "float64")
    add_condition_arguments(p)
    if chunked:
        p.add_argument("--chunk", type=int, default=64,
                       help="samples per batch (default 64): the unit of work spread over torchrun's ranks; the "
                            "same --chunk gives the same bytes on any number of ranks")


def add_condition_arguments(p: argparse.ArgumentParser) -> None:
    """--class, --prompt, --prompt-embeds, --negative, --guidance: the condition of a conditional model
    (`probflow.models.load`; the ODE of that one fixed condition, guided with weight w)."""
    g = p.add_argument_group("condition (conditional models: class embeddings, cross-attention, a vae/)")
    g.add_argument("--class", dest="class_label", default=None, metavar="N",
                   help="the class of a class-conditional model (an index, or a name from its card.json)")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help="the prompt of a text-conditioned model (needs `transformers` and the folder's "
                        "text_encoder/ and tokenizer/)")
    g.add_argument("--prompt-embeds", default=None, metavar="FILE",
                   help="the prompt's embedding instead of --prompt: a .safetensors file, or a torch file read with "
                        "weights_only=True, holding 'prompt_embeds' ((L, D) or (1, L, D)) and optionally "
                        "'negative_prompt_embeds'")
    g.add_argument("--negative", default=None, metavar="CLASS|TEXT",
                   help="the condition guided against: a class (class-conditional) or a negative prompt (text); "
                        "default the card's null class / the empty prompt")
    g.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight w: ε_w = ε_∅ + w (ε_c − ε_∅); 1 (default) is the "
                        "conditional model, 0 the unconditional one")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--threads and --no-limits, for every command (a command that defines its own keeps it)."""
    if "--threads" not in p._option_string_actions:
        p.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads per process (default: the free cores of this machine divided "
                            "by the ranks on it, at least 1: ranks × threads never exceeds the cores; at most "
                            "the CPUs unless --no-limits)")
    if "--no-limits" not in p._option_string_actions:
        p.add_argument("--no-limits", action="store_true",
                       help=f"lift the bounds on work and memory (--steps, --n, --scale, --frames, --draws, "
                            f"--probes, --samples, --nfe, --threads; model size, noise-table length, input pixels) "
                            f"and the tolerance floor (--rtol/--atol >= {TOL_FLOOR:g})")


# ---------------------------------------------------------------- what a request names


def start(run: Run | None = None, threads: int | None = None, spread: bool = True):
    """Set torch's threads (the request's or `threads`, checked by the request (`check_threads`); None:
    `default_threads`) and join torchrun's ranks (world size 1
    without torchrun; a command that is not `spread` refuses more). Returns the World; on a CUDA device
    each rank works on GPU LOCAL_RANK (`World.device`)."""
    from probflow import ranks

    ranks.set_threads(run.threads if run is not None else threads)
    cuda = run is not None and run.device.startswith("cuda")
    w = ranks.world(device="cuda" if cuda else "cpu")
    if not spread and w.size > 1:
        raise ValueError("not spread over ranks; run it without torchrun")
    return w


@dataclass(frozen=True)
class Opened:
    """What an image command works with once it has started: the world (torchrun's ranks or one process),
    the device this rank computes on, and the model of the request's condition."""

    w: Any
    device: str
    model: Any


def open_model(run: Run, out: Path | None = None, folder: bool = False, spread: bool = True,
               condition: Condition | None = None) -> Opened:
    """The start of every image command, each step a floor lower and none taken twice: the condition read
    (--prompt-embeds) and the model loaded on the CPU (`probflow.models.load`, with `condition` or the
    request's; an image model, (C, H, W)), then the run's ranks (`probflow.ranks`): torch's threads, torchrun's
    world (a command that is not `spread` refuses more than one rank) and `out` checked writable on rank 0
    (`probflow.files.atomic`: a file, or a `folder` of files; None: no output file), all before any solve;
    last the model moved to this rank's device (--device, or under torchrun with CUDA its own GPU). The load
    comes first because it needs none of them: it makes no batched computation for the threads to share."""
    from probflow import models, ranks
    from probflow.files.atomic import check_writable, check_writable_folder

    kw = condition_kwargs(condition or run.condition)
    try:
        model = models.load(run.model, limits=run.limits, **kw)
    except ValueError as e:
        raise flag_error(e) from None
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"--model: {run.model!r} is not an image model (no (C, H, W) sample shape)")
    ranks.set_threads(run.threads)
    cuda = run.device.startswith("cuda")
    w = ranks.world(device="cuda" if cuda else "cpu")
    if not spread and w.size > 1:
        raise ValueError("not spread over ranks; run it without torchrun")
    if out is not None:
        check = check_writable_folder if folder else check_writable
        ranks.on_rank0(lambda: check(out, run.force, "--out"), w=w)
    device = w.device if w.size > 1 and cuda else run.device
    if device != "cpu":
        if not hasattr(model, "to"):
            raise ValueError(f"--device: model {run.model!r} cannot be moved to {device}")
        model.to(device)
        if getattr(model, "autoencoder", None) is not None:
            model.autoencoder.vae.to(device)
    return Opened(w, device, model)


def device_of(run: Run, w) -> str:
    """The device this rank computes on: --device, or under torchrun with CUDA its own GPU."""
    return w.device if w.size > 1 and run.device.startswith("cuda") else run.device


def load_image_model(spec: str, device: str = "cpu", limits: bool = True):
    """An image ε-model by `--model` spec, unconditional, without a command around it (`open_model` is the
    commands' path): "digits", "digits32" needs a class, so use `open_model` for conditional models."""
    return open_model(Run(spec, device, None, 64, None, True, False, limits)).model


# the loader's argument names, as the command line spells them
_FLAGS = {"class_label": "--class", "prompt": "--prompt", "prompt_embeds": "--prompt-embeds",
          "negative": "--negative", "guidance": "--guidance"}
_HINTS = (("(negative=, --negative)", "(--negative)"), ("prompt_embeds= (a safetensors file)", "--prompt-embeds FILE"),
          ("prompt_embeds=", "--prompt-embeds FILE"), ("prompt=", "--prompt"), ("negative=", "--negative"),
          ("use guidance 1", "use --guidance 1"), ("use w = 1", "use --guidance 1"))


def condition_kwargs(condition: Condition) -> dict:
    """The request's condition as `probflow.models.load`'s keyword arguments (--prompt-embeds passed as its path)."""
    kw = {"class_label": condition.class_label, "prompt": condition.prompt, "negative": condition.negative,
          "guidance": condition.guidance}
    if condition.prompt_embeds is not None:  # read by the loader (models.diffusers_folders.read_prompt_embeds)
        kw["prompt_embeds"] = str(condition.prompt_embeds)
    return kw


def flag_error(e: ValueError) -> ValueError:
    """A loader's error with its argument named as the command line spells it (--class, …; else --model)."""
    msg = str(e)
    for a, b in _HINTS:
        msg = msg.replace(a, b)
    head, _, rest = msg.partition(": ")
    if head in _FLAGS:
        return ValueError(f"{_FLAGS[head]}: {rest}")
    return ValueError(msg if msg.startswith("--model") else f"--model: {msg}")


def image_shape(model) -> tuple[int, int, int]:
    """(C, H, W) of the images a model makes: its sample shape, or for latent diffusion (a vae/) the
    shape its VAE decodes a latent of that shape to (2^(levels − 1) pixels per latent pixel)."""
    ae = getattr(model, "autoencoder", None)
    if ae is None:
        return tuple(model.sample_shape)
    cfg, (_, h, w) = ae.vae.config, model.sample_shape
    f = 2 ** (len(cfg.block_out_channels) - 1)
    return (int(cfg.in_channels), h * f, w * f)


def to_latent(model, x: Tensor, chunk: int) -> Tensor:
    """Images → the ODE's x_0: themselves, or for latent diffusion the VAE encoder's mean × scaling factor."""
    ae = getattr(model, "autoencoder", None)
    return x if ae is None else torch.cat([ae.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def decoded(fn: Callable, model) -> Callable:
    """A chunk's solve `fn` (`solve`) whose x_0 is taken to images: as it is, or for latent diffusion through
    the VAE decoder, chunk by chunk on the chunk's rank."""
    ae = getattr(model, "autoencoder", None)
    if ae is None:
        return fn

    def solve_then_decode(*a, **kw):
        sol = fn(*a, **kw)
        return replace(sol, x=ae.decode(sol.x))

    return solve_then_decode


def to_image(model, z: Tensor, chunk: int) -> Tensor:
    """The ODE's x_0 → images: themselves, or for latent diffusion the VAE decoder's output."""
    ae = getattr(model, "autoencoder", None)
    return z if ae is None else torch.cat([ae.decode(z[i:i + chunk]) for i in range(0, len(z), chunk)])


def condition_text(model) -> str:
    """', class 3 (guided against class 10, w = 3)' — the condition a conditional model carries, for the
    summary line; '' for an unconditional model."""
    rec = getattr(model, "condition", None) or {}
    if not rec:
        return ""
    what = f"class {rec['class_label']}" if "class_label" in rec else \
        f"{rec['condition_kind']} sha256 {rec['condition_sha256'][:12]}…"
    against = f"class {rec['negative_class_label']}" if "negative_class_label" in rec else "the negative condition"
    w = float(rec["guidance"])
    return f", {what}" + (f" (guided against {against}, w = {w:g})" if w != 1.0 else " (w = 1)")


VAE_NOTE = ("the VAE is not exact: its decoder does not invert its encoder, so the images differ from the "
            "encoded ones by the VAE's own reconstruction error (the latent ODE part is exact)")


def check_sizes(flag: str, count: int, shape: tuple[int, ...], scale: int | None, limits: bool,
                nrow: int | None = None) -> None:
    """Before allocating: `count` samples of `shape` (C, H, W) fit `MAX_BYTES` in float64, and their PNG grid
    (`probflow.files.images.save_grid`: `nrow` per row, default ⌈√count⌉, 2-pixel pad, `scale`, default to at
    least 32 px) fits `MAX_PIXELS`. `flag` names the count's flag (--n, --frames)."""
    from probflow.files.images import MAX_PIXELS

    if not limits:
        return
    c, h, w = shape
    nbytes = count * c * h * w * 8
    if nbytes > MAX_BYTES:
        raise ValueError(f"{flag}: {count} samples of {c}×{h}×{w} need {nbytes / 2**30:.3g} GiB in float64, above the "
                         f"bound of {MAX_BYTES / 2**30:g} GiB (pass --no-limits to lift it)")
    s = scale if scale is not None else max(1, math.ceil(32 / min(h, w)))
    per_row = nrow or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / per_row)
    pixels = (per_row * (w * s + 2) + 2) * (rows * (h * s + 2) + 2)
    if pixels > MAX_PIXELS:
        flags = f"{flag} and --scale" if scale is not None else flag
        raise ValueError(f"{flags}: the PNG would have {pixels} pixels, above the bound of {MAX_PIXELS} "
                         "(pass --no-limits to lift it)")


def sample_plan(req, model) -> tuple[tuple[int, ...], Tensor, Callable]:
    """What `probflow sample` needs from the model before it solves, all command-line work: --n and --scale
    checked against the images' size (`check_sizes`), the shape of x_T (the model's; latents for latent
    diffusion), the grid, and the chunk's solve (`probflow.sample`, then the VAE decoder where there is one)."""
    import probflow

    check_sizes("--n", req.n, image_shape(model), req.scale, req.run.limits)
    return tuple(model.sample_shape), make_grid(req.solver, model), decoded(probflow.sample, model)


def precision_of(run: Run, model, state: torch.dtype = torch.float64) -> Precision:
    """--precision, else the model's own dtype with the ODE state in `state` (the one precision path:
    `probflow.distributed.solve_chunks` applies it once, before the chunk runner)."""
    if run.precision is not None:
        return run.precision
    md = getattr(model, "model_dtype", None)
    md = md if md in (torch.float64, torch.float32, torch.bfloat16, torch.float16) else torch.float32
    return Precision(md, torch.float64 if md == torch.float64 or state not in (torch.float32, torch.float64)
                     else state)


def make_grid(s: Solver, model, default: str = "uniform") -> Tensor:
    """The decreasing sampling grid: [σ_max, 0] for adaptive methods (they choose their own steps), else the
    `--grid` builder (`default` when none was named; sigma_uniform for methods that need equal steps) with
    `--steps` steps."""
    from probflow.grids import named

    method = s.method
    if method.adaptive:
        return torch.tensor([model.schedule.sigma_max, 0.0], dtype=torch.float64)
    name = grid_name(s, default)
    if name == "calibrated":
        from probflow.calibrate import calibrated_builder

        say(f"calibrating a {s.steps}-step grid for {method.name} on this model (16 calibration samples)")
        return calibrated_builder(model, tuple(model.sample_shape), method.name)(model.schedule, s.steps)
    return named(name, model.schedule, s.steps)


def grid_name(s: Solver, default: str = "uniform") -> str:
    return s.grid or ("sigma_uniform" if s.method.uniform_steps else default)


def make_method(s: Solver, seed: int = 0, indices: range | None = None) -> Method:
    """The method the request names: `--eta`/`--gamma` build a seeded stochastic method (noise stream
    (seed, i) for sample i of `indices`, default 0 … B−1), else the registry's."""
    from probflow import sde

    if s.eta is not None:
        return sde.stochastic_ddim(s.eta, seed=seed, indices=indices)
    if s.gamma is not None:
        return sde.reverse_sde(s.gamma, seed=seed, indices=indices)
    return s.method


def load_inputs(run: Run, model, paths: list[str], name: str, invert: bool, device: str) -> Tensor:
    """Images → x in the model's range, shape and channels (converted with a message); for latent diffusion
    the images its VAE takes (`image_shape`)."""
    from probflow.files.images import load_images

    c, h, w = image_shape(model)
    x = load_images(paths, (h, w), c, data_range=getattr(model, "data_range", (-1.0, 1.0)), invert=invert,
                    name=name, **({} if run.limits else {"max_pixels": None}))
    return x.to(device)


# ---------------------------------------------------------------- the one solve


def solve_in_chunks(run: Run, s: Solver, model, fn: Callable, n: int, inputs: Tensor | Callable, sigmas: Tensor,
                    method: Method | Callable, what: str, *, w=None, state: Any = None,
                    precision: Precision | None = None, dtype: torch.dtype = torch.float64):
    """`fn` (probflow.sample/encode/decode, or one of their signature) on n samples, chunk by chunk over the
    ranks (`probflow.distributed.solve_chunks`; --chunk samples each, world `w`), in `precision` (default
    `precision_of` with the state in `dtype`, the inputs' own; checked once on this rank's device), with a
    progress bar, NaN/Inf ε refused with its σ, and a solver's internal failure or an unstable solve turned
    into a one-line error. Returns the Solution on rank 0, None on the others."""
    from tqdm import tqdm

    from probflow import distributed as dist

    name = method.name if isinstance(method, Method) else s.name
    w = w or dist.world()
    mine = len(range(w.rank, -(-n // run.chunk), w.size))
    total = None if s.method.adaptive else mine * (len(sigmas) - 1) * s.method.stages
    kw = {"max_steps": s.max_steps} if s.method.adaptive else {}
    with tqdm(total=total, desc=f"{what} ({name})", unit="NFE", file=sys.stderr, leave=False,
              disable=True if (run.quiet or w.rank != 0) else None) as bar:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            sol = guarded(dist.solve_chunks, name)(
                fn, model, n, inputs, sigmas, method, chunk=run.chunk, state=state, w=w, rtol=s.rtol, atol=s.atol,
                precision=precision or precision_of(run, model, dtype), device=device_of(run, w),
                hook=_Progress(bar), **kw)
    for c in caught:  # an unstable solve is refused, not written (probflow.reversible: stability limits)
        if issubclass(c.category, RuntimeWarning) and "unstable" in str(c.message):
            raise ValueError(f"--method: {c.message}")
        warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
    return sol


def check_finite(eps: Tensor, sigma: Tensor) -> None:
    """Refuse a NaN/Inf ε (broken weights, an input out of the network's range) with the σ where it appeared."""
    if not torch.isfinite(eps).all():
        raise ValueError(f"--model: the network returned NaN or Inf for ε at σ = {float(sigma):.6g} "
                         "(broken weights or an input out of its range)")


class _Progress:
    """What the solve does after every model evaluation (`solve_chunks`' hook): ε checked finite, the bar
    advanced by one NFE."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, eps: Tensor, sigma: Tensor) -> None:
        check_finite(eps, sigma)
        self.bar.update(1)


def guarded(fn: Callable, name: str) -> Callable:
    """`fn` with a solver's internal failures (torchdiffeq's "underflow in dt" assertion, a NaN/Inf result)
    turned into a ValueError naming the method."""

    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except AssertionError as e:
            raise ValueError(f"--method {name}: the solver failed ({str(e) or 'assertion'}): its step "
                             "size collapsed; the model's ε is not smooth or not finite here") from None
        except FloatingPointError as e:
            raise ValueError(f"--method {name}: {e}") from None

    return run


def nfe_text(sol) -> str:
    """'NFE k' — model calls on each sample's path — with the batched total beside it where it differs (a run
    in several chunks), and the range where an adaptive solve made the chunks differ."""
    info = sol.info or {}
    total, low = info.get("nfe_total", sol.nfe), info.get("nfe_min", sol.nfe)
    per = f"{low}–{sol.nfe}" if low != sol.nfe else f"{sol.nfe}"
    if total == sol.nfe:
        return f"NFE {per}"
    return f"NFE {per} per sample ({total} batched model calls over {info.get('chunks', 1)} chunks)"
