"""Checks every script must pass: shapes, a training run, resume, interruption, generation, bad input, --help."""

import ast
import dataclasses
import math
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tyro
from conftest import (
    GRID_ROWS,
    ROOT,
    SCRIPTS,
    SHARED_SCRIPT,
    build_models,
    copy_run,
    expect_error,
    load,
    load_checkpoint,
    run,
    tiny,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_model_shapes(script, image_size, channels):
    torch.manual_seed(0)
    generator, critic = build_models(script, image_size, channels, latent_dim=16)
    fake = generator(torch.randn(5, 16))
    assert fake.shape == (5, channels, image_size, image_size)
    assert fake.min() >= -1 and fake.max() <= 1  # tanh output, the range real images are mapped to
    assert critic(fake).shape == (5,)


@pytest.mark.parametrize("script", SCRIPTS)
def test_widths_default_to_32_up_to_32_px_and_64_above(script):
    module = load(script)
    for size, width in [(16, 32), (32, 32), (64, 64), (128, 64)]:
        args = module.Args(image_size=size)
        module.check_args(args)
        assert (args.g_width, args.d_width) == (width, width)
    args = module.Args(g_width=48, d_width=16)  # given widths stay
    module.check_args(args)
    assert (args.g_width, args.d_width) == (48, 16)


@pytest.mark.parametrize("script", SCRIPTS)
def test_cpu_runs_batches_of_32_and_the_lazy_penalty_where_they_trained_better(script):
    # wgan_gp.py and cond_wgan_gp.py: batch 32 and --gp-every 4 on the CPU (README), the paper's 64 and 1 on a GPU.
    module, changed = load(script), script in ("wgan_gp", "cond_wgan_gp")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    for device, kind in [
        ("cpu", "cpu"),
        ("cuda:1", "cuda"),
        (None, here),
        ("", here),
    ]:  # "": unset, as setup_device
        args = module.Args(device=device)
        module.check_args(args)  # no GPU needed: the device is only named here
        expected = (32, 4) if changed and kind == "cpu" else (64, 1)
        assert (args.batch_size, getattr(args, "gp_every", 1)) == expected, device
    args = module.Args(device="cpu", batch_size=48)  # a given batch size stays
    module.check_args(args)
    assert args.batch_size == 48


WGAN_GP_SCALARS = {
    "losses/critic",
    "losses/wasserstein_estimate",
    "losses/gradient_penalty",
    "losses/generator",
}
SCALARS = {
    "wgan_gp": WGAN_GP_SCALARS,
    "dcgan": {"losses/discriminator", "losses/generator", "charts/d_real", "charts/d_fake"},
    "cond_wgan_gp": WGAN_GP_SCALARS,
    "resnet_sn_wgan_gp": WGAN_GP_SCALARS | {"charts/learning_rate"},
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_run_logs_finite_scalars_grids_and_checkpoint(script, trained):
    run_dir = trained(script)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()["scalars"]
    assert set(tags) == SCALARS[script], tags
    values = {}
    for tag in tags:
        values[tag] = [e.value for e in events.Scalars(tag)]
        assert [e.step for e in events.Scalars(tag)] == [12, 24], (
            tag
        )  # logged every 12 generator steps
        assert all(math.isfinite(v) for v in values[tag]), (tag, values[tag])
    if script == "dcgan":  # D's mean probabilities of "real" on the reals and on the fakes
        assert all(0 < v < 1 for v in values["charts/d_real"] + values["charts/d_fake"]), values
    else:  # L_D with the last GP: -W + lambda_gp GP (lambda_gp 10; cond_wgan_gp's lambda_ac 0)
        logged = zip(
            *(
                values[f"losses/{name}"]
                for name in ("critic", "wasserstein_estimate", "gradient_penalty")
            )
        )
        for critic, wasserstein, gp in logged:
            assert math.isclose(critic, -wasserstein + 10 * gp, rel_tol=1e-5, abs_tol=1e-5)
    if (
        script == "resnet_sn_wgan_gp"
    ):  # decayed linearly to 0 over 24 steps: the rate of steps 12 and 24
        assert values["charts/learning_rate"] == pytest.approx([2e-4 * 13 / 24, 2e-4 * 1 / 24])
    assert [e.step for e in events.Images("samples/fixed_noise")] == [12, 24]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["0000012.png", "0000024.png"]
    from PIL import Image

    with Image.open(run_dir / "samples" / "0000024.png") as grid:
        assert grid.size == (
            8 * 34 + 2,
            GRID_ROWS.get(script, 8) * 34 + 2,
        )  # 8 columns of 32 px, 2 px padding
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["step"] == 24 and ckpt["kind"] == script and ckpt["args"]["precision"] == "bf16"
    assert (
        ckpt["args"]["run_name"] == "tiny"
        and ckpt["args"]["image_size"] == 32
        and ckpt["args"]["channels"] == 1
    )
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("halflife, moved", [(2, 1 - 0.5**4), (1e9, 0.9)])
def test_ema_halflife_sets_the_decay_per_step_and_the_warm_up_caps_it(halflife, moved, tmp_path):
    # Batch 8 and a half-life of 2 images: decay 0.5 ** (8 / 2) = 0.0625 per step, under the warm-up's cap of 1/10 at
    # step 0, so after one step the average has moved 1 - 0.0625 of the way from the initial to the trained weights.
    # A half-life of 1e9 images: decay 0.5 ** (8 / 1e9), nearly 1, so the cap (1 + 0) / (10 + 0) = 0.1 sets it: 0.9.
    module = load(SHARED_SCRIPT)
    flags = [
        *tiny(SHARED_SCRIPT),
        "--ema-halflife",
        str(halflife),
        "--seed",
        "1",
        "--total-steps",
        "1",
    ]
    result = run(SHARED_SCRIPT, *flags, "--precision", "fp32", "--run-name", "ema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "runs/ema/checkpoint.pt")
    torch.manual_seed(1)  # the script seeds the same way right before it builds the generator
    start = module.Generator(128, 1, 32, 8).state_dict()
    for name, ema in ckpt["ema"].items():
        if (
            name.endswith("weight") and ema.dim() > 1
        ):  # the conv weights: each moved `moved` of the way
            trained, initial = ckpt["generator"][name], start[name]
            torch.testing.assert_close(
                ema, initial + moved * (trained - initial), rtol=1e-5, atol=1e-7
            )
    buffers = [
        name for name in ckpt["ema"] if "running" in name
    ]  # batch norm's statistics: copied, not averaged
    assert buffers and all(
        torch.equal(ckpt["ema"][name], ckpt["generator"][name]) for name in buffers
    )


def test_generate_draws_from_the_moving_average_and_needs_no_data(trained, tmp_path):
    module, checkpoint = load(SHARED_SCRIPT), copy_run(trained(SHARED_SCRIPT), tmp_path / "run")
    flags = [
        "--generate",
        str(checkpoint),
        "--num-images",
        "2",
        "--data-dir",
        str(tmp_path / "no-such-data"),
    ]
    result = run(SHARED_SCRIPT, *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    ckpt, written = load_checkpoint(checkpoint), []
    for i in range(2):
        with Image.open(tmp_path / "run" / "generated" / f"{i:06d}.png") as image:
            written.append(torch.from_numpy(np.array(image)))
    for weights, expect_match in (("ema", True), ("generator", False)):
        # As the script: the seed, then the weights and the fixed noise draw from it, then image 0's z.
        torch.manual_seed(ckpt["args"]["seed"])
        generator, _ = module.Generator(128, 1, 32, 8), module.Critic(1, 32, 8)
        torch.randn(64, 128)  # the fixed noise
        generator.load_state_dict(ckpt[weights])
        with torch.no_grad():
            images = [generator.eval()(torch.randn(1, 128))[0, 0] for _ in range(2)]
        pixels = [x.add(1).mul(127.5).round().clamp(0, 255) for x in images]
        gaps = [(a - b.float()).abs().max().item() for a, b in zip(pixels, written)]
        assert all(gap <= 1 for gap in gaps) == expect_match, (
            weights,
            gaps,
        )  # 1: the script's channels_last rounds


NO_NATIVE_BF16 = """
import torch
torch.cpu._is_avx512_bf16_supported = torch.cpu._is_amx_tile_supported = lambda: False
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_is_bit_identical_also_in_bf16(script, tmp_path):
    common = [*tiny(script), "--log-every", "1", "--sample-every", "100", "--precision", "bf16"]
    if (
        script == "resnet_sn_wgan_gp"
    ):  # a decay to 0 over --total-steps changes with the --total-steps given on resume
        common.append("--no-lr-decay")
    straight = run(script, *common, "--total-steps", "4", "--run-name", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    half = run(script, *common, "--total-steps", "2", "--run-name", "resumed", cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-3000:]
    # Resumed where auto would be fp32 (as on a CPU without native bf16): the run keeps the precision it was saved with.
    resumed = run(script, "--resume", "runs/resumed/checkpoint.pt", "--total-steps", "4", cwd=tmp_path,
                  prelude=NO_NATIVE_BF16)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(tmp_path / "runs/straight/checkpoint.pt")
    b = load_checkpoint(tmp_path / "runs/resumed/checkpoint.pt")
    assert (
        a["step"] == b["step"] == 4 and b["args"]["precision"] == "bf16"
    )  # the resumed run kept its precision
    weights = [
        k
        for k in a
        if isinstance(a[k], dict) and any(isinstance(v, torch.Tensor) for v in a[k].values())
    ]
    assert (
        len(weights) >= 3
    )  # the generator, the critic (discriminator) and the EMA generator at least
    for key in weights:
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for key in ("opt_g", "opt_d"):
        for pid, state in a[key]["state"].items():
            for name, tensor in state.items():
                assert torch.equal(tensor, b[key]["state"][pid][name]), (
                    f"{key} state {pid}.{name} differs"
                )
    # The resumed run appended to the same event file folder: its losses continue at steps 3 and 4.
    events = EventAccumulator(str(tmp_path / "runs/resumed"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("losses/generator")] == [1, 2, 3, 4]


# Each script's stop handler takes Ctrl-C, SIGTERM (a scheduler, kill) and SIGHUP (a closed terminal) alike; each
# signal is sent to some of the scripts, which keeps the suite short.
@pytest.mark.parametrize(
    "script, signum",
    [("wgan_gp", signal.SIGINT), ("dcgan", signal.SIGTERM), ("cond_wgan_gp", signal.SIGHUP)]
    + [("resnet_sn_wgan_gp", signal.SIGTERM)],
)
def test_a_stop_signal_saves_a_checkpoint_that_the_printed_command_resumes(
    script, signum, tmp_path
):
    # A name with spaces: the printed command quotes its path, so that it works when pasted.
    args = [
        *tiny(script),
        "--total-steps",
        "100000",
        "--sample-every",
        "100000",
        "--run-name",
        "my run 2",
    ]
    command = [sys.executable, str(ROOT / f"{script}.py"), *args]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    events = tmp_path / "runs/my run 2"
    deadline = time.time() + 120
    while not list(events.glob("events.*")) and time.time() < deadline:  # training starts
        time.sleep(0.1)
    time.sleep(1)  # a few steps in, none saved: --sample-every is far away
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    ckpt = load_checkpoint(events / "checkpoint.pt")
    assert (
        1 <= ckpt["step"] < 100000
        and f"stopped at step {ckpt['step']}: runs/my run 2; continue with: " in out
    )
    pasted = shlex.split(out.strip().splitlines()[-1].split("continue with: ")[1])
    assert pasted[:2] == ["python", f"{script}.py"] and pasted[2:] == [
        "--resume",
        "runs/my run 2/checkpoint.pt",
    ]
    resumed = run(script, *pasted[2:], "--total-steps", str(ckpt["step"] + 1), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(events / "checkpoint.pt")["step"] == ckpt["step"] + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_writes_pngs_beside_the_checkpoint_and_nothing_else(script, trained, tmp_path):
    checkpoint = copy_run(trained(script), tmp_path / "run")
    ckpt = load_checkpoint(
        checkpoint
    )  # as saved by a resumed run: its settings name the checkpoint it resumed
    torch.save(
        {**ckpt, "args": {**ckpt["args"], "resume": str(tmp_path / "elsewhere" / "checkpoint.pt")}},
        checkpoint,
    )
    result = run(script, "--generate", str(checkpoint), "--num-images", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    out = (tmp_path / "run" / "generated").resolve()
    files = sorted(out.rglob("*.png"), key=lambda f: f.name)
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(7)]
    if script == "cond_wgan_gp":  # generated/<class>/: image i of class i % 10, a "/" in a name "_"
        classes = ckpt["classes"]
        assert classes[0] == "T-shirt/top" and len(classes) == 10
        assert [f.parent for f in files] == [out / classes[i].replace("/", "_") for i in range(7)]
        assert result.stdout.strip() == f"wrote 7 images to {out}/<class>/"
    else:
        assert [f.parent for f in files] == [out] * 7
        assert result.stdout.strip() == f"wrote 7 images to {out}"
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "L"
    # no grid or other file beside them, no half-written folder, nothing where the settings' resume points
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "generated"]
    assert not (tmp_path / "elsewhere").exists()


BAD_INPUTS = {
    "missing data dir": (
        ["--dataset", "folder", "--data-dir", "does/not/exist"],
        r"No such file .*: does/not/exist$",
    ),
    "empty data dir": (
        ["--dataset", "folder", "--data-dir", "empty"],
        r"no images in empty \(looked for \.jpg \.jpeg \.png \.webp\)$",
    ),
    "non-image file": (
        ["--dataset", "folder", "--data-dir", "corrupt"],
        r"corrupt/b\.png is not an image that torchvision reads$",
    ),
    "missing celeba": (
        ["--dataset", "celeba", "--data-dir", "empty"],
        r"No such file .*: empty/celeba/img_align_celeba",
    ),
    "seed beyond 32 bits": (
        ["--seed", "20000000000000"],
        r"--seed must be in \[0, 2\^32\), got 20000000000000$",
    ),
    "negative seed": (["--seed", "-1"], r"--seed must be in \[0, 2\^32\), got -1$"),
    "image size not a power of two": (
        ["--image-size", "48"],
        r"--image-size must be a power of two from 16 to 256, got 48",
    ),
    "image size out of range": (
        ["--image-size", "512"],
        r"--image-size must be a power of two from 16 to 256, got 512",
    ),
    "negative lr": (["--lr-g", "-0.001"], r"--lr-g must be > 0 and finite, got -0.001"),
    "infinite lr": (["--lr-d", "inf"], r"--lr-d must be > 0 and finite, got inf"),
    "nan beta": (["--beta2", "nan"], r"--beta2 must be in \[0, 1\), got nan"),
    "negative EMA half-life": (
        ["--ema-halflife", "-5"],
        r"--ema-halflife must be >= 0 and finite, got -5.0",
    ),
    "zero steps": (["--total-steps", "0"], r"--total-steps must be >= 1, got 0"),
    "unknown device": (["--device", "tpu9"], r"--device tpu9: "),
    "too few images": (
        ["--max-images", "4"],
        r"the dataset has 4 images, fewer than one batch of 8",
    ),
    "resume of a missing file": (
        ["--resume", "nothing.pt"],
        r"cannot read checkpoint nothing.pt \(FileNotFoundError",
    ),
    "checkpoint of another script": (
        ["--resume", "other.pt"],
        r"other\.pt is not a checkpoint of wgan_gp\.py$",
    ),
    "checkpoint of an older version": (
        ["--resume", "old.pt"],
        r"old\.pt lacks the settings run_name seed device .* d_width$",
    ),
    "not a checkpoint": (
        ["--resume", "garbage.pt"],
        r"cannot read checkpoint garbage.pt \(UnpicklingError",
    ),
    "empty checkpoint": (
        ["--resume", "empty.pt"],
        r"cannot read checkpoint empty.pt \(EOFError: \)",
    ),
}


@pytest.fixture
def bad_inputs_dir(tmp_path, monkeypatch):
    """A working folder holding the bad inputs that BAD_INPUTS names."""
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "corrupt" / "a.png")
    (tmp_path / "corrupt" / "b.png").write_text("this is text, not a PNG")
    torch.save({"kind": "some_other_gan", "args": {}}, tmp_path / "other.pt")
    torch.save(
        {"kind": SHARED_SCRIPT, "args": {}, "scaler_g": {}}, tmp_path / "old.pt"
    )  # an older version's: none of the settings this one reads
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_by_the_checks_before_training(case, bad_inputs_dir):
    """In-process, the shared checks that every main block runs, in its order, before it writes anything."""
    module = load(SHARED_SCRIPT)
    flags, pattern = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as stop:
        args = tyro.cli(module.Args, args=[*tiny(SHARED_SCRIPT), *flags])
        if args.resume:
            module.load_checkpoint(args.resume)
        module.check_args(args)
        module.setup_device(args)
        module.load_dataset(args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and re.search(pattern, message), (
        message
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_exits_with_one_line_and_writes_nothing(script, bad_inputs_dir):
    flags, pattern = BAD_INPUTS["non-image file"]
    expect_error(run(script, *tiny(script), *flags, cwd=bad_inputs_dir), pattern)
    assert not (bad_inputs_dir / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_with_other_shapes_is_refused(script, trained, tmp_path):
    checkpoint = copy_run(trained(script), tmp_path / "run")
    before = checkpoint.read_bytes()
    flag = (
        "--generate" if script in ("dcgan", "resnet_sn_wgan_gp") else "--resume"
    )  # the message names either's file
    result = run(
        script, flag, str(checkpoint), "--g-width", "16", "--total-steps", "30", cwd=tmp_path
    )
    expect_error(
        result,
        rf"^error: the generator of {checkpoint} does not fit this run \('Error\(s\) in loading state_dict "
        r"for Generator:\\n\\tsize mismatch for \S+: copying a param with shape",
    )
    assert checkpoint.read_bytes() == before
    assert [p.name for p in (tmp_path / "run").iterdir()] == [
        "checkpoint.pt"
    ]  # no events file, no folders


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_run_is_not_overwritten(script, trained):
    run_dir = trained(script)
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = run(script, *tiny(script), "--run-name", "tiny", cwd=run_dir.parent.parent)
    expect_error(result, r"^error: FileExistsError: \[Errno 17\] File exists: 'runs/tiny'$")
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def docstrings(script: str) -> tuple:
    """Each Args field and the docstring written under it, read from the source; and the fields that
    tyro.conf.Suppress keeps out of the command line (set by the script, such as channels from the data)."""
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    found, suppressed = {}, set()
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            if ast.unparse(node.annotation).startswith("tyro.conf.Suppress["):
                suppressed.add(node.target.id)
                continue
            has_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            found[node.target.id] = (
                after.value.value if has_doc and isinstance(after.value.value, str) else None
            )
    return found, suppressed


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_field_with_its_docstring(script, tmp_path):
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.replace("│", " ").split())  # a wrapped line: │ at either end
    fields, suppressed = docstrings(script)
    assert set(fields) | suppressed == {f.name for f in dataclasses.fields(load(script).Args)}
    assert suppressed == {"channels"} and "--channels" not in help_text  # from the data, not a flag
    for name, doc in fields.items():
        assert doc, f"Args.{name} has no docstring"
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert " ".join(doc.split())[:40] in help_text, (name, doc)
