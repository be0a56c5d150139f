"""diffusers' schedulers as peers: driven exactly as diffusers' pipelines drive them, on a probflow ε-model.

A pipeline's loop is, for t in `scheduler.timesteps`:

    x_in = scheduler.scale_model_input(x, t);   ε = unet(x_in, t);   x = scheduler.step(ε, t, x).prev_sample

`run_peer` runs that loop with the ε-model of `probflow.field` (`model(x, σ)`), from the same x_T, the same
start σ_max (t = T−1, `timestep_spacing="trailing"`) and the same end (σ = 0) as probflow's solvers, so the
returned x_0 is comparable to `probflow.sample(...)` on the same noise. NFE = model calls.

State variable. DDIM, DPM-Solver++ and UniPC keep x (the model's variable, docs/MATH.md §1) and take x_T as is.
Euler, Heun and LMS keep x̄ = x·sqrt(1 + σ²) (they divide by sqrt(σ² + 1) in `scale_model_input`); at σ = 0
both are x_0.

The model's σ. A pipeline passes the timestep t to the network. For integer timesteps (DDIM, DPM-Solver++,
UniPC) the model gets σ_t from the float64 table, exactly. Euler-type schedulers use continuous timesteps on a
Karras grid, so the model gets their own σ (`model_sigma="scheduler"`, the default for them). DPM-Solver++
and UniPC *round* the timesteps of a Karras grid (for beta schedules other than squaredcos_cap_v2), so a
pipeline evaluates the network at σ_round(t) while the update uses the Karras σ; `model_sigma="timestep"`
(their default here) reproduces that, `model_sigma="scheduler"` evaluates at the update's own σ instead. The
same holds for `use_exponential_sigmas` (grid "exponential": σ log-uniform from σ_max to σ_0, i.e. log-SNR
uniform, = `probflow.grids.log_uniform`), which DPM-Solver++, UniPC, Euler, Heun and LMS support and DDIM
does not; "karras_sigma"/"exponential_sigma" select `model_sigma="scheduler"`.

Traps handled here (docs/MATH.md §6):
1. float32 tables: every scheduler builds ᾱ, σ in float32 (σ_max off in the 7th digit). Before
   `set_timesteps` its `alphas_cumprod` is replaced by the float64 table, and after it every σ of the grid is
   replaced by the float64 value it rounds (a table σ_t, or the float64 Karras grid), checked to 1e-5
   relative. DDIM then runs entirely in float64 and agrees with probflow's Euler to ~1e-12. Euler, Heun
   (no), DPM-Solver++ still cast the *state* to float32 inside `step` ("upcast"), so their error has a floor
   of ≈1e-7·|x| (irrelevant at the NFE of a benchmark, visible in a float64 cross-check).
2. `clip_sample` defaults to True for DDIM (clamps x̂_0 to [−1, 1]): set to False (not an ODE step otherwise).
3. Initial noise: Euler-type pipelines start from σ_max·z (`init_noise_sigma` with trailing spacing), but the
   x̄ of x_T is x_T·sqrt(1 + σ_max²); they get the latter, so every solver starts from the same point.
4. DPM-Solver++ and UniPC with `final_sigmas_type="zero"` take a first-order last step into σ = 0 (a
   second-order step in λ = −log σ cannot reach λ = ∞); that is their method, counted as such.
5. Euler-type schedulers (Euler, Heun, LMS) build their Karras and exponential grids down to the σ of their
   last *trailing timestep* (t = T/n − 1: σ ≈ 0.34 at 10 steps of the linear table, not σ_0 ≈ 0.01) and then
   jump from there to σ = 0 in one step (`last_sigma_before_zero`); that is diffusers' method, run as is.
   DPM-Solver++ and UniPC end their Karras/exponential grids at σ_0 (then a first-order step to 0, trap 4).
6. Any grid (`run_peer(..., sigmas=...)`): for DPM-Solver++ and UniPC (x-variable, σ-based updates) the scheduler
   is built on the Karras grid of the same length and its `sigmas` replaced by the given float64 grid
   (decreasing, ending in 0); their updates read only `sigmas[step_index ± k]`, so they step on that grid, with
   the model at the grid's σ. This gives them the same grid freedom as probflow's methods (`custom_grid_peers`).
7. `DDIMScheduler` with trailing spacing moves the state to t − T//n, which is not the next timestep when n
   does not divide T: such runs are recorded in `PeerResult.notes` ("missteps") and flagged.

diffusers is imported lazily; `available()` says whether it can be (any Exception counts as absent).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from probflow.grids import karras, log_uniform
from probflow.method import steps_for_nfe as _steps_for_nfe
from probflow.schedules import Schedule

__all__ = ["PEERS", "PeerSpec", "PeerResult", "available", "peer_grids", "peer_names", "make_scheduler",
           "run_peer", "steps_for_nfe", "last_sigma_before_zero", "custom_grid_peers"]

_REL_MATCH = 1e-5  # a float32 σ and the float64 value it rounds agree far better than this


@dataclass(frozen=True)
class PeerSpec:
    """A diffusers scheduler as a peer: its class, its config, the variable it keeps ("x" or "xbar"), the grids
    it supports (`karras`: whether it takes `use_karras_sigmas` and `use_exponential_sigmas`), and its model calls
    for n steps, stages·n + extra_calls (declared as a `probflow.solvers.Method` declares them)."""

    cls: str
    config: dict
    variable: str
    karras: bool
    description: str
    stages: int = 1
    extra_calls: int = 0

    def nfe(self, steps: int) -> int:
        """Model calls of a run of `steps` steps."""
        return self.stages * steps + self.extra_calls


_DDPM = {"timestep_spacing": "trailing", "prediction_type": "epsilon"}

PEERS: dict[str, PeerSpec] = {
    "ddim": PeerSpec("DDIMScheduler", {**_DDPM, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0},
                     "x", False, "diffusers DDIMScheduler, η = 0 (= Euler on Eq. 12)"),
    "dpmpp_2m": PeerSpec("DPMSolverMultistepScheduler",
                         {**_DDPM, "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
                          "thresholding": False},
                         "x", True, "diffusers DPM-Solver++(2M), first-order last step"),
    "dpmpp_3m": PeerSpec("DPMSolverMultistepScheduler",
                         {**_DDPM, "algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": "zero",
                          "thresholding": False},
                         "x", True, "diffusers DPM-Solver++(3M), first-order last step"),
    "unipc": PeerSpec("UniPCMultistepScheduler",
                      {**_DDPM, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
                       "final_sigmas_type": "zero", "thresholding": False},
                      "x", True, "diffusers UniPC (bh2, order 2, corrector on)"),
    "unipc_3": PeerSpec("UniPCMultistepScheduler",
                        {**_DDPM, "solver_order": 3, "predict_x0": True, "solver_type": "bh2",
                         "final_sigmas_type": "zero", "thresholding": False},
                        "x", True, "diffusers UniPC (bh2, order 3, corrector on)"),
    "unipc_4": PeerSpec("UniPCMultistepScheduler",
                        {**_DDPM, "solver_order": 4, "predict_x0": True, "solver_type": "bh2",
                         "final_sigmas_type": "zero", "thresholding": False},
                        "x", True, "diffusers UniPC (bh2, order 4, corrector on)"),
    "euler_d": PeerSpec("EulerDiscreteScheduler", {**_DDPM, "final_sigmas_type": "zero"}, "xbar", True,
                        "diffusers EulerDiscreteScheduler"),
    "heun_d": PeerSpec("HeunDiscreteScheduler", {**_DDPM, "clip_sample": False}, "xbar", True,
                       "diffusers HeunDiscreteScheduler (last step Euler into σ = 0)", stages=2, extra_calls=-1),
    "lms_d": PeerSpec("LMSDiscreteScheduler", _DDPM, "xbar", True, "diffusers LMSDiscreteScheduler (order 4)"),
}


@dataclass
class PeerResult:
    """x: x_0 in the model's variable (at σ = 0 x̄ = x). nfe: model calls. sigmas: the float64 σ the
    scheduler stepped through (with repeats for Heun). model_sigmas: the σ each model call got."""

    x: Tensor
    nfe: int
    sigmas: Tensor
    model_sigmas: list[float]
    timesteps: list[float]
    notes: list[str] = field(default_factory=list)


def available() -> bool:
    """Whether diffusers imports here (any failure counts as absent)."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken optional dependency is an absent one
        return False
    return True


