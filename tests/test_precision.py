"""--precision on the CPU, whose autocast and GradScaler run the same code paths as CUDA's: what auto picks, fp16's
skipped steps, and --compile. The penalty under bf16 and fp16: test_gradient_penalty.py; bf16 training, resume and
divergence: the tiny runs of test_shared.py and test_reliability.py."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPTS, SHARED_SCRIPT, expect_error, load, load_checkpoint, run, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Runs a script as __main__ with the loss of some backward() calls multiplied by inf, so that their gradients overflow
# as fp16's do: argv is [this file, the calls to poison ("all" or 0-based numbers joined by ","), script, flags...].
POISON = """
import math, runpy, sys, torch
calls, poison = [0], sys.argv[1]
backward = torch.Tensor.backward
def poisoned(loss, *args, **kwargs):
    calls[0] += 1
    hit = poison == "all" or str(calls[0] - 1) in poison.split(",")
    return backward(loss * math.inf if hit else loss, *args, **kwargs)
torch.Tensor.backward = poisoned
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_poisoned(script: str, poison: str, *flags: str, cwd) -> subprocess.CompletedProcess:
    (cwd / "poison.py").write_text(POISON)
    command = [sys.executable, str(cwd / "poison.py"), poison, str(ROOT / f"{script}.py"), *flags]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("script", SCRIPTS)
