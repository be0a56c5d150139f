"""`probflow encode`, `decode`, `interpolate`: images ↔ latents through `probflow.encode/decode/interpolate`
and `probflow.inversion.encode_exact`.

Default: the latent is made exact for an ordinary decoder, euler (DDIM) with 20 steps on the
`quadratic_open` grid (quadratic in t, ending at the table's smallest σ, where inverting the last step is
well-conditioned), in the network's own dtype: one tensor, and `decode` with that decoder returns the images
to round-off. Any fixed-grid decoder can be named instead (`--method heun2`, `--method dpmpp_2m`, `dpmpp_3m`,
`unipc`, `unipc_3`): the latent is then exact for that decoder (matrix-free solves, forward calls of the
network only; multistep decoders by a trajectory-level solve). `--plain` gives the method's
ordinary explicit encode; a reversible method (reversible_heun) gives its pair latent, an adaptive one the
ODE's latent. Latent files (`probflow.io.latents`) carry their
provenance and environment; decode reads method, grid, dtype and state from the file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from probflow.cli.common import GRID_NAMES, add_solver_arguments
from probflow.cli.request import DecodeRequest, EncodeRequest, InterpolateRequest, Solver
from probflow.models import MODEL_NAMES

DEFAULT_METHOD, DEFAULT_STEPS, EXACT_GRID = "euler", 20, "quadratic_open"


def _add_encode_mode(p: argparse.ArgumentParser, chunked: bool = True) -> None:
    add_solver_arguments(p, DEFAULT_METHOD, DEFAULT_STEPS, chunked=chunked)
    p.add_argument("--plain", action="store_true", help="the method's ordinary explicit encode instead of the latent "
                   "made exact for it (not a round trip)")
    for a in p._actions:
        if a.dest == "grid":
            a.help = f"{a.help.split(';')[0]}; default {EXACT_GRID} for exact latents, else uniform"


def _encode_plan(req: EncodeRequest, model, x0: Tensor) -> dict:
    """What the encode's solve is, all command-line work before it: the grid (its name and σ's), the chunk's
    solve (`probflow.encode`, or `encode_exact` for an exact latent) and its precision. An exact latent is
    made in the network's own dtype for both model and state unless --precision says otherwise (exact to the
    network's own precision)."""
    import probflow
    from probflow.cli.common import grid_name, make_grid, precision_of
    from probflow.inversion import encode_exact

    s, mode = req.solver, req.mode
    default = EXACT_GRID if mode == "exact" else "uniform"
    plan = {"name": grid_name(s, default), "sigmas": make_grid(s, model, default)}
    if mode != "exact":
        return {**plan, "fn": probflow.encode, "what": "encode", "dtype": x0.dtype, "precision": None}
    md = getattr(model, "model_dtype", None)
    precision = precision_of(req.run, model, state=md if md is not None and md.is_floating_point else torch.float64)
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    # images come from 8-bit files: where a step map folds (guided models' last steps), the latent is exact to
    # those levels (verified: the decoded PNG has the input's bytes); a VAE's latents have no such levels
    quantum = None if getattr(model, "autoencoder", None) is not None else (hi - lo) / 255

    def exact(field, x, sigmas, method, rtol, atol, state=None):
        return encode_exact(field, x, sigmas, method, quantum=quantum)

    return {**plan, "fn": exact, "what": "encode (exact)", "dtype": x0.dtype, "precision": precision}


def _encode(req: EncodeRequest, model, x0: Tensor, plan: dict, w):
    """The latent of `x0` by the `plan` (`_encode_plan`), chunk by chunk over the ranks of `w` (None on ranks
    other than 0); an exact encode that cannot be made exact is refused with what to try."""
    from probflow.cli.common import solve_in_chunks
    from probflow.inversion import InversionError

    s = req.solver
    try:
        return solve_in_chunks(req.run, s, model, plan["fn"], len(x0), x0, plan["sigmas"], s.method, plan["what"],
                               w=w, precision=plan["precision"], dtype=plan["dtype"])
    except InversionError:
        raise  # its own message names σ, the residual and what to try
    except ValueError as e:
        if req.mode != "exact":
            raise
        msg = str(e).removeprefix("method: ")
        raise ValueError(f"--method: {msg}; pass --plain for the ordinary encode") from None


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (grayscale or RGB)")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background); "
                   "decode inverts back")
    _add_encode_mode(p)


