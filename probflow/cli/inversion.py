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
from pathlib import Path

import torch
from torch import Tensor

from probflow.cli.common import (
    GRID_NAMES,
    add_solver_arguments,
    apply_runtime,
    check_solver_args,
    grid,
    load_image_model,
    load_inputs,
    run_chunks,
    say,
    solve,
    solver_method,
)
from probflow.distributed import on_rank0
from probflow.io.atomic import check_writable, check_writable_folder
from probflow.solvers import Method, get_method

DEFAULT_METHOD, DEFAULT_STEPS, EXACT_GRID = "euler", 20, "quadratic_open"


def _add_encode_mode(p: argparse.ArgumentParser, chunked: bool = True) -> None:
    add_solver_arguments(p, DEFAULT_METHOD, DEFAULT_STEPS, chunked=chunked)
    p.add_argument("--plain", action="store_true", help="the method's ordinary explicit encode instead of the latent "
                   "made exact for it (not a round trip)")
    for a in p._actions:
        if a.dest == "grid":
            a.help = f"{a.help.split(';')[0]}; default {EXACT_GRID} for exact latents, else uniform"


def _mode(args: argparse.Namespace, method: Method) -> str:
    """'exact' (encode_exact for the method), 'pair' (reversible), 'plain' (explicit or adaptive encode)."""
    if method.reversible:
        return "pair"
    if method.adaptive or args.plain or getattr(args, "eta", None) is not None:
        return "plain"
    return "exact"


def _encode(args: argparse.Namespace, model, x0: Tensor, method: Method, rt=None):
    """(Solution, grid, grid name, mode): the latent of `x0` for the arguments' method and mode, chunk by chunk
    over torchrun's ranks when `rt` is given (None on ranks other than 0)."""
    import probflow
    from probflow.inversion import InversionError, encode_exact

    mode = _mode(args, method)
    if args.grid is None and mode == "exact":
        args.grid = EXACT_GRID
    name = args.grid or ("sigma_uniform" if method.uniform_steps else "uniform")
    sig = grid(args, model, method)
    def run(fn, x, what):
        if rt is None:
            return solve(args, model, fn, x, sig, method, what)
        return run_chunks(args, rt, model, fn, len(x), lambda a, b: x[a:b], sig, lambda a, b: method, what)

    if mode != "exact":
        return run(probflow.encode, x0, "encode"), sig, name, mode
    md = getattr(model, "model_dtype", None)
    x0 = x0.to(md) if md is not None and md.is_floating_point else x0  # exact to the network's own precision

    def exact(field, x, sigmas, method, rtol, atol, state=None):
        return encode_exact(field, x, sigmas, method)

    try:
        sol = run(exact, x0, "encode (exact)")
    except InversionError:
        raise  # its own message names σ, the residual and what to try
    except ValueError as e:
        msg = str(e).removeprefix("method: ")
        raise ValueError(f"--method: {msg}; pass --plain for the ordinary encode") from None
    return sol, sig, name, mode


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (grayscale or RGB)")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background); "
                   "decode inverts back")
    _add_encode_mode(p)


