"""benchmarks/quality.py: the Frechet distance against closed forms, the generated-folder layouts,
and one end-to-end smoke run on tiny settings into a temporary results folder."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402


def test_frechet_distance_matches_the_closed_form_of_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
    )
    s1, s2 = (
        torch.rand(8, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(8, generator=g, dtype=torch.float64) + 0.1,
    )
    # FD = ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)) when both covariances are diagonal
    expected = ((mu1 - mu2).pow(2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()).item()
    assert math.isclose(
        quality.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)), expected, rel_tol=1e-9
    )
    # A shared rotation leaves the distance unchanged but makes C1 C2 non-symmetric: the general path.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    rotated = quality.frechet_distance(
        q @ mu1, q @ torch.diag(s1) @ q.T, q @ mu2, q @ torch.diag(s2) @ q.T
    )
    assert math.isclose(rotated, expected, rel_tol=1e-9)


def test_frechet_distance_of_a_feature_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2000, 128, generator=g) @ torch.randn(
        128, 128, generator=g
    )  # correlated, like real features
    fit = quality.gaussian_fit(features)
    assert abs(quality.frechet_distance(*fit, *fit)) < 1e-6 * torch.trace(fit[1]).item()


def test_coverage_kl_is_zero_when_uniform_and_log_k_when_collapsed():
    assert quality.coverage_kl(torch.arange(10).repeat(7)) == 0
    assert math.isclose(quality.coverage_kl(torch.full((50,), 3)), math.log(10))


def test_class_folders_map_to_fashion_mnist_classes(tmp_path):
    for folder in ("t-shirt_top", "Ankle boot"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(np.full((32, 32), 255 * i, dtype=np.uint8)).save(
                tmp_path / folder / f"{i:06d}.png"
            )
    images, requested = quality.read_generated(tmp_path)
    assert images.shape == (4, 1, 32, 32) and images.min() == -1 and images.max() == 1
    assert requested.tolist() == [
        9,
        9,
        0,
        0,
    ]  # folders in sorted order: "Ankle boot" before "t-shirt_top"


def write_pngs(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    for i, pixels in enumerate(images[:, 0].add(1).mul(127.5).round().byte().numpy()):
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


@pytest.fixture(scope="module")
def scorer():
    """The classifier and the Gaussian fit of its features of 2,000 test images (quality.py fits all 10,000)."""
    model = quality.load_classifier()
    test_images, _ = quality.load_test_set()
    return model, quality.gaussian_fit(quality.classify(model, test_images[:2000])[0])


def test_the_score_tells_real_images_from_one_class_and_from_blanks(scorer, tmp_path):
    """Measured: 2,000 training images score FD 0.37 against 2,000 test images; 2,000 sneakers 201.7; blanks 251.2."""
    model, reference = scorer
    train, labels = quality.load_train_set()
    write_pngs(tmp_path / "real", train[:2000])
    write_pngs(
        tmp_path / "sneakers", train[labels == 7][:2000]
    )  # a generator collapsed onto one class
    write_pngs(tmp_path / "blank", torch.full((500, 1, 32, 32), -1.0))
    real, sneakers, blank = (
        quality.evaluate(model, tmp_path / f, reference) for f in ("real", "sneakers", "blank")
    )
    assert real["fd"] < 1 and real["kl"] < 0.01 and real["cond_acc"] is None
    assert sneakers["fd"] > 100 and sneakers["kl"] > 2 and blank["fd"] > 100
    assert math.isclose(blank["kl"], math.log(10))  # every blank is given one class
    # Class folders, as a conditional script writes them: the classifier agrees with the folder it finds an image in.
    for k, name in enumerate(quality.CLASSES):
        write_pngs(tmp_path / "by_class" / name.replace("/", "_"), train[labels == k][:50])
        write_pngs(
            tmp_path / "shifted" / name.replace("/", "_"), train[labels == (k + 1) % 10][:50]
        )
    assert quality.evaluate(model, tmp_path / "by_class", reference)["cond_acc"] > 0.9
    assert quality.evaluate(model, tmp_path / "shifted", reference)["cond_acc"] < 0.1


def test_options_that_cannot_run_are_refused_with_one_line():
    with pytest.raises(SystemExit, match=r"^error: --ablations-only needs --ablations$"):
        quality.check_args(quality.Args(scripts=["wgan_gp"], ablations_only=True))
    import classifier

    with pytest.raises(SystemExit, match=r"^error: --cpus 999: this process may only use cores \d"):
        classifier.pin_to_cpus([999])  # speed.py pins with the same function


def test_a_stop_in_the_scripts_startup_keeps_the_checkpoint_it_started_from(tmp_path, monkeypatch):
    # A script's startup turns SIGTERM into a KeyboardInterrupt, which ends Python with -2: a budget
    # that runs out there stops the run at the step it resumed from.
    startup = "import signal, time; signal.signal(signal.SIGTERM, signal.default_int_handler); time.sleep(60)"
    monkeypatch.setattr(quality, "script_command", lambda *_: [sys.executable, "-c", startup])
    (tmp_path / "run").mkdir()
    torch.save({"step": 7}, tmp_path / "run" / "checkpoint.pt")
    assert quality.continue_until("wgan_gp", tmp_path / "run", 2.0) == 7


def test_quality_benchmark_runs_end_to_end(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/quality.py"), "--scripts", "wgan_gp", "--seeds", "1",
               "--fixed-steps", "2", "--budget-minutes", "0.25", "--num-images", "200",
               "--ablations", "no EMA=--ema-halflife 0",
               "--script-flags=--batch-size 8 --g-width 8 --d-width 8 --n-critic 1 --ema-halflife 5000 --max-images 512",
               "--results-dir", str(tmp_path / "results"), "--assets-dir", str(tmp_path / "assets"),
               "--work-dir", str(tmp_path / "work")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert 0 <= stored["floor"]["fd"] < 1 and stored["classifier_accuracy"] > 0.9
    rows = {row["kind"]: row for row in stored["scripts"]["wgan_gp"]["rows"]}
    assert set(rows) == {"fixed", "budget", "budget-raw", "ablation"}
    assert (
        rows["budget-raw"]["steps"] == rows["budget"]["steps"]
    )  # the same checkpoint, sampled without its EMA:
    budget = torch.load(tmp_path / "work" / "wgan_gp-seed1" / "checkpoint.pt", weights_only=True)
    raw = torch.load(tmp_path / "work" / "wgan_gp-seed1-raw" / "checkpoint.pt", weights_only=True)
    assert budget["ema"] is not None and raw["ema"] is None and raw["args"]["ema_halflife"] == 0
    assert all(torch.equal(raw["generator"][k], v) for k, v in budget["generator"].items())
    for row in rows.values():
        assert math.isfinite(row["fd"]) and row["fd"] > stored["floor"]["fd"]
        assert 0 <= row["kl"] <= math.log(10) + 1e-9 and row["cond_acc"] is None
    # The stored numbers are the score of the images the budget run generated: scored again here, they match.
    model = quality.load_classifier()
    reference = quality.gaussian_fit(quality.classify(model, quality.load_test_set()[0])[0])
    again = quality.evaluate(model, tmp_path / "work" / "wgan_gp-seed1" / "generated", reference)
    assert (
        math.isclose(again["fd"], rows["budget"]["fd"], rel_tol=1e-6)
        and again["kl"] == rows["budget"]["kl"]
    )
    assert rows["fixed"]["steps"] == 2 and rows["ablation"]["steps"] == 2
    # The resumed run was stopped by SIGTERM once the 15 s were spent, its step finished and saved (15 s leave the
    # resumed run time to start even on a loaded machine), not run to its end.
    assert (
        15 <= rows["budget"]["wall_s"] < 15 + 60 and rows["budget"]["steps"] == budget["step"] >= 2
    )
    assert "stopped at step" in (tmp_path / "work" / "wgan_gp-seed1.log").read_text()
    table = (tmp_path / "results" / "quality.md").read_text()
    assert (
        "| fixed 2 steps |" in table
        and "| 0.25 min budget |" in table
        and "| 0.25 min budget, sampled without EMA |" in table
        and "| no EMA | `--ema-halflife 0` |" in table
    )
    assert (tmp_path / "assets" / "wgan_gp-fashion-mnist.png").is_file()
    assert (tmp_path / "assets" / "wgan_gp-fashion-mnist-no-ema.png").is_file()
    assert (tmp_path / "assets" / "wgan_gp-fashion-mnist-2steps.png").is_file()
