"""Sample quality of the GAN scripts on Fashion-MNIST, measured offline against benchmarks/classifier.pt.

    python benchmarks/quality.py                     # every script present, seeds 1 2, 10-minute budget each
    python benchmarks/quality.py --scripts wgan_gp --ablations "paper penalty=--gp-every 1" \
        "EMA=--ema-halflife 10000" "width 64=--g-width 64 --d-width 64"

Protocol, per script and seed: train with the script's defaults for --fixed-steps generator steps
(the "fixed steps" row: equal work), then resume the same run until --budget-minutes of wall time
have passed since the first launch and stop it with SIGTERM (the "budget" row: equal time, which
rewards a faster step). Resume is bit-identical, so both rows come from one run. Ablations add
flags to the fixed-steps run. Each checkpoint generates --num-images PNGs with the script's own
--generate, which the classifier reads back:

- FD: the Frechet distance between Gaussian fits of the classifier's penultimate features of the
  generated images and of the 10,000 test images (FID's formula with a Fashion-MNIST network).
- coverage KL: KL(predicted-class histogram || uniform); 0 when every class is drawn equally
  often, log 10 = 2.30 when every image is one class (mode collapse).
- conditional accuracy: for scripts that write one folder per class, how often the classifier
  agrees with the requested class.

Raw per-seed numbers are merged into results/quality.json (a run replaces only what it re-measured)
and results/quality.md is rewritten from all of it; the first seed's sample grids go to assets/.
"""

import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torchvision
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from classifier import (
    Classifier,
    load_classifier,
    load_test_set,
    load_train_set,
    machine,
    pin_to_cpus,
)  # noqa: E402

from wgan_gp import fail  # noqa: E402  (one line on stderr and exit code 1, as the scripts do)

SCRIPTS = ["dcgan", "wgan_gp", "cond_wgan_gp", "resnet_sn_wgan_gp"]
CLASSES = torchvision.datasets.FashionMNIST.classes  # wgan_gp.load_dataset's order


@dataclass
class Args:
    scripts: List[str] = field(
        default_factory=lambda: [s for s in SCRIPTS if (ROOT / f"{s}.py").exists()]
    )
    """scripts to measure (dcgan, wgan_gp, cond_wgan_gp, resnet_sn_wgan_gp); default those present"""
    seeds: List[int] = field(default_factory=lambda: [1, 2])
    """training seeds; every row reports the mean and standard deviation over them"""
    fixed_steps: int = 500
    """generator steps of the fixed-steps row and of the ablations (the default fits in 10 minutes on 2 CPU cores)"""
    budget_minutes: float = 10.0
    """wall-clock budget of the budget row, from the first launch of the run (startup and data loading included)"""
    num_images: int = 10000
    """images generated per checkpoint"""
    ablations: List[str] = field(default_factory=list)
    """ablations as "label=flags", e.g. "no EMA=--ema-halflife 0"; trained for --fixed-steps with every seed"""
    ablation_scripts: List[str] = field(default_factory=lambda: ["wgan_gp"])
    """scripts the ablations are run for (those also in --scripts); each must accept the ablation flags"""
    ablations_only: bool = False
    """train only the ablations; the defaults' rows measured before under the same settings stay in the table"""
    script_flags: str = ""
    """extra flags for every training command, written with "=": --script-flags="--batch-size 8" (tests: tiny)"""
    results_dir: str = str(ROOT / "benchmarks" / "results")
    """where quality.json is merged into and quality.md is written"""
    assets_dir: str = str(ROOT / "assets")
    """where the first seed's sample grids are copied"""
    cpus: Optional[List[int]] = None
    """run everything on these CPU cores only, one thread per core (--cpus 0: the other core stays free); default all"""
    work_dir: Optional[str] = None
    """keep the runs and generated PNGs in this new folder; default a temporary folder, deleted at the end"""


