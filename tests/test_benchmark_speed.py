"""Smoke test: benchmarks/speed.py runs end to end on tiny settings and writes its table."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_speed_benchmark_writes_a_table_with_every_lever(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/speed.py"), "--scripts", "wgan_gp", "--shapes", "16x1",
               "--steps", "1", "--warmup", "1", "--width", "8", "--peak-size", "256",
               "--compare-dir", str(ROOT), "--out-dir", str(tmp_path), "--suffix=-tiny"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "speed-cpu-tiny.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "textbook: PIL per step, 3 critic forwards, fp32",
        "+ uint8 tensor data, index slices",
        "+ real and fake in one critic forward",
        "+ channels_last",
        "+ the penalty on every 4th critic step only (lazy)",
        "wgan_gp.py defaults",
        f"wgan_gp.py defaults at {ROOT.name}",
        "wgan_gp.py EMA on (--ema-halflife 10000)",
        "wgan_gp.py the penalty on every critic step (--gp-every 1)",
        "wgan_gp.py --compile",
    ] + ["wgan_gp.py defaults on 1 core, 1 thread"] * (len(os.sched_getaffinity(0)) > 1)
    assert rows[0].split(" | ")[3] == "1.00x"
    # FLOPs per step: the lazy rows (the script's CPU default among them) do the work of 5 forwards and 5 / 4 penalties
    flops = {r.split(" | ")[0][2:]: r.split(" | ")[4] for r in rows}
    full, lazy = float(flops["+ channels_last"]), float(flops["wgan_gp.py defaults"])
    assert flops["+ the penalty on every 4th critic step only (lazy)"] == flops["wgan_gp.py defaults"]
    assert 0.4 * full < lazy < 0.8 * full
    assert float(flops["wgan_gp.py the penalty on every critic step (--gp-every 1)"]) == full
    for row in rows:
        steps_per_sec, images_per_sec = (float(v) for v in row.split(" | ")[1:3])
        assert steps_per_sec > 0 and images_per_sec > 0
    assert re.search(r"fp32 matmul \d+ GFLOP/s", table)


def test_script_shapes_choose_where_each_script_is_timed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    args = speed.Args(scripts=["wgan_gp", "dcgan", "resnet_sn_wgan_gp"], script_shapes=["32x1", "64x3=wgan_gp,dcgan"])
    assert speed.scripts_at("32x1", args) == ["wgan_gp", "dcgan", "resnet_sn_wgan_gp"]
    assert speed.scripts_at("64x3", args) == ["wgan_gp", "dcgan"]
    assert speed.scripts_at("128x3", args) == []
    assert speed.scripts_at("64x3", speed.Args(scripts=["dcgan"])) == ["dcgan"]
