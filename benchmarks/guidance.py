"""Classifier-free guidance: equivalence with diffusers' pipeline loop, sampling overhead, and exact inversion
under CFG against plain DDIM inversion.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance.py [--model digits32|FOLDER] [--n 20]
        [--steps 20] [--repeats 5] [--part all|inversion] [--force]

1. Equivalence: probflow's DDIM (Euler on the trailing grid, `probflow.sample`) of the guided model vs diffusers'
   own loop (DDIMScheduler, trailing spacing, set_alpha_to_one, no clipping; the unet on [x; x] with
   [negative; positive] conditions; u + w (c − u); scheduler.step) on the same noise, float32 state, max abs
   difference. On the trained model at w = 1, 3, 7.5 and on tiny random folders of each kind (class
   UNet2DModel with ε- and v-prediction, class UNet2DConditionModel, text UNet2DConditionModel with prompt
   embeddings, latent diffusion with an AutoencoderKL); the random ε-prediction folder's samples keep about the
   size σ_max·x_T (an untrained network does not predict ε ≈ x at σ_max, and a float32 ulp at 500 is 3e-5), so
   every difference is also given relative to the samples' size.
2. Overhead: wall time of both loops at equal NFE (the same steps, one thread), alternated `--repeats` times;
   the ratio of the medians, measured in this one run.
3. Inversion under CFG (trained model, w = 1, 3, 7.5): the first n held-out test images as 8-bit PNG pixels
   (what `probflow encode` reads; each conditioned on its own label), float32 state, euler with `--steps` steps
   on two grids: quadratic_open (`probflow encode`'s default, ending at the table's smallest σ) and the DDIM
   trailing grid ending at the table's σ_0 (diffusers' DDIM with set_alpha_to_one=False; the step into σ = 0
   would invert the denoiser itself, probflow.inversion).
   Exact: `probflow.inversion.encode_exact` with quantum = 2/255 as `probflow encode` calls it (matrix-free:
   forward calls only, torch's scaled-dot-product attention as loaded): exact to round-off, or where a step map
   folds (the guided last step) a step accepted below a quarter of an 8-bit level and the round trip verified
   below it ("to 8-bit levels"); plain DDIM inversion: Euler up the flipped grid (`probflow.encode`). Each latent is
   decoded with the same condition and w; reported per image: ok or the InversionError, max abs distance from
   the input (in [−1, 1]), whether the decoded image is byte-identical to the input as 8-bit PNG pixels, and the
   encode's model calls ÷ the decoder's. `--part inversion` reruns only this table and the latent-diffusion
   check (4.) and splices them into the existing guidance.json / GUIDANCE.md, naming both commands.
4. Latent diffusion (tiny random AutoencoderKL + text UNet2DConditionModel, w = 3): the ODE part of the round
   trip (encode_exact of the VAE latent) apart from the VAE's own reconstruction error.

Writes benchmarks/GUIDANCE.md and benchmarks/guidance.json (refuses to replace them without --force).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import probflow  # noqa: E402
from probflow import grids  # noqa: E402
from probflow.inversion import InversionError, encode_exact  # noqa: E402
from probflow.io.atomic import atomic_write, check_writable  # noqa: E402
from probflow.models import DIGITS32, load  # noqa: E402
from probflow.models.conditional import with_guidance  # noqa: E402

HERE = Path(__file__).resolve().parent
WS = (1.0, 3.0, 7.5)


def diffusers_loop(unet_call, scheduler_config: dict, x_T, steps, w, cond, unc, final_alpha_one=True):
    import diffusers

    sched = diffusers.DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing",
                                                set_alpha_to_one=final_alpha_one, clip_sample=False)
    sched.set_timesteps(steps)
    x = x_T.float()
    n = len(x)
    both = {k: torch.cat([unc[k].expand(n, *unc[k].shape[1:]), cond[k].expand(n, *cond[k].shape[1:])]) for k in cond}
    with torch.no_grad():
        for t in sched.timesteps:
            if w == 1.0:  # diffusers' pipelines skip the unconditional half when guidance is off
                out = unet_call(x, t, **{k: v[n:] for k, v in both.items()})
            else:
                u, c = unet_call(torch.cat([x, x]), t, **both).chunk(2)
                out = u + w * (c - u)
            x = sched.step(out, t, x, eta=0.0).prev_sample
    return x


def _conds(model):
    net = model.net
    return ({k: getattr(net, f"cond_{k}") for k in net.keys}, {k: getattr(net, f"uncond_{k}") for k in net.keys})


def _call(model):
    unet = model.net.unet
    inner = getattr(unet, "unet", unet)  # _NoText wraps a UNet2DConditionModel without cross-attention
    if inner is not unet:
        return lambda x, t, **k: inner(x, t, None, **k).sample
    return lambda x, t, **k: unet(x, t, **k).sample


def equivalence(model, folder: Path, steps: int, w: float, n: int = 4, seed: int = 0) -> dict:
    m = with_guidance(model, w)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cond, unc = _conds(m)
    x_T = probflow.noise(n, tuple(model.sample_shape), seed).float()
    ref = diffusers_loop(_call(m), cfg, x_T, steps, w, cond, unc)
    ours = probflow.sample(m, x_T, grids.ddim(model.schedule, steps), "euler").x
    d = (ours - ref).abs().max().item()
    return {"w": w, "steps": steps, "n": n, "max_abs": d, "sample_max_abs": ref.abs().max().item(),
            "relative": d / max(1.0, ref.abs().max().item())}


def overhead(model, folder: Path, steps: int, w: float, n: int, repeats: int) -> dict:
    m = with_guidance(model, w)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cond, unc = _conds(m)
    x_T = probflow.noise(n, tuple(model.sample_shape), 1).float()
    sig = grids.ddim(model.schedule, steps)
    tp, td = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probflow.sample(m, x_T, sig, "euler")
        tp.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        diffusers_loop(_call(m), cfg, x_T, steps, w, cond, unc)
        td.append(time.perf_counter() - t0)
    return {"w": w, "steps": steps, "batch": n, "repeats": repeats, "probflow_s": statistics.median(tp),
            "diffusers_s": statistics.median(td), "ratio": statistics.median(tp) / statistics.median(td)}


def _grid(model, name: str, steps: int):
    """(σ grid, label): `probflow encode`'s default (quadratic_open) or diffusers' DDIM trailing grid ending at the
    table's σ_0 (set_alpha_to_one=False)."""
    if name == "ddim":
        g = torch.cat([grids.ddim(model.schedule, steps, final_zero=False), model.schedule.sigmas[:1]])
        return g, f"ddim trailing {steps} → σ_0 = {float(g[-1]):.4g}"
    g = grids.named(name, model.schedule, steps)
    return g, f"{name} {steps} (probflow encode's default) → σ = {float(g[-1]):.4g}"


