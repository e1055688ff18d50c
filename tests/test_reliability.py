"""Faults a demanding user meets: divergence, failed writes, clashing runs, pinned cores; and the real-vs-fake grid."""

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, SHARED_SCRIPT, copy_run, expect_error, last_line, load, load_checkpoint, run, tiny
from PIL import Image

DIVERGE = ["--lr-g", "1e38", "--lr-d", "1e38"]  # Adam steps of 1e38 overflow fp32 weights in every script


def limit_file_size(size: int):
    """A child whose writes beyond `size` bytes fail with EFBIG, as on a disk that fills (SIGXFSZ ignored)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def run_limited(script: str, *args: str, cwd, size: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / f"{script}.py"), *args]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limit_file_size(size))


# fp16 in every script: the scaler skips every step once the weights overflow fp16, so they stay finite in fp32; the
# check reads them in the precision that the forward casts them to.
@pytest.mark.parametrize(
    "script, precision", [(s, "fp16") for s in SCRIPTS] + [(SHARED_SCRIPT, p) for p in ("fp32", "bf16")]
)
def test_divergence_stops_at_the_first_check_and_writes_no_checkpoint(script, precision, tmp_path):
    flags = [*tiny(script), *DIVERGE, "--total-steps", "6", "--log-every", "3", "--sample-every", "3"]
    flags += ["--precision", precision]
    result = run(script, *flags, "--run-name", "nan", cwd=tmp_path)
    expect_error(result, r"^error: training diverged at step 3 \(a loss or weight is not finite\); no checkpoint was")
    assert not (tmp_path / "runs" / "nan" / "checkpoint.pt").exists()
    assert not list((tmp_path / "runs" / "nan").glob("samples/*.png")) and "finished" not in result.stdout


def test_divergence_after_a_save_keeps_that_checkpoint_untouched(tmp_path):
    script = SHARED_SCRIPT
    flags = [*tiny(script), "--total-steps", "2", "--log-every", "1", "--sample-every", "2", "--run-name", "r"]
    assert run(script, *flags, cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / "runs" / "r" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    result = run(script, "--resume", str(checkpoint), *DIVERGE, "--total-steps", "6", cwd=tmp_path)
    expect_error(result, rf"training diverged at step 3 .*; {checkpoint} keeps the last good step$")
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.glob("samples/*")) == ["0000002.png"]


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_other_device_types_are_refused_before_a_run_folder_exists(device, tmp_path):
    result = run(SHARED_SCRIPT, *tiny(SHARED_SCRIPT), "--device", device, cwd=tmp_path)
    expect_error(result, rf"--device {device}: this script runs on cpu or cuda")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "run_name, pattern",
    [
        ("a_file/run", r"cannot make the run folder runs/a_file/run \(Not a directory\)"),
        ("/proc/gan", r"cannot make the run folder /proc/gan \((No such file or directory|Permission denied)\)"),
    ],
)
def test_a_run_folder_that_cannot_be_made_is_one_line(run_name, pattern, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a_file").write_text("in the way")  # --run-name is a folder under runs/, or a path
    expect_error(run(SHARED_SCRIPT, *tiny(SHARED_SCRIPT), "--run-name", run_name, cwd=tmp_path), pattern)


def test_a_disk_that_fills_while_saving_is_one_line_and_leaves_no_partial_file(tmp_path):
    flags = [*tiny(SHARED_SCRIPT), "--total-steps", "2", "--sample-every", "2", "--run-name", "full"]
    result = run_limited(SHARED_SCRIPT, *flags, cwd=tmp_path, size=400_000)  # grids fit, the checkpoint does not
    expect_error(result, r"cannot write runs/full/checkpoint.pt \(File too large\)")
    files = sorted(p.name for p in (tmp_path / "runs" / "full").iterdir() if p.is_file() and "events" not in p.name)
    assert files == ["real_vs_fake.png"]


def test_generate_onto_a_file_or_a_full_disk_is_one_line_and_leaves_no_empty_png(trained, tmp_path):
    checkpoint = copy_run(trained(SHARED_SCRIPT), tmp_path / "in_the_way")
    (checkpoint.parent / "generated").write_text("a file where the folder goes")
    result = run(SHARED_SCRIPT, "--generate", str(checkpoint), "--num-images", "3", cwd=tmp_path)
    expect_error(result, r"cannot write .*in_the_way/generated/000000.png \((File exists|Not a directory)\)")
    checkpoint = copy_run(trained(SHARED_SCRIPT), tmp_path / "full")
    result = run_limited(SHARED_SCRIPT, "--generate", str(checkpoint), "--num-images", "3", cwd=tmp_path, size=100)
    expect_error(result, r"cannot write .*full/generated_grid.png \(File too large\)")
    assert sorted(p.name for p in checkpoint.parent.rglob("*")) == ["checkpoint.pt"]


def test_two_runs_started_at_once_with_one_name_never_share_a_folder(tmp_path):
    flags = [*tiny(SHARED_SCRIPT), "--total-steps", "2", "--sample-every", "2", "--run-name", "same"]
    command = [sys.executable, str(ROOT / f"{SHARED_SCRIPT}.py"), *flags]
    both = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    both.append(subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = sorted((p.wait(timeout=240), last_line(p.communicate()[1])) for p in both)
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    assert outcomes[1][1].startswith("error: cannot make the run folder runs/same (File exists)"), outcomes
    assert "Traceback" not in outcomes[1][1]


def test_run_name_with_resume_is_refused(trained, tmp_path):
    checkpoint = copy_run(trained(SHARED_SCRIPT), tmp_path / "run")
    result = run(SHARED_SCRIPT, "--resume", str(checkpoint), "--run-name", "elsewhere", cwd=tmp_path)
    expect_error(result, r"--resume continues the run in .*run: --run-name cannot move it")
    assert not (tmp_path / "runs").exists()


def test_a_run_pinned_to_one_core_decodes_without_dataloader_warnings(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(16):
        Image.new("RGB", (40, 30), (i * 15, 100, 50)).save(tmp_path / "images" / f"{i}.png")
    flags = [*tiny(SHARED_SCRIPT), "--dataset", "folder", "--data-dir", "images", "--max-images", "16"]
    command = [sys.executable, str(ROOT / f"{SHARED_SCRIPT}.py"), *flags, "--total-steps", "1", "--image-size", "16"]
    pin = lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # noqa: E731
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=pin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_real_vs_fake_grid_puts_data_and_samples_side_by_side_at_one_size(script, trained, tmp_path):
    run_dir = trained(script)
    reals = load_checkpoint(run_dir / "checkpoint.pt")["reals"]
    rows = 10 if script == "cond_wgan_gp" else 8  # the conditional grid: one row per Fashion-MNIST class
    assert reals.shape == (rows * 8, 1, 32, 32) and reals.dtype == torch.uint8
    grid = torch.from_numpy(np.array(Image.open(run_dir / "real_vs_fake.png").convert("L")))
    assert grid.shape == (2 + rows * 34, 2 + 16 * 34)  # rows of 8 reals then 8 fakes, 32 px and 2 px padding
    assert torch.equal(grid[2:34, 2:34], reals[0, 0])  # the top-left image is the first real one, unchanged
    fakes = torch.from_numpy(np.array(Image.open(run_dir / "samples" / "0000024.png").convert("L")))
    assert torch.equal(grid[2:34, 2 + 8 * 34 : 34 + 8 * 34], fakes[2:34, 2:34])  # then the first fixed-noise sample
    if script == "cond_wgan_gp":  # each row's reals belong to that row's class
        module = load(script)
        args = module.Args(max_images=64, batch_size=8)
        module.check_args(args)
        images, labels, *_ = module.load_dataset(args)
        for k, real in enumerate(reals):
            assert any(torch.equal(real, image) for image in images[labels == k // 8])
    checkpoint = copy_run(run_dir, tmp_path / "gen")
    assert run(script, "--generate", str(checkpoint), "--num-images", "2", cwd=tmp_path).returncode == 0
    assert (tmp_path / "gen" / "real_vs_fake.png").read_bytes() == (run_dir / "real_vs_fake.png").read_bytes()
