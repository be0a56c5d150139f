"""Conditional diffusers folders (class-conditional, text-conditioned, latent diffusion), built from tiny random
components with save_pretrained: probflow's DDIM (Euler on the trailing grid) of the guided model equals
diffusers' own pipeline loop (DDIMScheduler, the CFG expression on the batched [negative; positive] forward) on
the same noise to float32 round-off (1e-5 relative to the samples' size: untrained networks do not predict
ε ≈ x at σ_max, so their samples keep the size σ_max·x_T; the trained digits32 model's absolute figure is in
benchmarks/guidance.py); each folder encodes exactly under guidance and decodes back."""

import json

import pytest
import torch

import probflow
from probflow import grids
from probflow.inversion import encode_exact
from probflow.models import load
from probflow.models.diffusers_folders import load_conditional

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DIM = 12  # cross_attention_dim of the tiny text UNets


def _sched(folder, **kw):
    diffusers.DDIMScheduler(clip_sample=False, **kw).save_pretrained(folder / "scheduler")


def class_unet2d(folder, seed=0, prediction_type="epsilon"):
    """UNet2DModel with num_class_embeds = 4 (class 3 the null class, named in card.json)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4, attention_head_dim=4).eval()
    unet.save_pretrained(folder / "unet")
    _sched(folder, prediction_type=prediction_type)
    (folder / "card.json").write_text(json.dumps({"classes": ["a", "b", "c"], "null_class": 3}))
    return unet


def class_unet2dcond(folder, seed=1, prediction_type="v_prediction"):
    """UNet2DConditionModel with class embeddings and no cross-attention; no card (the negative is explicit)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", num_class_embeds=5, cross_attention_dim=8, attention_head_dim=4).eval()
    unet.save_pretrained(folder / "unet")
    _sched(folder, prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085,
           beta_end=0.012)
    return unet


def text_unet(folder, seed=2, prediction_type="sample", in_channels=2, size=8):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=DIM, attention_head_dim=4).eval()
    unet.save_pretrained(folder / "unet")
    _sched(folder, prediction_type=prediction_type)
    return unet


def tiny_vae(folder, seed=3):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5).eval()
    vae.save_pretrained(folder / "vae")
    return vae


def embeds(seed, L=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, L, DIM, generator=g)


def diffusers_loop(unet, folder, x_T, steps, w, cond_kw, uncond_kw):
    """diffusers' pipeline loop: DDIMScheduler from the folder's config (trailing, set_alpha_to_one, no
    clipping), the unet on [x; x] with [negative; positive] conditions, noise = u + w (c − u), scheduler.step."""
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", timestep_spacing="trailing",
                                                    set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    x = x_T.float()
    n = len(x)
    both = {k: torch.cat([uncond_kw[k].expand(n, *uncond_kw[k].shape[1:]),
                          cond_kw[k].expand(n, *cond_kw[k].shape[1:])]) for k in cond_kw}
    with torch.no_grad():
        for t in sched.timesteps:
            u, c = unet(torch.cat([x, x]), t, **both).sample.chunk(2)
            x = sched.step(u + w * (c - u), t, x, eta=0.0).prev_sample
    return x


KINDS = {
    "class-UNet2DModel": (class_unet2d, dict(class_label="b"),
                          {"class_labels": torch.tensor([1])}, {"class_labels": torch.tensor([3])}, (2, 8, 8)),
    "class-UNet2DConditionModel": (class_unet2dcond, dict(class_label=4, negative=0),
                                   {"class_labels": torch.tensor([4])}, {"class_labels": torch.tensor([0])}, (2, 8, 8)),
}


def _text_kind(tmp_path):
    unet = text_unet(tmp_path)
    pos, neg = embeds(10), embeds(11)
    safetensors_torch.save_file({"prompt_embeds": pos[0], "negative_prompt_embeds": neg[0]},
                                str(tmp_path / "prompt.safetensors"))
    return unet, dict(prompt_embeds=tmp_path / "prompt.safetensors"), {"encoder_hidden_states": pos}, \
        {"encoder_hidden_states": neg}, (2, 8, 8)


