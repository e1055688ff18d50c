"""Speed of the full training step (n_critic critic steps + one generator step), measured side by side.

    python benchmarks/speed.py                      # CPU, and CUDA too when a GPU is present
    python benchmarks/speed.py --compare-dir ../old  # also the scripts of another checkout, row by row

Each row is one configuration, timed in this run on this machine: first the step written the
textbook way, then the same step with one lever added at a time, then the scripts themselves
(run as a user runs them, their own logged images/s) with their option levers and each precision
with and without --compile. Ratios are against the textbook row of the same device and size.
Warm-up steps are excluded; each figure is the median over --steps generator steps; on CUDA every
timing is bracketed by synchronize(). FLOPs per step are counted with torch.utils.flop_counter:
the textbook step's in this process, each script's in its own process (the FLOPs of 2k steps
minus those of k, k its lazy-penalty period). The peaks are large fp32 and bf16 matmuls timed in
the same run; each row's % of peak is against the peak of the precision it ran in.
"""

import contextlib
import datetime
import functools
import importlib
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from classifier import cpu_description, pin_to_cpus  # noqa: E402

import wgan_gp  # noqa: E402  (the models and data loaders under test)

SCRIPTS = ["wgan_gp", "dcgan", "cond_wgan_gp", "resnet_sn_wgan_gp"]


@dataclass
class Args:
    scripts: List[str] = field(
        default_factory=lambda: [s for s in SCRIPTS if (ROOT / f"{s}.py").exists()]
    )
    """scripts whose own training loop is timed"""
    shapes: List[str] = field(default_factory=lambda: ["32x1", "64x3"])
    """image size x channels of each measured setting"""
    script_shapes: Optional[List[str]] = None
    """where the scripts' loops are timed: SHAPE or SHAPE=script,script (32x1 64x3=wgan_gp,dcgan); default all"""
    cpus: Optional[List[int]] = None
    """run on these CPU cores only, one thread per core (e.g. --cpus 0); default all"""
    devices: Optional[List[str]] = None
    """devices to measure; default cpu, plus cuda when available"""
    steps: int = 20
    """timed generator steps per row (the median is reported)"""
    warmup: int = 3
    """untimed generator steps before timing (allocator, cudnn autotuning, compilation)"""
    batch_size: int = 64
    """images per critic step and per generator step"""
    width: int = 64
    """generator and critic width of every row, so that all rows time the same networks"""
    peak_size: Optional[int] = None
    """side of the square matmul that measures the peak; default 8192 on CUDA, 4096 on CPU"""
    out_dir: str = str(ROOT / "benchmarks" / "results")
    """where speed-<device><suffix>.md is written"""
    suffix: str = ""
    """ends the table's file name, e.g. --suffix=-2-cores for speed-cpu-2-cores.md"""
    script_flags: str = ""
    """extra flags for every script run (the smoke test passes tiny widths)"""
    compile: bool = True
    """time the --compile rows (the first steps of each compile: a minute or more on a CPU)"""
    defaults_only: bool = False
    """time each script's defaults only (and --compare-dir's right after), no textbook or lever rows;
    the ratios are then against the first row"""
    compare_dir: Optional[str] = None
    """another checkout (e.g. a git worktree named after an older commit): its scripts' defaults are timed too, each
    right after the same script of this checkout, labelled with the folder's name"""


# ---------------------------------------------------------------------------------------------
# The textbook step: what most WGAN-GP repositories do, with each lever switchable.
# ---------------------------------------------------------------------------------------------
@dataclass
class Levers:
    tensor_data: bool = (
        False  # uint8 tensor on the device, batches are index slices (else PIL decode per image)
    )
    one_forward: bool = (
        False  # real and fake scored in one critic forward (else three: real, fake, interpolates)
    )
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    gp_every: int = (
        1  # the penalty on every k-th critic step only, weighted by k (the scripts' --gp-every)
    )