def _exact_case(m, x, grid) -> dict:
    """encode_exact of one image, decoded with the same condition and w: ok/failed, round trip, PNG, calls."""
    t0 = time.time()
    try:
        sol = encode_exact(m, x, grid, quantum=2 / 255)
    except InversionError as e:
        return {"ok": False, "error": str(e), "wall_s": round(time.time() - t0, 1)}
    back = probflow.decode(m, sol.x, grid).x
    n = len(grid) - 1
    return {"ok": True, "max_abs": (back - x).abs().max().item(), "exact": sol.info["exact"],
            "png_identical": bool(torch.equal(_png(back), _png(x))),
            "calls_over_decoder": (sol.info["nfe_solve"] + sol.info["nfe_verify"]) / n,
            "last_step_calls": sol.info["iterations"][-1], "wall_s": round(time.time() - t0, 1)}


def inversion(model, n: int, steps: int, grid_names=("quadratic_open", "ddim")) -> list[dict]:
    """Per grid and w: exact vs plain DDIM inversion on the first n held-out test images (one row per image too)."""
    from probflow.digits.data32 import load_split32
    from probflow.io.images import from_uint8, to_uint8

    split = load_split32()
    x0s, ys = from_uint8(to_uint8(split["x_test"][:n]), dtype=torch.float32), split["y_test"][:n]  # PNG pixels
    rows = []
    for gname in grid_names:
        grid, label = _grid(model, gname, steps)
        for w in WS:
            row = {"w": w, "steps": steps, "n": n, "grid": label, "images": []}
            for k, (x0, y) in enumerate(zip(x0s, ys)):
                m = with_guidance(model, w, {"class_labels": torch.tensor([int(y)])})
                x = x0[None]
                ex = _exact_case(m, x, grid)
                pl = probflow.decode(m, probflow.encode(m, x, grid).x, grid).x
                row["images"].append({"index": k, "label": int(y), **ex, "ddim_max_abs": (pl - x).abs().max().item(),
                                      "ddim_png_identical": bool(torch.equal(_png(pl), _png(x)))})
            ims = row["images"]
            oks = [i for i in ims if i["ok"]]
            row.update({"exact_max_abs": max(i["max_abs"] for i in oks) if oks else None,
                        "exact_png_identical": sum(i["png_identical"] for i in oks),
                        "exact_roundoff": sum(i["exact"] == "round-off" for i in oks),
                        "exact_failed": len(ims) - len(oks),
                        "exact_calls_median": statistics.median(i["calls_over_decoder"] for i in oks) if oks else None,
                        "ddim_inversion_max_abs": max(i["ddim_max_abs"] for i in ims),
                        "ddim_inversion_median_abs": statistics.median(i["ddim_max_abs"] for i in ims),
                        "ddim_inversion_png_identical": sum(i["ddim_png_identical"] for i in ims)})
            print(json.dumps({k: v for k, v in row.items() if k != "images"}), flush=True)
            rows.append(row)
    return rows


