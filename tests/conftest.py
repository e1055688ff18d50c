"""Shared fixtures. A new script joins every per-script check by adding its name to SCRIPTS, its method flags to
TINY_METHOD and a model builder to build_models. Code that the scripts share byte for byte (test_structure.py checks
it) is tested once, on SHARED_SCRIPT."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest -n auto runs one worker per core: each worker and the scripts it starts (they inherit this
    # variable) use one thread, instead of every process spreading over all cores at once.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
SCRIPTS = ["wgan_gp", "dcgan", "cond_wgan_gp", "resnet_sn_wgan_gp"]
SHARED_SCRIPT = "wgan_gp"
# A training run small enough for a test: 32 px, narrow networks, few images; EMA on (off by default in
# most scripts) so that the tests cover its checkpointing, resume and sampling.
TINY_COMMON = ["--batch-size", "8", "--g-width", "8", "--d-width", "8", "--max-images", "64", "--ema-halflife", "5000"]
TINY_METHOD = {
    "wgan_gp": ["--n-critic", "2"],
    "dcgan": [],
    "cond_wgan_gp": ["--n-critic", "2", "--embed-dim", "4"],
    "resnet_sn_wgan_gp": ["--n-critic", "2"],
}
# Rows of the fixed-noise grid on Fashion-MNIST where they are not 8: the conditional script draws one row per class.
GRID_ROWS = {"cond_wgan_gp": 10}


def tiny(script: str) -> list:
    return TINY_COMMON + TINY_METHOD[script]


def load(script: str):
    """Import a script as a module: everything above its main guard only defines things."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(script)


class FixedLabel(nn.Module):
    """A conditional generator or critic called like an unconditional one: every sample gets class `label`
    (one class for all, so a sample's output does not depend on its place in the batch)."""

    def __init__(self, model: nn.Module, label: int):
        super().__init__()
        self.model, self.label = model, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x, torch.full((len(x),), self.label, device=x.device))
        return out[0] if isinstance(out, tuple) else out  # the critic's scores, without its class logits


def build_critic(script: str, channels: int, image_size: int, width: int, norm: str = "instance") -> nn.Module:
    """The critic of a WGAN-GP script as a function of the images alone (a conditional one with its labels fixed).
    `norm` is resnet_sn_wgan_gp's option; the other two critics use layer norm."""
    module = load(script)
    if script == "cond_wgan_gp":
        return FixedLabel(module.Critic(channels, image_size, width, 10, "projection", 4, False), 3)
    if script == "resnet_sn_wgan_gp":
        return module.Critic(channels, image_size, width, norm)
    return module.Critic(channels, image_size, width)


def build_models(script: str, image_size: int, channels: int, latent_dim: int = 16):
    module = load(script)
    if script == "dcgan":
        return module.Generator(latent_dim, channels, image_size, 8), module.Discriminator(channels, image_size, 8)
    if script == "cond_wgan_gp":
        generator = FixedLabel(module.Generator(latent_dim, channels, image_size, 8, 10, 4), 3)
        return generator, build_critic(script, channels, image_size, 8)
    return module.Generator(latent_dim, channels, image_size, 8), build_critic(script, channels, image_size, 8)


def run(script: str, *args: str, cwd: Path, timeout: float = 240, env: dict = None) -> subprocess.CompletedProcess:
    """Run a script as a user would, from `cwd`, and capture what it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, str(ROOT / f"{script}.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def expect_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    """A bad input ends with one clear line on stderr, exit code 1 and no traceback."""
    import re

    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith("error: ") and re.search(pattern, line), line


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of a run's checkpoint in a folder of its own, so that tests writing beside it do not meet."""
    to.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoint.pt", to / "checkpoint.pt")
    return to / "checkpoint.pt"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny training run per script, shared by the tests that only read its outputs."""
    cache = {}

    def get(script: str) -> Path:
        if script not in cache:
            cwd = tmp_path_factory.mktemp(f"run_{script}")
            # A few dozen steps in bf16 (fp16 runs: test_precision.py), logged and saved twice.
            flags = [*tiny(script), "--precision", "bf16", "--total-steps", "24", "--log-every", "12"]
            flags += ["--sample-every", "12", "--run-name", "tiny"]
            result = run(script, *flags, cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[script] = cwd / "runs" / "tiny"
        return cache[script]

    return get