def run_encode(args: argparse.Namespace) -> int:
    """Images x_0 → latents x_T: by default exact for the decoder (`encode_exact`), else `probflow.encode`;
    written with provenance and environment."""
    from probflow.cli.common import condition_text, load_inputs, nfe_text, open_model
    from probflow.cli.request import encode_request
    from probflow.io.latents import save_latents
    from probflow.ranks import on_rank0

    req = encode_request(args)  # read and checked once; `args` is not used after this line
    job = open_model(req.run, req.out)
    model, device, w = job.model, job.device, job.w
    x0 = load_inputs(req.run, model, list(req.images), "IMAGE", req.invert, device)
    z0, vae = _through_vae(model, x0, req.run.chunk)
    plan = _encode_plan(req, model, z0)
    sol, sig, name = _encode(req, model, z0, plan, w), plan["sigmas"], plan["name"]
    if w.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=w) or 0
    s, mode = req.solver, req.mode
    state = sol.state.tensors() if hasattr(sol.state, "tensors") else None
    p = req.run.precision
    extra = {"invert": json.dumps(bool(req.invert)), **({"precision": str(p)} if p else {})}
    if getattr(model, "autoencoder", None) is not None:  # decode must go back through the VAE
        extra["autoencoder"] = "vae"
    coarse = mode == "exact" and (sol.info or {}).get("exact") == "quantum"
    if coarse:  # what decode may promise: the image's 8-bit levels, not round-off
        extra["exact_to"] = "8-bit levels"
    on_rank0(lambda: save_latents(req.out, sol.x.cpu(), sig, model, method=s.name, nfe=sol.nfe, rtol=s.rtol,
                                  atol=s.atol, state=state, sources=[Path(i).name for i in req.images],
                                  grid=name if name in GRID_NAMES else "",
                                  exact_for=s.name if mode == "exact" else "", device=device,
                                  data_range=getattr(model, "data_range", (-1.0, 1.0)), force=req.run.force,
                                  extra=extra), w=w)
    bound = (sol.info or {}).get("roundtrip_max_abs")
    what = {"exact": f"exact for the {s.name} decoder (verified"
                     + (f" round trip |Δx| ≤ {bound:.1e}" if bound is not None else "")
                     + ("; to the images' 8-bit levels, not to round-off: a step map that folds, or the "
                        "decoder's chain, stops above it)" if coarse
                        else ")"),
            "pair": "with its reversible state (exact on this environment only)",
            "plain": "ordinary encode, not an exact round trip"}[mode]
    print(f"wrote {req.out}: {len(req.images)} latent(s) of shape {tuple(sol.x.shape[1:])}, {s.name} on the "
          f"{name} grid ({len(sig) - 1} steps), {nfe_text(sol)}, {what}{condition_text(model)}{vae}")
    return 0


def _through_vae(model, x0: Tensor, chunk: int) -> tuple[Tensor, str]:
    """The ODE's x_0 for images `x0`: themselves, or for latent diffusion the VAE encoder's mean × scaling
    factor, with the VAE's own reconstruction error said (its decoder does not invert its encoder)."""
    from probflow.cli.common import VAE_NOTE, say, to_image, to_latent

    if getattr(model, "autoencoder", None) is None:
        return x0, ""
    z0 = to_latent(model, x0, chunk)
    err = float((to_image(model, z0, chunk).to(x0.dtype) - x0).abs().max())
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    say(f"note: {VAE_NOTE}; here the VAE alone reconstructs the images to within {err:.3g} "
        f"({err / (hi - lo) * 255:.3g} grey levels of 255)")
    return z0, f"; VAE latents (the VAE's reconstruction is not exact: |Δx| ≤ {err:.3g})"


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latent file written by `probflow encode`")
    p.add_argument("--out", required=True, help="folder for the decoded PNGs (one per latent)")
    add_solver_arguments(p, None, None)
    p.add_argument("--any-condition", action="store_true",
                   help="decode latents made under another condition or guidance weight than the one given (an "
                        "ordinary decode then: NOT exact); default: refuse them. Without --class/--prompt/"
                        "--guidance, a class-conditional model takes the class and w the file records")
    p.set_defaults(rtol=None, atol=None)
    for a in p._actions:
        if a.dest in ("method", "steps", "rtol", "atol", "grid"):
            a.help = f"{a.help.split(';')[0]}; default: as the latents were encoded"
        if a.dest == "model":  # None: the built-in model the file records (digits32 latents need no --model)
            a.default, a.help = None, ("the model: a built-in name, a digits checkpoint folder or a local diffusers "
                                       "folder; default: the built-in model the latents record, else 'digits'")