def test_auto_is_bf16_where_the_device_computes_it_natively(script, monkeypatch):
    module = load(script)

    def resolved(precision: str, device: str = "cpu") -> str:
        args = module.Args(precision=precision, device=device)
        module.setup_device(args)
        return args.precision

    for avx512_bf16, amx in [(True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolved("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolved("auto") == "fp32" and resolved("bf16") == "bf16" and resolved("fp16") == "fp16"
    # private: a later torch may drop them
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolved("auto") == "fp32"
    # A GPU, faked: before Ampere it only emulates bf16 (is_bf16_supported() says True, with emulation), so fp16.
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for native, expected in [(False, "fp16"), (True, "bf16")]:
        supported = lambda including_emulation=True, n=native: n or including_emulation  # noqa: E731
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        assert resolved("auto", "cuda") == expected and resolved("fp32", "cuda") == "fp32"


def test_fp16_step_with_an_overflowing_gradient_is_skipped():
    module = load(SHARED_SCRIPT)
    torch.manual_seed(0)
    critic = module.Critic(1, 32, 8)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fp16's, at a scale that fits
    before = [p.detach().clone() for p in critic.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = critic(torch.rand(8, 1, 32, 32)).float().mean()
    module.optimizer_step(loss * math.inf, opt, scaler)
    # skipped: the weights did not move, and the scale halved
    assert all(torch.equal(p, b) for p, b in zip(critic.parameters(), before))
    assert scaler.get_scale() == 512
    with torch.autocast("cpu", dtype=torch.float16):
        loss = critic(torch.rand(8, 1, 32, 32)).float().mean()
    module.optimizer_step(loss, opt, scaler)
    # taken: every weight moved, at the same scale
    assert not any(torch.equal(p, b) for p, b in zip(critic.parameters(), before))
    assert scaler.get_scale() == 512


# A run() prelude: the critic's (discriminator's) scores in the 4th generator step, the one step whose critic takes
# no gradient, become NaN, as fp16's inf - inf does; its loss is NaN, and the gradients of G with it.
POISON_FOURTH_G_STEP = """
import math, torch
g_steps = [0]
def poison(module, inputs, output):
    if type(module).__name__ in ("Critic", "Discriminator"):
        if not any(p.requires_grad for p in module.parameters()):
            g_steps[0] += 1
            if g_steps[0] == 4:
                nan = lambda x: x * math.nan
                return (nan(output[0]), *output[1:]) if isinstance(output, tuple) else nan(output)
torch.nn.modules.module.register_module_forward_hook(poison)
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_fp16_runs_through_a_skipped_step_and_logs_only_finite_losses(script, tmp_path):
    flags = [*tiny(script), "--precision", "fp16", "--total-steps", "24", "--log-every", "1"]
    flags += ["--sample-every", "12"]
    # its 32 px steps are the slow ones in fp16
    flags += ["--image-size", "16"] * (script == "resnet_sn_wgan_gp")
    flags += ["--run-name", "skip"]
    result = run(script, *flags, cwd=tmp_path, prelude=POISON_FOURTH_G_STEP)
    assert result.returncode == 0 and "finished at step 24" in result.stdout, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "skip"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    for tag in events.Tags()["scalars"]:
        assert all(math.isfinite(e.value) for e in events.Scalars(tag)), tag
    # step 4's generator loss, NaN, is left out; its critic steps' loss is logged
    generator_steps = [e.step for e in events.Scalars("losses/generator")]
    assert generator_steps == [k for k in range(1, 25) if k != 4]
    critic_tag = "losses/discriminator" if script == "dcgan" else "losses/critic"
    assert [e.step for e in events.Scalars(critic_tag)] == list(range(1, 25))
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    # the step was skipped: the scale halved at least once
    assert ckpt["args"]["precision"] == "fp16" and ckpt["scaler"]["scale"] < 65536


def test_fp16_whose_every_step_overflows_stops_as_diverged_once_the_scale_falls_below_1(tmp_path):
    flags = [*tiny(SHARED_SCRIPT), "--precision", "fp16", "--total-steps", "100"]
    flags += ["--log-every", "3"]
    result = run_poisoned(SHARED_SCRIPT, "all", *flags, "--run-name", "overflow", cwd=tmp_path)
    # 3 optimizer steps a step, each halving 65536: 17 skips bring the scale below 1 in step 6, checked at its log.
    expect_error(result, r"^error: training diverged at step 6: a weight is not finite; not saved$")
    assert not (tmp_path / "runs" / "overflow" / "checkpoint.pt").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_compile_trains_as_the_eager_networks_do(script, tmp_path):
    # fp32, so that the two runs agree to rounding; at 16 px, whose networks are shallower and compile sooner.
    flags = [*tiny(script), "--precision", "fp32", "--image-size", "16", "--total-steps", "3"]
    flags += ["--sample-every", "3", "--log-every", "1"]
    eager = run(script, *flags, "--run-name", "eager", cwd=tmp_path)
    compiled = run(script, *flags, "--compile", "--run-name", "compiled", cwd=tmp_path, timeout=600)
    errors = (eager.stderr[-2000:], compiled.stderr[-2000:])
    assert eager.returncode == 0 and compiled.returncode == 0, errors
    # The losses of every step: Adam's steps hardly depend on the gradients' size (not at all on their scale), so the
    # weights alone would not see a compiled forward that is off by a factor.
    names = ("eager", "compiled")
    events = [EventAccumulator(str(tmp_path / "runs" / name)).Reload() for name in names]
    for tag in [t for t in events[0].Tags()["scalars"] if t.startswith("losses/")]:
        a, b = ([e.value for e in run_events.Scalars(tag)] for run_events in events)
        assert len(a) == 3, tag
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5, msg=tag)
    if script == "resnet_sn_wgan_gp":
        # Its norms leave some weight directions with gradients of rounding's size, whose Adam steps
        # take rounding's sign (with one thread, 0.2% of a weight after 3 steps): its losses above are
        # the check.
        return
    a, b = (load_checkpoint(tmp_path / "runs" / name / "checkpoint.pt") for name in names)
    for network in ("generator", "critic" if script != "dcgan" else "discriminator"):
        for name, tensor in a[network].items():
            message = f"{network}.{name}"
            torch.testing.assert_close(b[network][name], tensor, rtol=1e-4, atol=1e-5, msg=message)


# Records the dtype of every convolution's output while a network trains (module.training; the grids are drawn in
# eval mode, outside autocast), and writes them to dtypes.txt when the script exits.
CONV_DTYPES = """
import atexit, torch
dtypes = set()
def record(module, inputs, output):
    if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and module.training:
        dtypes.add(str(output.dtype))
torch.nn.modules.module.register_module_forward_hook(record)
atexit.register(lambda: open("dtypes.txt", "w").write(" ".join(sorted(dtypes))))
"""


@pytest.mark.parametrize(
    "script, precision",
    [(s, "bf16") for s in SCRIPTS] + [(SHARED_SCRIPT, "fp16"), (SHARED_SCRIPT, "fp32")],
)
def test_autocast_computes_every_training_convolution_in_the_precision(script, precision, tmp_path):
    flags = [*tiny(script), "--precision", precision, "--image-size", "16", "--total-steps", "1"]
    result = run(script, *flags, cwd=tmp_path, prelude=CONV_DTYPES)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
    assert (tmp_path / "dtypes.txt").read_text() == expected[precision]


def test_fp16_resumes_bit_identically_with_its_loss_scale(tmp_path):
    # The first optimizer step overflows (backward call 0): the scale halves to 32768, and the scaler counts the steps
    # taken since towards its next doubling. A resumed run that started a fresh scaler would be at 65536 again, and
    # would skip other steps than the straight run.
    common = [*tiny(SHARED_SCRIPT), "--precision", "fp16", "--image-size", "16", "--log-every", "1"]
    common += ["--sample-every", "100"]
    straight = [*common, "--total-steps", "4", "--run-name", "straight"]
    straight = run_poisoned(SHARED_SCRIPT, "0", *straight, cwd=tmp_path)
    half = run_poisoned(
        SHARED_SCRIPT, "0", *common, "--total-steps", "2", "--run-name", "resumed", cwd=tmp_path
    )
    errors = (straight.stderr[-2000:], half.stderr[-2000:])
    assert straight.returncode == 0 and half.returncode == 0, errors
    saved = load_checkpoint(tmp_path / "runs/resumed/checkpoint.pt")["scaler"]
    # 6 optimizer steps, the first skipped
    assert saved["scale"] == 32768 and saved["_growth_tracker"] == 5
    flags = ["--resume", "runs/resumed/checkpoint.pt", "--total-steps", "4"]
    resumed = run(SHARED_SCRIPT, *flags, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names = ("straight", "resumed")
    a, b = (load_checkpoint(tmp_path / "runs" / name / "checkpoint.pt") for name in names)
    assert a["scaler"] == b["scaler"]  # the scale, and the steps counted towards its next doubling
    for key in ("generator", "critic", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
