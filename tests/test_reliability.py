"""Faults a demanding user meets: divergence, failed writes, clashing runs, pinned cores; and the real-vs-fake grid."""

import os
import resource
import signal
import subprocess
import sys
import time

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
        ("a_file/run", r"^error: NotADirectoryError: \[Errno 20\] Not a directory: 'runs/a_file/run'$"),
        ("/proc/gan", r"^error: (FileNotFoundError|PermissionError): \[Errno \d+\] .*: '/proc/gan'$"),
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
    assert outcomes[1][1] == "error: FileExistsError: [Errno 17] File exists: 'runs/same'", outcomes
    assert "Traceback" not in outcomes[1][1]


def test_run_name_with_resume_is_refused(trained, tmp_path):
    checkpoint = copy_run(trained(SHARED_SCRIPT), tmp_path / "run")
    result = run(SHARED_SCRIPT, "--resume", str(checkpoint), "--run-name", "elsewhere", cwd=tmp_path)
    expect_error(result, r"run/checkpoint.pt belongs to the run in its folder: --run-name cannot move it$")
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


# Issue 21's probes, each a class of fault: what lies in a run folder, what a run is given, what a machine lacks.
def test_stray_files_in_a_run_folder_never_stop_its_saves(trained, tmp_path):
    run_dir = copy_run(trained(SHARED_SCRIPT), tmp_path / "run").parent
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # a run folder copied from a Mac
    (run_dir / "samples" / "0000024.png.4242.tmp").write_bytes(b"")  # what a kill -9 during a grid write leaves
    (run_dir / "progress.gif").mkdir()  # a folder where an older version wrote its GIF
    flags = ["--resume", str(run_dir / "checkpoint.pt"), "--total-steps", "26", "--sample-every", "1"]
    result = run(SHARED_SCRIPT, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 26
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["0000025.png", "0000026.png"]


def test_a_disk_that_fills_between_saves_stops_the_logging_with_one_line(tmp_path):
    # 40 KB a file: the event file outgrows it after a few hundred logged steps, long before the first save.
    flags = [*tiny(SHARED_SCRIPT), "--total-steps", "100000", "--log-every", "1", "--sample-every", "100000"]
    result = run_limited(SHARED_SCRIPT, *flags, "--n-critic", "1", "--run-name", "full", cwd=tmp_path, size=40_000)
    expect_error(result, r"^error: OSError: \[Errno 27\] File too large")
    assert not (tmp_path / "runs" / "full" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--latent-dim", "100000000000"], r"^error: RuntimeError: .*can't allocate memory"),  # a size beyond memory
        (["--seed", "1e20"], None),  # not an integer: tyro's usage box, exit code 2
    ],
)
def test_sizes_beyond_memory_and_malformed_numbers_stop_without_a_traceback(flags, pattern, tmp_path):
    result = run(SHARED_SCRIPT, *tiny(SHARED_SCRIPT), *flags, cwd=tmp_path)
    if pattern:
        expect_error(result, pattern)
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr and "--seed" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_compile_without_a_cpp_compiler_is_one_line(tmp_path):
    # A real interpreter: torch reads $CXX when it first imports inductor's settings.
    command = [sys.executable, str(ROOT / f"{SHARED_SCRIPT}.py"), *tiny(SHARED_SCRIPT), "--compile"]
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    expect_error(result, r"^error: InductorError: InvalidCxxCompiler: No working C\+\+ compiler")


