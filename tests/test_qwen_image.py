"""Qwen-Image (an MM-DiT on 2x2-packed latent tokens, true CFG as two transformer calls per step combined with a
norm-preserving rescale) on a tiny random pipeline saved with `save_pretrained` and loaded back, built as diffusers'
own tests build it (a Qwen2.5-VL text encoder from config): the layout, the pipeline's sigmas with the dynamic shift
at its token count, the CFG rule, the default plan equal to `pipe(...)`, prompts through its encoder and decoding
through its video VAE, cached schedules inside the stock pipeline (cond and uncond passes), every space, a search,
its export and evaluation, and what is refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from family_checks import cli_search_export_evaluate, every_baseline_runs  # noqa: E402

from schedsearch.errors import UserInputError  # noqa: E402
from schedsearch.runtime.apply import apply_schedule  # noqa: E402
from schedsearch.runtime.diffusers_models import guidance_rule, linear_cfg, loaded_model_from_pipeline  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, PIXELS, GUIDANCE, STEPS = 16, 32, 4.0, 4  # 32 px -> 8x8 latents (VAE factor 4) -> 16 packed tokens
LATENT = (4, 8, 8)


def _tokenizer():
    """A byte-level Qwen2 tokenizer without merges (one token per byte) and the chat-template specials: the
    pipeline's own tokenizer class, built offline (diffusers' tests download a tiny one)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {ch: i for i, ch in enumerate([*sorted(pre_tokenizers.ByteLevel.alphabet()), *specials])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def _text_encoder(vocab_size: int):
    """diffusers' tests' tiny Qwen2.5-VL (one text and one vision layer here), its vocabulary cut to the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    last = vocab_size - 1
    text = {"hidden_size": TEXT_DIM, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": vocab_size,
            "bos_token_id": last - 2, "eos_token_id": last, "pad_token_id": last - 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": TEXT_DIM}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=TEXT_DIM, vocab_size=vocab_size,
                              vision_start_token_id=last - 2, vision_end_token_id=last - 1, vision_token_id=last,
                              image_token_id=last, video_token_id=last)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def components(**transformer_options) -> dict:
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(8, 4, 4), **transformer_options,
    )
    # per-channel latent statistics that are not the identity, so decoding checks that they are undone
    vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                           latents_std=[0.5, 1.5, 1.0, 2.0])
    # Qwen-Image's own scheduler config: dynamic shift from the token count, stretched to a terminal σ of 0.02
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
        shift_terminal=0.02, time_shift_type="exponential")
    tokenizer = _tokenizer()
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "tokenizer": tokenizer,
            "text_encoder": _text_encoder(len(tokenizer))}


def build_qwen_image():
    return diffusers.QwenImagePipeline(**components())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_image") / "pipe"
    build_qwen_image().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS)


def embeddings(n: int) -> dict:
    """A prompt of 6 tokens, one of them padding, and an unpadded negative prompt of 3: lengths differ, as
    QwenImagePipeline.encode_prompt pads each batch only to its own longest prompt."""
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, 6, TEXT_DIM, generator=g),
            "prompt_embeds_mask": torch.tensor([[1, 1, 1, 1, 1, 0]] * n),
            "negative_prompt_embeds": torch.randn(n, 3, TEXT_DIM, generator=g),
            "negative_prompt_embeds_mask": torch.ones(n, 3, dtype=torch.long)}


def _pipe(saved):
    pipe = diffusers.QwenImagePipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, x, steps, guidance=GUIDANCE, **conditions):
    """The stock call on our (unpacked) noise, latent output unpacked back; true CFG when guidance > 1 and a
    negative prompt is given (two transformer calls per step)."""
    packed = pipe._pack_latents(x, len(x), *LATENT)
    out = pipe(latents=packed, num_inference_steps=steps, true_cfg_scale=guidance, height=PIXELS, width=PIXELS,
               output_type="latent", **conditions).images
    return pipe._unpack_latents(out, PIXELS, PIXELS, pipe.vae_scale_factor)[:, :, 0]


def _ours(model, conditions, x, guidance=GUIDANCE, steps=STEPS):
    with torch.no_grad():
        return sample(model.denoiser(conditions, guidance), x, model.default_plan(steps), model.noise_schedule,
                      "flow_prediction")


def test_info_is_a_packed_flow_model(model, saved, capsys):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from schedsearch.cli import main

    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("qwen_image", "flow_prediction", "prompt")
    assert info.sample_shape == LATENT and info.guidance_default == 4.0  # the pipeline's true_cfg_scale default
    assert [(g.path, g.count, g.components) for g in info.block_groups] == [
        ("transformer_blocks", 2, ("attn", "img_mlp", "txt_mlp"))]
    assert info.extra["tokens_per_sample"] == 16  # (8/2)²: the pipeline's image_seq_len
    mu = calculate_shift(16, 256, 8192, 0.5, 0.9)  # the pipeline's own μ at this token count
    assert info.extra["flow_shift"] == pytest.approx(torch.tensor(mu).exp().item())
    assert main(["info", "--model", f"diffusers:{saved}", "--resolution", str(PIXELS)]) == 0
    assert "qwen_image" in capsys.readouterr().out


def test_cfg_is_the_pipelines_norm_preserving_rule():
    """Per packed token (2x2 latent patches of every channel) the guided output has the conditional prediction's
    norm and the linear combination's direction; other families combine linearly."""
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, *LATENT, generator=g), torch.randn(2, *LATENT, generator=g)
    layout = {"sample_shape": LATENT, "vae_scale_factor": 4}
    out = guidance_rule("qwen_image", layout)(uncond, cond, GUIDANCE)
    pack = diffusers.QwenImagePipeline._pack_latents
    tokens, cond_tokens = pack(out, 2, *LATENT), pack(cond, 2, *LATENT)
    linear = pack(linear_cfg(uncond, cond, GUIDANCE), 2, *LATENT)
    torch.testing.assert_close(tokens.norm(dim=-1), cond_tokens.norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(tokens, linear, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert (out - linear_cfg(uncond, cond, GUIDANCE)).abs().max() > 0.1
    assert guidance_rule("flux", layout) is linear_cfg


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_default_plan_is_the_pipelines_own_call(model, saved, guidance):
    """linspace(1, 1/N, N) sigmas shifted by μ of the token count and stretched to the terminal σ; with true CFG the
    pipeline's two calls (prompt and negative prompt of different lengths) and norm-preserving combination equal
    our one batched call; without it (true_cfg_scale 1) one call."""
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    ours = _ours(model, cond, x, guidance)
    stock = cond if guidance > 1 else {k: v for k, v in cond.items() if not k.startswith("negative_")}
    with torch.no_grad():
        theirs = _call(_pipe(saved), x, STEPS, guidance, **stock)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_prompts_and_decoding_are_the_pipelines_own(model, saved):
    """A user's `pipe(prompt=..., negative_prompt="")` with image output equals our sampler from the same prompt
    strings (through the pipeline's encoder, at its call's max_sequence_length) and our decode (latent statistics
    undone, the video VAE on one frame), mapped to [0, 1] as its image processor does."""
    prompts = ["a cat", "a dog on a mat"]
    x = initial_noise([0, 1], model.info.sample_shape)
    ours = model.decode(_ours(model, prompts, x))
    pipe = _pipe(saved)
    packed = pipe._pack_latents(x, 2, *LATENT)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, negative_prompt=["", ""], latents=packed, num_inference_steps=STEPS,
                      true_cfg_scale=GUIDANCE, height=PIXELS, width=PIXELS, output_type="pt").images
    assert ours.shape == (2, 3, PIXELS, PIXELS) and ours.abs().max() <= 1.0
    torch.testing.assert_close(ours * 0.5 + 0.5, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fora", "fora+skip", "unit", "unipc+fora"])
def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved, kind):
    """A FORA schedule (plain reuse, or whole blocks skipped: both streams' residuals, located by diffusers' block
    registry), a unit over both blocks, and a searched solver (UniPC on its own timesteps) with FORA, inside the
    stock pipeline with true CFG (the transformer called for the prompt, then the negative prompt, each pass with
    its own cached outputs) equal our batched sampler."""
    import dataclasses

    plan = model.default_plan(STEPS)
    fora = baselines.fora_cache_plan(model_layout(model.info), STEPS, 2)
    if kind == "unipc+fora":
        plan = baselines.unipc_plan(baselines.linspace_timesteps(1000, STEPS), 2, "bh2", "data")
    cache = {"fora+skip": dataclasses.replace(fora, skip_reused_blocks=True),
             "unit": baselines.uniform_unit_plan("transformer_blocks", 0, 2, STEPS, 2)}.get(kind, fora)
    schedule = Schedule(model.info.name, plan, cache)
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = _pipe(saved)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with apply_schedule(pipe, schedule, resolution=PIXELS), torch.no_grad():
        theirs = _call(pipe, x, STEPS, **cond)
    handle.remove()
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], GUIDANCE, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], GUIDANCE, decode=False)
    assert len(calls) == 2 * STEPS
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (uncached - ours).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["img2img", "guidance_embeds", "use_additional_t_cond"])
def test_what_qwen_image_pipeline_cannot_drive_is_refused(case):
    """Before any work: another pipeline class around the same transformer (it feeds image latents), and the
    transformer settings QwenImagePipeline's call cannot feed (diffusers' forward fails on them)."""
    if case == "img2img":
        pipe = diffusers.QwenImageImg2ImgPipeline(**components())
    else:
        pipe = diffusers.QwenImagePipeline(**components(**{case: True}))
    with pytest.raises(UserInputError) as err:
        loaded_model_from_pipeline(pipe, resolution=PIXELS)
    assert err.value.field == "--model" and err.value.fix
    assert ("QwenImageImg2ImgPipeline" if case == "img2img" else f"{case}=True") in err.value.problem


