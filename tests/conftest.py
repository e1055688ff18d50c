"""Shared fixtures. A new script joins every shared check by adding its name to SCRIPTS, its
method flags to TINY_METHOD and a model builder to build_models."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest -n auto runs one worker per core: each worker and the scripts it starts (they inherit
    # this variable) use one thread, instead of every process spreading over all cores at once.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
SCRIPTS = ["wgan_gp", "dcgan", "cond_wgan_gp", "resnet_sn_wgan_gp"]
# A training run small enough for a test: 32 px, narrow networks, few images; EMA on (off by default
# in most scripts) so that the tests cover its checkpointing, resume and sampling.
TINY_COMMON = ["--batch-size", "8", "--g-width", "8", "--d-width", "8", "--max-images", "64", "--num-workers", "0", "--ema-decay", "0.999"]
TINY_METHOD = {"wgan_gp": ["--n-critic", "2"], "dcgan": [], "cond_wgan_gp": ["--n-critic", "2", "--embed-dim", "4"], "resnet_sn_wgan_gp": ["--n-critic", "2"]}
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


def build_critic(script: str, channels: int, image_size: int, width: int, norm: str) -> nn.Module:
    """The critic of a WGAN-GP script as a function of the images alone (a conditional one with its labels fixed)."""
    module = load(script)
    if script == "cond_wgan_gp":
        return FixedLabel(module.Critic(channels, image_size, width, norm, 10, "projection", 4, False), 3)
    return module.Critic(channels, image_size, width, norm)


def build_models(script: str, image_size: int, channels: int, latent_dim: int = 16):
    module = load(script)
    if script == "wgan_gp":
        return module.Generator(latent_dim, channels, image_size, 8), module.Critic(channels, image_size, 8, "layer")
    if script == "dcgan":
        return module.Generator(latent_dim, channels, image_size, 8), module.Discriminator(channels, image_size, 8)
    if script == "cond_wgan_gp":
        return FixedLabel(module.Generator(latent_dim, channels, image_size, 8, 10, 4), 3), build_critic(script, channels, image_size, 8, "layer")
    if script == "resnet_sn_wgan_gp":
        return module.Generator(latent_dim, channels, image_size, 8), module.Critic(channels, image_size, 8, "instance")
    raise KeyError(script)


def run(script: str, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a script as a user would, from `cwd`, and capture what it prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny training run per script, shared by the tests that only read its outputs."""
    cache = {}

    def get(script: str) -> Path:
        if script not in cache:
            cwd = tmp_path_factory.mktemp(f"run_{script}")
            result = run(script, *tiny(script), "--total-steps", "4", "--log-every", "2", "--sample-every", "2", "--run-name", "tiny", cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[script] = cwd / "runs" / "tiny"
        return cache[script]

    return get
