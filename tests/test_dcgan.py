"""dcgan.py: the paper's initialisation, logits and their loss, label smoothing and noisy labels, and the one-batch
sanity run."""

import math

import pytest
import torch
import torch.nn as nn
import tyro
from conftest import load, load_checkpoint, recorder, run, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

dcgan = load("dcgan")


def test_weights_are_initialised_as_in_the_paper():
    torch.manual_seed(0)
    modules = [
        *dcgan.Generator(100, 3, 64, 16).modules(),
        *dcgan.Discriminator(3, 64, 16).modules(),
    ]
    convs = [m for m in modules if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    norms = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    assert (
        len(convs) == 10 and len(norms) == 7
    )  # 5 + 5 convolutions; batch norm everywhere but the D input and both outputs
    for conv in convs:
        # The smallest has 768 weights: standard errors 0.0005 for its std, 0.0007 for its mean; these bounds are 4-6
        # of them. PyTorch's default init (Kaiming uniform) has std 0.083 in the 3x4x4 input layer, 0.013 in the last.
        # Biases keep PyTorch's init: the paper names only the weights (as does pytorch/examples' dcgan).
        assert abs(conv.weight.std().item() - 0.02) < 0.003, conv
        assert abs(conv.weight.mean().item()) < 0.003, conv
    for norm in norms:
        assert abs(norm.weight.mean().item() - 1) < 0.02 and (norm.weight - 1).abs().max() < 0.1, (
            norm
        )
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias)), norm


def test_discriminator_returns_one_logit_per_sample():
    torch.manual_seed(0)
    discriminator = dcgan.Discriminator(3, 32, 8)
    assert not any(isinstance(m, nn.Sigmoid) for m in discriminator.modules())
    logits = discriminator(torch.randn(16, 3, 32, 32))
    assert logits.shape == (16,)
    assert (logits < 0).any()  # a probability never is
    with torch.no_grad():
        discriminator[-2].weight.mul_(1000)  # the last conv, before the flatten
    assert discriminator(torch.randn(16, 3, 32, 32)).abs().max() > 1


def bce(logit: float, target: float) -> float:
    """-[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))], written out."""
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_losses_equal_hand_computed_cross_entropy_with_smoothed_labels():
    real_logits, fake_logits = [2.0, -1.0, 0.5, 3.0], [-2.5, 0.3, 1.0, -0.1]
    targets = torch.full((4,), 0.9)
    expected_d = (
        sum(bce(logit, 0.9) for logit in real_logits) / 4
        + sum(bce(logit, 0.0) for logit in fake_logits) / 4
    )
    expected_g = sum(bce(logit, 1.0) for logit in fake_logits) / 4  # -E[log D(G(z))]
    d_loss = dcgan.discriminator_loss(torch.tensor(real_logits), torch.tensor(fake_logits), targets)
    g_loss = dcgan.generator_loss(torch.tensor(fake_logits))
    assert d_loss.item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss.item() == pytest.approx(expected_g, rel=1e-6)
    unsmoothed = dcgan.discriminator_loss(
        torch.tensor(real_logits), torch.tensor(fake_logits), torch.ones(4)
    )
    assert (
        abs(unsmoothed.item() - d_loss.item()) > 0.05
    )  # the smoothing changes the number: the targets are used
    # On logits, a confident mistake costs its logit instead of log(0) = -inf.
    assert dcgan.generator_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


