"""What each --precision costs a script on this CPU: seconds per generator step, side by side.

    python benchmarks/precision_cpu.py --precisions fp32 fp16 --cpus 0

Runs the script at its defaults (Fashion-MNIST, 32x32) once per precision, one after the other, on
the cores given with one thread each, for --steps generator steps, each logged, and reports the
median time between logs after the first (the first includes start-up). PyTorch's CPU autocast
runs the same code paths as CUDA's, but its fp16 convolutions have no fast kernel: this measures
how much slower that is.
"""

import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from classifier import cpu_description, pin_to_cpus  # noqa: E402


@dataclass
class Args:
    script: str = "wgan_gp"
    """the script to time"""
    precisions: List[str] = field(default_factory=lambda: ["fp32", "fp16"])
    """--precision values, timed in this order"""
    steps: int = 4
    """generator steps per run; the first is not timed"""
    cpus: List[int] = field(default_factory=lambda: [0])
    """cores to run on, one thread each"""
    out: str = str(ROOT / "benchmarks" / "results" / "fp16-cpu.md")
    """the report to write"""


def seconds_per_step(args: Args, precision: str, workdir: Path) -> float:
    command = [sys.executable, str(ROOT / f"{args.script}.py"), "--precision", precision]
    command += ["--total-steps", str(args.steps), "--log-every", "1", "--sample-every", "100000"]
    command += ["--run-name", f"precision-{precision}"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"error: --precision {precision}: {result.stderr.strip().splitlines()[-1]}"
        )
    events = EventAccumulator(str(workdir / "runs" / f"precision-{precision}")).Reload()
    times = [e.wall_time for e in events.Scalars("losses/generator")]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main(args: Args) -> None:
    if args.steps < 2:
        raise SystemExit(f"error: --steps must be >= 2 (the first is not timed), got {args.steps}")
    pin_to_cpus(args.cpus)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            seconds = seconds_per_step(args, precision, Path(tmp))
            print(f"{precision}: {seconds:.2f} s a step", flush=True)
            rows.append((precision, seconds))
    base = rows[0][1]
    lines = [
        f"# Seconds per generator step of {args.script}.py by --precision on a CPU",
        "",
        f"- Machine: {cpu_description()}",
        f"- Command: `python benchmarks/precision_cpu.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Protocol: the script's defaults, {args.steps} generator steps a run, the median time "
        "between logs after the first step.",
        "",
        f"| precision | seconds a step | against {rows[0][0]} |",
        "|---|---:|---:|",
        *(f"| {p} | {s:.2f} | {s / base:.1f}x |" for p, s in rows),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