def peer_names() -> list[str]:
    return list(PEERS)


def custom_grid_peers() -> list[str]:
    """Peers that run on any σ grid (`run_peer(..., sigmas=...)`): the x-variable schedulers with σ grids."""
    return [k for k, v in PEERS.items() if v.karras and v.variable == "x"]


def peer_grids(name: str) -> list[str]:
    """Grids a peer supports: "trailing" (uniform in t from T−1); for the schedulers with
    `use_karras_sigmas` and `use_exponential_sigmas` (DPM-Solver++, UniPC, Euler, Heun, LMS; not DDIM)
    "karras" and "exponential" (diffusers' exponential sigmas: σ log-uniform from σ_max to σ_min, i.e.
    log-SNR uniform, = `probflow.grids.log_uniform`), both with the model at the pipeline's (rounded)
    timestep, and for the x-variable ones (DPM-Solver++, UniPC) "karras_sigma" and "exponential_sigma":
    the same grids with the model at the scheduler's own σ (for the Euler-type schedulers that is what
    "karras" and "exponential" already do, so they are not listed for them)."""
    spec = _spec(name)
    out = ["trailing"]
    if spec.karras:
        out += ["karras", "exponential"]
        if spec.variable == "x":
            out += ["karras_sigma", "exponential_sigma"]
    return out


