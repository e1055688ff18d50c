"""benchmarks/export_reals.py writes the training images, pixel for pixel, as PNGs."""

import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT, load
from PIL import Image


def test_export_reals_writes_the_training_pixels(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/export_reals.py"), "--num-images", "5"]
    command += ["--seed", "3", "--out-dir", str(tmp_path / "reals")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    module = load("wgan_gp")
    args = module.Args(batch_size=1)
    module.check_args(args)
    images = module.load_dataset(args)[0]
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))[:5]
    for k, i in enumerate(chosen.tolist()):
        with Image.open(tmp_path / "reals" / f"{k:06d}.png") as png:
            assert png.mode == "L" and png.size == (32, 32)
            assert np.array_equal(np.asarray(png), images[i, 0].numpy())


def test_export_reals_refuses_more_images_than_the_dataset_has(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks/export_reals.py"), "--num-images", "60001"]
    command += ["--out-dir", str(tmp_path / "reals")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    message = "error: --num-images must be from 1 to 60000 (the dataset's size), got 60001"
    assert result.returncode == 1 and result.stderr.strip() == message
    assert not (tmp_path / "reals").exists()