def check_args(args: Args) -> list:
    """Reject bad input before any training starts; return the ablations as (label, flags) pairs."""
    if not args.scripts:
        fail(
            "no scripts to measure: none of "
            + ", ".join(f"{s}.py" for s in SCRIPTS)
            + " is in "
            + str(ROOT)
        )
    for script in args.scripts + args.ablation_scripts:
        if script not in SCRIPTS:
            fail(f"unknown script {script!r}: choose from {', '.join(SCRIPTS)}")
    for script in args.scripts:
        if not (ROOT / f"{script}.py").exists():
            fail(f"{script}.py is not in {ROOT}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds must be distinct and at least one, got {args.seeds}")
    if args.fixed_steps < 1:
        fail(f"--fixed-steps must be >= 1, got {args.fixed_steps}")
    if not args.budget_minutes > 0:
        fail(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.num_images < 2:
        fail(f"--num-images must be >= 2 (a covariance needs two images), got {args.num_images}")
    if args.work_dir and Path(args.work_dir).exists():
        fail(f"--work-dir {args.work_dir} already exists: give a new folder")
    ablations = []
    for spec in args.ablations:
        label, sep, flags = spec.partition("=")
        if not sep or not label.strip() or not flags.strip():
            fail(f'ablation {spec!r} is not "label=flags", e.g. "no EMA=--ema-halflife 0"')
        ablations.append((label.strip(), flags.strip()))
    if len({label for label, _ in ablations}) != len(ablations):
        fail("two ablations share a label")
    if args.ablations_only and not ablations:
        fail("--ablations-only needs --ablations")
    if ablations and not set(args.scripts) & set(args.ablation_scripts):
        fail(
            f"the ablations run for --ablation-scripts {' '.join(args.ablation_scripts)}, "
            "and none of them is in --scripts"
        )
    return ablations


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def gaussian_fit(features: torch.Tensor) -> tuple:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64: FD subtracts nearly equal large numbers."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; eigenvalues that rounding made negative count as 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """FD = ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2).

    C1 C2 is not symmetric, and scipy's general sqrtm of it can return complex noise. Its eigenvalues
    equal those of the symmetric PSD matrix C1^1/2 C2 C1^1/2, so tr((C1 C2)^1/2) is the sum of the
    square roots of that matrix's eigenvalues: two symmetric eigendecompositions, nothing complex.
    """
    root1 = sqrtm_psd(cov1)
    eigenvalues = torch.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    return (
        (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    ).item()


def coverage_kl(predictions: torch.Tensor, num_classes: int = len(CLASSES)) -> float:
    """KL(p || uniform) = sum_k p_k log(K p_k) of the predicted-class histogram p; 0 means every class equally often."""
    p = torch.bincount(predictions, minlength=num_classes).double() / len(predictions)
    p = p[p > 0]  # 0 log 0 = 0
    return (p * (num_classes * p).log()).sum().item()


@torch.no_grad()
def classify(model: Classifier, images: torch.Tensor) -> tuple:
    """Penultimate features (N, D) and predicted classes (N,) of images in [-1, 1].

    Computed in batches that keep memory small.
    """
    features = torch.cat([model.features(batch) for batch in images.split(500)])
    return features, model.head(features).argmax(1)


def normalized(name: str) -> str:
    return re.sub(
        r"[^a-z0-9]", "", name.lower()
    )  # "T-shirt/top" and a folder "t-shirt_top" both become "tshirttop"


def read_gray(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def read_generated(folder: Path) -> tuple:
    """Generated PNGs as (N, 1, 32, 32) in [-1, 1], and the requested class of each (None for unconditional layouts).

    Unconditional scripts write folder/000000.png ...; conditional ones folder/<class name>/<index>.png.
    """
    by_name = {normalized(name): k for k, name in enumerate(CLASSES)}
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    files, requested = sorted(folder.glob("*.png")), None
    if subfolders:
        unknown = [p.name for p in subfolders if normalized(p.name) not in by_name]
        if unknown:
            fail(
                f"{folder} has class folders that are not Fashion-MNIST classes: {', '.join(unknown)}"
            )
        files = [f for sub in subfolders for f in sorted(sub.glob("*.png"))]
        requested = torch.tensor([by_name[normalized(f.parent.name)] for f in files])
    if not files:
        fail(f"no PNGs in {folder}")
    pixels = np.stack([read_gray(f) for f in files])  # (N, 32, 32) uint8
    if pixels.shape[1:] != (32, 32):
        fail(
            f"the generated images in {folder} are {pixels.shape[2]}x{pixels.shape[1]}, the classifier reads 32x32"
        )
    return torch.from_numpy(pixels)[:, None].float() / 127.5 - 1, requested


def evaluate(model: Classifier, folder: Path, reference: tuple) -> dict:
    """FD against the reference fit (mu, cov), coverage KL, and conditional accuracy where classes were requested."""
    images, requested = read_generated(folder)
    features, predictions = classify(model, images)
    result = {
        "fd": frechet_distance(*gaussian_fit(features), *reference),
        "kl": coverage_kl(predictions),
        "cond_acc": None,
    }
    if requested is not None:
        result["cond_acc"] = (predictions == requested).double().mean().item()
    return result


# ---------------------------------------------------------------------------------------------
# Runs: the scripts as users run them, each in its own process
# ---------------------------------------------------------------------------------------------
def script_command(script: str, *flags: str) -> list:
    return [sys.executable, str(ROOT / f"{script}.py"), *flags]


def launch(command: list, log: Path) -> subprocess.Popen:
    # Output goes to a file, not a pipe: tqdm's bar would fill a pipe nobody reads and stall the run.
    with open(log, "a") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def check_exit(process: subprocess.Popen, log: Path, allowed: tuple = (0,)) -> None:
    """Stop with the script's own last words when it failed (tyro's box drawing removed)."""
    if process.returncode not in allowed:
        lines = [line.strip("│╭╮╰╯─ ") for line in log.read_text(errors="replace").splitlines()]
        words = [line for line in lines if line and not line.startswith("For full helptext")][-2:]
        fail(f"{Path(process.args[1]).name} exited with {process.returncode}: {' | '.join(words)}")


def run_to_end(command: list, log: Path) -> float:
    """Run a script to its end and return its wall time in seconds."""
    start = time.perf_counter()
    process = launch(command, log)
    process.wait()
    check_exit(process, log)
    return time.perf_counter() - start


def train(script: str, seed: int, flags: list, run_dir: Path, args: Args) -> float:
    """Train a fresh run for args.fixed_steps generator steps; return its wall time in seconds (startup included)."""
    command = script_command(
        script, "--seed", str(seed), "--total-steps", str(args.fixed_steps), "--run-name", str(run_dir),
        "--sample-every", "100000", *shlex.split(args.script_flags), *flags,
    )  # fmt: skip
    return run_to_end(command, run_dir.parent / f"{run_dir.name}.log")


def continue_until(script: str, run_dir: Path, seconds: float) -> int:
    """Resume a run, stop it with SIGTERM after `seconds`, return the generator step its checkpoint reached."""
    log = run_dir.parent / f"{run_dir.name}.log"
    process = launch(
        script_command(
            script, "--resume", str(run_dir / "checkpoint.pt"), "--total-steps", "1000000000"
        ),
        log,
    )
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(
            signal.SIGTERM
        )  # the script finishes its step, saves and exits with 128 + 15
        process.wait()
    # -15 or -2: the signal came in the script's startup, before its handler (-15) or while its startup
    # turns SIGTERM into a KeyboardInterrupt (-2), so the checkpoint is the one it started from.
    check_exit(process, log, allowed=(0, 128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGINT))
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def generate(script: str, checkpoint: Path, num_images: int) -> Path:
    """The script's own --generate, which writes <checkpoint folder>/generated (its fixed-noise grid beside it)."""
    command = script_command(
        script, "--generate", str(checkpoint), "--num-images", str(num_images), "--seed", "0"
    )
    run_to_end(command, checkpoint.parent / "generate.log")
    return checkpoint.parent / "generated"


