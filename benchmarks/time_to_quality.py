"""Sample quality against one-core minutes, for the scripts and for the repositories people use instead.

    python benchmarks/time_to_quality.py --pytorch-gan ~/src/PyTorch-GAN --examples ~/src/examples  # every row, 2 h
    python benchmarks/time_to_quality.py --plot-only  # the plot and the table again, from results/time-to-quality.json

Every row trains once per seed in a process of its own, pinned to one core with one thread (two rows at a time on a
2-core machine, one per core), from its own defaults on the shipped Fashion-MNIST. A hook after every optimizer step
reads the wall clock, counted from the process's launch (startup and data loading included), and at each of --minutes
saves the generator; after the last one it ends the run. Scoring comes afterwards, when no run is timed, with
quality.py's protocol: 10,000 generated images, the Frechet distance (FD) of the repository's classifier's features
against the 10,000 test images, the coverage KL, and for the conditional script the accuracy of the class asked for.

- This repository's scripts run as `python <script>.py --seed S` with their CPU defaults; a saved checkpoint is the
  script's own checkpoint format, and its images come from the script's own `--generate --seed 0`.
- The other repositories run unchanged from a checkout given on the command line (never copied here): the harness
  executes their training file as __main__ with their default flags, after three changes around it, none inside it:
  torchvision's MNIST class is replaced by its FashionMNIST class reading this repository's data/ (the same images
  and labels), the global RNGs are seeded with S (pytorch/examples also gets its own `--manualSeed S`), and the
  optimizer-step hook saves the generator. Their images come from their generator in training mode, batch norm on a
  batch of 64 samples, as their scripts draw their sample grids, and are resized to 32x32 (antialiased) to be scored
  as ours are.
"""

import copy
import dataclasses
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402  (the scoring protocol: generate, evaluate)
from classifier import load_classifier, load_test_set, machine  # noqa: E402

# The rows: this repository's scripts at their defaults (wgan_gp.py also in fp32, bf16 being its CPU default where the
# CPU has it), and the training files of the repositories people use instead, with their commits as measured.
OURS = {
    "wgan_gp.py": ("wgan_gp", []),
    "wgan_gp.py fp32": ("wgan_gp", ["--precision", "fp32"]),
    "dcgan.py": ("dcgan", []),
    "cond_wgan_gp.py": ("cond_wgan_gp", []),
    "resnet_sn_wgan_gp.py": ("resnet_sn_wgan_gp", []),
}


@dataclass
class Reference:
    checkout: str  # which --flag names the checkout
    path: str  # the training file, within the checkout
    argv: List[
        str
    ]  # their flags: the defaults, but what a run needs ({seed}, {data} are filled in)
    generator: str  # the global that holds the generator
    optimizer: str  # the global that holds the generator's optimizer: its step ends a training step
    noise: str  # the shape of a batch of z: "flat" (B, latent) or "4d" (B, nz, 1, 1)
    latent: str  # where the latent size is: an expression over their globals


REFERENCES = {
    "PyTorch-GAN wgan_gp": Reference(
        "pytorch_gan",
        "implementations/wgan_gp/wgan_gp.py",
        [],
        "generator",
        "optimizer_G",
        "flat",
        "opt.latent_dim",
    ),
    "PyTorch-GAN dcgan": Reference(
        "pytorch_gan",
        "implementations/dcgan/dcgan.py",
        [],
        "generator",
        "optimizer_G",
        "flat",
        "opt.latent_dim",
    ),
    "pytorch/examples dcgan": Reference(
        "examples",
        "dcgan/main.py",
        ["--dataset", "mnist", "--dataroot", "{data}", "--manualSeed", "{seed}"],
        "netG",
        "optimizerG",
        "4d",
        "nz",
    ),
}


@dataclass
class Args:
    rows: List[str] = field(default_factory=lambda: list(OURS) + list(REFERENCES))
    """rows to measure: the scripts' names as in the table, and the references'"""
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    """training seeds; the plot shows their mean and range"""
    minutes: List[float] = field(default_factory=lambda: [1, 2, 5, 10, 15])
    """wall-clock points, from each run's launch, at which the generator is saved; the run ends at the last"""
    cpus: List[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0))[:2])
    """cores to run on, one run per core at a time"""
    pytorch_gan: Optional[str] = None
    """a checkout of github.com/eriklindernoren/PyTorch-GAN (its rows are skipped without one)"""
    examples: Optional[str] = None
    """a checkout of github.com/pytorch/examples (its row is skipped without one)"""
    num_images: int = 10000
    """images generated per saved generator"""
    script_flags: str = ""
    """extra flags for this repository's scripts (the test passes tiny widths)"""
    results_dir: str = str(ROOT / "benchmarks" / "results")
    """where time-to-quality.json is merged into and time-to-quality.md is written"""
    plot: str = str(ROOT / "assets" / "time-to-quality.png")
    """where the picture is written"""
    work_dir: Optional[str] = None
    """keep the runs and their images in this new folder; default a temporary folder, deleted at the end"""
    plot_only: bool = False
    """write the table and the plot from the stored results, train nothing"""