def _decode_grid(given: Solver, s: Solver, lf, model):
    """The grid to decode on: the file's own unless --steps/--grid (or an adaptive method) ask otherwise."""
    from probflow.cli.common import make_grid
    from probflow.solvers import get_method

    if given.steps is not None or given.grid is not None or s.method.adaptive:
        return make_grid(s, model)
    if given.method not in (None, get_method(lf.meta["method"])) and get_method(lf.meta["method"]).adaptive:
        raise ValueError(f"--steps: the latents were encoded with the adaptive {lf.meta['method']}; give the number of "
                         f"steps for {s.name}")
    return lf.sigmas


def _exactness(lf, s: Solver, model, sig, state, device: str) -> str:
    """What the decode can promise (`probflow.io.latents.decode_exactness`), its notes and warnings said."""
    from probflow.cli.common import say
    from probflow.io.latents import decode_exactness

    rec = getattr(model, "condition", None) or {}
    claim, notes = decode_exactness(lf, s.method, sig, state_used=state is not None, device=device, model=model,
                                    condition_sha256=rec.get("condition_sha256"),
                                    guidance=float(rec["guidance"]) if rec else None,
                                    negative_sha256=rec.get("negative_sha256", "") if rec else None)
    for note in notes:
        say(note)
    return claim


def run_decode(args: argparse.Namespace) -> int:
    from probflow.cli.request import decode_request

    req = decode_request(args)  # read and checked once; `args` is not used after this line
    return decode(req)


def _decode_state(req: DecodeRequest, s: Solver, lf, sig):
    """A reversible decode's partner state from the file, when the method and grid are the file's own."""
    from probflow.cli.common import say
    from probflow.reversible import HeunState

    same = s.name == lf.meta["method"] and sig is lf.sigmas
    if s.method.reversible and same:
        if not lf.state:
            raise ValueError(f"latents: {req.latents} was made with the reversible {s.name} but holds no partner "
                             "state; it cannot be inverted exactly (pass another --method to solve the ODE from "
                             "the latents)")
        return HeunState.from_tensors(lf.state)
    if s.method.reversible:
        say(f"note: {s.name} without the encode's own state and grid is an ordinary solve, not an exact inverse")
    return None


def _file_condition(req: DecodeRequest, meta: dict[str, str]):
    """The condition to decode under: the one given, else the class, negative class and w the file records
    (a class-conditional encode; a text condition is recorded by its hash only, so it must be given)."""
    from probflow.cli.common import say
    from probflow.cli.request import Condition

    if req.run.condition.given or "condition_sha256" not in meta:
        return req.run.condition
    c = Condition(class_label=meta.get("class_label"), negative=meta.get("negative_class_label"),
                  guidance=float(meta["guidance"]) if "guidance" in meta else None)
    if c.class_label is not None:
        say(f"note: decoding under the file's condition: class {c.class_label}, w = {c.guidance:g}")
    return c


def decode(req: DecodeRequest) -> int:
    """Latents x_T → images x_0 down Eq. 12 (`probflow.decode`) with the method, grid, dtype and state the
    file records; "exact" is printed only when the file's exactness conditions hold here."""
    import probflow
    from probflow.cli.common import VAE_NOTE, decoded, nfe_text, open_model, say, solve_in_chunks
    from probflow.cli.request import with_file_defaults
    from probflow.files.images import save_images
    from probflow.io.latents import check_compatible, load_latents
    from probflow.ranks import on_rank0

    lf = load_latents(req.latents, "latents")  # every field validated, naming the field
    if req.run.model is None:  # the file's model where it is a built-in one (a folder must be named again)
        recorded = lf.meta.get("model")
        req = replace(req, run=replace(req.run, model=recorded if recorded in MODEL_NAMES else "digits"))
    s = with_file_defaults(req.solver, lf.meta, len(lf.sigmas) - 1)
    names = [Path(n).stem + ".png" for n in lf.sources] if len(lf.sources) == len(lf.latents) else None
    if names is not None and len(set(names)) != len(names):
        names = None
    job = open_model(req.run, req.out, folder=True, condition=_file_condition(req, lf.meta))  # --out before work
    model, device, w = job.model, job.device, job.w
    for msg in check_compatible(lf, model, req.run.force, "latents", any_condition=req.any_condition):
        say(f"warning: decoding latents made with {msg} ({'--any-condition' if 'condition' in msg else '--force'})")
    if tuple(lf.latents.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(f"latents: shape {tuple(lf.latents.shape[1:])} does not fit the model's input "
                         f"{tuple(model.sample_shape)}")
    sig = _decode_grid(req.solver, s, lf, model)
    state = _decode_state(req, s, lf, sig)
    claim = _exactness(lf, s, model, sig, state, device) if w.rank == 0 else ""
    fn = decoded(probflow.decode, model)
    sol = solve_in_chunks(req.run, s, model, fn, len(lf.latents), lambda a, b: lf.latents[a:b].to(device), sig,
                          s.method, "decode", w=w, state=state, dtype=lf.latents.dtype)
    lo, hi = json.loads(lf.meta["data_range"])
    if w.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=w) or 0
    x = sol.x  # images: through the VAE decoder chunk by chunk for latent diffusion (`decoded`)
    if getattr(model, "autoencoder", None) is not None:
        say(f"note: {VAE_NOTE}")
        claim += " of the VAE latents; the VAE decoder is not exact" if claim else "; the VAE decoder is not exact"
    x = (lo + hi) - x if json.loads(lf.meta.get("invert", "false")) else x  # back to the inputs' polarity
    paths = on_rank0(lambda: save_images(x.cpu(), req.out, req.run.force, names=names, data_range=(lo, hi)), w=w)
    print(f"wrote {len(paths)} image(s) to {req.out}/ ({s.name}, {nfe_text(sol)}{claim})")
    return 0