_SIGMA_GRIDS = ("karras", "exponential")


def _grid_kind(grid: str) -> str | None:
    """"karras" or "exponential" for a grid of diffusers' σ options (with or without "_sigma"), else None."""
    return next((k for k in _SIGMA_GRIDS if grid in (k, f"{k}_sigma")), None)


def last_sigma_before_zero(name: str, schedule: Schedule, steps: int, grid: str) -> float:
    """The σ from which the peer's last step jumps to σ = 0 (the last nonzero σ of its grid)."""
    sig = make_scheduler(name, schedule, steps, grid).sigmas
    return float(sig[sig > 0].min())


def steps_for_nfe(name: str, nfe: int) -> int:
    """The step count whose model calls come closest to `nfe`, the fewer on a tie (Heun: 2n − 1 calls): the rule
    of probflow's own methods, `probflow.method.steps_for_nfe`."""
    spec = _spec(name)
    return _steps_for_nfe(nfe, spec.stages, spec.extra_calls)


def _spec(name: str) -> PeerSpec:
    if name not in PEERS:
        raise ValueError(f"peer: unknown diffusers peer {name!r}; expected one of {list(PEERS)}")
    return PEERS[name]


def _betas(schedule: Schedule) -> list[float]:
    ab = schedule.alpha_bar
    return torch.cat([1 - ab[:1], 1 - ab[1:] / ab[:-1]]).tolist()


def _match_float64(s32: Tensor, candidates: Tensor) -> Tensor:
    """Each σ of a float32 grid replaced by the float64 candidate it rounds (0 stays 0)."""
    s = s32.double()
    out = torch.zeros_like(s)
    for i, v in enumerate(s.tolist()):
        if v == 0.0:
            continue
        j = int(torch.argmin((candidates - v).abs()))
        if abs(float(candidates[j]) - v) > _REL_MATCH * v:
            raise RuntimeError(f"peer grid: σ = {v!r} matches no float64 table or grid value (diffusers changed?)")
        out[i] = candidates[j]
    return out


def make_scheduler(name: str, schedule: Schedule, steps: int, grid: str = "trailing") -> Any:
    """A diffusers scheduler for `schedule` with `steps` steps on `grid`, its tables swapped for float64.

    grid: "trailing" (DDIM trailing timesteps, t from T−1), "karras"/"karras_sigma" (ρ = 7 from σ_max to
    σ_min = σ_0, then 0, as `probflow.grids.karras(σ_max, σ_0, steps)`) or "exponential"/"exponential_sigma"
    (`use_exponential_sigmas`: log-uniform from σ_max to σ_0, then 0, as `probflow.grids.log_uniform`).
    Every σ of the grid is replaced by the float64 value it rounds (a table σ_t or the float64 grid).
    """
    import diffusers

    spec = _spec(name)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if grid not in peer_grids(name):
        raise ValueError(f"grid: peer {name!r} supports {peer_grids(name)}, got {grid!r}")
    config = dict(spec.config, num_train_timesteps=schedule.T, trained_betas=_betas(schedule))
    kind = _grid_kind(grid)
    if kind is not None:
        config[f"use_{kind}_sigmas"] = True
    sched = getattr(diffusers, spec.cls)(**config)
    ab64 = schedule.alpha_bar.clone()
    sched.alphas_cumprod = ab64  # trap 1: float64 table before set_timesteps builds the grid from it
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    for attr, val in (("alpha_t", ab64.sqrt()), ("sigma_t", (1 - ab64).sqrt())):
        if hasattr(sched, attr):
            setattr(sched, attr, val)
    if hasattr(sched, "lambda_t"):
        sched.lambda_t = torch.log(ab64.sqrt()) - torch.log((1 - ab64).sqrt())
    sched.set_timesteps(steps)
    if isinstance(getattr(sched, "sigmas", None), Tensor):
        cand = schedule.sigmas
        if kind is not None:  # ends as diffusers picks them (Euler-type: σ of the last trailing t)
            nz = sched.sigmas[sched.sigmas > 0]
            ends = _match_float64(torch.stack([nz.max(), nz.min()]), cand)
            build = karras if kind == "karras" else log_uniform
            cand = torch.cat([cand, build(float(ends[0]), float(ends[1]), steps)[:-1]])
        sched.sigmas = _match_float64(sched.sigmas, cand)
    return sched


