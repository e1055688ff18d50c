"""resnet_sn_wgan_gp.py: where spectral normalisation sits and what it does, the norm options, the
tanh output, the ResNet recipe's decaying learning rate, and an EMA of a spectrally normalised generator."""

import pytest
import torch
import torch.nn as nn
from conftest import load, load_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.utils import parametrize

resnet = load("resnet_sn_wgan_gp")


def normalised(model: nn.Module) -> list:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def sigmas(model: nn.Module) -> list:
    """Largest singular value of each normalised layer's effective weight W / sigma, as a matrix (out, in * k * k)."""
    was_training = model.training
    model.eval()  # reading .weight in training mode would run one more power iteration
    with torch.no_grad():
        values = [
            torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in normalised(model)
        ]
    model.train(was_training)
    return values


@pytest.mark.parametrize("image_size, g_convs, d_convs", [(32, 10, 9), (64, 13, 12)])
def test_spectral_norm_sits_on_every_conv_and_linear_that_should_carry_it(
    image_size, g_convs, d_convs
):
    generator = resnet.Generator(16, 3, image_size, 8, "instance")
    critic = resnet.Critic(3, image_size, 8, "instance")
    # Generator: 3 convs per up-sampling block (2 in its residual block) and the output conv;
    # its linear seed stays plain.
    g_conv = [m for m in generator.modules() if isinstance(m, nn.Conv2d)]
    assert len(g_conv) == g_convs
    assert [m for m in generator.modules() if isinstance(m, nn.Linear)] == [
        generator[0]
    ]  # the seed z -> 4x4
    assert not parametrize.is_parametrized(generator[0])
    # Critic: the stem, 2 convs per residual block, a 1x1 shortcut where the channels double, and the linear score.
    d_layers = [m for m in critic.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(d_layers) == d_convs + 1
    assert (
        sum(m.kernel_size == (1, 1) for m in d_layers if isinstance(m, nn.Conv2d))
        == image_size.bit_length() - 4
    )
    assert normalised(generator) == g_conv and normalised(critic) == d_layers
    for m in normalised(generator) + normalised(critic):
        assert [type(p).__name__ for p in m.parametrizations.weight] == ["_SpectralNorm"]
        assert m.parametrizations.weight[0].n_power_iterations == 1


def test_a_few_power_iterations_bring_every_normalised_weight_to_sigma_one():
    """One power iteration per forward in training mode: a generator step runs the critic 2 * 5 + 1 = 11
    times and the generator 5 + 1 = 6 times. Measured over seeds 0-9 at these widths, the largest
    effective sigma after 5 steps' worth of forwards (55 and 30, after the 15 at construction) is 1.014;
    after 20 forwards of each it is up to 1.065: where a weight's top two singular values are close, the
    power method needs more than a few iterations."""
    torch.manual_seed(0)
    generator, critic = resnet.Generator(16, 3, 32, 8), resnet.Critic(3, 32, 8, "instance")
    with torch.no_grad():
        for m in normalised(generator) + normalised(critic):
            m.parametrizations.weight.original.mul_(
                10
            )  # raw weights far from sigma 1; W / sigma does not see the scale
    raw = [
        torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2).item()
        for m in normalised(critic)
    ]
    assert min(raw) > 2
    with torch.no_grad():
        for _ in range(5):  # the forwards of 5 generator steps
            for _ in range(6):
                fake = generator(torch.randn(4, 16))
            for _ in range(11):
                critic(fake)
    values = sigmas(generator) + sigmas(critic)
    assert len(values) == 20
    # u^T W v never exceeds the largest singular value, so the effective sigma is >= 1 up to rounding.
    assert all(1 - 1e-4 < s < 1.05 for s in values), values


def test_power_iteration_runs_in_training_mode_only():
    torch.manual_seed(0)
    critic = resnet.Critic(1, 32, 8, "instance")
    sn = critic[0].parametrizations.weight[0]  # the stem conv
    u = sn._u.clone()
    critic.eval()
    critic(torch.randn(2, 1, 32, 32))
    assert torch.equal(sn._u, u)  # eval reuses the stored vectors
    critic.train()
    critic(torch.randn(2, 1, 32, 32))
    assert not torch.equal(sn._u, u)  # each forward in training mode updates them in place
    assert abs(sn._u.norm().item() - 1) < 1e-6 and abs(sn._v.norm().item() - 1) < 1e-6


def test_generator_output_is_tanh_bounded():
    torch.manual_seed(0)
    generator = resnet.Generator(16, 3, 32, 8, "none")
    with torch.no_grad():
        images = generator(1000 * torch.randn(8, 16))
    assert images.min() >= -1 and images.max() <= 1
    assert (
        images.abs().max() > 0.999
    )  # saturated: the bound comes from the tanh, not from small values
    assert isinstance(generator[-1], nn.Tanh)