@pytest.mark.parametrize("kind", [*KINDS, "text"])
@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
def test_guided_euler_equals_diffusers_pipeline_loop(tmp_path, kind, w):
    if kind == "text":
        unet, kw, cond, unc, shape = _text_kind(tmp_path)
        wrap = lambda x, t, **k: unet(x, t, **k)  # noqa: E731
    else:
        build, kw, cond, unc, shape = KINDS[kind]
        unet = build(tmp_path)
        wrap = (lambda x, t, **k: unet(x, t, None, **k)) if kind.endswith("ConditionModel") else unet  # noqa: E731
    model = load_conditional(tmp_path, guidance=w, **kw)
    assert model.sample_shape == shape
    x_T = probflow.noise(3, shape, seed=5)
    steps = 10
    ref = diffusers_loop(wrap, tmp_path, x_T, steps, w, cond, unc)
    sol = probflow.sample(model, x_T, grids.ddim(model.schedule, steps), "euler")
    assert sol.nfe == steps
    assert (sol.x.float() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    # negative control: another guidance weight is far outside the same bound
    other = probflow.sample(load_conditional(tmp_path, guidance=w + 1, **kw), x_T, grids.ddim(model.schedule, steps))
    assert (other.x.float() - ref).abs().max().item() > 1e-3 * max(1.0, ref.abs().max().item())


def test_latent_diffusion_folder_equals_diffusers_and_inverts_exactly(tmp_path):
    unet = text_unet(tmp_path, prediction_type="v_prediction", in_channels=4, size=8)
    vae = tiny_vae(tmp_path)
    pos, neg = embeds(20), embeds(21)
    model = load_conditional(tmp_path, prompt_embeds=pos, negative=neg, guidance=3.0)
    assert model.sample_shape == (4, 8, 8) and model.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():  # the encoder mean times the scaling factor, and back through the decoder (the same
        z_ref = vae.encode(images).latent_dist.mean * 0.5  # weights in another module instance: conv round-off)
        assert (model.autoencoder.encode(images) - z_ref).abs().max() <= 1e-6 * z_ref.abs().max()
        dec = vae.decode(z_ref / 0.5).sample
        assert (model.autoencoder.decode(z_ref) - dec).abs().max() <= 1e-6 * dec.abs().max()
    x_T = probflow.noise(2, (4, 8, 8), seed=6)
    ref = diffusers_loop(unet, tmp_path, x_T, 10, 3.0, {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg})
    sol = probflow.sample(model, x_T, grids.ddim(model.schedule, 10), "euler")
    assert (sol.x.float() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    # exact inversion of the latent ODE under CFG (float32, the network's dtype): decode returns the VAE latent
    # to float32 round-off; plain DDIM inversion (Euler up the flipped grid) does not. The grid ends at the
    # table's σ near 0 instead of stepping into σ = 0 (inverting that step inverts the denoiser; probflow.inversion)
    z0 = model.autoencoder.encode(images)
    sig = grids.named("quadratic_open", model.schedule, 10)
    lat = encode_exact(model, z0, sig).x
    back = probflow.decode(model, lat, sig).x
    exact_err = (back - z0).abs().max().item()
    assert exact_err <= 1e-4 * max(1.0, z0.abs().max().item())
    plain = probflow.decode(model, probflow.encode(model, z0, sig).x, sig).x
    assert (plain - z0).abs().max().item() > 10 * exact_err


def test_text_encoder_folder_encodes_prompts_like_diffusers(tmp_path):
    transformers = pytest.importorskip("transformers")
    unet = text_unet(tmp_path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}}
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                                     str(tmp_path / "tokenizer" / "merges.txt"), model_max_length=6)
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=DIM, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=6, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    enc.save_pretrained(str(tmp_path / "text_encoder"))
    ids = lambda p: tok([p], padding="max_length", max_length=6, truncation=True, return_tensors="pt").input_ids  # noqa: E731
    with torch.no_grad():
        pos, neg = enc(ids("a b c"))[0], enc(ids(""))[0]
    model = load_conditional(tmp_path, prompt="a b c", guidance=2.0)  # the negative: the empty prompt
    x_T = probflow.noise(2, (2, 8, 8), seed=3)
    ref = diffusers_loop(unet, tmp_path, x_T, 8, 2.0, {"encoder_hidden_states": pos}, {"encoder_hidden_states": neg})
    sol = probflow.sample(model, x_T, grids.ddim(model.schedule, 8))
    assert (sol.x.float() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_load_routes_conditional_folders_and_refuses_conditions_for_unconditional_models(tmp_path):
    class_unet2d(tmp_path)
    m = load(tmp_path, class_label=2, guidance=2.0)
    assert m.condition["class_label"] == "2" and m.condition["negative_class_label"] == "3"
    with pytest.raises(ValueError, match="^class_label: model 'mixture2d' is unconditional"):
        load("mixture2d", class_label=1)
    with pytest.raises(TypeError, match="unknown argument"):
        load(tmp_path, clas=1)


BAD = [
    ("class", dict(class_label=7), r"^class_label: unknown class 7; expected an integer in 0 … 3"),
    ("class", dict(class_label="z"), r"^class_label: unknown class 'z'"),
    ("class", dict(), r"^class_label: this model is class-conditional"),
    ("class", dict(class_label=1, guidance=float("nan")), r"^guidance: expected a finite number"),
    ("class", dict(class_label=1, guidance=float("inf")), r"^guidance: expected a finite number"),
    ("class", dict(class_label=1, prompt="x"), r"^prompt: this model is not text-conditioned"),
    ("class", dict(class_label=1, negative=9), r"^negative: unknown class 9"),
    ("text", dict(prompt_embeds=torch.zeros(1, 5, DIM + 1)), r"^prompt_embeds: expected a float tensor of shape"),
    ("text", dict(prompt_embeds=torch.zeros(5)), r"^prompt_embeds: expected a float tensor of shape"),
    ("text", dict(prompt="a cat"), r"^prompt: .* has no text_encoder/ and tokenizer/; pass prompt_embeds="),
    ("text", dict(prompt_embeds=torch.zeros(1, 5, DIM), guidance=3.0), r"^negative: guidance ≠ 1 needs a negative"),
    ("text", dict(prompt_embeds=torch.zeros(1, 5, DIM), negative=torch.zeros(1, 4, DIM), guidance=3.0),
     r"^negative: expected the prompt embedding's shape"),
    ("text", dict(prompt_embeds="missing.safetensors"), r"^prompt_embeds: 'missing.safetensors' is not a file"),
    ("text", dict(class_label=1, prompt_embeds=torch.zeros(1, 5, DIM)), r"^class_label: this model has no class"),
]


@pytest.mark.parametrize("kind,kw,msg", BAD)
def test_bad_conditions_are_one_line_value_errors_naming_the_argument(tmp_path, kind, kw, msg):
    (class_unet2d if kind == "class" else text_unet)(tmp_path)
    with pytest.raises(ValueError, match=msg) as e:
        load_conditional(tmp_path, **kw)
    assert "\n" not in str(e.value)
