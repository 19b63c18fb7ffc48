"""HunyuanVideo (double- then single-stream video DiT, guidance-distilled, FlowMatch Euler) on a tiny random
pipeline saved and loaded back: the layout, the pipeline's own sigmas and embedded guidance, the default plan
equal to `pipe(...)`, and a cached schedule (per-component and a unit over the double-stream blocks) applied inside
the stock pipeline equal to our sampler. A second tiny pipeline with its text encoders built from config (a Llama
encoder with the pipeline's prompt template, CLIP for the pooled embedding) runs the whole path from prompt
strings: `pipe(prompt=...)` equal to our sampler, every space's baselines, a search, the CLI's search, export and
evaluate, and the exported schedule inside the stock pipeline called with prompts."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from family_checks import cli_search_export_evaluate, every_baseline_runs, quick_cache_search, true_cfg_per_pass
from stand_in_text import clip_stand_in

diffusers = pytest.importorskip("diffusers")

from schedsearch.runtime.apply import apply_schedule  # noqa: E402
from schedsearch.runtime.models import initial_noise, load_model, model_layout  # noqa: E402
from schedsearch.runtime.sampler import sample  # noqa: E402
from schedsearch.spaces import baselines  # noqa: E402
from schedsearch.spaces.schedule import Schedule  # noqa: E402

TEXT_DIM, POOLED_DIM, TEXT_LEN, FRAMES, PIXELS = 16, 8, 6, 9, 16


def build_hunyuan(text: dict | None = None):
    """The tiny pipeline; `text`: its tokenizers and text encoders (none by default: pre-encoded conditions)."""
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
    )
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    text = text or {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    return diffusers.HunyuanVideoPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hunyuan") / "pipe"
    build_hunyuan().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved}", resolution=PIXELS, num_frames=FRAMES)


def embeddings(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
            "prompt_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]] * n),
            "pooled_prompt_embeds": torch.randn(n, POOLED_DIM, generator=g)}


def _pipe(saved):
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(saved, text_encoder=None, tokenizer=None,
                                                          text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, x, cond, steps, **kwargs):
    return pipe(latents=x, num_inference_steps=steps, guidance_scale=6.0, height=PIXELS, width=PIXELS,
                num_frames=FRAMES, output_type="latent", **cond, **kwargs).frames


def test_info(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("hunyuan_video", "flow_prediction", "prompt")
    assert info.sample_shape == (4, 3, 2, 2)
    assert [g.path for g in info.block_groups] == ["transformer_blocks", "single_transformer_blocks"]


def test_default_plan_is_the_pipelines_own_call(model, saved):
    """The pipeline's sigmas linspace(1, 0, N + 1)[:-1] at shift 7, guidance 6 embedded as 6000, no CFG pair."""
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    with torch.no_grad():
        ours = sample(model.denoiser(cond), x, model.default_plan(4), model.noise_schedule, "flow_prediction")
        theirs = _call(_pipe(saved), x, cond, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fora", "unit", "single_unit"])
def test_cached_schedule_in_the_pipeline_equals_our_sampler(model, saved, kind):
    """FORA, a unit over the double-stream blocks and one over the single-stream block (its residual taken on the
    video tokens, which it returns apart from the text's) inside the stock pipeline equal our sampler."""
    plan = model.default_plan(4)
    layout = model_layout(model.info)
    cache = {"fora": baselines.fora_cache_plan(layout, 4, 2),
             "unit": baselines.uniform_unit_plan("transformer_blocks", 0, 2, 4, 2),
             "single_unit": baselines.uniform_unit_plan("single_transformer_blocks", 0, 1, 4, 2)}[kind]
    schedule = Schedule(model.info.name, plan, cache)
    x = initial_noise([0, 1], model.info.sample_shape)
    cond = embeddings(2)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x, cond, 4)
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(cond, [0, 1], 6.0, decode=False)
    with apply_schedule(model, Schedule(model.info.name, plan)) as applied:
        uncached = applied.sample(cond, [0, 1], 6.0, decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (uncached - ours).abs().max() > 1e-5
    video = model.decode(ours)
    assert video.shape == (2, 3, FRAMES, PIXELS, PIXELS) and video.abs().max() <= 1.0


# ---------------------------------------------------------------------------------- from prompt strings, end to end


def _llama_tokenizer():
    """The pipeline's tokenizer class (Llama, byte-fallback BPE) built offline: single characters plus merges that
    make the prompt template's words one token each, some left as characters so that the template before the prompt
    is exactly its `crop_start` tokens (95, BOS included) as with HunyuanVideo's Llama-3 tokenizer; the cropped
    embeddings then start at the prompt's first token."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaTokenizer

    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    before = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    plain = before
    for special in specials:
        plain = plain.replace(special, " ")
    chars = sorted(set(plain.replace("\n", "").replace(" ", "")) | set("abcdefghijklmnopqrstuvwxyz▁"))

    def build(words: list[str]):
        tokens = ["<unk>", "<s>", "</s>", "<pad>", *(f"<0x{i:02X}>" for i in range(256)), *chars]
        merges = []
        for word in words:  # one merge per prefix: "▁t" + "h" -> "▁th", ...
            for k in range(2, len(word) + 1):
                if word[:k] not in tokens:
                    merges.append((word[: k - 1], word[k - 1]))
                    tokens.append(word[:k])
        tokenizer = LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, add_bos_token=True,
                                   pad_token="<pad>", padding_side="right")
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        return tokenizer

    def count(words: list[str]) -> int:
        return len(build(words)(before).input_ids)

    words = sorted({"▁" + w for w in plain.split()})
    for word in list(words):
        if count(words) == DEFAULT_PROMPT_TEMPLATE["crop_start"]:
            break
        if count([w for w in words if w != word]) <= DEFAULT_PROMPT_TEMPLATE["crop_start"]:
            words.remove(word)
    assert count(words) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    return build(words)


def text_components(tmp) -> dict:
    """A 3-layer Llama encoder (the pipeline takes the hidden states 2 layers before the last) and CLIP's text encoder
    for the pooled embedding, as HunyuanVideoPipeline's components."""
    from transformers import LlamaConfig, LlamaModel

    tokenizer = _llama_tokenizer()
    torch.manual_seed(2)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=16,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)).eval()
    tokenizer_2, clip = clip_stand_in(tmp, POOLED_DIM, 77)  # the pipeline's CLIP tokenizer pads to 77
    return {"tokenizer": tokenizer, "text_encoder": llama, "tokenizer_2": tokenizer_2, "text_encoder_2": clip}