def run_peer(
    name: str,
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    schedule: Schedule,
    steps: int,
    grid: str = "trailing",
    model_sigma: str | None = None,
    sigmas: Tensor | None = None,
) -> PeerResult:
    """x_T → x_0 with the diffusers scheduler `name`, driven as a pipeline drives it (see the module doc).

    model: a probflow ε-model `model(x, σ)`; noise: x_T in the model's variable, shape (B, *S), any float
    dtype (float64 for accuracy studies). model_sigma: "timestep" (σ of the pipeline's timestep t, via the
    float64 table, log-σ interpolated for fractional t) or "scheduler" (σ of the scheduler's grid at that
    call); default "scheduler" for Euler-type peers and for grids "karras_sigma" and "exponential_sigma",
    else "timestep". sigmas: run on this grid instead (decreasing, float, ending in σ = 0, `steps` + 1 points;
    peers of `custom_grid_peers` only; trap 6), with the model at the grid's σ; `grid` is then ignored.
    """
    spec = _spec(name)
    if sigmas is not None:
        if name not in custom_grid_peers():
            raise ValueError(f"sigmas: peer {name!r} takes no custom grid; those that do: {custom_grid_peers()}")
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if (sigmas.numel() != steps + 1 or float(sigmas[-1]) != 0.0 or not bool((sigmas[1:] < sigmas[:-1]).all())):
            raise ValueError(f"sigmas: expected {steps + 1} decreasing values ending in 0, got {sigmas.tolist()}")
        grid, model_sigma = "karras_sigma", "scheduler"
    if model_sigma is None:
        model_sigma = "scheduler" if (spec.variable == "xbar" or grid.endswith("_sigma")) else "timestep"
    if model_sigma not in ("timestep", "scheduler"):
        raise ValueError(f"model_sigma: expected 'timestep' or 'scheduler', got {model_sigma!r}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise: expected a floating-point batch (B, ...) of x_T")
    sched = make_scheduler(name, schedule, steps, grid)
    if sigmas is not None:
        if sched.sigmas.shape != sigmas.shape:
            raise RuntimeError(f"peer {name}: scheduler grid has {sched.sigmas.numel()} points, not {sigmas.numel()}")
        sched.sigmas = sigmas.clone()
    notes: list[str] = []
    if name == "ddim" and schedule.T % steps:
        notes.append(f"missteps: T = {schedule.T} is not a multiple of {steps}; DDIMScheduler steps to t − T//n, "
                     "not to the next trailing timestep (docs/MATH.md §6)")
    sig64 = sched.sigmas if hasattr(sched, "sigmas") else None
    x = noise
    if spec.variable == "xbar":  # trap 3: x̄_T = x_T·sqrt(1 + σ_max²), not σ_max·z
        x = noise * math.sqrt(1.0 + schedule.sigma_max**2)
    used: list[float] = []
    ts = [float(t) for t in sched.timesteps]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            if model_sigma == "timestep":
                tf = float(t)
                s = float(schedule.sigmas[int(tf)]) if tf.is_integer() else float(schedule.sigma(tf))
            else:
                k = sched.step_index if spec.variable == "xbar" else i
                s = float(sig64[k])
            used.append(s)
            eps = model(x_in, torch.tensor(s, dtype=x_in.dtype, device=x_in.device))
            x = sched.step(eps, t, x, return_dict=False)[0]
    x = x.to(noise.dtype)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"peer {name}: produced NaN or Inf")
    steps_sig = sig64.double() if sig64 is not None else torch.tensor([schedule.sigma(t) for t in ts] + [0.0])
    return PeerResult(x, len(used), steps_sig, used, ts, notes)