# ---------------------------------------------------------------------------------------------
# One run: a process of its own, pinned to one core (see launch), that saves the generator at the marks
# ---------------------------------------------------------------------------------------------
class Finished(Exception):
    """Raised from the step hook after the last mark: it ends the training loop of the file that runs."""


def child(spec: dict) -> None:
    """Train one row for one seed as __main__ of this process; save the generator at every mark, then stop."""
    torch.set_num_threads(1)
    marks, out, ref = [60 * m for m in spec["minutes"]], Path(spec["out"]), spec.get("reference")
    namespace = {"__name__": "__main__", "__file__": spec["path"]}
    saved, steps = [], [0]

    def after_step(
        optimizer, *_
    ):  # every optimizer step: a generator step ends with the generator's optimizer
        if optimizer is not namespace.get(ref["optimizer"] if ref else "opt_g"):
            return
        steps[0] += 1
        while marks and time.time() - spec["launched"] >= marks[0]:
            minute = marks.pop(0) / 60
            folder = out / f"{minute:g}min"
            folder.mkdir(parents=True)
            if (
                ref
            ):  # kept in memory, drawn from after the run; its weights also on disk, for the record
                saved.append((minute, steps[0], copy.deepcopy(namespace[ref["generator"]])))
                torch.save(saved[-1][2].state_dict(), folder / "generator.pt")
            else:  # this repository's checkpoint, as its training loop writes it
                state = {
                    key: obj.state_dict() if obj is not None else None
                    for key, obj in namespace["state"].items()
                }
                args = dataclasses.asdict(namespace["args"])
                state.update(
                    kind=namespace["script"],
                    args=args,
                    step=steps[0],
                )
                if (
                    "classes" in namespace
                ):  # cond_wgan_gp.py's --generate names its folders after them
                    state["classes"] = namespace["classes"]
                torch.save(state, folder / "checkpoint.pt")
            (folder / "steps").write_text(str(steps[0]))
            (folder / "seconds").write_text(f"{time.time() - spec['launched']:.3f}")
        if not marks:
            raise Finished

    register_optimizer_step_post_hook(after_step)  # every optimizer's steps
    if ref:  # their MNIST is this repository's Fashion-MNIST; the global RNGs are seeded
        data = str(ROOT / "data")

        class FashionMNIST(torchvision.datasets.FashionMNIST):
            def __init__(
                self, root, train=True, transform=None, target_transform=None, download=False
            ):
                super().__init__(
                    data, train=train, transform=transform, target_transform=target_transform
                )

        torchvision.datasets.MNIST = FashionMNIST
        random.seed(spec["seed"]), np.random.seed(spec["seed"]), torch.manual_seed(spec["seed"])
    sys.argv = [spec["path"], *spec["argv"]]
    try:
        exec(compile(Path(spec["path"]).read_text(), spec["path"], "exec"), namespace)
    except Finished:
        pass
    if marks:
        raise SystemExit(
            f"error: {spec['path']} ended before the last mark ({marks[0] / 60:g} min)"
        )
    for (
        minute,
        _,
        generator,
    ) in saved:  # their generator in training mode, as their sample grids are drawn
        torch.manual_seed(0)
        latent = eval(ref["latent"], namespace)
        folder = out / f"{minute:g}min" / "generated"
        folder.mkdir()
        generator.train()
        with torch.no_grad():
            for start in range(0, spec["num_images"], 64):
                z = (
                    torch.randn(64, latent)
                    if ref["noise"] == "flat"
                    else torch.randn(64, latent, 1, 1)
                )
                images = generator(z)[
                    : spec["num_images"] - start
                ]  # (64, 1, S, S) in [-1, 1], S their size
                images = TF.resize(images, [32, 32], antialias=True).clamp(-1, 1)
                for i, image in enumerate(images.add(1).mul(127.5).round().to(torch.uint8)):
                    torchvision.io.write_png(image, str(folder / f"{start + i:06d}.png"))