def test_every_space_and_baseline_runs(model):
    """Every space but the policy one builds on Qwen-Image, and each of its baselines runs (one sample, the
    pre-encoded embeddings) to a finite output: solver plans, component caches over the three components of its
    dual-stream blocks, CacheQuant's unit over them, DC ratios and their joint combinations."""
    assert every_baseline_runs(model, embeddings(1)) > 10


def test_cachequant_search_calibrates_on_the_image_stream(model, tmp_path):
    """CacheQuant's DP on the unit over both blocks: its feature table is the image tokens' residual (diffusers'
    block registry: Qwen-Image blocks return (text, image)), calibrated through the pipeline's encoder."""
    from schedsearch.calibration.unit_features import unit_features
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    features = unit_features(model, model.default_plan(3), ("transformer_blocks", 0, 2), embeddings(2), [0, 1])
    assert all(f.shape == (4, 16, 32) for f in features)  # CFG pair x 2 samples, 16 image tokens, width 32
    result = run_search(model=model, space="cachequant", strategy="dp", objectives=["psnr", "macs"], study="cq",
                        store=tmp_path / "r.db", budget=Budget(evaluations=3), samples=2, prompts=["a cat", "a dog"],
                        cache_dir=tmp_path / "cache", batch_size=2, space_options={"num_steps": STEPS},
                        progress=False, validate=False)
    assert result.evaluations >= 1 and result.failed == 0