def measure_script(
    script: str, ablations: list, model: Classifier, reference: tuple, args: Args, work: Path
) -> list:
    """Every row of one script: per seed a fixed-steps row, a budget row and one row per ablation."""
    rows = []
    budget = 60 * args.budget_minutes
    assets = Path(args.assets_dir)

    def add_row(
        kind: str,
        label: str,
        flags: str,
        seed: int,
        checkpoint: Path,
        steps: int,
        wall: float,
        grid_to: Optional[Path] = None,
    ) -> None:
        out_dir = generate(script, checkpoint, args.num_images)
        metrics = evaluate(model, out_dir, reference)
        if grid_to is not None:
            grid_to.parent.mkdir(parents=True, exist_ok=True)
            # the first 64 generated PNGs, 8 a row (a --generate writes no grid of its own)
            first = sorted(out_dir.rglob("*.png"), key=lambda f: f.name)[:64]
            pixels = torch.stack([torchvision.io.decode_image(str(f)) for f in first])
            grid = torchvision.utils.make_grid(pixels, 8)
            torchvision.io.write_png(grid, str(grid_to))
        rows.append(
            {
                "kind": kind,
                "label": label,
                "flags": flags,
                "seed": seed,
                "steps": steps,
                "wall_s": wall,
                **metrics,
            }
        )
        print(
            f"[{script} seed {seed}] {label or kind}: FD {metrics['fd']:.2f}, coverage KL {metrics['kl']:.3f}, "
            f"{steps} steps, {wall:.0f} s"
        )

    def run_ablations(seed: int) -> None:
        for j, (label, flags) in enumerate(ablations if script in args.ablation_scripts else []):
            print(
                f"[{script} seed {seed}] ablation {label!r}: training {args.fixed_steps} steps with {flags}"
            )
            ablation_dir = work / f"{script}-seed{seed}-ablation{j}"
            wall = train(script, seed, shlex.split(flags), ablation_dir, args)
            add_row(
                "ablation",
                label,
                flags,
                seed,
                ablation_dir / "checkpoint.pt",
                args.fixed_steps,
                wall,
            )

    for seed in args.seeds:
        if args.ablations_only:
            run_ablations(seed)
            continue
        first = seed == args.seeds[0]  # the first seed's grids illustrate the README
        run_dir = work / f"{script}-seed{seed}"
        print(f"[{script} seed {seed}] training {args.fixed_steps} steps")
        wall = train(script, seed, [], run_dir, args)
        fixed_checkpoint = (
            work / f"{script}-seed{seed}-step{args.fixed_steps}" / "checkpoint.pt"
        )  # a folder each:
        fixed_checkpoint.parent.mkdir()  # --generate writes beside its checkpoint
        shutil.copyfile(
            run_dir / "checkpoint.pt", fixed_checkpoint
        )  # the resumed run overwrites checkpoint.pt
        steps, budget_wall = args.fixed_steps, wall
        if wall < budget:
            print(
                f"[{script} seed {seed}] continuing for the remaining {budget - wall:.0f} s of the budget"
            )
            resumed = time.perf_counter()
            steps = continue_until(script, run_dir, budget - wall)
            budget_wall = (
                wall + time.perf_counter() - resumed
            )  # a little over the budget: the last step and the save
        else:
            print(
                f"[{script} seed {seed}] {args.fixed_steps} steps took {wall:.0f} s, "
                "the whole budget: the budget row repeats them"
            )
        fixed_grid = (
            assets / f"{script}-fashion-mnist-{args.fixed_steps}steps.png" if first else None
        )
        budget_grid = assets / f"{script}-fashion-mnist.png" if first else None
        add_row("fixed", "", "", seed, fixed_checkpoint, args.fixed_steps, wall, fixed_grid)
        add_row("budget", "", "", seed, run_dir / "checkpoint.pt", steps, budget_wall, budget_grid)
        checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        if checkpoint.get("ema") is not None:
            # The same weights without their moving average: --generate falls back to the raw generator.
            raw_checkpoint = work / f"{script}-seed{seed}-raw" / "checkpoint.pt"
            raw_checkpoint.parent.mkdir()
            args_raw = {
                **checkpoint["args"],
                "ema_halflife": 0.0,
            }  # the run's settings without its moving average
            torch.save({**checkpoint, "ema": None, "args": args_raw}, raw_checkpoint)
            raw_grid = assets / f"{script}-fashion-mnist-no-ema.png" if first else None
            add_row("budget-raw", "", "", seed, raw_checkpoint, steps, budget_wall, raw_grid)
        run_ablations(seed)
    return rows