def add_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first image (PNG/JPEG)")
    p.add_argument("b", metavar="B", help="second image (PNG/JPEG)")
    p.add_argument("--frames", type=int, default=8, help="frames from A to B, ends included (default 8)")
    p.add_argument("--kind", choices=["slerp", "lerp"], default="slerp", help="latent mixing (default slerp)")
    p.add_argument("--out", required=True, help="PNG strip to write")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background)")
    p.add_argument("--scale", type=int, default=None,
                   help="enlarge each frame by pixel repetition (default: to at least 32 px; 1 keeps pixels exact)")
    _add_encode_mode(p, chunked=False)


def run_interpolate(args: argparse.Namespace) -> int:
    from probflow.cli.request import interpolate_request

    req = interpolate_request(args)  # read and checked once; `args` is not used after this line
    return interpolate(req)


def interpolate(req: InterpolateRequest) -> int:
    """Encode A and B (by default exact for the decoder), mix their latents at `frames` weights and decode
    every frame with `probflow.interpolate`: the end frames are A and B to round-off, the inner frames ordinary
    decodes of the mixed latents. Two images: one process, one chunk."""
    import probflow
    from probflow.cli.common import (
        check_sizes,
        condition_text,
        image_shape,
        load_inputs,
        nfe_text,
        open_model,
        solve_in_chunks,
        to_image,
    )
    from probflow.files.images import save_grid

    job = open_model(req.run, req.out, spread=False)
    model, w = job.model, job.w
    check_sizes("--frames", req.frames, image_shape(model), req.scale, req.run.limits, nrow=req.frames)
    x0 = torch.cat([load_inputs(req.run, model, [req.a], "A", req.invert, req.run.device),
                    load_inputs(req.run, model, [req.b], "B", req.invert, req.run.device)])
    z0, vae = _through_vae(model, x0, req.run.chunk)
    plan = _encode_plan(req.encode, model, z0)
    enc, sig, name = _encode(req.encode, model, z0, plan, w), plan["sigmas"], plan["name"]

    def mix_and_decode(field, x, sigmas, method, state=None, **kw):  # slerp/lerp per latent over all its pixels
        return probflow.interpolate(field, x[:1], x[1:], sigmas, method, frames=req.frames, kind=req.kind,
                                    state=state, **kw)

    mode = req.encode.mode
    sol = solve_in_chunks(req.run, req.solver, model, mix_and_decode, 2, enc.x, sig, req.solver.method, "decode",
                          w=w, state=enc.state if mode == "pair" else None, dtype=enc.x.dtype)
    frames = to_image(model, sol.x.reshape(req.frames, *z0.shape[1:]), req.run.chunk)
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    frames = (lo + hi) - frames if req.invert else frames  # back to the inputs' polarity
    save_grid(frames.cpu().double(), req.out, nrow=req.frames, force=req.run.force, scale=req.scale,
              data_range=(lo, hi))
    print(f"wrote {req.out}: {req.frames} frames ({req.kind}), {req.solver.name} on the {name} grid, "
          f"{'exact' if mode == 'exact' else mode} latents, {nfe_text(enc)} to encode + {nfe_text(sol)} to decode"
          f"{condition_text(model)}{vae}")
    return 0