def run_encode(args: argparse.Namespace) -> int:
    """Images x_0 → latents x_T: by default exact for the decoder (`encode_exact`), else `probflow.encode`;
    written with provenance and environment."""
    from probflow.io.latents import save_latents

    check_solver_args(args)
    rt = apply_runtime(args)
    on_rank0(lambda: check_writable(args.out, args.force, "--out"), w=rt.world)
    model = load_image_model(args.model, args.device, limits=not args.no_limits)
    x0 = load_inputs(args, model, args.images, "IMAGE")
    method = solver_method(args)
    sol, sig, name, mode = _encode(args, model, x0, method, rt)
    if rt.world.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=rt.world) or 0
    state = sol.state.tensors() if hasattr(sol.state, "tensors") else None
    extra = {"invert": json.dumps(bool(args.invert)), **({"precision": str(rt.precision)} if rt.precision else {})}
    on_rank0(lambda: save_latents(args.out, sol.x.cpu(), sig, model, method=method.name, nfe=sol.nfe, rtol=args.rtol,
                                  atol=args.atol, state=state, sources=[Path(p).name for p in args.images],
                                  grid=name if name in GRID_NAMES else "",
                                  exact_for=method.name if mode == "exact" else "", device=args.device,
                                  data_range=getattr(model, "data_range", (-1.0, 1.0)), force=args.force,
                                  extra=extra), w=rt.world)
    what = {"exact": f"exact for the {method.name} decoder (verified round trip |Δx| ≤ "
                     f"{sol.info['roundtrip_max_abs']:.1e})" if sol.info else f"exact for the {method.name} decoder "
                     "(verified)",
            "pair": "with its reversible state (exact on this environment only)",
            "plain": "ordinary encode, not an exact round trip"}[mode]
    print(f"wrote {args.out}: {len(args.images)} latent(s) of shape {tuple(sol.x.shape[1:])}, {method.name} on the "
          f"{name} grid ({len(sig) - 1} steps), NFE {sol.nfe}, {what}")
    return 0


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latent file written by `probflow encode`")
    p.add_argument("--out", required=True, help="folder for the decoded PNGs (one per latent)")
    add_solver_arguments(p, None, None)
    p.set_defaults(rtol=None, atol=None)
    for a in p._actions:
        if a.dest in ("method", "steps", "rtol", "atol", "grid"):
            a.help = f"{a.help.split(';')[0]}; default: as the latents were encoded"


def _decode_grid(args: argparse.Namespace, lf, model, same_method: bool):
    """The grid to decode on: the file's own unless --steps/--grid (or an adaptive method) ask otherwise."""
    meta = lf.meta
    method = get_method(args.method)
    if args.steps is not None or args.grid is not None or method.adaptive:
        if args.steps is None and not method.adaptive:
            args.steps = len(lf.sigmas) - 1
        return grid(args, model, method)
    if not same_method and get_method(meta["method"]).adaptive:
        raise ValueError(f"--steps: the latents were encoded with the adaptive {meta['method']}; give the number of "
                         f"steps for {args.method}")
    return lf.sigmas


def _exactness(args: argparse.Namespace, lf, model, method: Method, sig, state) -> str:
    """What the decode can promise, with loud warnings where the file's environment differs."""
    from probflow.io.latents import environment_differences

    same = args.method == lf.meta["method"] and sig is lf.sigmas
    exact_for = lf.meta.get("exact_for", "")
    if not ((state is not None) or (exact_for and same and exact_for == args.method)):
        return ""
    diff = environment_differences(lf, args.device, model)
    if state is None and not diff:
        return ", exact inverse (round-off)"
    if state is None:
        say(f"note: decoding on another environment than the encode ({'; '.join(diff)}): {exact_for} is an ordinary "
            "stable decoder, so expect agreement to about the network's precision, not bit for bit")
        return ", ordinary decode of an exact latent (environment differs)"
    if diff:
        say(f"WARNING: NOT EXACT: this reversible latent was made on another environment ({'; '.join(diff)}); "
            "reversible_heun's retrace amplifies any change in ε (a relative 1e-7 moves pixels by whole grey "
            "levels), so the images can differ from the encoded ones. Re-encode here, or use an exact latent "
            "(`probflow encode` without --method reversible_heun)")
        return ", reversible retrace on another environment: NOT exact"
    return ", exact inverse (reversible pair, same environment)"