def pil_loader(images: torch.Tensor, size: int, channels: int, batch_size: int):
    """torchvision's MNIST recipe: a PIL image per sample, Resize + ToTensor + Normalize in 2 workers."""
    import torchvision.transforms as T
    from PIL import Image

    class PilImages(torch.utils.data.Dataset):
        transform = T.Compose(
            [
                T.Resize(size),
                T.Grayscale(channels),
                T.ToTensor(),
                T.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(images[i, 0].numpy(), mode="L"))

    loader = torch.utils.data.DataLoader(
        PilImages(),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
    )
    while True:
        yield from loader


def textbook_step_fn(
    levers: Levers,
    size: int,
    channels: int,
    batch_size: int,
    width: int,
    device: torch.device,
    raw: torch.Tensor,
):
    """Build models, optimizers and data for one configuration; return a function that runs one full step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if levers.channels_last else torch.contiguous_format
    generator = wgan_gp.Generator(128, channels, size, width).to(device, memory_format=fmt)
    critic = wgan_gp.Critic(channels, size, width).to(device, memory_format=fmt)
    generator_fwd = torch.compile(generator) if levers.compile else generator
    critic_fwd = torch.compile(critic) if levers.compile else critic
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=levers.bf16)
    if levers.tensor_data:
        images = TF.resize(raw.expand(-1, channels, -1, -1), [size, size], antialias=True).to(
            device
        )  # as load_dataset

        def next_real():
            return (
                images[torch.randint(len(images), (batch_size,), device=device)]
                .contiguous(memory_format=fmt)
                .float()
                / 127.5
                - 1
            )

    else:
        batches = pil_loader(raw, size, channels, batch_size)

        def next_real():
            return next(batches).to(device).contiguous(memory_format=fmt)

    critic_steps = itertools.count()  # numbers the critic steps, for the lazy penalty

    def step():
        for _ in range(5):
            lazy_skip = next(critic_steps) % levers.gp_every != 0
            real = next_real()
            z = torch.randn(batch_size, 128, device=device)
            with autocast:
                with torch.no_grad():
                    fake = generator_fwd(z)
                if levers.one_forward:
                    d_real, d_fake = critic_fwd(torch.cat([real, fake])).float().chunk(2)
                    gp = (
                        0
                        if lazy_skip
                        else levers.gp_every * wgan_gp.gradient_penalty(critic, real, fake.float())
                    )
                else:  # the textbook penalty: its own forward on the interpolates
                    d_real, d_fake = critic_fwd(real).float(), critic_fwd(fake).float()
                    eps = torch.rand(batch_size, 1, 1, 1, device=device)
                    x_hat = (eps * real + (1 - eps) * fake.float()).requires_grad_(True)
                    (grad,) = torch.autograd.grad(
                        critic(x_hat).float().sum(), x_hat, create_graph=True
                    )
                    gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
                d_loss = d_fake.mean() - d_real.mean() + 10 * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        critic.requires_grad_(False)
        with autocast:
            g_loss = (
                -critic_fwd(generator_fwd(torch.randn(batch_size, 128, device=device)))
                .float()
                .mean()
            )
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        critic.requires_grad_(True)

    return step


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of step()."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class GlobalOnly(contextlib.nullcontext):
    parents = {"Global"}


def count_flops(step, steps: int = 1) -> float:
    """FLOPs per step, averaged over `steps` steps (a lazy penalty every k-th critic step repeats every k steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Its per-module tracker hooks reject autograd.grad on a leaf (the penalty's inner gradient);
    # only the total is needed, so every FLOP is booked to "Global".
    counter.mod_tracker = GlobalOnly()
    with counter:
        for _ in range(steps):
            step()
    return counter.get_total_flops() / steps


def peak_flops(device: torch.device, dtype: torch.dtype, size: Optional[int]) -> float:
    """FLOP/s of the fastest of several large matmuls: the practical ceiling for the achieved fraction."""
    n = size or (8192 if device.type == "cuda" else 4096)
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    times = []
    for _ in range(8 if device.type == "cpu" else 30):
        times.append(time_steps(lambda: a @ b, steps=1, warmup=0, device=device))
    return 2 * n**3 / min(times[1:])


# ---------------------------------------------------------------------------------------------
# The scripts as users run them: their own images/s, logged every step.
# ---------------------------------------------------------------------------------------------
def script_seconds_per_step(
    script: str,
    flags: List[str],
    args: Args,
    size: int,
    channels: int,
    device: torch.device,
    workdir: Path,
    name: str,
    root: Path = ROOT,
    cores: Optional[int] = None,
) -> tuple:
    """Median seconds per generator step of a script's own loop, and the run's settings (its checkpoint's args). Only
    flags that every version of the scripts takes: the run goes to <workdir>/runs/<name>. `cores`: run it on the first
    that many of this process's cores, one thread each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # at least one untimed step: a timed step's time runs from the log of the step before it
    warmup = max(args.warmup, 1)
    command = script_command(
        script, flags, args, size, channels, device, name, warmup + args.steps, root
    )
    env, pin = dict(os.environ), None
    if cores:
        env["OMP_NUM_THREADS"] = str(cores)
        pin = functools.partial(os.sched_setaffinity, 0, sorted(os.sched_getaffinity(0))[:cores])
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=workdir, env=env, preexec_fn=pin
    )
    run_dir = workdir / "runs" / name
    if result.returncode != 0:
        raise SystemExit(
            f"error: {script}.py {' '.join(flags)} failed: {result.stderr.strip().splitlines()[-1]}"
        )
    settings = torch.load(run_dir / "checkpoint.pt", weights_only=True)["args"]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    # Logged every step: the wall-clock times of consecutive logs are the step times, the first
    # timed step's from the last warm-up step's log.
    times = [e.wall_time for e in events.Scalars("losses/generator")][warmup - 1 :]
    return statistics.median(b - a for a, b in zip(times, times[1:])), settings


def script_command(
    script, flags, args, size, channels, device, name, steps, root=ROOT
) -> List[str]:
    """The command line of a timed (or counted) run of a script: sizes, widths and batch of this benchmark."""
    return [
        sys.executable, str(root / f"{script}.py"), "--device", str(device),
        "--image-size", str(size), "--batch-size", str(args.batch_size),
        *(["--dataset", "folder", "--data-dir", "rgb"] if channels == 3 else []),
        "--total-steps", str(steps), "--log-every", "1", "--sample-every", "1000000",
        "--run-name", name, "--g-width", str(args.width), "--d-width", str(args.width),
        *args.script_flags.split(), *flags,
    ]  # fmt: skip


# Runs a script (argv[1:]) under a FLOP counter and prints "flops" and the running total after every optimizer step,
# last; speed.py's own GlobalOnly, because the counter's per-module tracker rejects the penalty's autograd.grad on a
# leaf.
FLOP_RUNNER = """
import contextlib, runpy, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode
class GlobalOnly(contextlib.nullcontext):
    parents = {"Global"}
counter, totals = FlopCounterMode(display=False), []
counter.mod_tracker = GlobalOnly()
register_optimizer_step_post_hook(lambda *_: totals.append(counter.get_total_flops()))
sys.argv = sys.argv[1:]
with counter:
    runpy.run_path(sys.argv[0], run_name="__main__")
print("flops", *totals)
"""


def script_flops(script, flags, args, size, channels, device, workdir: Path, period: int) -> float:
    """FLOPs per generator step of a script's own loop, in fp32 (the count is the same in every precision), from one
    run of 2 * period steps: the running total after step 2 * period's last optimizer step (the generator's) minus that
    after step period's, over period, so that the start and the final grid fall outside; period: the lazy penalty's,
    whose pattern repeats every `period` steps (a penalised critic step every gp_every)."""
    name = f"flops-{script}-{size}x{channels}-{len(list(workdir.glob('runs/flops-*')))}"
    steps = 2 * period
    command = script_command(
        script, [*flags, "--precision", "fp32"], args, size, channels, device, name, steps
    )
    command.insert(1, "-c")
    command.insert(2, FLOP_RUNNER)
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if result.returncode != 0:
        raise SystemExit(
            f"error: counting {script}.py's FLOPs failed: {result.stderr.strip().splitlines()[-1]}"
        )
    totals = [float(t) for t in result.stdout.split("flops")[-1].split()]
    per_step = len(totals) // steps  # optimizer steps per generator step: n_critic + 1
    assert per_step * steps == len(totals), (
        f"{len(totals)} optimizer steps in {steps} generator steps"
    )
    return (totals[-1] - totals[period * per_step - 1]) / period


def script_levers(script: str, device: torch.device, compile_rows: bool = True) -> List[tuple]:
    """Rows per script as (label, flags, cores): its defaults, each precision with and without --compile, then one
    change per row. The EMA, lazy-penalty and thread levers cost alike in every script, so on the CPU they are timed
    in the cheaper loops only."""
    script_args = importlib.import_module(script).Args()
    rows = [("defaults", [], None)]
    for precision in ["fp32", "bf16"] + ["fp16"] * (
        device.type == "cuda"
    ):  # fp16: no CPU here computes it natively
        rows += [(f"{precision} (--precision {precision})", ["--precision", precision], None)]
        if compile_rows:
            rows += [(f"{precision} + --compile", ["--precision", precision, "--compile"], None)]
    if script in ("wgan_gp", "dcgan"):
        if script_args.ema_halflife > 0:
            rows += [("EMA off (--ema-halflife 0)", ["--ema-halflife", "0"], None)]
        else:
            rows += [("EMA on (--ema-halflife 10000)", ["--ema-halflife", "10000"], None)]
    if script == "wgan_gp" and device.type == "cpu":  # the lazy penalty is the CPU's default
        rows += [("the penalty on every critic step (--gp-every 1)", ["--gp-every", "1"], None)]
    if script == "wgan_gp" and device.type == "cuda":
        rows += [("lazy penalty (--gp-every 4)", ["--gp-every", "4"], None)]
    if script == "cond_wgan_gp":
        rows += [("AC loss (--lambda-ac 1)", ["--lambda-ac", "1"], None)]
    if script == "resnet_sn_wgan_gp":
        rows += [("layer norm in the critic", ["--critic-norm", "layer"], None)]
    if device.type == "cpu" and script in ("wgan_gp", "dcgan") and len(os.sched_getaffinity(0)) > 1:
        rows += [("defaults on 1 core, 1 thread", [], 1)]
    return rows


def scripts_at(shape: str, args: Args) -> List[str]:
    """The scripts whose loops are timed at this shape, following --script-shapes."""
    if args.script_shapes is None:
        return args.scripts
    for spec in args.script_shapes:
        at, _, names = spec.partition("=")
        if at == shape:
            return [s for s in args.scripts if not names or s in names.split(",")]
    return []


def measure(
    device: torch.device, size: int, channels: int, args: Args, raw: torch.Tensor, workdir: Path
) -> List[dict]:
    steps = [("textbook: PIL per step, 3 critic forwards, fp32", Levers())]
    steps.append(("+ uint8 tensor data, index slices", Levers(tensor_data=True)))
    steps.append(
        ("+ real and fake in one critic forward", Levers(tensor_data=True, one_forward=True))
    )
    steps.append(
        ("+ channels_last", Levers(tensor_data=True, one_forward=True, channels_last=True))
    )
    lazy = Levers(tensor_data=True, one_forward=True, channels_last=True, gp_every=4)
    steps.append(("+ the penalty on every 4th critic step only (lazy)", lazy))
    steps.append(
        (
            "+ bf16 autocast",
            Levers(tensor_data=True, one_forward=True, channels_last=True, gp_every=4, bf16=True),
        )
    )
    if args.compile:
        compiled = Levers(
            tensor_data=True,
            one_forward=True,
            channels_last=True,
            gp_every=4,
            bf16=True,
            compile=True,
        )
        steps.append(("+ torch.compile", compiled))
    rows = []

    def flops_of(
        gp_every: int,
    ) -> float:  # the textbook step's FLOPs, which fit wgan_gp.py's own step
        levers = Levers(tensor_data=True, one_forward=True, gp_every=gp_every)
        return count_flops(
            textbook_step_fn(levers, size, channels, args.batch_size, args.width, device, raw),
            gp_every,
        )

    flops = {1: flops_of(1), 4: flops_of(4)}
    if args.defaults_only:
        steps = []
    for label, levers in steps:
        print(f"[{device}] {size}x{channels} {label}", flush=True)
        seconds = time_steps(
            textbook_step_fn(levers, size, channels, args.batch_size, args.width, device, raw),
            args.steps,
            args.warmup,
            device,
        )
        print(f"    {1 / seconds:.3f} steps/s", flush=True)
        precision = "bf16" if levers.bf16 else "fp32"
        rows.append(
            dict(
                config=label,
                seconds=seconds,
                flops=flops.get(levers.gp_every),
                precision=precision,
                n_critic=5,
            )
        )
    for script in scripts_at(f"{size}x{channels}", args):
        levers = [
            (label, flags, cores, ROOT)
            for label, flags, cores in script_levers(script, device, args.compile)
        ][: 1 if args.defaults_only else None]
        if args.compare_dir:  # the other checkout's defaults, right after this one's
            levers.insert(
                1,
                (
                    f"defaults at {Path(args.compare_dir).resolve().name}",
                    [],
                    None,
                    Path(args.compare_dir),
                ),
            )
        script_flops_of = {}  # FLOPs per step by the flags other than precision and compile, which leave them alone
        for label, flags, cores, root in levers:
            print(f"[{device}] {size}x{channels} {script}.py {label}", flush=True)
            name = f"{script}-{size}x{channels}-{device.type}-{len(rows)}"
            seconds, settings = script_seconds_per_step(
                script, flags, args, size, channels, device, workdir, name, root, cores
            )
            print(f"    {1 / seconds:.3f} steps/s", flush=True)
            key = tuple(
                f for f in flags if f not in ("--compile", "--precision", "fp32", "bf16", "fp16")
            )
            if key not in script_flops_of and root == ROOT:
                period = settings.get("gp_every", 1)
                script_flops_of[key] = script_flops(
                    script, list(key), args, size, channels, device, workdir, period
                )
            rows.append(
                dict(
                    config=f"{script}.py {label}",
                    seconds=seconds,
                    flops=script_flops_of.get(key) if root == ROOT else None,
                    precision=settings.get("precision", "fp32"),
                    n_critic=settings.get("n_critic", 1),
                )
            )
    return rows


def write_table(device: torch.device, results: dict, peaks: dict, args: Args) -> Path:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_description()}, {torch.get_num_threads()} threads"
    )
    lines = [
        f"# Training-step speed on {device.type.upper()}",
        "",
        f"- Machine: {name}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}",
        f"- Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        f"- Protocol: batch {args.batch_size}, one step = n_critic critic steps + 1 generator step "
        f"(5 + 1; dcgan.py 1 + 1), {args.warmup} warm-up steps, median of {args.steps} timed steps; "
        f"every row at widths {args.width} unless it says otherwise; textbook rows: latent 128, critic layer norm; "
        "script rows: the script's defaults otherwise"
        f"{' plus ' + args.script_flags if args.script_flags else ''}.",
        "- Peak: "
        + ", ".join(
            f"{k} matmul {v / 1e9:.2f} GFLOP/s" for k, v in peaks.items()
        )  # a CPU without bf16: 0.95
        + " (each row's % of peak is against the peak of its precision)",
        "",
    ]
    for shape, rows in results.items():
        base = rows[0]["seconds"]
        lines += [
            f"## {shape} (size x channels)",
            "",
            f"| configuration | precision | steps/s | real images/s | speed-up vs {'the first row' if args.defaults_only else 'textbook'} | GFLOP/step | % of peak |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            steps_per_sec = 1 / row["seconds"]
            flops = f"{row['flops'] / 1e9:.3g}" if row["flops"] else "—"
            peak = peaks[row["precision"]]
            fraction = f"{100 * row['flops'] * steps_per_sec / peak:.1f}" if row["flops"] else "—"
            images = steps_per_sec * row["n_critic"] * args.batch_size
            lines.append(
                f"| {row['config']} | {row['precision']} | {steps_per_sec:.3f} | {images:.0f} "
                f"| {base / row['seconds']:.2f}x | {flops} | {fraction} |"
            )
        lines.append("")
    path = Path(args.out_dir) / f"speed-{device.type}{args.suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    args = tyro.cli(Args)
    unknown = [s for s in args.scripts if not (ROOT / f"{s}.py").exists()]
    if unknown:
        raise SystemExit(f"error: no such script: {', '.join(unknown)}")
    if args.cpus is not None:
        pin_to_cpus(args.cpus)  # the timed script processes inherit the cores and the thread count
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fashion = wgan_gp.Args()
    wgan_gp.check_args(fashion)
    wgan_gp.load_dataset(fashion)  # extracts the shipped archives
    raw = torchvision.datasets.FashionMNIST(str(ROOT / "data")).data[
        :, None
    ]  # (60000, 1, 28, 28) uint8
    with tempfile.TemporaryDirectory() as tmp:
        # The scripts train in the data's channels: an RGB shape reads a folder of RGB PNGs of
        # Fashion-MNIST images, each channel a different brightness, from the runs' folder.
        (Path(tmp) / "rgb").mkdir()
        for i, image in enumerate(raw[:2048]):
            rgb = torch.cat([image, image * 3 // 4, image // 2]).contiguous()
            torchvision.io.write_png(rgb, str(Path(tmp) / "rgb" / f"{i:05d}.png"))
        for name in devices:
            device = torch.device(name)
            dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} | (
                {"fp16": torch.float16} if device.type == "cuda" else {}
            )
            peaks = {
                name: peak_flops(device, dtype, args.peak_size) for name, dtype in dtypes.items()
            }
            torch.backends.cudnn.benchmark = device.type == "cuda"
            results = {}
            for shape in args.shapes:
                size, channels = (int(v) for v in shape.split("x"))
                results[shape] = measure(device, size, channels, args, raw, Path(tmp))
            print(f"wrote {write_table(device, results, peaks, args)}")
