"""`probflow encode`, `decode`, `interpolate`: images ↔ latents through `probflow.encode/decode/interpolate`.

Latent files (`probflow.io.latents`) carry their provenance; decode reads the method, grid and state from
the file unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from probflow.cli.common import (
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
from probflow.io.atomic import check_writable
from probflow.solvers import get_method


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (grayscale or RGB)")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background); "
                   "decode inverts back")
    add_solver_arguments(p, "reversible_heun", 50)


def run_encode(args: argparse.Namespace) -> int:
    """Images x_0 → latents x_T up the flipped grid of Eq. 12 (`probflow.encode`), with provenance."""
    import probflow
    from probflow.io.latents import save_latents

    check_solver_args(args)
    rt = apply_runtime(args)
    on_rank0(lambda: check_writable(args.out, args.force, "--out"), w=rt.world)
    model = load_image_model(args.model, args.device)
    x0 = load_inputs(args, model, args.images, "IMAGE")
    method = solver_method(args)
    sig = grid(args, model, method)
    sol = run_chunks(args, rt, model, probflow.encode, len(x0), lambda a, b: x0[a:b], sig, lambda a, b: method,
                     "encode")
    if rt.world.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=rt.world) or 0
    state = sol.state.tensors() if hasattr(sol.state, "tensors") else None
    extra = {"invert": json.dumps(bool(args.invert)), **({"precision": str(rt.precision)} if rt.precision else {})}
    on_rank0(lambda: save_latents(args.out, sol.x.cpu(), sig, model, method=args.method, nfe=sol.nfe, rtol=args.rtol,
                                  atol=args.atol, state=state, sources=[Path(p).name for p in args.images],
                                  data_range=getattr(model, "data_range", (-1.0, 1.0)), force=args.force,
                                  extra=extra), w=rt.world)
    print(f"wrote {args.out}: {len(args.images)} latent(s) of shape {tuple(sol.x.shape[1:])}, {args.method}, "
          f"NFE {sol.nfe}{', with its reversible state' if state else ''}")
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


def run_decode(args: argparse.Namespace) -> int:
    """Latents x_T → images x_0 down Eq. 12 (`probflow.decode`); the exact inverse of encode for a reversible
    method on its own grid and state."""
    import probflow
    from probflow.io.images import save_images
    from probflow.io.latents import check_compatible, load_latents
    from probflow.reversible import HeunState

    lf = load_latents(args.latents, "latents")
    meta = lf.meta
    same_method = args.method in (None, meta["method"])
    args.method = args.method or meta["method"]
    for k in ("rtol", "atol"):
        if getattr(args, k) is None:
            v = meta.get(k, "None")
            setattr(args, k, float(v) if v not in ("None", "") else 1e-6)
    check_solver_args(args)
    rt = apply_runtime(args)
    model = load_image_model(args.model, args.device)
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
    names = [Path(s).stem + ".png" for s in lf.sources] if len(lf.sources) == len(lf.latents) else None
    if names is not None and len(set(names)) != len(names):
        names = None
    folder = Path(args.out)
    on_rank0(lambda: _check_out_folder(args, folder, names, len(lf.latents)), w=rt.world)
    sol = run_chunks(args, rt, model, probflow.decode, len(lf.latents), lambda a, b: lf.latents[a:b], sig,
                     lambda a, b: method, "decode", state=state)
    lo, hi = json.loads(meta.get("data_range", "[-1, 1]"))
    if rt.world.rank != 0:  # the other ranks meet rank 0's write, then stop
        return on_rank0(lambda: None, w=rt.world) or 0
    x = (lo + hi) - sol.x if json.loads(meta.get("invert", "false")) else sol.x  # back to the inputs' polarity
    paths = on_rank0(lambda: save_images(x.cpu(), folder, args.force, names=names, data_range=(lo, hi)), w=rt.world)
    print(f"wrote {len(paths)} image(s) to {folder}/ ({args.method}, NFE {sol.nfe}"
          f"{', exact inverse' if state is not None else ''})")
    return 0


def _check_out_folder(args: argparse.Namespace, folder: Path, names: list[str] | None, n: int) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out: {folder} exists and is not a folder")
    targets = [folder / n for n in (names or [f"{i:04d}.png" for i in range(n)])]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not args.force:
        raise FileExistsError(f"--out: {', '.join(clash[:3])} exist(s); pass --force to overwrite")


def add_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first image (PNG/JPEG)")
    p.add_argument("b", metavar="B", help="second image (PNG/JPEG)")
    p.add_argument("--frames", type=int, default=8, help="frames from A to B, ends included (default 8)")
    p.add_argument("--kind", choices=["slerp", "lerp"], default="slerp", help="latent mixing (default slerp)")
    p.add_argument("--out", required=True, help="PNG strip to write")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background)")
    p.add_argument("--scale", type=int, default=None,
                   help="enlarge each frame by pixel repetition (default: to at least 32 px; 1 keeps pixels exact)")
    add_solver_arguments(p, "reversible_heun", 50, chunked=False)


def run_interpolate(args: argparse.Namespace) -> int:
    """Encode A and B (`probflow.encode`), mix their latents at `frames` weights and decode every frame
    (`probflow.interpolate`, with the encode's state: a reversible method reproduces A and B exactly)."""
    import probflow
    from probflow.io.images import save_grid

    check_solver_args(args)
    if args.frames < 2:
        raise ValueError(f"--frames: expected an integer >= 2, got {args.frames}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale: expected a positive integer, got {args.scale}")
    check_writable(args.out, args.force, "--out")
    rt = apply_runtime(args, spread=False)  # threads and precision (two images: not spread over ranks)
    model = load_image_model(args.model, args.device)
    x0 = torch.cat([load_inputs(args, model, [args.a], "A"), load_inputs(args, model, [args.b], "B")])
    if rt.precision is not None:
        model, x0 = rt.precision.cast_model(model), rt.precision.state_tensor(x0)
    method = solver_method(args)
    sig = grid(args, model, method)
    enc = solve(args, model, probflow.encode, x0, sig, method, "encode")

    def mix_and_decode(field, x, **kw):  # slerp/lerp per latent over all its pixels (B = 1)
        return probflow.interpolate(field, x[:1], x[1:], frames=args.frames, kind=args.kind, **kw)

    state = enc.state if method.backend == "probflow" else None
    sol = solve(args, model, mix_and_decode, enc.x, sig, method, "decode", state=state)
    frames = sol.x.reshape(args.frames, *x0.shape[1:])
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    frames = (lo + hi) - frames if args.invert else frames  # back to the inputs' polarity
    save_grid(frames.cpu(), args.out, nrow=args.frames, force=args.force, scale=args.scale, data_range=(lo, hi))
    print(f"wrote {args.out}: {args.frames} frames ({args.kind}), {args.method}, NFE {enc.nfe + sol.nfe}")
    return 0