@pytest.mark.parametrize(
    "norm, kind", [("instance", nn.InstanceNorm2d), ("batch", nn.BatchNorm2d), ("none", None)]
)
def test_generator_norm_options_give_the_expected_layers(norm, kind):
    generator = resnet.Generator(16, 1, 32, 8, norm)
    norms = [
        m
        for m in generator.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))
    ]
    convs = [m for m in generator.modules() if isinstance(m, nn.Conv2d)]
    if kind is None:
        assert norms == [] and all(c.bias is not None for c in convs)
    else:
        assert len(norms) == 10 and all(
            type(m) is kind for m in norms
        )  # after the seed and each hidden conv: 1 + 3 x 3
        assert all(isinstance(m, nn.BatchNorm2d) or m.affine for m in norms)
        assert (
            sum(c.bias is not None for c in convs) == 1
        )  # only the output conv: a norm's shift follows the others


@pytest.mark.parametrize(
    "norm, kind", [("instance", nn.InstanceNorm2d), ("layer", nn.GroupNorm), ("none", None)]
)
def test_critic_norm_options_give_the_expected_layers(norm, kind):
    critic = resnet.Critic(1, 32, 8, norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    norms = [m for m in critic.modules() if isinstance(m, (nn.InstanceNorm2d, nn.GroupNorm))]
    assert len(norms) == (0 if kind is None else 6) and all(
        type(m) is kind for m in norms
    )  # 2 per residual block


def test_defaults_are_the_resnet_recipe():
    args = resnet.Args()
    assert (args.lr_g, args.lr_d, args.beta1, args.beta2, args.n_critic, args.lr_decay) == (
        2e-4,
        2e-4,
        0.0,
        0.9,
        5,
        True,
    )
    assert (args.g_norm, args.critic_norm) == ("instance", "instance")


def test_learning_rate_decays_linearly_to_zero(trained):
    # The tiny run: 24 steps, logged at steps 12 and 24. Step k (1-based) trains at 2e-4 * (1 - (k - 1) / 24),
    # so the rate would reach 0 at the step after the last.
    events = EventAccumulator(
        str(trained("resnet_sn_wgan_gp")), size_guidance={"scalars": 0}
    ).Reload()
    rates = [(e.step, e.value) for e in events.Scalars("charts/learning_rate")]
    assert [step for step, _ in rates] == [12, 24]
    assert [value for _, value in rates] == pytest.approx([2e-4 * 13 / 24, 2e-4 / 24], rel=1e-6)


def test_checkpoint_holds_every_power_iteration_vector(trained):
    ckpt = load_checkpoint(trained("resnet_sn_wgan_gp") / "checkpoint.pt")
    assert ckpt["kind"] == "resnet_sn_wgan_gp"
    for key in ("generator", "critic", "ema"):
        assert sum(name.endswith("parametrizations.weight.0._u") for name in ckpt[key]) == 10, key
        assert sum(name.endswith("parametrizations.weight.0._v") for name in ckpt[key]) == 10, key
        assert sum(name.endswith("parametrizations.weight.original") for name in ckpt[key]) == 10, (
            key
        )


def test_ema_of_a_spectrally_normalised_generator_averages_weights_and_copies_vectors(trained):
    """The tiny run kept an EMA (decay 0.999, warm-up (1 + step) / (10 + step)): its weights are a blend of the
    generator's, while the power-iteration vectors u, v are copied, so the EMA's sigma estimate uses them."""
    ckpt = load_checkpoint(trained("resnet_sn_wgan_gp") / "checkpoint.pt")
    trained_weights, averaged = ckpt["generator"], ckpt["ema"]
    assert trained_weights.keys() == averaged.keys()
    for name, tensor in averaged.items():
        if name.endswith(("._u", "._v")) or "running_" in name or "num_batches" in name:
            assert torch.equal(tensor, trained_weights[name]), name  # buffers: copied
        elif name.endswith("original"):
            assert not torch.equal(tensor, trained_weights[name]), (
                name
            )  # weights: averaged, behind the trained ones
    ema = resnet.Generator(ckpt["args"]["latent_dim"], 1, 32, 8, ckpt["args"]["g_norm"]).eval()
    ema.load_state_dict(averaged)
    values = sigmas(ema)  # the copied vectors estimate sigma of the averaged weights closely
    assert len(values) == 10 and all(0.9 < s < 1.1 for s in values), values
    with torch.no_grad():
        images = ema(torch.randn(16, ckpt["args"]["latent_dim"]))
    assert torch.isfinite(images).all() and images.abs().max() <= 1
