"""The `schedsearch` command: good runs write what they say; bad input names the field, exits 2, writes nothing."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from schedsearch.cli import EXIT_BAD_INPUT, main
from schedsearch.spaces.schedule import load_schedule


@pytest.fixture()
def good_schedule(tmp_path):
    path = tmp_path / "unipc6.json"
    assert main(["schedule", "unipc", "--steps", "6", "--out", str(path)]) == 0
    return path


def test_sample_with_schedule_writes_a_grid(tmp_path, good_schedule):
    out = tmp_path / "grid.png"
    code = main(
        ["sample", "--schedule", str(good_schedule), "--classes", "3,5", "--n-per-class", "3", "--out", str(out)]
    )
    assert code == 0
    width, height = Image.open(out).size
    assert (width, height) == (3 * 30 + 2, 2 * 30 + 2)  # 28 px + 2 px padding per cell


def test_schedule_file_is_valid_and_for_the_model(good_schedule):
    schedule = load_schedule(good_schedule)
    assert schedule.model == "builtin:mnist-dit"
    assert schedule.solver.nfe == 6
    assert schedule.meta == {"baseline": "unipc"}


def _mutated(path, tmp_path, mutate):
    data = json.loads(path.read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    return bad


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(model="diffusers:PixArt-alpha/PixArt-XL-2-512x512"), "'model'"),
        (lambda d: d["solver"].update(timesteps=[999, 800, 800, 400, 200, 100]), "solver.timesteps[2]"),
        (lambda d: d["solver"]["steps"][2].update(prediction="velocity"), "solver.steps[2].prediction"),
        (lambda d: d["solver"]["steps"][3].update(order=4), "solver.steps[3].order"),
        (lambda d: d["solver"].update(timesteps=[1500, 800, 600, 400, 200, 100]), "solver.timesteps"),
    ],
)
def test_bad_schedule_is_refused(tmp_path, good_schedule, capsys, mutate, message):
    bad = _mutated(good_schedule, tmp_path, mutate)
    out = tmp_path / "never.png"
    assert main(["sample", "--schedule", str(bad), "--out", str(out)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_malformed_schedule_and_bad_flags(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "schedsearch.schedule/v1", "solver": [')
    out = tmp_path / "never.png"
    assert main(["sample", "--schedule", str(broken), "--out", str(out)]) == EXIT_BAD_INPUT
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["sample", "--classes", "1,12", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "--classes" in capsys.readouterr().err
    assert main(["sample", "--classes", "one", "--out", str(out)]) == EXIT_BAD_INPUT
    assert main(["sample", "--model", "builtin:nope", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "model: unknown" in capsys.readouterr().err
    assert not out.exists()


def test_console_script_exit_code(tmp_path):
    """The installed entry point returns non-zero on bad input (what a shell script or CI sees)."""
    proc = subprocess.run(
        [sys.executable, "-m", "schedsearch.cli", "sample", "--schedule", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert "no such file" in proc.stderr


def test_sample_runs_a_cached_schedule(tmp_path, capsys):
    path = tmp_path / "fora.json"
    assert main(["schedule", "dpmsolver++", "--steps", "6", "--fora", "2", "--out", str(path)]) == 0
    assert load_schedule(path).cache.kind == "components"
    out = tmp_path / "cached.png"
    assert main(["sample", "--schedule", str(path), "--classes", "1", "--n-per-class", "2", "--out", str(out)]) == 0
    assert "cache components" in capsys.readouterr().out
    assert out.is_file()


def test_cache_plan_for_another_architecture_is_refused(tmp_path, capsys):
    path = tmp_path / "fora.json"
    assert main(["schedule", "dpmsolver++", "--steps", "6", "--fora", "2", "--out", str(path)]) == 0
    data = json.loads(path.read_text())
    data["cache"]["layout"] = "transformer_blocks[28](attn1,attn2,ff)"
    data["cache"]["recompute"] = ["1" * 84] * 6
    path.write_text(json.dumps(data))
    out = tmp_path / "never.png"
    assert main(["sample", "--schedule", str(path), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "transformer_blocks[28]" in err and "transformer_blocks[6]" in err
    assert not out.exists()