def test_search_export_evaluate_and_apply_in_the_pipeline(saved, tmp_path, capsys):
    """The CLI as users run it: a cache search from prompts, its front exported, an exported schedule scored by
    `evaluate`, then applied to the stock pipeline called with prompt strings and true CFG, equal to our sampler
    running the same schedule from the same prompts."""
    name, size = f"diffusers:{saved}", ["--resolution", str(PIXELS)]
    schedule = cli_search_export_evaluate(name, size, ["a cat", "a dog"], tmp_path, capsys)
    steps = schedule.solver.num_steps
    model = load_model(name, resolution=PIXELS)
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS), torch.no_grad():
        theirs = pipe(prompt=["a cat", "a dog"], negative_prompt=["", ""], latents=pipe._pack_latents(x, 2, *LATENT),
                      num_inference_steps=steps, true_cfg_scale=GUIDANCE, height=PIXELS, width=PIXELS,
                      output_type="latent").images
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(["a cat", "a dog"], [0, 1], GUIDANCE, decode=False)
    torch.testing.assert_close(pipe._unpack_latents(theirs, PIXELS, PIXELS, 4)[:, :, 0], ours, rtol=1e-5, atol=1e-5)


def test_cli_refuses_an_img2img_checkpoint_with_the_field_and_fix(saved, tmp_path, capsys):
    """The same weights saved as a QwenImageImg2ImgPipeline: `info` exits 2 naming --model and the fix."""
    import json

    from schedsearch.cli import main

    other = tmp_path / "img2img"
    other.mkdir()
    for part in saved.iterdir():
        if part.is_dir():
            (other / part.name).symlink_to(part)
    index = json.loads((saved / "model_index.json").read_text()) | {"_class_name": "QwenImageImg2ImgPipeline"}
    (other / "model_index.json").write_text(json.dumps(index))
    assert main(["info", "--model", f"diffusers:{other}", "--resolution", str(PIXELS)]) == 2
    err = capsys.readouterr().err
    assert "error: --model: QwenImageImg2ImgPipeline" in err and "; load the checkpoint as a QwenImagePipeline" in err


def test_cache_space_skips_blocks_and_policy_space_is_refused(model):
    """Qwen-Image's blocks are in diffusers' block registry, so the cache space offers whole-block skipping; its
    pipeline runs cond and uncond as separate calls, so an adaptive policy tuned on batched CFG is refused."""
    from schedsearch.errors import UserInputError
    from schedsearch.study import build_space

    assert build_space("cache", model.info).block_skip
    with pytest.raises(UserInputError, match="separate calls") as err:
        build_space("policy", model.info, model=model)
    assert err.value.field == "--space policy"
