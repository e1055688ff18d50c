"""Write real training images as PNGs, preprocessed exactly as the scripts train on them.

    python benchmarks/export_reals.py --dataset celeba --data-dir ~/data --num-images 10000 --out-dir reals

The scripts' --generate writes fakes at the training resolution; an Inception FID compares them
with this folder (see benchmarks/README.md), so both sides share the crop, resize and channels.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wgan_gp  # noqa: E402  (its data block is the one every script shares)


@dataclass
class Args:
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "celeba", "folder"] = "fashion-mnist"
    """the dataset, as the scripts' --dataset"""
    data_dir: Optional[str] = None
    """as the scripts' --data-dir"""
    image_size: Optional[int] = None
    """as the scripts' --image-size (default 32, or 64 for celeba and folder)"""
    channels: Optional[int] = None
    """as the scripts' --channels (default follows the data)"""
    num_images: int = 10000
    """how many images to write: a random subset, fixed by --seed"""
    seed: int = 0
    """seed of the subset"""
    out_dir: str = "reals"
    """the folder to write <index>.png into"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    config = wgan_gp.Args(
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        channels=args.channels,
        batch_size=1,
    )
    wgan_gp.check_args(config)
    images = wgan_gp.load_dataset(config)[0]  # (N, C, S, S) uint8, every image decoded once
    n = len(images)
    if args.num_images < 1 or args.num_images > n:
        raise SystemExit(
            f"error: --num-images must be from 1 to {n} (the dataset's size), got {args.num_images}"
        )
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[
        : args.num_images
    ]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(chosen.tolist()):
        wgan_gp.save_png(
            images[i : i + 1].float() / 127.5 - 1, out_dir / f"{k:06d}.png"
        )  # save_png maps back to uint8
    print(
        f"wrote {args.num_images} real images of {args.dataset} at {config.image_size} px to {out_dir}"
    )