def run_decode(args: argparse.Namespace) -> int:
    """Latents x_T → images x_0 down Eq. 12 (`probflow.decode`) with the method, grid, dtype and state the
    file records; "exact" is printed only when the file's exactness conditions hold here."""
    import probflow
    from probflow.io.images import save_images
    from probflow.io.latents import check_compatible, load_latents
    from probflow.reversible import HeunState

    lf = load_latents(args.latents, "latents")  # every field validated, naming the field
    meta = lf.meta
    same_method = args.method in (None, meta["method"])
    args.method = args.method or meta["method"]
    for k in ("rtol", "atol"):
        if getattr(args, k) is None:  # from the file (validated there), not a flag the user passed
            setattr(args, k, float(meta[k]) if meta[k] not in ("None", "") else 1e-6)
    check_solver_args(args)
    rt = apply_runtime(args)
    names = [Path(s).stem + ".png" for s in lf.sources] if len(lf.sources) == len(lf.latents) else None
    if names is not None and len(set(names)) != len(names):
        names = None
    folder = Path(args.out)
    on_rank0(lambda: check_writable_folder(folder, args.force, "--out"), w=rt.world)  # before any work
    model = load_image_model(args.model, args.device, limits=not args.no_limits)
    for msg in check_compatible(lf, model, args.force, "latents"):
        say(f"warning: decoding latents made with {msg} (--force)")
    if tuple(lf.latents.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(f"latents: shape {tuple(lf.latents.shape[1:])} does not fit the model's input "
                         f"{tuple(model.sample_shape)}")
    sig = _decode_grid(args, lf, model, same_method)
    state = None
    method = get_method(args.method)
    if method.reversible and same_method and sig is lf.sigmas:
        if not lf.state:
            raise ValueError(f"latents: {args.latents} was made with the reversible {meta['method']} but holds no "
                             "partner state; it cannot be inverted exactly (pass another --method to solve "
                             "the ODE from the latents)")
        state = HeunState.from_tensors(lf.state)
    elif method.reversible:
        say(f"note: {args.method} without the encode's own state and grid is an ordinary solve, not an exact inverse")
    claim = _exactness(args, lf, model, method, sig, state) if rt.world.rank == 0 else ""
    sol = run_chunks(args, rt, model, probflow.decode, len(lf.latents), lambda a, b: lf.latents[a:b], sig,
                     lambda a, b: method, "decode", state=state)
    lo, hi = json.loads(meta["data_range"])
    if rt.world.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=rt.world) or 0
    x = (lo + hi) - sol.x if json.loads(meta.get("invert", "false")) else sol.x  # back to the inputs' polarity
    paths = on_rank0(lambda: save_images(x.cpu(), folder, args.force, names=names, data_range=(lo, hi)), w=rt.world)
    print(f"wrote {len(paths)} image(s) to {folder}/ ({args.method}, NFE {sol.nfe}{claim})")
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
    """Encode A and B (by default exact for the decoder), mix their latents at `frames` weights and decode
    every frame with `probflow.interpolate`: the end frames are A and B to round-off, the inner frames ordinary
    decodes of the mixed latents (a reversible method passes its state for the ends; its stateless inner
    frames are refused where it is unstable)."""
    import probflow
    from probflow.io.images import save_grid

    check_solver_args(args)
    if args.frames < 2:
        raise ValueError(f"--frames: expected an integer >= 2, got {args.frames}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale: expected a positive integer, got {args.scale}")
    check_writable(args.out, args.force, "--out")
    rt = apply_runtime(args, spread=False)  # threads and precision (two images: not spread over ranks)
    model = load_image_model(args.model, args.device, limits=not args.no_limits)
    x0 = torch.cat([load_inputs(args, model, [args.a], "A"), load_inputs(args, model, [args.b], "B")])
    if rt.precision is not None:
        model, x0 = rt.precision.cast_model(model), rt.precision.state_tensor(x0)
    method = solver_method(args)
    enc, sig, name, mode = _encode(args, model, x0, method)

    def mix_and_decode(field, x, **kw):  # slerp/lerp per latent over all its pixels (B = 1)
        return probflow.interpolate(field, x[:1], x[1:], frames=args.frames, kind=args.kind, **kw)

    state = enc.state if mode == "pair" else None
    sol = solve(args, model, mix_and_decode, enc.x, sig, method, "decode", state=state)
    frames = sol.x.reshape(args.frames, *x0.shape[1:])
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    frames = (lo + hi) - frames if args.invert else frames  # back to the inputs' polarity
    save_grid(frames.cpu().double(), args.out, nrow=args.frames, force=args.force, scale=args.scale,
              data_range=(lo, hi))
    print(f"wrote {args.out}: {args.frames} frames ({args.kind}), {method.name} on the {name} grid, "
          f"{'exact' if mode == 'exact' else mode} latents, NFE {enc.nfe + sol.nfe}")
    return 0
