"""Reference curves: every TensorBoard scalar of some runs against generator steps, in one PNG.

    python benchmarks/curves.py --healthy runs/curves/wgan_gp-seed1 runs/curves/wgan_gp-seed2 \
        --failing runs/curves/wgan_gp-lambda-gp-0 --out assets/curves-wgan_gp.png

Healthy runs are drawn in blue (one shade a seed), failing runs in red, one panel a scalar; a
panel whose failing run leaves the healthy range is linear up to it and logarithmic beyond. The
panels are the union of the scalars the runs logged; a healthy run that lacks one of them is
refused, so a page's curves never leave a scalar out. Prints the scalars it drew, one a line.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import matplotlib
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

matplotlib.use("Agg")  # no screen
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Args:
    healthy: List[str]
    """run folders of healthy runs (their event files)"""
    out: str
    """the PNG to write"""
    failing: List[str] = field(default_factory=list)
    """run folders of runs made to fail, drawn beside the healthy ones"""
    title: str = ""
    """the figure's title"""


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def scalars(run: str) -> dict:
    """{tag: ([steps], [values])} of a run folder's event files."""
    if not list(Path(run).glob("events.out.tfevents.*")):
        fail(f"no event files in {run}")
    events = EventAccumulator(run, size_guidance={"scalars": 0}).Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


def main(args: Args) -> List[str]:
    healthy = {run: scalars(run) for run in args.healthy}
    failing = {run: scalars(run) for run in args.failing}
    tags = sorted(set().union(*healthy.values(), *failing.values()))
    if not tags:
        fail("the runs logged no scalars")
    for run, logged in healthy.items():
        missing = [tag for tag in tags if tag not in logged]
        if missing:
            fail(f"{run} lacks the scalars {' '.join(missing)}")
    columns = min(3, len(tags))
    rows = -(-len(tags) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    blues = plt.cm.Blues([0.55 + 0.4 * i / max(1, len(healthy) - 1) for i in range(len(healthy))])
    for ax, tag in zip(axes.flat, tags):
        for color, (run, logged) in zip(blues, healthy.items()):
            ax.plot(*logged[tag], color=color, linewidth=1, label=f"healthy: {Path(run).name}")
        for run, logged in failing.items():
            if tag in logged:
                ax.plot(
                    *logged[tag], color="tab:red", linewidth=1, label=f"failing: {Path(run).name}"
                )
        scale = max(abs(v) for logged in healthy.values() for v in logged[tag][1]) or 1.0
        failed = [abs(v) for logged in failing.values() for v in logged.get(tag, ([], []))[1]]
        if failed and max(failed) > 3 * scale:  # linear up to the healthy range, log beyond it
            ax.set_yscale("symlog", linthresh=scale)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if args.title:
        figure.suptitle(args.title)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    for tag in tags:
        print(tag)
    return tags


if __name__ == "__main__":
    main(tyro.cli(Args))