PROMPTS = ["a cat", "a dog on a mat"]
STEPS = 2


@pytest.fixture(scope="module")
def saved_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan_text")
    build_hunyuan(text_components(root)).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def text_model(saved_text):
    torch.set_num_threads(1)
    return load_model(f"diffusers:{saved_text}", resolution=PIXELS, num_frames=FRAMES)


def _text_pipe(saved_text):
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(saved_text)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts_are_encoded_as_the_pipelines_call_encodes_them(saved_text):
    """The Llama embeddings cropped at the template's end and cut to __call__'s max_sequence_length (256), the mask
    covering the prompt's tokens and <|eot_id|> only, CLIP's pooled embedding per prompt."""
    from schedsearch.runtime.diffusers_models import encode_prompts

    pipe = _text_pipe(saved_text)
    cond = encode_prompts(pipe, "hunyuan_video", PROMPTS)
    assert cond.keys() == {"prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"}
    assert cond["prompt_embeds"].shape == (2, 256, TEXT_DIM) and cond["pooled_prompt_embeds"].shape == (2, POOLED_DIM)
    lengths = [len(pipe.tokenizer(p, add_special_tokens=False).input_ids) + 1 for p in PROMPTS]  # + <|eot_id|>
    assert cond["prompt_attention_mask"].sum(1).tolist() == lengths
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().max() > 1e-3


@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_pipe_called_with_prompts_equals_our_sampler(text_model, saved_text, output_type):
    """A user's `pipe(prompt=[...])` (default template and length, guidance 6 embedded) equals our sampler fed the
    same prompt strings; decoded, our decode equals its video mapped to [0, 1]."""
    x = initial_noise([0, 1], text_model.info.sample_shape)
    with torch.no_grad():
        ours = sample(text_model.denoiser(PROMPTS), x, text_model.default_plan(STEPS), text_model.noise_schedule,
                      "flow_prediction")
        theirs = _text_pipe(saved_text)(prompt=PROMPTS, latents=x, num_inference_steps=STEPS, height=PIXELS,
                                        width=PIXELS, num_frames=FRAMES, output_type=output_type).frames
    if output_type == "pt":
        ours = text_model.decode(ours) * 0.5 + 0.5
        assert ours.shape == (2, 3, FRAMES, PIXELS, PIXELS)
        theirs = theirs.transpose(1, 2)  # (N, frames, C, H, W) -> (N, C, frames, H, W)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_every_space_and_baseline_runs(text_model):
    """Every space but the policy one builds on HunyuanVideo, and each of its baselines runs from a prompt to a finite
    output: solver plans, component caches over both block groups, CacheQuant's unit, DC ratios and joint ones."""
    assert every_baseline_runs(text_model, ["a cat"]) > 10


