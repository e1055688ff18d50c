"""A small CNN that classifies Fashion-MNIST at 32x32: the yardstick of benchmarks/quality.py.

    python benchmarks/classifier.py      # trains it (a few minutes on 2 CPU cores),
                                         # writes classifier.pt and results/classifier.md

Inception features, the usual FID yardstick, were learned on ImageNet photos and need a download;
this network is trained on the very data the GANs learn, ships with the repository (about 1 MB)
and runs offline. Its penultimate 128-d features are what the Frechet distance compares; its
predicted classes show which kinds of clothing a generator covers. It sees images exactly as the
GAN scripts do: wgan_gp.load_dataset's 32x32 uint8 tensor mapped to [-1, 1] (the test set resized the same way).
"""

import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import wgan_gp  # noqa: E402  (its data loader, so the preprocessing is the GANs' own)

WEIGHTS = ROOT / "benchmarks" / "classifier.pt"


@dataclass
class Args:
    epochs: int = 6
    """passes over the 60,000 training images"""
    batch_size: int = 128
    """images per optimizer step"""
    lr: float = 3e-3
    """peak Adam learning rate of the one-cycle schedule"""
    seed: int = 0
    """seed of the initial weights, the data order and the flips"""
    out: str = str(WEIGHTS)
    """where the state dict is written"""
    report: str = str(ROOT / "benchmarks" / "results" / "classifier.md")
    """where the markdown summary is written"""


class Classifier(nn.Module):
    def __init__(self, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list:
            return [
                nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(
                1, 32, kernel=4, stride=2
            ),  # (B, 32, 16, 16): strided, since full-resolution maps dominate the CPU time
            *block(32, 64),
            nn.MaxPool2d(2),  # (B, 64, 8, 8)
            *block(64, 128),
            nn.MaxPool2d(2),  # (B, 128, 4, 4)
            *block(128, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128)
            nn.Linear(128, feature_dim),
            nn.ReLU(
                inplace=True
            ),  # (B, feature_dim): the features that the Frechet distance compares
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 1, 32, 32) in [-1, 1] -> (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, num_classes) logits


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1  # uint8 -> [-1, 1], as the GAN scripts map their batches


def load_train_set() -> tuple:
    """The 60,000 training images (N, 1, 32, 32) in [-1, 1] and their labels, through wgan_gp's own loader."""
    args = wgan_gp.Args()
    wgan_gp.check_args(args)
    # also extracts the shipped archives, test set included
    images, dataset = wgan_gp.load_dataset(args)
    return to_float(images), torch.as_tensor(dataset.targets)


def load_test_set() -> tuple:
    """The 10,000 test images (N, 1, 32, 32) in [-1, 1] and their labels, resized as load_dataset resizes the
    training set (torchvision's uint8 antialiased resize)."""
    load_train_set()
    test = torchvision.datasets.FashionMNIST(str(ROOT / "data"), train=False)
    images = TF.resize(test.data[:, None], [32, 32], antialias=True)  # (10000, 1, 32, 32) uint8
    return to_float(images), test.targets


def load_classifier(path: Path = WEIGHTS) -> Classifier:
    """The trained classifier in eval mode.

    Batch norm uses its running statistics, so results do not depend on batching.
    """
    if not Path(path).is_file():
        wgan_gp.fail(
            f"{path} is missing: train the classifier first with python benchmarks/classifier.py"
        )
    model = Classifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(1000)])
    return (predictions == labels).float().mean().item()


def cpu_description() -> str:
    """CPU model and the cores this process may use: the hardware a CPU timing belongs to."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    used = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {used} cores"
        if used == os.cpu_count()
        else f"{cpu}, {used} of its {os.cpu_count()} cores"
    )


def machine() -> str:
    """The CPU, plus the GPU when one is used."""
    return cpu_description() + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )


def pin_to_cpus(cpus: list) -> None:
    """Run this process and every process it starts on these cores only, one thread per core.

    The benchmarks use it to measure on one core while the other core does other work."""
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        wgan_gp.fail(
            f"--cpus {' '.join(map(str, cpus))}: this process may only use cores {' '.join(map(str, sorted(allowed)))}"
        )
    os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))  # inherited by the training processes
    torch.set_num_threads(len(cpus))


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        wgan_gp.fail(
            f"--epochs and --batch-size must be >= 1 and --lr > 0, got {args.epochs}, {args.batch_size}, {args.lr}"
        )
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_images, train_labels = load_train_set()
    test_images, test_labels = load_test_set()
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = len(train_images) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = train_images[idx], train_labels[idx]
            # Mirrored clothes stay the same class; the flips make the classifier less picky about
            # the exact pixels, which generated images never match.
            flip = torch.rand(len(x), 1, 1, 1) < 0.5
            x = torch.where(flip, x.flip(3), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        model.eval()
        test_accuracy = accuracy(model, test_images, test_labels)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, test accuracy {test_accuracy:.4f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    seconds = time.perf_counter() - start

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "# Fashion-MNIST classifier (the yardstick of quality.md)",
        "",
        f"- Test accuracy: **{100 * test_accuracy:.2f}%** on the 10,000 test images",
        f"- Training: {args.epochs} epochs of the 60,000 training images, batch {args.batch_size}, "
        f"Adam with a one-cycle learning rate (peak {args.lr}), random horizontal flips, seed {args.seed}; "
        f"{n_params:,} parameters, "
        f"{Path(args.out).stat().st_size / 1e6:.1f} MB",
        f"- Wall time: {seconds / 60:.1f} min (data loading included)",
        f"- Machine: {machine()}, {torch.get_num_threads()} threads",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}",
        f"- Command: `{' '.join(['python benchmarks/classifier.py', *sys.argv[1:]])}`",
        "",
    ]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(lines))
    print(f"test accuracy {test_accuracy:.4f}; wrote {args.out} and {args.report}")
