"""builtin:mnist-flow: the SD3-style rectified-flow model, its training objective, and its loading through the SD3
family adapter (checked against diffusers' own StableDiffusion3Pipeline loop and DPM-Solver++ flow scheduler)."""

import json
import math

import pytest
import torch

from schedsearch.calibration import train_builtin, train_flow
from schedsearch.errors import UnavailableError
from schedsearch.runtime import builtin_flow
from schedsearch.runtime.builtin import NULL_CLASS
from schedsearch.runtime.models import initial_noise, load_builtin_mnist_flow
from schedsearch.runtime.sampler import sample
from schedsearch.spaces.baselines import ddim_plan


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Random-initialised weights saved as the shipped file is (fp16 safetensors)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    flow = builtin_flow.build_flow()
    directory = tmp_path_factory.mktemp("flow_assets")
    save_file({k: v.half().contiguous() for k, v in flow.state_dict().items()},
              str(directory / builtin_flow.FLOW_WEIGHTS))
    return directory


@pytest.fixture(scope="module")
def flow(assets):
    return builtin_flow.load_builtin_flow(assets)


@pytest.fixture(scope="module")
def model(assets):
    return load_builtin_mnist_flow(assets)


def test_info_is_a_class_conditional_sd3_flow_model(model):
    info = model.info
    assert (info.family, info.prediction_type, info.conditioning) == ("sd3", "flow_prediction", "class")
    assert info.num_classes == 10 and info.sample_shape == (1, 28, 28) and info.guidance_default == 2.0
    assert info.block_groups[0].path == "transformer_blocks" and info.block_groups[0].count == 6
    assert info.extra["absent_components"] == {"transformer_blocks.5": ("ff_context",)}  # context-pre-only block
    assert info.extra["tokens_per_sample"] == 49 and info.extra["vae_scale_factor"] == 1