# ---------------------------------------------------------------------------------------------
# Results: raw numbers in JSON, the table rebuilt from all of them
# ---------------------------------------------------------------------------------------------
def merge(stored: dict, script: str, entry: dict) -> None:
    """Put one script's new rows into the stored results.

    A row replaces the stored row of the same kind, label and seed. Rows measured under other settings
    (steps, budget, images, flags) are not comparable and are dropped.
    """
    old = stored["scripts"].get(script)
    if old and old["settings"] == entry["settings"]:
        new_keys = {(r["kind"], r["label"], r["seed"]) for r in entry["rows"]}
        entry["rows"] = [
            r for r in old["rows"] if (r["kind"], r["label"], r["seed"]) not in new_keys
        ] + entry["rows"]
        entry["commands"] = list(dict.fromkeys(old["commands"] + entry["commands"]))
    elif old:
        print(
            f"{script}: the stored rows used other settings ({old['settings']}); they are replaced"
        )
    stored["scripts"][script] = entry


def mean_std(values: list, digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cells(group: list) -> dict:
    """Table cells of one row measured over several seeds."""
    return {
        "fd": mean_std([r["fd"] for r in group], 2),
        "kl": mean_std([r["kl"] for r in group], 3),
        "steps": f"{statistics.mean(r['steps'] for r in group):.0f}",
        "seeds": ", ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"])),
    }