def test_ctrl_c_during_generate_is_one_line_and_a_second_generate_leaves_no_stale_images(trained, tmp_path):
    checkpoint = copy_run(trained(SHARED_SCRIPT), tmp_path / "run")
    command = [sys.executable, str(ROOT / f"{SHARED_SCRIPT}.py"), "--generate", str(checkpoint), "--num-images"]
    process = subprocess.Popen([*command, "100000"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    generated = checkpoint.parent / "generated"
    deadline = time.time() + 120
    while len(list(generated.glob("*.png"))) < 20 and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == -signal.SIGINT and last_line(stderr) == "error: KeyboardInterrupt", stderr[-2000:]
    assert "Traceback" not in stderr and len(list(generated.glob("*.png"))) >= 20
    # Run again with fewer images: the folder holds those alone, as an FID tool reads it.
    result = subprocess.run([*command, "3"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in generated.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_a_newline_in_a_file_name_stays_on_the_line_of_its_message(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad\nname.png").write_text("not an image")
    result = run(SHARED_SCRIPT, *tiny(SHARED_SCRIPT), "--dataset", "folder", "--data-dir", "images", cwd=tmp_path)
    expect_error(result, r"^error: images/bad\\nname\.png is not a readable image")  # one line: the name's \n escaped


def test_a_copied_script_away_from_its_data_and_offline_says_what_to_do_in_one_line(tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "gan.py").write_bytes((ROOT / f"{SHARED_SCRIPT}.py").read_bytes())
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # offline for sure
    command = [sys.executable, "gan.py", *tiny(SHARED_SCRIPT)]
    result = subprocess.run(command, cwd=tmp_path / "project", env=env, capture_output=True, text=True, timeout=240)
    expect_error(result, r"^error: no fashion-mnist in .*project/data, and no download \(.+\): try --data-dir$")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_generate_with_resume_generates_from_its_own_checkpoint_and_resume_follows_a_link(trained, tmp_path):
    a, b = (copy_run(trained(SHARED_SCRIPT), tmp_path / name) for name in ("a", "b"))
    ckpt = torch.load(a, weights_only=True)
    torch.save(ckpt | {"args": ckpt["args"] | {"seed": 7}}, a)  # a draws other noise than b: other images
    images = []
    for flags in (["--generate", str(b)], ["--resume", str(a), "--generate", str(b)]):
        result = run(SHARED_SCRIPT, *flags, "--num-images", "1", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        images.append((tmp_path / "b" / "generated" / "000000.png").read_bytes())
    assert images[0] == images[1] and not (tmp_path / "a" / "generated").exists()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.pt").symlink_to(a)
    result = run(SHARED_SCRIPT, "--resume", "elsewhere/link.pt", "--total-steps", "25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(a)["step"] == 25 and (tmp_path / "a" / "samples" / "0000025.png").exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["link.pt"]


@pytest.mark.parametrize("g_norm", ["none", "batch", "instance"])
@pytest.mark.parametrize("g_sn", [True, False])
@pytest.mark.parametrize("critic_sn", [True, False])
def test_resnet_trains_with_every_generator_norm_and_spectral_norm(g_norm, g_sn, critic_sn, tmp_path):
    # The EMA (on in the tiny runs) copies the generator's buffers: without spectral norm and batch norm it has none.
    critic_norm = {"none": "instance", "batch": "layer", "instance": "none"}[g_norm]  # every critic norm too
    flags = [*tiny("resnet_sn_wgan_gp"), "--g-norm", g_norm, "--critic-norm", critic_norm, "--total-steps", "2"]
    flags += ["--g-spectral-norm" if g_sn else "--no-g-spectral-norm"]
    flags += ["--critic-spectral-norm" if critic_sn else "--no-critic-spectral-norm"]
    result = run("resnet_sn_wgan_gp", *flags, "--run-name", "combo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "runs" / "combo" / "checkpoint.pt")
    buffers = {k for k in ckpt["generator"] if k.endswith(("running_mean", "._u"))}
    assert {k for k in ckpt["ema"] if k in buffers} == buffers and all(
        torch.equal(ckpt["ema"][k], ckpt["generator"][k]) for k in buffers
    )  # copied, where there are any
    assert bool(buffers) == (g_norm == "batch" or g_sn)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    # Steps of a few seconds (128 px at widths 64), so that the first Ctrl-C is still finishing its step.
    flags = ["--image-size", "128", "--batch-size", "16", "--max-images", "64", "--total-steps", "100000"]
    command = [sys.executable, str(ROOT / f"{SHARED_SCRIPT}.py"), *flags, "--run-name", "twice"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "runs" / "twice"
    deadline = time.time() + 120
    while not list(events.glob("events.*")) and time.time() < deadline:  # the run folder: training starts
        time.sleep(0.1)
    time.sleep(1)  # the handlers are set right after the event file: now inside the first step
    process.send_signal(signal.SIGINT)
    # Python runs a handler between two operations, so a second Ctrl-C during a long one (a loaded machine's first
    # step takes seconds) merges with the first: press again every 0.1 s, as a user would, until the process ends.
    while process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT, (process.returncode, err[-2000:])
    assert "stopped at step" not in out and not (events / "checkpoint.pt").exists()
