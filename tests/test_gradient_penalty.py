"""The gradient penalty against closed forms, and the critic properties it relies on."""

import pytest
import torch
import torch.nn as nn
from conftest import build_critic, load, load_checkpoint, run, tiny

GP_SCRIPTS = ["wgan_gp", "cond_wgan_gp", "resnet_sn_wgan_gp"]
B, C, S = 6, 3, 8


class Linear(nn.Module):
    """f(x) = <w, x> + b: its gradient is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + 1.5


class HalfSquaredNorm(nn.Module):
    """f(x) = ||x||^2 / 2: its gradient at x is x itself, a different norm for every sample."""

    def forward(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1)


def images(seed: int) -> torch.Tensor:
    return torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_negative_lambda_is_refused(script):
    module = load(script)
    with pytest.raises(SystemExit, match=r"^error: --lambda-gp must be >= 0 and finite, got -1.0$"):
        module.check_args(module.Args(lambda_gp=-1.0))


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_linear_critic_gives_squared_norm_error(script):
    w = torch.randn(C, S, S, generator=torch.Generator().manual_seed(1)) * 0.3
    gp = load(script).gradient_penalty(Linear(w), images(2), images(3))
    expected = (w.double().norm() - 1) ** 2
    torch.testing.assert_close(gp.double(), expected, rtol=1e-5, atol=1e-7)
    assert expected > 0.5  # a non-trivial value, so a wrong norm cannot match by accident


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_unit_gradient_critic_gives_zero(script):
    u = torch.randn(C, S, S)
    assert load(script).gradient_penalty(Linear(u / u.norm()), images(2), images(3)).item() < 1e-10


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_norm_is_per_sample_with_one_epsilon_per_sample(script):
    real, fake = images(2) * 0.2, images(3) * 0.2
    eps = torch.rand(B, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    x_hat = eps * real + (1 - eps) * fake  # the gradient of HalfSquaredNorm at x^ is x^
    per_sample = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    per_pixel = ((x_hat.abs() - 1) ** 2).mean()
    per_batch = (x_hat.norm() - 1) ** 2
    gp = load(script).gradient_penalty(HalfSquaredNorm(), real, fake, eps=eps)
    torch.testing.assert_close(gp, per_sample, rtol=1e-5, atol=1e-7)
    assert abs(per_sample - per_pixel) > 0.1 and abs(per_sample - per_batch) > 0.1
    # Drawn inside: the same numbers as torch.rand(B, 1, 1, 1) right after the same seed.
    torch.manual_seed(5)
    drawn = load(script).gradient_penalty(HalfSquaredNorm(), real, fake)
    torch.manual_seed(5)
    eps = torch.rand(B, 1, 1, 1)
    torch.testing.assert_close(
        drawn, load(script).gradient_penalty(HalfSquaredNorm(), real, fake, eps=eps)
    )


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_zero_gradient_gives_one_and_no_nan(script):
    critic = Linear(torch.zeros(C, S, S))
    gp = load(script).gradient_penalty(critic, images(2), images(3))
    gp.backward()
    torch.testing.assert_close(gp, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(critic.w.grad).all()  # without the eps under the square root this is NaN


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_penalty_gradient_reaches_every_critic_parameter(script):
    torch.manual_seed(0)
    module = load(script)
    critic = build_critic(script, 3, 32, 8)
    gp = module.gradient_penalty(critic, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    gp.backward()
    # A bias with only piecewise-linear layers after it (the last conv's, the last norm's) leaves the input
    # gradient unchanged, so only the weights of convolutions and linear layers must all receive a non-zero gradient.
    weights = [(name, p) for name, p in critic.named_parameters() if p.dim() >= 2]
    # wgan_gp: 4 convs; cond_wgan_gp: 4 convs and the projection embedding;
    # resnet: stem, 3 blocks of 2 convs, 2 shortcuts, the linear score
    assert len(weights) == {"wgan_gp": 4, "cond_wgan_gp": 5, "resnet_sn_wgan_gp": 10}[script]
    for name, p in weights:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("script", GP_SCRIPTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_penalty_under_bf16_and_fp16_at_any_loss_scale_agrees_with_fp32(script, seed):
    """Autocast (the CPU's runs the same code paths as CUDA's) against fp32, on the same critic and batch. fp16 runs at
    the GradScaler's initial scale, 65536, where a scale on the summed scores put 65536 > fp16's maximum 65504 into
    each score's gradient (NaN), and at 1, where the scale has halved 16 times and cancels out exactly.
    The critic's scores are multiplied by c so that the per-sample gradient norms are about 4: near a norm of 1 the
    penalty (norm - 1)^2 turns a tiny error of the norm into a large relative one, far from 1 it is about
    2 * 4 / 3 = 2.7 times the norm's. Tolerances: 5% in bf16 (8 significant bits) and 3% in fp16 (11 bits), about
    1.6x the largest error over 20 seeds of this test per script (3.2% and 1.8%, both resnet_sn_wgan_gp's deep critic
    with spectral norms; the other two stay under 1% and 0.25%), and far from the failures they guard against: NaN,
    or a gradient that was not unscaled, 65536x off."""
    torch.manual_seed(seed)
    module = load(script)
    # eval: a spectral norm's power iteration would move sigma
    critic = build_critic(script, 1, 32, 8).eval()
    real, fake = torch.rand(16, 1, 32, 32) * 2 - 1, torch.rand(16, 1, 32, 32) * 2 - 1
    eps = torch.rand(16, 1, 1, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
    # fp16 at 65536: each score's gradient is 65536 * c / 16 < 65504
    c = 4 / grad.flatten(1).norm(dim=1).mean()

    def scaled(x):
        return c * critic(x)

    expected = module.gradient_penalty(scaled, real, fake, eps=eps)
    assert 4 < expected < 30  # norms near 4: (4 - 1)^2 = 9
    for dtype, init_scale, rtol in [
        (torch.bfloat16, 1.0, 0.05),
        (torch.float16, 65536.0, 0.03),
        (torch.float16, 1.0, 0.03),
    ]:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=dtype == torch.float16)
        with torch.autocast("cpu", dtype=dtype):
            gp = module.gradient_penalty(scaled, real, fake, eps=eps, loss_scale=scaler.get_scale())
        assert gp.dtype == torch.float32  # the norm is taken in fp32
        assert abs(gp - expected) <= rtol * expected, (
            dtype,
            init_scale,
            gp.item(),
            expected.item(),
        )


@pytest.mark.parametrize(
    "script, norm",
    [(s, "layer") for s in GP_SCRIPTS] + [("resnet_sn_wgan_gp", n) for n in ("none", "instance")],
)
def test_critic_scores_each_sample_on_its_own(script, norm):
    # Real and fake share one forward pass in training; that is exact only without batch coupling.
    torch.manual_seed(0)
    # eval: a spectral norm's power iteration would move sigma
    critic = build_critic(script, 3, 32, 8, norm).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    a, b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(
        critic(torch.cat([a, b])), torch.cat([critic(a), critic(b)]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_lazy_penalty_runs_on_every_kth_critic_step_weighted_by_k(script, tmp_path):
    """losses/gradient_penalty logs the last penalty computed, unweighted: a step that skips it logs the previous
    one again. The weight k shows in the critic's update: one step at --gp-every 2 --lambda-gp 5 trains the same
    weights as one at --gp-every 1 --lambda-gp 10, and others than --gp-every 1 --lambda-gp 5."""
    module = load(script)
    with pytest.raises(SystemExit, match=r"^error: --gp-every must be >= 1, got 0$"):
        module.check_args(module.Args(gp_every=0))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(*flags: str) -> tuple:
        """The penalties logged at each step, and the critic's weights at the end."""
        name = "gp" + "".join(flags).replace("-", "")
        flags = [*tiny(script), "--n-critic", "1", "--log-every", "1", *flags, "--run-name", name]
        result = run(script, *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        events = EventAccumulator(str(tmp_path / "runs" / name)).Reload()
        critic = load_checkpoint(tmp_path / "runs" / name / "checkpoint.pt")["critic"]
        return [e.value for e in events.Scalars("losses/gradient_penalty")], critic

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (paper,), paper_critic = train("--total-steps", "1", "--gp-every", "1")
    (weighted,), weighted_critic = train(
        "--total-steps", "1", "--gp-every", "2", "--lambda-gp", "5"
    )
    (_,), unweighted_critic = train("--total-steps", "1", "--gp-every", "1", "--lambda-gp", "5")
    # Step 1 is the same critic step in every run: the same penalty, logged unweighted, and weighted by 2.
    assert paper > 0 and weighted == paper
    assert same(weighted_critic, paper_critic) and not same(unweighted_critic, paper_critic)
    # Step 2 skips the penalty: the last one computed is logged again.
    lazy, _ = train("--total-steps", "2", "--gp-every", "2")
    assert lazy == [paper, paper]
    # The CPU's default: every 4th critic step in wgan_gp.py and cond_wgan_gp.py; every step in resnet_sn_wgan_gp.py,
    # where each step's penalty is a new number.
    k = 1 if script == "resnet_sn_wgan_gp" else 4
    default, _ = train("--total-steps", "4")
    assert default[0] == paper and len(default) == 4
    assert (default == [paper] * 4) if k == 4 else (len(set(default)) == 4)


@pytest.mark.parametrize("script", GP_SCRIPTS)
def test_fp16_penalty_uses_the_loss_scale_where_the_gradient_would_underflow(script):
    """A critic whose gradient of the mean score, c / B = 2e-8 per score, is below fp16's smallest number (6e-8):
    without the loss scale it rounds to 0, every norm to 0 and the penalty to 1; scaled by the GradScaler's 65536 it
    is exact. A dense layer computes in fp16 under autocast; its inputs are small, so that its outputs fit fp16."""
    c, pixels = 3.2e-7, 3 * 32 * 32
    dense = nn.Linear(pixels, 1, bias=False)
    signs = torch.randn(pixels, generator=torch.Generator().manual_seed(0)).sign()
    # the critic's gradient c * w has norm 0.5
    dense.weight.data = (signs * 0.5 / (c * pixels**0.5))[None]

    def critic(x):
        return c * dense(x.flatten(1)).float().flatten()

    real, fake = (
        torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(k)) * 2e-3 - 1e-3
        for k in (1, 2)
    )
    eps = torch.rand(16, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    module = load(script)
    expected = module.gradient_penalty(critic, real, fake, eps=eps)
    torch.testing.assert_close(expected, torch.tensor(0.25), rtol=1e-4, atol=0)  # (0.5 - 1)^2
    # at 1, the scale of a scaler halved 16 times: the gradient underflows, as it would with the scale ignored
    for init_scale, penalty in ((65536.0, 0.25), (1.0, 1.0)):
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        with torch.autocast("cpu", dtype=torch.float16):
            gp = module.gradient_penalty(critic, real, fake, eps=eps, loss_scale=scaler.get_scale())
        torch.testing.assert_close(gp, torch.tensor(penalty), rtol=0.01, atol=0)