def write_markdown(stored: dict, path: Path) -> None:
    floor = stored["floor"]
    runs = {
        (c, e["machine"], e["torch"], e["date"])
        for e in stored["scripts"].values()
        for c in e["commands"]
    }
    lines = [
        "# Sample quality on Fashion-MNIST",
        "",
        "Measured with `benchmarks/quality.py` against a Fashion-MNIST classifier trained in this repository "
        f"(`benchmarks/classifier.py`, {100 * stored['classifier_accuracy']:.2f}% test accuracy, see classifier.md).",
        "",
        "- Protocol: per script and seed, train with the script's defaults for a fixed number of generator steps, "
        "then resume the same run until the wall-clock budget (counted from the first launch, startup included) "
        "is spent and stop it with SIGTERM; ablations change flags of the fixed-steps run. Wall time is that of "
        "the training processes, startup included. Each checkpoint writes its images with the script's own "
        "`--generate --seed 0` (EMA weights where the run kept them); the budget checkpoint is also sampled with "
        "its raw generator weights, which isolates what the moving average adds to the same training.",
        "- FD: Frechet distance between Gaussian fits of the classifier's 128-d penultimate features of the "
        "generated images and of the 10,000 test images (lower is better). Coverage KL: "
        "KL(predicted-class histogram || uniform); 0 when every class is drawn equally often, 2.30 when all images "
        "fall in one class. Conditional accuracy: how often the classifier names the class that was asked for.",
        f"- Real-vs-real floor: {floor['train_images']:,} training images "
        f"(random subset, seed {floor['subset_seed']}) against the test images: "
        f"FD {floor['fd']:.2f}, coverage KL {floor['kl']:.4f}.",
        "- Mean ± standard deviation over the seeds listed.",
        "- Runs:",
        *[
            f"  - `{command}`: {where}, torch {version}, {date}"
            for command, where, version, date in sorted(runs)
        ],
        "",
    ]
    for script, entry in stored["scripts"].items():
        settings, rows = entry["settings"], entry["rows"]
        fixed = [r for r in rows if r["kind"] == "fixed"]
        lines += [
            f"## {script}.py",
            "",
            f"{settings['num_images']:,} generated images per checkpoint; every process ran on "
            + (
                f"{settings['cpus']} CPU core{'s' if settings['cpus'] > 1 else ''} with as many threads"
                if "cpus" in settings
                else "all cores"
            )
            + (f"; extra flags `{settings['script_flags']}`" if settings["script_flags"] else "")
            + ".",
            "",
            "| row | FD | coverage KL | conditional accuracy | generator steps | wall time | seeds |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        budget_title = f"{settings['budget_minutes']:g} min budget"
        for kind, title in [
            ("fixed", f"fixed {settings['fixed_steps']} steps"),
            ("budget", budget_title),
            ("budget-raw", f"{budget_title}, sampled without EMA"),
        ]:
            group = [r for r in rows if r["kind"] == kind]
            if not group:
                continue
            c = cells(group)
            accuracy = (
                mean_std([100 * r["cond_acc"] for r in group], 1) + "%"
                if group[0]["cond_acc"] is not None
                else "—"
            )
            minutes = statistics.mean(r["wall_s"] for r in group) / 60
            lines.append(
                f"| {title} | {c['fd']} | {c['kl']} | {accuracy} | {c['steps']} | {minutes:.1f} min | {c['seeds']} |"
            )
        labels = list(dict.fromkeys(r["label"] for r in rows if r["kind"] == "ablation"))
        if labels and fixed:
            base, c = statistics.mean(r["fd"] for r in fixed), cells(fixed)
            lines += [
                "",
                f"Ablations, each trained for {settings['fixed_steps']} steps with the same seeds; "
                "ΔFD against the defaults' fixed-steps row.",
                "",
                "| ablation | flags | FD | ΔFD | coverage KL | generator steps | seeds |",
                "|---|---|---:|---:|---:|---:|---|",
                f"| defaults | | {c['fd']} | | {c['kl']} | {c['steps']} | {c['seeds']} |",
            ]
            for label in labels:
                group = [r for r in rows if r["kind"] == "ablation" and r["label"] == label]
                c, delta = cells(group), statistics.mean(r["fd"] for r in group) - base
                lines.append(
                    f"| {label} | `{group[0]['flags']}` | {c['fd']} | {delta:+.2f} | {c['kl']} | {c['steps']} "
                    f"| {c['seeds']} |"
                )
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    args = tyro.cli(Args)
    ablations = check_args(args)
    sys.stdout.reconfigure(
        line_buffering=True
    )  # progress lines show at once, also when piped into a log
    if args.cpus is not None:
        pin_to_cpus(
            args.cpus
        )  # the training and generation processes inherit the cores and the thread count
    model = load_classifier()

    print("classifying the test images and the real-vs-real floor")
    test_images, test_labels = load_test_set()
    test_features, test_predictions = classify(model, test_images)
    reference = gaussian_fit(test_features)
    train_images, _ = load_train_set()
    subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:10000]
    train_features, train_predictions = classify(model, train_images[subset])
    floor_fd = frechet_distance(*gaussian_fit(train_features), *reference)
    floor = {
        "fd": floor_fd,
        "kl": coverage_kl(train_predictions),
        "train_images": len(subset),
        "subset_seed": 0,
    }
    print(f"real-vs-real floor: FD {floor['fd']:.2f}, coverage KL {floor['kl']:.4f}")

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "quality.json"
    accuracy = (test_predictions == test_labels).double().mean().item()
    settings = {
        "fixed_steps": args.fixed_steps,
        "budget_minutes": args.budget_minutes,
        "num_images": args.num_images,
        "script_flags": args.script_flags,
        "cpus": len(args.cpus or os.sched_getaffinity(0)),
    }
    command = shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    with (
        contextlib.nullcontext(args.work_dir)
        if args.work_dir
        else tempfile.TemporaryDirectory() as work
    ):
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)  # --work-dir was checked to be new
        for script in args.scripts:
            rows = measure_script(script, ablations, model, reference, args, work)
            entry = {"settings": settings, "commands": [command], "rows": rows}
            entry.update(
                machine=machine(), torch=torch.__version__, date=datetime.date.today().isoformat()
            )
            # Read just before writing: another quality.py (a script measured on another core) may have written since.
            stored = json.loads(json_path.read_text()) if json_path.exists() else {"scripts": {}}
            stored.update(floor=floor, classifier_accuracy=accuracy)
            merge(stored, script, entry)
            # Written after every script, so an interrupted run keeps what it finished.
            json_path.write_text(json.dumps(stored, indent=1))
            write_markdown(stored, results_dir / "quality.md")
    print(f"wrote {json_path} and {results_dir / 'quality.md'}")