def test_euler_sampling_equals_diffusers_sd3_pipeline(model, flow):
    """Our first-order step from σ = 1 (α = 0, λ = −∞) against the stock pipeline called with embeddings."""
    labels = torch.tensor([3, 7])
    x = initial_noise([0, 1], model.info.sample_shape)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    pipe = builtin_flow.flow_pipeline(flow)
    with torch.no_grad():
        ours = sample(model.denoiser(labels), x, ddim_plan([s * 1000 for s in sigmas]), model.noise_schedule,
                      "flow_prediction")
        theirs = pipe(**flow.conditioner.embeddings(labels), latents=x, height=28, width=28, sigmas=sigmas,
                      num_inference_steps=4, guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert model.decode(ours).abs().max() <= 1.0


def test_class_ids_become_the_conditioner_embeddings_and_the_null_label(model, flow):
    """CFG pairs each label with the null id's embedding, as the training dropped labels to NULL_CLASS."""
    seen = []
    handle = model.network.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        model.denoiser([4, 9], guidance=2.0)(torch.zeros(2, 1, 28, 28), 500.0, 0)
    finally:
        handle.remove()
    expected = flow.conditioner(torch.tensor([NULL_CLASS, NULL_CLASS, 4, 9]))["prompt_embeds"]
    torch.testing.assert_close(seen[0], expected)


def test_flow_loss_is_velocity_mse_at_logit_normal_sigmas():
    """The loss equals the rectified-flow objective recomputed from the same random draws."""
    class Recorder(torch.nn.Module):
        def forward(self, x, sigmas, labels):
            self.seen = (x, sigmas, labels)
            return torch.zeros_like(x)

    net, x0 = Recorder(), torch.rand(512, 1, 28, 28) * 2 - 1
    loss = train_flow.flow_loss(net, x0, torch.zeros(512, dtype=torch.long), torch.Generator().manual_seed(0))
    xt, sigmas, labels = net.seen
    gen = torch.Generator().manual_seed(0)
    expect_sigmas = torch.sigmoid(torch.randn(512, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(sigmas, expect_sigmas)
    torch.testing.assert_close(xt, (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean())  # a zero prediction leaves the whole velocity
    dropped = (labels == NULL_CLASS).float().mean().item()
    assert 0.06 < dropped < 0.14 and set(labels.tolist()) <= {0, NULL_CLASS}


def test_train_resume_and_export(tmp_path):
    work, assets = tmp_path / "work", tmp_path / "assets"
    common = ["--work-dir", str(work), "--batch-size", "4", "--ckpt-every", "2", "--grid-every", "1000",
              "--grid-per-class", "1", "--threads", "1"]
    train_builtin.main(["flow", "--steps", "1", *common])
    first = torch.load(work / "flow_ckpt.pt", weights_only=True)
    train_builtin.main(["flow", "--steps", "2", *common])  # resumes from step 1
    second = torch.load(work / "flow_ckpt.pt", weights_only=True)
    assert (first["step"], second["step"]) == (1, 2)
    key = "transformer.pos_embed.proj.weight"
    assert not torch.equal(first["model"][key], second["model"][key])
    log = json.loads(second["log"])
    assert any("grid_accuracy" in row for row in log)  # the grid at the last step is scored by the classifier
    train_builtin.main(["export-flow", *common, "--assets-dir", str(assets)])
    manifest = json.loads((assets / train_flow.MANIFEST).read_text())["training"]
    assert manifest["training_steps"] == 2 and manifest["config"]["patch_size"] == 4
    assert (assets / builtin_flow.FLOW_WEIGHTS).stat().st_size < 10 * 2**20
    loaded = load_builtin_mnist_flow(assets)
    assert sum(p.numel() for p in builtin_flow.build_flow().parameters()) == manifest["parameters"]
    assert loaded.info.name == "builtin:mnist-flow"


def test_missing_weights_say_how_to_train_them(tmp_path):
    with pytest.raises(UnavailableError, match="train-builtin flow"):
        load_builtin_mnist_flow(tmp_path)


def test_shipped_weights_are_the_manifests_and_draw_their_classes():
    """The shipped file is the one the manifest describes (hash, size, ≥ 98% accuracy at 28 steps), and a few
    steps of the default plan already draw digits of the asked classes."""
    from schedsearch.calibration.manifest import sha256_file
    from schedsearch.runtime.builtin import ASSETS_DIR, load_builtin_classifier
    from schedsearch.runtime.models import load_model

    manifest = json.loads((ASSETS_DIR / train_flow.MANIFEST).read_text())
    weights = ASSETS_DIR / builtin_flow.FLOW_WEIGHTS
    assert sha256_file(weights) == manifest["training"]["weights_sha256"] == manifest["evaluation"]["weights_sha256"]
    assert weights.stat().st_size < 10 * 2**20
    assert manifest["evaluation"]["generated_accuracy"] >= 0.98 and manifest["evaluation"]["n_generated"] >= 1000
    model = load_model("builtin:mnist-flow")
    labels = torch.arange(10)
    x = initial_noise(list(range(10)), model.info.sample_shape)
    images = model.decode(sample(model.denoiser(labels), x, model.default_plan(8), model.noise_schedule,
                                 model.info.prediction_type))
    with torch.no_grad():
        predicted = load_builtin_classifier()(images).argmax(1)
    assert (predicted == labels).sum() >= 9


SPACES_AND_STRATEGIES = [  # every space, with each of its seed methods and a general strategy
    ("cache", "ecad", "psnr,macs"), ("cache", "nsga2", "psnr,macs"), ("joint", "ecad", "psnr,macs"),
    ("solver", "predictor", "psnr,nfe"), ("solver", "tpe", "psnr,nfe"), ("dc", "dc-fit", "mse,nfe"),
    ("dc", "optuna-nsga2", "mse,nfe"), ("cachequant", "dp", "psnr,macs"),
]


@pytest.fixture(scope="module")
def shipped():
    from schedsearch.runtime.models import load_model

    return load_model("builtin:mnist-flow")


@pytest.mark.parametrize(("space", "strategy", "objectives"), SPACES_AND_STRATEGIES,
                         ids=[f"{s}-{m}" for s, m, _ in SPACES_AND_STRATEGIES])
def test_every_space_and_strategy_runs_on_the_flow_model(shipped, tmp_path_factory, space, strategy, objectives):
    """Each space with its seed method (and a general strategy) on the shipped flow model: no failures, and the
    found schedules are scored (CacheQuant's DP needs units on the joint-attention blocks)."""
    from schedsearch.results.store import ResultStore
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    root = tmp_path_factory.getbasetemp() / "flow_studies"  # one calibration cache for every combination
    options = {"population": 4} if strategy in ("ecad", "nsga2") else {}
    result = run_search(model=shipped, space=space, strategy=strategy, objectives=objectives, study=strategy,
                        store=root / f"{space}-{strategy}.db", budget=Budget(evaluations=4), samples=2,
                        cache_dir=root / "cache", batch_size=4, strategy_options=options, progress=False,
                        validate=False, space_options={"num_steps": 6} if space in ("cache", "cachequant") else {})
    assert result.failed == 0 and result.evaluations >= 1
    with ResultStore(root / f"{space}-{strategy}.db") as store:
        records = [r for r in store.records(strategy) if r.status == "ok"]
    quality = objectives.split(",")[0]
    assert records and all(math.isfinite(r.metrics[quality]) for r in records)