def _png(x):
    from probflow.io.images import to_uint8

    return torch.from_numpy(to_uint8(x.double()).copy())


def tiny_folders(root: Path) -> dict:
    """Tiny random folders of each kind, as the tests build them; returns {kind: load kwargs}."""
    import diffusers
    from safetensors.torch import save_file

    def sched(folder, **kw):
        diffusers.DDIMScheduler(clip_sample=False, **kw).save_pretrained(folder / "scheduler")

    common = dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                  attention_head_dim=4)
    out = {}
    torch.manual_seed(0)
    for pred in ("epsilon", "v_prediction"):  # random ε-prediction weights leave samples of size ~500: both kinds
        f = root / f"class_unet2d_{pred}"
        torch.manual_seed(0)
        diffusers.UNet2DModel(in_channels=2, out_channels=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4,
                              **common).save_pretrained(f / "unet")
        sched(f, prediction_type=pred)
        (f / "card.json").write_text(json.dumps({"null_class": 3}))
        out[f"class UNet2DModel ({pred}, linear)"] = (f, {"class_label": 1})
    f = root / "class_unet2dcond"
    diffusers.UNet2DConditionModel(in_channels=2, out_channels=2, down_block_types=("DownBlock2D",) * 2,
                                   up_block_types=("UpBlock2D",) * 2, mid_block_type="UNetMidBlock2D",
                                   num_class_embeds=5, cross_attention_dim=8, **common).save_pretrained(f / "unet")
    sched(f, prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    out["class UNet2DConditionModel (v_prediction, scaled_linear)"] = (f, {"class_label": 4, "negative": 0})
    for name, cin, pred, vae in (("text", 2, "sample", False), ("latent", 4, "v_prediction", True)):
        f = root / name
        diffusers.UNet2DConditionModel(in_channels=cin, out_channels=cin,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                       **common).save_pretrained(f / "unet")
        sched(f, prediction_type=pred)
        g = torch.Generator().manual_seed(1)
        save_file({"prompt_embeds": torch.randn(5, 12, generator=g),
                   "negative_prompt_embeds": torch.randn(5, 12, generator=g)}, str(f / "prompt.safetensors"))
        if vae:
            diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                    latent_channels=4, norm_num_groups=4, sample_size=16,
                                    scaling_factor=0.5).save_pretrained(f / "vae")
        label = "text UNet2DConditionModel, prompt embeddings (sample)" if not vae else \
            "latent diffusion: AutoencoderKL + text UNet2DConditionModel (v_prediction)"
        out[label] = (f, {"prompt_embeds": f / "prompt.safetensors"})
    return out