def test_cache_search_runs_from_prompts(text_model, tmp_path):
    quick_cache_search(text_model, tmp_path, "hunyuan")


def test_search_export_evaluate_and_apply_in_the_pipeline(saved_text, tmp_path, capsys):
    """The CLI as users run it: a cache search from prompts, its front exported, the exported schedule with the most
    reuse scored by `evaluate`, then applied to the stock pipeline called with prompt strings, equal to our sampler
    running the same schedule from the same prompts."""
    name, size = f"diffusers:{saved_text}", ["--resolution", str(PIXELS), "--frames", str(FRAMES)]
    schedule = cli_search_export_evaluate(name, size, PROMPTS, tmp_path, capsys)

    model = load_model(name, resolution=PIXELS, num_frames=FRAMES)
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _text_pipe(saved_text)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=x, num_inference_steps=schedule.solver.num_steps, height=PIXELS,
                      width=PIXELS, num_frames=FRAMES, output_type="latent").frames
    with apply_schedule(model, schedule) as applied:
        ours = applied.sample(PROMPTS, [0, 1], decode=False)
    with apply_schedule(model, type(schedule)(schedule.model, schedule.solver)) as applied:
        uncached = applied.sample(PROMPTS, [0, 1], decode=False)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (uncached - ours).abs().max() > 1e-5


def test_info_shows_the_layout(saved_text, capsys):
    import json

    from schedsearch.cli import main

    assert main(["info", "--model", f"diffusers:{saved_text}", "--resolution", str(PIXELS), "--frames",
                 str(FRAMES)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["sample_shape"]) == ("hunyuan_video", [4, 3, 2, 2])
    assert [(g["path"], g["count"]) for g in info["block_groups"]] == [("transformer_blocks", 2),
                                                                       ("single_transformer_blocks", 1)]


def test_true_cfg_embeddings_are_refused_before_any_work(model):
    """Negative embeddings would ask for the pipeline's true CFG, which schedsearch does not sample (as for Flux):
    refused with the field and the fix, not silently dropped."""
    from schedsearch.errors import UserInputError

    cond = embeddings(1)
    with pytest.raises(UserInputError) as err:
        model.denoiser(cond | {f"negative_{k}": v for k, v in cond.items()})
    assert err.value.field == "conditions" and "true_cfg_scale" in err.value.problem and err.value.fix


def test_true_cfg_in_the_pipeline_keeps_a_cache_per_pass(model, saved):
    """The stock pipeline's true CFG (true_cfg_scale > 1 and a negative prompt: the transformer on the prompt, then on
    the negative prompt) under a FORA schedule keeps one cache per pass, as for Flux: equal to our denoisers on
    each prompt, each with its own branch of the cache, combined as the pipeline combines them."""
    plan = model.default_plan(4)
    schedule = Schedule(model.info.name, plan, baselines.fora_cache_plan(model_layout(model.info), 4, 2))
    cond, neg = embeddings(2), {k: v.flip(0) for k, v in embeddings(2).items()}
    x = initial_noise([0, 1], model.info.sample_shape)
    pipe = _pipe(saved)
    with apply_schedule(pipe, schedule, resolution=PIXELS, num_frames=FRAMES), torch.no_grad():
        theirs = _call(pipe, x, cond, 4, true_cfg_scale=2.0, **{f"negative_{k}": v for k, v in neg.items()})
    with apply_schedule(model, schedule) as applied, torch.no_grad():
        ours = true_cfg_per_pass(model, applied, cond, neg, 6.0, 2.0, x, plan)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_cachequant_search_calibrates_on_the_video_stream(text_model, tmp_path):
    """CacheQuant's DP on the unit over the double-stream blocks: its features are the video tokens' residual
    (diffusers' block registry: both block kinds return (video, text)), calibrated from prompts."""
    from schedsearch.calibration.unit_features import unit_features
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    for unit in (("transformer_blocks", 0, 2), ("single_transformer_blocks", 0, 1)):
        features = unit_features(text_model, text_model.default_plan(3), unit, PROMPTS, [0, 1])
        assert all(f.shape == (2, 12, 20) for f in features)  # 2 samples, 3·2·2 video tokens, width 2·10
    result = run_search(model=text_model, space="cachequant", strategy="dp", objectives=["psnr", "macs"], study="cq",
                        store=tmp_path / "r.db", budget=Budget(evaluations=3), samples=2, prompts=PROMPTS,
                        cache_dir=tmp_path / "cache", batch_size=2, space_options={"num_steps": 4},
                        progress=False, validate=False)
    assert result.evaluations >= 1 and result.failed == 0