REAL_LABEL = r"^error: --real-label must be LOW or LOW HIGH in \[0.5, 1.2\], got "
BAD_OPTIONS = {
    "real label of 0": (["--real-label", "0"], REAL_LABEL + r"\(0.0,\)$"),
    "no real label": (["--real-label"], REAL_LABEL + r"\(\)$"),
    "infinite real label": (["--real-label", "inf"], REAL_LABEL + r"\(inf,\)$"),
    "inverted label range": (["--real-label", "1.2", "0.7"], REAL_LABEL + r"\(1.2, 0.7\)$"),
    "label range from 0": (["--real-label", "0", "1"], REAL_LABEL + r"\(0.0, 1.0\)$"),
    "three real labels": (
        ["--real-label", "0.7", "0.8", "0.9"],
        REAL_LABEL + r"\(0.7, 0.8, 0.9\)$",
    ),
    "real label far above 1": (
        ["--real-label", "0.5", "100"],
        REAL_LABEL + r"\(0.5, 100.0\)$",
    ),  # D loss -239
    "real label near 0": (["--real-label", "1e-30"], REAL_LABEL + r"\(1e-30,\)$"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_refused_with_one_line(case):
    flags, pattern = BAD_OPTIONS[case]
    with pytest.raises(SystemExit, match=pattern):
        dcgan.check_args(tyro.cli(dcgan.Args, args=flags))


def test_run_with_noisy_labels_resumes_with_them(tmp_path):
    tricks = ["--real-label", "0.7", "1.2"]
    first = run(
        "dcgan",
        *tiny("dcgan"),
        *tricks,
        "--total-steps",
        "2",
        "--log-every",
        "1",
        "--run-name",
        "tricks",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(
        "dcgan", "--resume", "runs/tricks/checkpoint.pt", "--total-steps", "3", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "runs/tricks/checkpoint.pt")
    assert ckpt["step"] == 3
    assert ckpt["args"]["real_label"] == (0.7, 1.2)
    events = EventAccumulator(str(tmp_path / "runs/tricks"), size_guidance={"scalars": 0}).Reload()
    for tag in ("losses/discriminator", "losses/generator", "charts/d_real", "charts/d_fake"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (tag, values)


def test_discriminator_separates_one_batch_of_real_from_fake(tmp_path):
    """--max-images 64 with batch 64 trains on one batch: in 20 steps D must tell those 64 images
    from the generator's. Measured with these flags, seeds 1-8: d_real - d_fake starts in
    [-0.05, 0.08] and ends in [0.63, 0.74] (seed 1, the default: 0.70), d_real rising to 0.79-0.84
    and d_fake falling to 0.10-0.15. With D frozen (--lr-d 1e-7) it ends at -0.10: the generator
    fools it. 0.3 sits below every seed measured and far above a discriminator that does not learn."""
    flags = ["--max-images", "64", "--batch-size", "64", "--g-width", "8", "--d-width", "8"]
    result = run(
        "dcgan",
        *flags,
        "--total-steps",
        "20",
        "--log-every",
        "1",
        "--sample-every",
        "100",
        "--run-name",
        "one_batch",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(
        str(tmp_path / "runs/one_batch"), size_guidance={"scalars": 0}
    ).Reload()
    d_real = [e.value for e in events.Scalars("charts/d_real")]
    d_fake = [e.value for e in events.Scalars("charts/d_fake")]
    assert len(d_real) == len(d_fake) == 20
    assert (
        abs(d_real[0] - 0.5) < 0.15 and abs(d_fake[0] - 0.5) < 0.15
    )  # N(0, 0.02) weights: logits near 0, D(.) near 1/2
    assert abs(d_real[0] - d_fake[0]) < 0.15
    assert d_real[-1] - d_fake[-1] > 0.3, (d_real, d_fake)
    assert d_real[-1] > d_real[0] and d_fake[-1] < d_fake[0]


def test_real_targets_are_drawn_per_image_and_step_and_fakes_reach_d_unchanged(tmp_path):
    """Recorded in a run: the targets of every cross entropy, and what the networks take and give."""
    patches = """
bce = torch.nn.functional.binary_cross_entropy_with_logits
def recording(logits, target, *args, **kwargs):
    records.append(("targets", None, None, [target.detach().cpu().clone()], None))
    return bce(logits, target, *args, **kwargs)
torch.nn.functional.binary_cross_entropy_with_logits = recording
"""
    prelude = recorder(tmp_path / "records.pt", ("Generator", "Discriminator"), patches)
    flags = [*tiny("dcgan"), "--precision", "fp32", "--real-label", "0.7", "1.2"]
    result = run(
        "dcgan", *flags, "--total-steps", "4", "--run-name", "noise", cwd=tmp_path, prelude=prelude
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = torch.load(tmp_path / "records.pt", weights_only=False)
    fakes = [out for name, training, _, _, out in records if name == "Generator" and training]
    inputs = [x[0] for name, training, _, x, _ in records if name == "Discriminator" and training]
    assert len(fakes) == 4 and len(inputs) == 12  # a step: D(real), D(fake) for D, D(fake) for G
    for step in range(4):  # no noise is added: D sees the generator's output itself
        for fake_input in inputs[3 * step + 1 : 3 * step + 3]:
            assert torch.equal(fake_input, fakes[step])
    targets = [
        x[0]
        for name, _, _, x, _ in records
        if name == "targets" and not torch.isin(x[0], torch.tensor([0.0, 1.0])).all()
    ]
    assert len(targets) == 4 and all(
        t.shape == (8,) and 0.7 <= t.min() and t.max() <= 1.2 for t in targets
    )
    assert all(len(set(t.tolist())) == 8 for t in targets)  # one draw per image
    assert all(not torch.equal(targets[0], t) for t in targets[1:])  # and per step