def markdown(res: dict) -> str:
    lines = ["# Classifier-free guidance: diffusers equivalence, overhead, exact inversion under CFG", "",
             f"Command: `{res['command']}`{res.get('command_note', '')} ({res['wall_s']:.0f} s, "
             f"{res['threads']} thread(s), torch {res['torch']}). Written by benchmarks/guidance.py; see its docstring "
             "for the method.", ""]
    if res.get("inversion_command"):
        lines += [f"The inversion and latent-diffusion sections were rerun on their own, spliced into the file above: "
                  f"`{res['inversion_command']}` ({res['inversion_wall_s']:.0f} s, {res['threads']} thread(s)).", ""]
    lines += ["## DDIM of the guided model vs diffusers' pipeline loop (float32, same noise)", "",
              "| model | w | steps | max abs difference | samples' max abs | relative |", "|---|---|---|---|---|---|"]
    for r in res["equivalence"]:
        lines.append(f"| {r['model']} | {r['w']:g} | {r['steps']} | {r['max_abs']:.2e} | {r['sample_max_abs']:.3g} "
                     f"| {r['relative']:.2e} |")
    o = res["overhead"]
    lines += ["", "## Sampling overhead at equal NFE (one thread)", "",
              f"{res['model']}, w = {o['w']:g}, {o['steps']} steps, batch {o['batch']}, median of {o['repeats']} "
              f"alternated runs: probflow {o['probflow_s']:.3f} s, diffusers' loop {o['diffusers_s']:.3f} s, "
              f"**ratio {o['ratio']:.3f}**.", ""]
    lines += inversion_markdown(res)
    return "\n".join(lines) + "\n"


def inversion_markdown(res: dict) -> list[str]:
    lines = ["## Inversion under CFG: exact (encode_exact) vs plain DDIM inversion", "",
             f"{res.get('inversion_model', res['model'])}, first {res['inversion'][0]['n']} held-out test images "
             "as 8-bit PNG pixels (each with its own label), float32, euler; `encode_exact(..., quantum=2/255)` as "
             "`probflow encode` calls it. Exact: to round-off, or to 8-bit levels where the guided last step's map "
             "folds (a step accepted below a quarter level, the round trip verified below it). Calls: the encode's "
             "model calls (solve and verification) ÷ the decoder's.", "",
             "| grid | w | exact: ok (of them to round-off) | exact: max abs | exact: PNG identical | "
             "exact: calls ÷ decoder (median) | DDIM inversion: max abs | DDIM inversion: median abs | "
             "DDIM inversion: PNG identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["inversion"]:
        ex = "—" if r["exact_max_abs"] is None else f"{r['exact_max_abs']:.2e}"
        ca = "—" if r.get("exact_calls_median") is None else f"{r['exact_calls_median']:.1f}"
        ro = f" ({r['exact_roundoff']})" if "exact_roundoff" in r else ""
        lines.append(f"| {r['grid']} | {r['w']:g} | {r['n'] - r['exact_failed']}/{r['n']}{ro} | {ex} | "
                     f"{r['exact_png_identical']}/{r['n']} | {ca} | {r['ddim_inversion_max_abs']:.3f} | "
                     f"{r['ddim_inversion_median_abs']:.3f} | {r['ddim_inversion_png_identical']}/{r['n']} |")
    lines += ["", "Per image (exact): ok, or the InversionError's step and residual.", "",
              "| grid | w | image (label) | exact | round trip max abs | PNG identical | calls ÷ decoder |",
              "|---|---|---|---|---|---|---|"]
    for r in res["inversion"]:
        for i in r.get("images", []):
            if i["ok"]:
                kind = {"round-off": "ok, round-off", "quantum": "ok, to 8-bit levels"}.get(i.get("exact"), "ok")
                lines.append(f"| {r['grid']} | {r['w']:g} | {i['index']} ({i['label']}) | {kind} | "
                             f"{i['max_abs']:.2e} | {'yes' if i['png_identical'] else 'no'} | "
                             f"{i['calls_over_decoder']:.1f} |")
            else:
                msg = i["error"].split(" did not converge")[0].replace("encode_exact: the euler ", "")
                res_ = i["error"].split("residual ")[1].split(" (")[0] if "residual " in i["error"] else ""
                floor = i["error"].split("round-off floor there is ")[1].split(",")[0] if "floor there" in i[
                    "error"] else "?"
                lines.append(f"| {r['grid']} | {r['w']:g} | {i['index']} ({i['label']}) | failed: {msg}, "
                             f"residual {res_} (the step's own round-off floor {floor}) | — | — | — |")
    if res.get("latent"):
        la = res["latent"]
        ode = f"max abs {la['ode_max_abs']:.2e}" if "ode_max_abs" in la else f"failed ({la['ode_error']})"
        lines += ["", "## Latent diffusion (tiny random AutoencoderKL + UNet, w = 3)", "",
                  f"ODE part (latent → exact latent → decoded latent, torch's scaled-dot-product attention): {ode}; "
                  f"VAE part (decoder(encoder mean) vs image, random untrained VAE, so not a quality figure): "
                  f"max abs {la['vae_max_abs']:.3f}. The VAE's encoder is not the inverse of its decoder: that part "
                  "of the round trip is the VAE's own reconstruction error, reported apart from the ODE's."]
    return lines


def latent_case(folder: Path, kw: dict) -> dict:
    m = load(folder, guidance=3.0, **kw)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z0 = m.autoencoder.encode(img)
    grid = grids.named("quadratic_open", m.schedule, 10)
    out = {"vae_max_abs": (m.autoencoder.decode(z0) - img).abs().max().item()}
    try:
        back = probflow.decode(m, encode_exact(m, z0, grid).x, grid).x
        out["ode_max_abs"] = (back - z0).abs().max().item()
    except (InversionError, NotImplementedError) as e:
        out["ode_error"] = str(e).splitlines()[0][:200]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits32")
    p.add_argument("--n", type=int, default=20, help="test images per guidance weight for the inversion table")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "GUIDANCE.md"))
    p.add_argument("--force", action="store_true")
    p.add_argument("--part", choices=("all", "inversion"), default="all",
                   help="inversion: rerun only the inversion table and the latent-diffusion check, spliced into the "
                        "existing guidance.json / GUIDANCE.md (needs --force)")
    a = p.parse_args(argv)
    out_md = Path(a.out)
    out_json = out_md.with_name("guidance.json")
    try:
        for path in (out_md, out_json):
            check_writable(path, a.force, "--out")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"guidance.py: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    model = load(a.model, class_label=0, guidance=3.0)
    folder = DIGITS32 if a.model == "digits32" else Path(a.model)
    command = "python benchmarks/guidance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.part == "inversion":
        res = splice_inversion(model, a, out_json, command, t0)
    else:
        res = full_run(model, folder, a, command, t0)

    def write_text(text):
        return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(out_json, write_text(json.dumps(res, indent=2) + "\n"), force=a.force, name="--out")
    atomic_write(out_md, write_text(markdown(res)), force=a.force, name="--out")
    print(f"wrote {out_md} and {out_json}")
    return 0