def launch(row: str, seed: int, core: int, args: Args, work: Path) -> tuple:
    """Start one run pinned to `core`; returns (process, its folder). The clock starts here, before Python does."""
    out = work / f"{row.replace(' ', '_').replace('/', '-')}-seed{seed}"
    out.mkdir(parents=True)
    spec = {"seed": seed, "minutes": args.minutes, "out": str(out), "num_images": args.num_images}
    if row in OURS:
        script, flags = OURS[row]
        spec.update(
            path=str(ROOT / f"{script}.py"),
            argv=["--seed", str(seed), "--run-name", str(out / "run")],
        )
        spec["argv"] += ["--total-steps", "1000000000", *args.script_flags.split(), *flags]
        cwd = ROOT
    else:
        ref = REFERENCES[row]
        checkout = getattr(args, ref.checkout)
        argv = [a.format(seed=seed, data=ROOT / "data") for a in ref.argv]
        spec.update(
            path=str(Path(checkout) / ref.path), argv=argv, reference=dataclasses.asdict(ref)
        )
        cwd = (
            out / "cwd" / "a" / "b"
        )  # their relative paths (../../data/mnist, images/) stay inside the run's folder
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "w")
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import time_to_quality as t; t.child({{}})"
    spec["launched"] = time.time()
    command = [sys.executable, "-c", code.replace("{}", json.dumps(spec))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pin = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
    ), out


def train_all(jobs: list, args: Args, work: Path) -> dict:
    """Run the jobs, one per core at a time; return {(row, seed): folder}."""
    folders, running, pending = {}, {}, list(jobs)
    while pending or running:
        for core in [c for c in args.cpus if c not in running and pending]:
            row, seed = pending.pop(0)
            print(
                f"[{row} seed {seed}] training on core {core} for {max(args.minutes):g} min",
                flush=True,
            )
            running[core] = (row, seed, *launch(row, seed, core, args, work))
        for core, (row, seed, process, out) in list(running.items()):
            if process.poll() is not None:
                del running[core]
                if process.returncode != 0:
                    lines = (out / "log.txt").read_text(errors="replace").strip().splitlines()
                    quality.fail(
                        f"{row} seed {seed} failed: {lines[-1] if lines else process.returncode}"
                    )
                folders[(row, seed)] = out
        time.sleep(1)
    return folders


def score_all(folders: dict, args: Args, model, reference: tuple) -> dict:
    """Score every saved generator of every run: {row: {seed: [{minute, steps, seconds, fd, kl, cond_acc}, ...]}};
    `reference`: the Gaussian fit of the classifier's features of the test images."""
    results = {}
    for (row, seed), out in folders.items():
        points = []
        for minute in args.minutes:
            folder = out / f"{minute:g}min"
            if row in OURS:  # the script's own --generate, as quality.py scores
                quality.generate(OURS[row][0], folder / "checkpoint.pt", args.num_images)
            metrics = quality.evaluate(model, folder / "generated", reference)
            steps, seconds = (float((folder / name).read_text()) for name in ("steps", "seconds"))
            points.append({"minute": minute, "steps": int(steps), "seconds": seconds, **metrics})
            print(
                f"[{row} seed {seed}] {minute:g} min: FD {metrics['fd']:.2f}, {points[-1]['steps']} steps",
                flush=True,
            )
        results.setdefault(row, {})[str(seed)] = points
    return results


