"""The builtin model's training code path, on a toy budget: it learns, checkpoints, resumes and exports."""

import json

import torch

from schedsearch.calibration import train_builtin
from schedsearch.runtime.builtin import CLASSIFIER_WEIGHTS, DIT_WEIGHTS, build_dit, load_builtin_dit


def test_loss_is_min_snr_weighted_epsilon_mse():
    torch.manual_seed(0)
    model = build_dit()
    x0 = torch.zeros(4, 1, 28, 28)
    loss = train_builtin.diffusion_loss(model, x0, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    # adaLN-zero starts as the identity residual: the untrained model predicts ε ≈ 0, so the loss ≈ E[w] · 1
    assert 0.2 < loss.item() < 1.2
    abar = train_builtin.alphas_cumprod()
    assert abar[0] > 0.999 and abar[-1] < 1e-4


def test_train_resume_and_export(tmp_path):
    work, assets = tmp_path / "work", tmp_path / "assets"
    common = [
        "--work-dir",
        str(work),
        "--batch-size",
        "8",
        "--ckpt-every",
        "2",
        "--grid-every",
        "1000",
        "--grid-per-class",
        "1",
        "--threads",
        "1",
    ]
    train_builtin.main(["dit", "--steps", "2", *common])
    first = torch.load(work / "dit_ckpt.pt", weights_only=True)
    assert first["step"] == 2
    train_builtin.main(["dit", "--steps", "4", *common])  # resumes from step 2, not from scratch
    second = torch.load(work / "dit_ckpt.pt", weights_only=True)
    assert second["step"] == 4
    assert not torch.equal(first["model"]["pos_embed.proj.weight"], second["model"]["pos_embed.proj.weight"])
    assert (work / "dit_grid_000004.png").is_file()  # a grid at the last step

    train_builtin.main(["classifier", "--work-dir", str(work), "--classifier-steps", "3", "--threads", "1"])
    train_builtin.main(["export", *common, "--assets-dir", str(assets)])
    manifest = json.loads((assets / "manifest.json").read_text())["training"]
    assert manifest["training_steps"] == 4
    assert manifest["config"]["patch_size"] == 4
    assert len(manifest["data"]["sha256"]) == 64
    assert 0.0 <= manifest["classifier"]["heldout_accuracy"] <= 1.0
    assert (assets / CLASSIFIER_WEIGHTS).is_file()
    model = load_builtin_dit(assets)
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert not any(p.name.endswith(".tmp") for p in assets.iterdir())
    assert (assets / DIT_WEIGHTS).stat().st_size < 20 * 2**20