def _latent() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        kinds = tiny_folders(Path(tmp))
        return latent_case(*next(v for k, v in kinds.items() if k.startswith("latent")))


def splice_inversion(model, a, out_json: Path, command: str, t0: float) -> dict:
    """The existing run's results with the inversion table and the latent check replaced by this run's."""
    if not out_json.exists():
        raise SystemExit(f"guidance.py: --part inversion: {out_json} does not exist; run the full benchmark first")
    res = json.loads(out_json.read_text(encoding="utf-8"))
    res["latent"] = _latent()
    res["inversion"] = inversion(model, a.n, a.steps)
    res["inversion_command"], res["inversion_wall_s"] = command, time.time() - t0
    res["inversion_model"] = a.model
    return res


def full_run(model, folder: Path, a, command: str, t0: float) -> dict:
    res = {"command": command, "threads": torch.get_num_threads(), "torch": torch.__version__, "model": a.model}
    eq = [{"model": a.model, **equivalence(model, folder, a.steps, w)} for w in WS]
    with tempfile.TemporaryDirectory() as tmp:
        kinds = tiny_folders(Path(tmp))
        for name, (f, kw) in kinds.items():
            eq.append({"model": name, **equivalence(load(f, guidance=3.0, **kw), f, 10, 3.0)})
        res["latent"] = latent_case(*next(v for k, v in kinds.items() if k.startswith("latent")))
    for r in eq:
        print(json.dumps(r), flush=True)
    res["equivalence"] = eq
    res["overhead"] = overhead(model, folder, a.steps, 3.0, 16, a.repeats)
    print(json.dumps(res["overhead"]), flush=True)
    res["inversion"] = inversion(model, a.n, a.steps)
    res["wall_s"] = time.time() - t0
    return res


if __name__ == "__main__":
    sys.exit(main())