# ---------------------------------------------------------------------------------------------
# Results: raw numbers in JSON, the table and the plot from all of them
# ---------------------------------------------------------------------------------------------
def spread(values: list, digits: int = 2) -> str:
    """Mean, and the range over the seeds when there are several: '13.74 (13.69-13.78)'."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return (
        mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def write_table(stored: dict, path: Path) -> None:
    rows, minutes = stored["rows"], stored["settings"]["minutes"]
    shown = [m for m in (5, 10, 15) if m in minutes] or minutes
    lines = [
        "# Sample quality against one-core minutes",
        "",
        "Measured with `benchmarks/time_to_quality.py` (protocol in its docstring); FD of the repository's "
        f"Fashion-MNIST classifier, real-vs-real floor {stored['floor']:.2f}; mean and range over the seeds listed.",
        "",
        f"- Machine: {stored['machine']}, one core and one thread per run; torch {stored['torch']}; {stored['date']}",
        f"- Command: `{stored['command']}`",
        *[f"- {name}: {commit}" for name, commit in stored["commits"].items()],
        "",
        "| row | "
        + " | ".join(f"FD after {m:g} min" for m in shown)
        + f" | generator steps in {max(minutes):g} min"
        " | conditional accuracy | seeds |",
        "|---|" + "---:|" * (len(shown) + 2) + "---|",
    ]
    for row, seeds in rows.items():
        at = {
            m: [p for points in seeds.values() for p in points if p["minute"] == m] for m in minutes
        }
        cells = [spread([p["fd"] for p in at[m]]) for m in shown]
        steps = spread([p["steps"] for p in at[max(minutes)]], 0)
        accuracy = [100 * p["cond_acc"] for p in at[max(minutes)] if p["cond_acc"] is not None]
        accuracy = spread(accuracy, 1) + "%" if accuracy else ""
        lines.append(
            f"| {row} | {' | '.join(cells)} | {steps} | {accuracy} | {', '.join(sorted(seeds))} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(stored: dict, path: Path) -> None:
    """FD against minutes, log-log: a line through each row's mean, its seeds' range shaded; references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for k, (row, seeds) in enumerate(stored["rows"].items()):
        minutes = sorted({p["minute"] for points in seeds.values() for p in points})
        fds = [
            [p["fd"] for points in seeds.values() for p in points if p["minute"] == m]
            for m in minutes
        ]
        mean = [statistics.mean(f) for f in fds]
        style = "--" if row in REFERENCES else "-"
        (line,) = axes.plot(minutes, mean, style, marker="o", color=f"C{k}", label=row)
        axes.fill_between(
            minutes, [min(f) for f in fds], [max(f) for f in fds], color=line.get_color(), alpha=0.2
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    ticks = sorted(
        {p["minute"] for seeds in stored["rows"].values() for pts in seeds.values() for p in pts}
    )
    axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes.set_xlabel("minutes of training on one CPU core (startup included)")
    axes.set_ylabel("Frechet distance to the test set (lower is better)")
    axes.set_title(f"Fashion-MNIST, {stored['machine']}, {stored['date']}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def commit_of(checkout: Optional[str]) -> Optional[str]:
    if not checkout:
        return None
    result = subprocess.run(
        ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "not a git checkout"


def main(args: Args) -> None:
    """Train, score, store; or, with --plot-only, the table and the plot from what is stored."""
    results_dir = Path(args.results_dir)
    json_path = results_dir / "time-to-quality.json"
    if not args.plot_only:
        unknown = [row for row in args.rows if row not in OURS and row not in REFERENCES]
        if unknown:
            quality.fail(f"unknown rows {unknown}: choose from {list(OURS) + list(REFERENCES)}")
        skipped = [
            row
            for row in args.rows
            if row in REFERENCES and not getattr(args, REFERENCES[row].checkout)
        ]
        if skipped:
            print(f"skipping {', '.join(skipped)}: no checkout given (--pytorch-gan, --examples)")
        rows = [row for row in args.rows if row not in skipped]
        if args.work_dir and Path(args.work_dir).exists():
            quality.fail(f"--work-dir {args.work_dir} already exists: give a new folder")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            folders = train_all([(row, seed) for row in rows for seed in args.seeds], args, work)
            model, (test_images, _) = load_classifier(), load_test_set()
            reference = quality.gaussian_fit(quality.classify(model, test_images)[0])
            scored = score_all(folders, args, model, reference)
        train_images, _ = quality.load_train_set()
        subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[
            :10000
        ]
        floor = quality.frechet_distance(
            *quality.gaussian_fit(quality.classify(model, train_images[subset])[0]), *reference
        )
        stored = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
        if stored.get("settings", {}).get("minutes") != args.minutes:
            stored["rows"] = {}  # other marks are not comparable
        stored["rows"].update(scored)
        stored.update(
            settings={
                "minutes": args.minutes,
                "num_images": args.num_images,
                "script_flags": args.script_flags,
            },
            floor=floor,
            machine=machine(),
            torch=torch.__version__,
            date=datetime.date.today().isoformat(),
            command=" ".join(["python", "benchmarks/time_to_quality.py", *sys.argv[1:]]),
            commits={
                name: commit
                for name, commit in [
                    ("eriklindernoren/PyTorch-GAN", commit_of(args.pytorch_gan)),
                    ("pytorch/examples", commit_of(args.examples)),
                ]
                if commit
            }
            or stored.get("commits", {}),
        )
        results_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(stored, indent=1))
    stored = json.loads(json_path.read_text())
    write_table(stored, results_dir / "time-to-quality.md")
    write_plot(stored, Path(args.plot))
    print(f"wrote {json_path}, {results_dir / 'time-to-quality.md'} and {args.plot}")


if __name__ == "__main__":
    main(tyro.cli(Args))
