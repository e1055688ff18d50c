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
TINY_COMMON = [
    "--batch-size",
    "8",
    "--g-width",
    "8",
    "--d-width",
    "8",
    "--max-images",
    "64",
    "--ema-halflife",
    "5000",
]
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
        # the critic's scores, without its class logits
        return out[0] if isinstance(out, tuple) else out


def build_critic(
    script: str, channels: int, image_size: int, width: int, norm: str = "instance"
) -> nn.Module:
    """The critic of a WGAN-GP script as a function of the images alone (a conditional one with its labels fixed).
    `norm` is resnet_sn_wgan_gp's option; the other two critics use layer norm."""
    module = load(script)
    if script == "cond_wgan_gp":
        return FixedLabel(module.Critic(channels, image_size, width, 10, False), 3)
    if script == "resnet_sn_wgan_gp":
        return module.Critic(channels, image_size, width, norm)
    return module.Critic(channels, image_size, width)


def build_models(script: str, image_size: int, channels: int, latent_dim: int = 16):
    module = load(script)
    if script == "dcgan":
        generator = module.Generator(latent_dim, channels, image_size, 8)
        return generator, module.Discriminator(channels, image_size, 8)
    if script == "cond_wgan_gp":
        generator = FixedLabel(module.Generator(latent_dim, channels, image_size, 8, 10, 4), 3)
        return generator, build_critic(script, channels, image_size, 8)
    generator = module.Generator(latent_dim, channels, image_size, 8)
    return generator, build_critic(script, channels, image_size, 8)


# Most tests run a script as a user would, as __main__ in a process of its own, its output captured. Starting Python and
# importing torch, torchvision and tensorboard takes 3.5 s, longer than most tiny runs, so each run is forked from a
# server process that imported them once (multiprocessing's forkserver: that server runs no torch op, so the fork is
# safe). GAN_TESTS_SUBPROCESS=1 starts every run as a fresh `python script.py` instead.
# Imported once, in the forkserver; every run forks from it. torch.compile's modules too: 2.5 s a compiling run.
PRELOAD = [
    "torch",
    "torchvision",
    "torch.utils.tensorboard",
    "tyro",
    "tqdm",
    "PIL.Image",
    "numpy",
    "torch._dynamo",
]
PRELOAD += ["torch._inductor.compile_fx"]


def _main(path: str, args: list, cwd: str, env: dict, out: str, err: str, prelude: str) -> None:
    """The forked child: the script as __main__, with this argv, folder and environment; stdout and stderr to files;
    `prelude` (Python source) runs first, in the child (a test's hooks)."""
    import atexit
    import runpy
    import signal

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, name in ((1, out), (2, err)):
        with open(name, "w") as f:
            os.dup2(f.fileno(), fd)
    sys.argv = [path, *args]
    exec(prelude, {})
    try:  # SystemExit, also fail()'s one line, reaches multiprocessing, which exits as the interpreter would
        runpy.run_path(path, run_name="__main__")
    except Exception:  # as the interpreter does: the error to sys.excepthook (the scripts set their own), exit code 1
        sys.excepthook(*sys.exc_info())
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # the same, then the interpreter ends itself with SIGINT
        sys.excepthook(*sys.exc_info())
        atexit._run_exitfuncs()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        atexit._run_exitfuncs()  # multiprocessing's children skip them; a script's exit runs them


def run(
    script: str,
    *args: str,
    cwd: Path,
    timeout: float = 240,
    env: dict = None,
    prelude: str = "",
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run a script as a user would, from `cwd`, and capture what it prints; `prelude`: Python run before it.
    fresh: in a new interpreter, as GAN_TESTS_SUBPROCESS=1 does, instead of forked from the server that preloaded
    PRELOAD."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    path = str(ROOT / f"{script}.py")
    if fresh or os.environ.get("GAN_TESTS_SUBPROCESS") == "1":
        code = f"import runpy, sys; exec({prelude!r}, {{}}); sys.argv = sys.argv[1:]; "
        code += "runpy.run_path(sys.argv[0], run_name='__main__')"
        command = (
            [sys.executable, "-c", code, path, *args] if prelude else [sys.executable, path, *args]
        )
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        process = context.Process(
            target=_main, args=(path, list(args), str(cwd), env, out, err, prelude)
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([path, *args], timeout)
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess([path, *args], process.exitcode, o.read(), e.read())


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
            flags = [
                *tiny(script),
                "--precision",
                "bf16",
                "--total-steps",
                "24",
                "--log-every",
                "12",
            ]
            flags += ["--sample-every", "12", "--run-name", "tiny"]
            result = run(script, *flags, cwd=cwd)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[script] = cwd / "runs" / "tiny"
        return cache[script]

    return get


def recorder(out: Path, classes: tuple, patches: str = "") -> str:
    """A run() prelude that records the inputs and outputs of every forward of the modules whose class names are in
    `classes` (the scripts' Generator, Critic, Discriminator), as (class name, training, grad enabled, inputs, output),
    and saves the list to `out` when the script exits. `patches`: more source, run after (it may append to records)."""
    return f"""
import atexit, torch
records = []
def record(module, inputs, output):
    if type(module).__name__ in {classes!r}:
        detach = lambda x: x.detach().float().cpu().clone() if torch.is_tensor(x) else x
        name, grad = type(module).__name__, torch.is_grad_enabled()
        records.append((name, module.training, grad, [detach(x) for x in inputs], detach(output)))
torch.nn.modules.module.register_module_forward_hook(record)
atexit.register(lambda: torch.save(records, {str(out)!r}))
{patches}
"""


# The tests that take a minute (torch.compile's first compile of a network, the benchmarks' end-to-end runs) start
# first: xdist hands tests out in this order, so no worker is left alone with one of them at the end of the run.
SLOW_FIRST = (
    "test_compile_trains",
    "test_speed_benchmark",
    "test_quality_benchmark",
    "test_quality_is_recorded",
)


def pytest_collection_modifyitems(items):
    # stable: the rest keep their order
    items.sort(key=lambda item: not item.name.startswith(SLOW_FIRST))
