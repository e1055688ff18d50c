"""Smoke tests: benchmarks/speed.py and benchmarks/precision_cpu.py run end to end on tiny settings and
write their tables."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_speed_benchmark_writes_a_table_with_every_lever(tmp_path):
    # --no-compile: the compile rows are rows like the others; --compile itself is tested in test_precision.py
    command = [sys.executable, str(ROOT / "benchmarks/speed.py"), "--scripts", "wgan_gp", "--shapes", "16x1",
               "--steps", "1", "--warmup", "1", "--width", "8", "--peak-size", "256", "--no-compile",
               "--compare-dir", str(ROOT), "--out-dir", str(tmp_path), "--suffix=-tiny",
               "--script-flags=--max-images 512"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "speed-cpu-tiny.md").read_text()
    lines = table.splitlines()
    rows = [
        line for line in lines if line.startswith("| ") and not line.startswith("| configuration")
    ]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "textbook: PIL per step, 3 critic forwards, fp32",
        "+ uint8 tensor data, index slices",
        "+ real and fake in one critic forward",
        "+ channels_last",
        "+ the penalty on every 4th critic step only (lazy)",
        "+ bf16 autocast",
        "wgan_gp.py defaults",
        f"wgan_gp.py defaults at {ROOT.name}",
        "wgan_gp.py fp32 (--precision fp32)",
        "wgan_gp.py bf16 (--precision bf16)",
        "wgan_gp.py EMA on (--ema-halflife 10000)",
        "wgan_gp.py the penalty on every critic step (--gp-every 1)",
    ] + ["wgan_gp.py defaults on 1 core, 1 thread"] * (len(os.sched_getaffinity(0)) > 1)
    # precision, steps/s, images/s, x, GFLOP, %
    cells = {r.split(" | ")[0][2:]: r.rstrip(" |").split(" | ")[1:] for r in rows}
    assert cells["textbook: PIL per step, 3 critic forwards, fp32"][3] == "1.00x"
    precisions = [cells[k][0] for k in ("+ bf16 autocast", "wgan_gp.py fp32 (--precision fp32)")]
    assert precisions == ["bf16", "fp32"]
    assert cells["wgan_gp.py bf16 (--precision bf16)"][0] == "bf16"
    assert cells["wgan_gp.py defaults"][0] in ("fp32", "bf16")
    # FLOPs per step, the script's counted in its own process: the lazy rows (the script's CPU default among them) do
    # the work of 5 forwards and 5 / 4 penalties, the same in every precision.
    flops = {label: cell[4] for label, cell in cells.items()}
    full, lazy = float(flops["+ channels_last"]), float(flops["wgan_gp.py defaults"])
    assert (
        flops["+ the penalty on every 4th critic step only (lazy)"] == flops["wgan_gp.py defaults"]
    )
    bf16 = flops["+ bf16 autocast"], flops["wgan_gp.py bf16 (--precision bf16)"]
    assert bf16[0] == bf16[1] == flops["wgan_gp.py defaults"]
    assert 0.4 * full < lazy < 0.8 * full
    assert float(flops["wgan_gp.py the penalty on every critic step (--gp-every 1)"]) == full
    for label, cell in cells.items():
        steps_per_sec, images_per_sec = float(cell[1]), float(cell[2])
        assert steps_per_sec > 0 and images_per_sec > 0, label
    # % of peak: each row against the peak of its own precision
    peaks = {k: float(v) for k, v in re.findall(r"(fp32|bf16) matmul ([\d.]+) GFLOP/s", table)}
    assert set(peaks) == {"fp32", "bf16"}
    for label, (precision, steps_per_sec, _, _, gflop, percent) in cells.items():
        if gflop != "—":
            expected = 100 * float(gflop) * float(steps_per_sec) / peaks[precision]
            assert abs(float(percent) - expected) < 0.05 * expected + 0.1, label


def test_script_shapes_choose_where_each_script_is_timed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    scripts = ["wgan_gp", "dcgan", "resnet_sn_wgan_gp"]
    args = speed.Args(scripts=scripts, script_shapes=["32x1", "64x3=wgan_gp,dcgan"])
    assert speed.scripts_at("32x1", args) == ["wgan_gp", "dcgan", "resnet_sn_wgan_gp"]
    assert speed.scripts_at("64x3", args) == ["wgan_gp", "dcgan"]
    assert speed.scripts_at("128x3", args) == []
    assert speed.scripts_at("64x3", speed.Args(scripts=["dcgan"])) == ["dcgan"]


def test_defaults_only_times_each_scripts_defaults_and_nothing_else(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/speed.py"), "--scripts", "wgan_gp", "--shapes", "16x1",
               "--steps", "1", "--warmup", "1", "--width", "8", "--peak-size", "256", "--no-compile",
               "--defaults-only", "--out-dir", str(tmp_path), "--suffix=-tiny",
               "--script-flags=--max-images 512"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "speed-cpu-tiny.md").read_text().splitlines()
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ")]
    assert rows == ["| configuration", "| wgan_gp.py defaults"]
    assert (
        "speed-up vs the first row"
        in lines[lines.index(next(r for r in lines if r.startswith("| config")))]
    )


def test_precision_cpu_writes_seconds_a_step_and_refuses_too_few_steps(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks/precision_cpu.py"),
        "--out",
        str(tmp_path / "p.md"),
    ]
    result = subprocess.run([*command, "--steps", "1"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --steps must be >= 2 (the first is not timed), got 1"
    result = subprocess.run([*command, "--precisions", "fp32", "--steps", "3"], capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = (tmp_path / "p.md").read_text().splitlines()[-1]
    precision, seconds, ratio = re.fullmatch(r"\| (\w+) \| ([\d.]+) \| ([\d.]+)x \|", row).groups()
    assert (precision, ratio) == ("fp32", "1.0") and 0 < float(seconds) < 60
