"""Several processes (torchrun) on the CPU with the gloo backend: the ranks stay in step, and the
gradients DistributedDataParallel averages equal those of one process that sees the whole batch."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SCRIPTS, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

UNCONDITIONAL_GP_SCRIPTS = [s for s in ["wgan_gp", "resnet_sn_wgan_gp"] if s in SCRIPTS]
# A two-process job small enough for a test: 32 images, 4 per process and step, a log every step.
JOB_FLAGS = ["--log-every", "1", "--run-name", "job", "--max-images", "32", "--batch-size", "4"]

# Runs a whole script as rank RANK of a 2-process job, then saves the parameters of every network it
# built: the script's main block runs at module level, so its networks are globals afterwards.
RUN_SCRIPT = """
import os, runpy, sys, torch
script, out = sys.argv[1], sys.argv[2].format(**os.environ)  # rank{RANK}.pt
sys.argv = [script, *sys.argv[3:]]
g = runpy.run_path(script, run_name="__main__")
nets = {k: v for k, v in g.items() if isinstance(v, torch.nn.Module)}
torch.save({k: {n: p.detach() for n, p in v.named_parameters()} for k, v in nets.items()}, out)
"""

# One critic update on this rank's half of a fixed batch (or on all of it with WORLD_SIZE=1), as the
# training loop makes it: the critic wrapped in DistributedDataParallel in a job, the loss of the loop
# with the script's gradient_penalty at given interpolation weights, and the script's optimizer_step
# (backward, in which DDP averages the gradients over the processes, and one Adam step).
CRITIC_UPDATE = """
import importlib, os, sys, torch
sys.path.insert(0, sys.argv[1])
m = importlib.import_module(sys.argv[2])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.manual_seed(0)
critic = D = {critic}
if world > 1:
    torch.distributed.init_process_group("gloo")
    D = torch.nn.parallel.DistributedDataParallel(critic)
opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.0, 0.9))
data = torch.Generator().manual_seed(1)
real, fake = (torch.rand(8, 1, 32, 32, generator=data) * 2 - 1 for _ in range(2))
eps = torch.rand(8, 1, 1, 1, generator=data)
part = slice(rank * 8 // world, (rank + 1) * 8 // world)
real, fake, eps = real[part], fake[part], eps[part]
d_real, d_fake = D(real).float(), D(fake).float()
loss = -(d_real.mean() - d_fake.mean()) + 10.0 * m.gradient_penalty(D, real, fake, eps=eps)
m.optimizer_step(loss, opt, torch.amp.GradScaler("cpu", enabled=False))
grads = {{n: p.grad.clone() for n, p in critic.named_parameters()}}
weights = {{n: p.detach() for n, p in critic.named_parameters()}}
torch.save({{"grads": grads, "weights": weights}}, sys.argv[3])
"""

CRITICS = {"wgan_gp": "m.Critic(1, 32, 8)", "resnet_sn_wgan_gp": "m.Critic(1, 32, 8, 'instance')"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, argv_of_rank, cwd) -> None:
    """Start `world` processes with the environment torchrun gives them; all must succeed."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, *argv_of_rank(rank)]
        output = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(subprocess.Popen(command, cwd=cwd, env=env, **output))
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    for rank, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"rank {rank}: {out[-3000:]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_keep_identical_weights_and_only_rank0_writes(script, tmp_path):
    """wgan_gp.py's job is launched by torchrun itself, the others' with the environment it gives."""
    (tmp_path / "worker.py").write_text(RUN_SCRIPT)
    flags = [*tiny(script), "--total-steps", "3", *JOB_FLAGS]
    argv = ["worker.py", str(ROOT / f"{script}.py"), "rank{RANK}.pt", *flags]
    if script == "wgan_gp":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        torchrun += ["--master_port", str(free_port())]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([*torchrun, *argv], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=240)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        # one process reports, the other stays quiet
        assert result.stdout.count("finished at step 3") == 1
    else:
        run_ranks(2, lambda rank: argv, tmp_path)
    # rank 0 alone logs, every step
    assert len(list((tmp_path / "runs" / "job").glob("events.*"))) == 1
    events = EventAccumulator(str(tmp_path / "runs" / "job")).Reload()
    assert [e.step for e in events.Scalars("losses/generator")] == [1, 2, 3]
    nets = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # the generator, the critic, the EMA where kept, and their DDP wrappers
    assert {"generator", "G", "D"} <= set(nets[0])
    for name, params in nets[0].items():
        for key, value in params.items():
            assert torch.equal(value, nets[1][name][key]), f"{name}.{key} differs between the ranks"
    assert set(os.listdir(tmp_path / "runs")) == {"job"}
    ckpt = torch.load(tmp_path / "runs" / "job" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    for key, value in nets[0]["generator"].items():
        assert torch.equal(ckpt["generator"][key], value)


@pytest.mark.parametrize("script", UNCONDITIONAL_GP_SCRIPTS)
def test_critic_update_of_two_ranks_equals_one_process_on_the_whole_batch(script, tmp_path):
    (tmp_path / "update.py").write_text(CRITIC_UPDATE.format(critic=CRITICS[script]))
    run_ranks(1, lambda rank: ["update.py", str(ROOT), script, "single.pt"], tmp_path)
    run_ranks(2, lambda rank: ["update.py", str(ROOT), script, f"rank{rank}.pt"], tmp_path)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Every parameter takes part but the score's bias, which cancels in E[D(x)] - E[D(x~)] and has no input gradient.
    moved = sum(bool(g.abs().max() > 0) for g in single["grads"].values())
    assert moved == len(single["grads"]) - 1
    for name, grad in single["grads"].items():
        # Float sums in another order: close to the scale of the gradient, far from a missing or doubled half.
        atol = 1e-4 * grad.abs().max().item()
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-3, atol=atol)
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max-images", "8", "--batch-size", "8"],
            "error: the dataset has 8 images, fewer than one batch of 16",
        ),
    ],
)
def test_bad_input_of_a_job_stops_every_process_with_one_line(flags, message, tmp_path):
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        command = [sys.executable, str(ROOT / "wgan_gp.py"), *tiny("wgan_gp"), "--device", "cpu"]
        command += flags
        processes.append(
            subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        )
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert all(p.returncode == 1 for p in processes)
    assert [e.strip().splitlines()[-1] for e in errors] == [message, message]
    assert not (tmp_path / "runs").exists()


def test_a_stop_on_one_process_stops_every_process_at_the_same_step_and_rank_0_saves(tmp_path):
    """SIGTERM to rank 1 alone: the stop flag, all-reduced every step, ends both at one step; rank 0 writes the
    checkpoint of that step and both exit with 128 + 15."""
    port, processes = free_port(), []
    flags = [*tiny("wgan_gp"), "--device", "cpu", "--total-steps", "100000"]
    flags += ["--sample-every", "100000", *JOB_FLAGS]
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, str(ROOT / "wgan_gp.py"), *flags]
        processes.append(
            subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        )
    events, deadline = tmp_path / "runs" / "job", time.time() + 120
    while not list(events.glob("events.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a few steps in
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs
    step = torch.load(events / "checkpoint.pt", weights_only=True)["step"]
    # rank 0 reports, once
    assert step > 0 and f"stopped at step {step}" in outputs[0] and outputs[1] == ""


def start_job(flags: list, cwd, **popen) -> list:
    """Two processes of wgan_gp.py with the environment torchrun gives them."""
    port, processes = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, str(ROOT / "wgan_gp.py"), *flags]
        processes.append(subprocess.Popen(command, cwd=cwd, env=env, text=True, **popen))
    return processes


def test_a_process_of_the_job_that_dies_stops_the_others_with_one_line(tmp_path):
    flags = [*tiny("wgan_gp"), "--device", "cpu", "--total-steps", "100000"]
    flags += ["--sample-every", "100000", *JOB_FLAGS]
    processes = start_job(flags, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    events, deadline = tmp_path / "runs" / "job", time.time() + 120
    while not list(events.glob("events.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    processes[1].kill()  # kill -9, as the kernel's out-of-memory killer
    err = processes[0].communicate(timeout=120)[1]
    processes[1].communicate()
    assert processes[0].returncode == 1 and "Traceback" not in err, err[-3000:]
    # The first line of gloo's error, which names gloo; its reason depends on where the peer was: "Read error [...]:
    # Connection reset by peer", "Broken pipe", ...
    assert re.fullmatch(r"error: \w+: .*gloo.+", err.strip().splitlines()[-1]), err


@pytest.mark.parametrize("world_size", ["two", "2"])
def test_a_process_count_without_torchrun_is_one_line(world_size, monkeypatch):
    """WORLD_SIZE=2 left set in a shell waited for processes that never came, or was a traceback."""
    import conftest

    module = conftest.load("wgan_gp")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = module.Args(device="cpu")
    module.check_args(args)
    with pytest.raises(SystemExit) as stop:
        module.setup_device(args)
    assert (
        str(stop.value) == f"error: WORLD_SIZE={world_size}: start several processes with torchrun"
    )


def test_torchrun_passes_a_closed_terminal_on_and_the_job_saves(tmp_path):
    """torchrun sends the SIGHUP it gets to its workers: each finishes its step, and rank 0 saves."""
    flags = [*tiny("wgan_gp"), "--total-steps", "100000", "--sample-every", "100000", *JOB_FLAGS]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*torchrun, "--master_port", str(free_port()), str(ROOT / "wgan_gp.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    events, deadline = tmp_path / "runs" / "job", time.time() + 120
    while not list(events.glob("events.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a few steps in
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    step = torch.load(events / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 1 and f"stopped at step {step}: runs/job; continue with: " in out, err[-3000:]
