"""Conditional WGAN-GP: a Wasserstein GAN with gradient penalty that generates the class it is asked for.

Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville 2017, "Improved Training of Wasserstein GANs"
(https://arxiv.org/abs/1704.00028), Algorithm 1, on the DCGAN architecture of Radford et al. 2015,
conditioned on the data's classes: the generator takes the label embedded and concatenated with z
(Mirza & Osindero 2014, https://arxiv.org/abs/1411.1784); the critic is a projection discriminator
(Miyato & Koyama 2018, https://arxiv.org/abs/1802.05637) or takes the label as extra input channels;
an optional auxiliary classifier loss follows AC-GAN (Odena, Olah & Shlens 2017, https://arxiv.org/abs/1610.09585).

    python cond_wgan_gp.py                                                            # Fashion-MNIST 32x32, 10 classes, offline
    python cond_wgan_gp.py --dataset folder --data-dir ~/data/afhq/train              # AFHQ: cat, dog, wild at 64x64
    python cond_wgan_gp.py --dataset celeba --data-dir ~/data --celeba-attrs Male Smiling  # CelebA, 4 classes
    python cond_wgan_gp.py --generate runs/<run>/checkpoint.pt                        # 10,000 PNGs, <out>/<class>/<index>.png
    torchrun --nproc_per_node 4 cond_wgan_gp.py --dataset folder --data-dir ~/data/afhq/train  # 4 GPUs, --batch-size images each

One file, read top to bottom: data, models, the loss, a CUDA/AMP training loop, TensorBoard
logging, checkpoints that resume bit-identically, and image generation. Copy it anywhere: it
imports nothing from this repository.
"""

import copy
import dataclasses
import gzip
import math
import os
import pickle
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    # Experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment, part of the run name"""
    run_name: Optional[str] = None
    """folder of this run under runs_dir; default <dataset>__<exp_name>__<seed>__<unix time>"""
    runs_dir: str = "runs"
    """where runs write their folders (event files, sample grids, checkpoints)"""
    seed: int = 1
    """seed of the initial weights, the noise and the data order"""
    device: Optional[str] = None
    """torch device (cpu, cuda, cuda:1, ...); default cuda when available, else cpu (under torchrun: cuda:<local rank>)"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """autocast dtype on CUDA: auto is bf16 where the GPU has it, else fp16; fp16 adds a GradScaler; the CPU always runs fp32"""
    compile: bool = False
    """compile the forward passes of both networks with torch.compile (the first steps are slow)"""
    log_every: int = 50
    """generator steps between scalar logs (each log is one GPU sync)"""
    sample_every: int = 500
    """generator steps between fixed-noise sample grids"""
    save_every: int = 1000
    """generator steps between checkpoints; one is also written at the end and on Ctrl-C or SIGTERM"""
    resume: Optional[str] = None
    """checkpoint to continue from: the run keeps its folder and saved settings, flags given now override them"""
    generate: Optional[str] = None
    """checkpoint to generate from: write num_images PNGs (and a grid) to out_dir, then exit"""
    num_images: int = 10000
    """number of images --generate writes"""
    out_dir: Optional[str] = None
    """folder for --generate; default <checkpoint folder>/generated"""

    # Data
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "celeba", "folder"] = "fashion-mnist"
    """fashion-mnist (shipped in data/), mnist and cifar10 (downloaded when missing), celeba (torchvision layout), folder (any folder of images)"""
    data_dir: Optional[str] = None
    """where the dataset lives or is downloaded to (for folder: the image folder); default the data/ folder beside this script"""
    image_size: Optional[int] = None
    """side of the square images, a power of two from 16 to 256; default 32, or 64 for celeba and folder"""
    channels: Optional[int] = None
    """1 (grayscale) or 3 (RGB); default follows the data"""
    max_images: Optional[int] = None
    """use only the first N images (64 with batch size 64 trains on one batch: a sanity check)"""
    num_workers: int = min(8, os.cpu_count() or 1)
    """DataLoader processes that decode celeba and folder images"""
    image_cache: Optional[str] = None
    """file of celeba or folder images decoded once into one uint8 tensor: written by the first run, read by later ones, which then keep the images on the training device (CelebA at 64 px: 2.5 GB)"""
    sync_bn: bool = False
    """under torchrun on GPUs, compute the generator's batch-norm statistics over all processes' batches (SyncBatchNorm) instead of per process"""

    # Training
    total_steps: int = 10000
    """generator steps to train for"""
    batch_size: int = 64
    """images per critic step and per generator step, per process under torchrun"""
    latent_dim: int = 128
    """size of the noise vector z"""
    lr_g: float = 1e-4
    """Adam learning rate of the generator"""
    lr_d: float = 1e-4
    """Adam learning rate of the critic"""
    beta1: float = 0.0
    """Adam beta1 of both optimizers"""
    beta2: float = 0.9
    """Adam beta2 of both optimizers"""
    lr_decay: bool = False
    """decay both learning rates linearly to 0 over total_steps"""
    ema_decay: float = 0.0
    """decay of a moving average of the generator weights used for samples and generation, e.g. 0.999; 0 (the default, which scored better in README, Quality) uses the trained weights"""

    # WGAN-GP
    n_critic: int = 5
    """critic steps per generator step"""
    lambda_gp: float = 10.0
    """weight of the gradient penalty"""
    gp_every: int = 1
    """lazy penalty: compute it on every k-th critic step only, weighted by k (StyleGAN2's lazy R1); 1 is the paper"""
    g_width: Optional[int] = None
    """channels of the generator's last hidden layer, each layer before it doubles them; default 32 up to 32 px, else 64"""
    d_width: Optional[int] = None
    """channels of the critic's first layer, each layer after it doubles them; default 32 up to 32 px, else 64"""
    critic_norm: Literal["none", "layer", "instance"] = "layer"
    """normalisation in the critic; never batch norm, which couples the samples that the penalty treats one by one"""

    # Conditioning
    critic_cond: Literal["projection", "concat"] = "projection"
    """how the critic sees the label: projection adds <embed(y), features(x)> to its score (Miyato & Koyama 2018); concat appends embed(y) to the image as channels"""
    embed_dim: int = 32
    """size of the generator's label embedding (concatenated with z), and the number of label channels of the concat critic"""
    lambda_ac: float = 0.0
    """weight of the AC-GAN auxiliary classifier loss, added to the critic and generator losses; 0 turns it off"""
    celeba_attrs: Optional[tuple[str, ...]] = None
    """celeba: binary attributes of list_attr_celeba.txt (e.g. Male Smiling) whose 2^k combinations are the classes"""
    augment_flip: bool = False
    """flip each real image horizontally with probability 1/2"""
    augment_rotate: float = 0.0
    """rotate each real image by an angle drawn from U[-DEGREES, DEGREES]; 0 turns it off"""
    label: Optional[int] = None
    """with --generate: write only this class (its index in the class list) instead of every class equally often"""


CHECKPOINT_KIND = "cond_wgan_gp"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRID_ROWS, GRID_COLUMNS = 16, 8  # fixed-noise grid: one row per class (the first 16), one noise vector per column


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit code 1: bad input gets a message, not a traceback."""
    raise SystemExit(f"error: {message}")


def check_args(args: Args) -> None:
    """Fill the data-dependent defaults and reject settings that cannot train, before anything is written."""
    if args.image_size is None:
        args.image_size = 64 if args.dataset in ("celeba", "folder") else 32
    if args.g_width is None:  # 32 at 32 px: as good per step on Fashion-MNIST and about 3x faster (README, Quality)
        args.g_width = 32 if args.image_size <= 32 else 64
    if args.d_width is None:
        args.d_width = 32 if args.image_size <= 32 else 64
    if args.image_size not in (16, 32, 64, 128, 256):
        fail(f"--image-size must be a power of two from 16 to 256, got {args.image_size}")
    if args.channels not in (None, 1, 3):
        fail(f"--channels must be 1 or 3, got {args.channels}")
    if args.lambda_gp < 0:
        fail(f"--lambda-gp must be >= 0, got {args.lambda_gp}")
    if args.lambda_ac < 0:
        fail(f"--lambda-ac must be >= 0, got {args.lambda_ac}")
    if not 0 <= args.augment_rotate <= 180:
        fail(f"--augment-rotate must be in [0, 180] degrees, got {args.augment_rotate}")
    if args.celeba_attrs is not None and args.dataset != "celeba":
        fail(f"--celeba-attrs needs --dataset celeba, got --dataset {args.dataset}")
    if args.celeba_attrs is not None and not 1 <= len(set(args.celeba_attrs)) == len(args.celeba_attrs) <= 8:
        fail(f"--celeba-attrs takes 1 to 8 different attributes (2 to 256 classes), got {' '.join(args.celeba_attrs)}")
    for name in ("lr_g", "lr_d"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("beta1", "beta2", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("total_steps", "batch_size", "latent_dim", "n_critic", "g_width", "d_width", "embed_dim", "log_every", "sample_every", "save_every", "num_images", "max_images", "gp_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ---------------------------------------------------------------------------------------------
# Data: small datasets are decoded once into a uint8 tensor (N, C, S, S) and batches are slices
# of it; celeba and folder stream from disk through DataLoader workers. Both give uint8 batches
# that become floats in [-1, 1] on the device.
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    images: Optional[torch.Tensor]  # (N, C, S, S) uint8 when decoded up front, else None
    files: list  # image paths (decoded by workers when images is None)
    labels: torch.Tensor  # (N,) int64 class index, -1 where the data has no class
    classes: list  # class names


def read_idx(path: Path) -> torch.Tensor:
    """Read an MNIST-style idx file (optionally gzipped) into a uint8 tensor."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) > 4 else 0
    if raw[:3] != b"\x00\x00\x08" or ndim == 0:
        fail(f"{path} is not an idx file of uint8 data")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    if len(raw) - 4 - 4 * ndim != math.prod(shape):
        fail(f"{path} is truncated: its header promises {shape}")
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).view(shape)


def download(dataset: str, root: Path) -> None:
    """Fetch a torchvision dataset into root, or stop with one line when that is impossible (offline)."""
    name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}[dataset]
    import torchvision  # imported where used: it adds a second to every start

    print(f"{dataset} is not in {root}: downloading it there")
    try:
        getattr(torchvision.datasets, name)(str(root), train=True, download=True)
    except Exception as e:  # urllib and torchvision raise many kinds; all mean the same to the user
        fail(f"{dataset} is not in {root} and could not be downloaded ({type(e).__name__}: {e})")


def load_idx_dataset(dataset: str, root: Path) -> tuple:
    """Fashion-MNIST or MNIST from <root>/<dataset>/ (this repo's layout) or torchvision's <root>/<Name>/raw/."""
    folders = [root / dataset, root / {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[dataset] / "raw"]
    for attempt in range(2):
        for folder in folders:
            for suffix in ("", ".gz"):
                if (folder / f"train-images-idx3-ubyte{suffix}").is_file():
                    images = read_idx(folder / f"train-images-idx3-ubyte{suffix}")[:, None]  # (N, 1, 28, 28)
                    labels = read_idx(folder / f"train-labels-idx1-ubyte{suffix}").long()
                    return images, labels
        if attempt == 0:
            download(dataset, root)
    fail(f"{dataset} download finished but no train-images-idx3-ubyte file is in {folders[1]}")


def load_cifar10(root: Path) -> tuple:
    """CIFAR-10's python pickles from <root>/cifar-10-batches-py/ (torchvision's layout)."""
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        download("cifar10", root)
    images, labels = [], []
    for i in range(1, 6):
        try:
            with open(folder / f"data_batch_{i}", "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8)).view(-1, 3, 32, 32))
            labels += list(batch[b"labels"])
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, RuntimeError) as e:
            fail(f"cannot read {folder / f'data_batch_{i}'} ({type(e).__name__}: {e})")
    return torch.cat(images), torch.tensor(labels)


def list_images(folder: Path) -> list:
    """Every image file below folder, sorted, each opened once so a bad file is named before training starts."""
    from PIL import Image

    if not folder.is_dir():
        fail(f"data folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        fail(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} in it and its subfolders)")
    for path in files:
        try:
            with Image.open(path) as im:  # reads the header only: cheap even for CelebA's 200k files
                im.size
        except Exception as e:
            fail(f"{path} is not a readable image ({type(e).__name__}: {e})")
    return files


def load_dataset(args: Args) -> ImageData:
    """Load args.dataset at args.image_size, with args.channels (filled in from the data when None)."""
    root = Path(args.data_dir) if args.data_dir else Path(__file__).resolve().parent / "data"
    if args.dataset == "folder" and not args.data_dir:
        fail("--dataset folder needs --data-dir, the folder that holds the images")
    if args.dataset in ("fashion-mnist", "mnist", "cifar10"):
        if args.dataset == "cifar10":
            images, labels = load_cifar10(root)
            classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        elif args.dataset == "fashion-mnist":
            images, labels = load_idx_dataset(args.dataset, root)
            classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
        else:
            images, labels = load_idx_dataset(args.dataset, root)
            classes = [str(digit) for digit in range(10)]
        images, labels = images[: args.max_images], labels[: args.max_images]
        args.channels = args.channels or images.size(1)
        data = ImageData(resize_images(match_channels(images, args.channels), args.image_size), [], labels, classes)
    else:
        folder = root / "celeba" / "img_align_celeba" if args.dataset == "celeba" else root
        if args.dataset == "celeba" and not folder.is_dir():
            fail(f"CelebA not found: expected the aligned images in {folder} (torchvision's layout, see README)")
        files = list_images(folder)[: args.max_images]
        # A file's class is its top-level subfolder (AFHQ: cat/, dog/, wild/); files at the top have none (-1).
        tops = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in files]
        classes = sorted({top for top in tops if top is not None})
        labels = torch.tensor([classes.index(top) if top is not None else -1 for top in tops])
        args.channels = args.channels or 3
        data = ImageData(None, files, labels, classes)
        if args.image_cache:
            data = cached_images(data, folder, args)
    if len(data.labels) < args.batch_size:
        fail(f"the dataset has {len(data.labels)} images, fewer than --batch-size {args.batch_size}")
    return data


def celeba_attribute_classes(data: ImageData, attrs: tuple, root: Path) -> ImageData:
    """CelebA with classes from list_attr_celeba.txt: an image's class is the binary code of its attributes
    `attrs` (the first one the highest bit), so k attributes give 2^k classes named like "Male=1,Smiling=0"."""
    path = root / "celeba" / "list_attr_celeba.txt"
    if not path.is_file():
        fail(f"CelebA attributes not found: expected {path} (torchvision's layout, see README)")
    lines = path.read_text().splitlines()  # a count, the 40 attribute names, then "<file> <40 values of 1 or -1>" per image
    names = lines[1].split() if len(lines) > 1 else []
    unknown = [a for a in attrs if a not in names]
    if unknown:
        fail(f"--celeba-attrs: {' '.join(unknown)} not in {path} (its attributes: {' '.join(names)})")
    columns = [names.index(a) + 1 for a in attrs]
    codes = {}
    for n, line in enumerate(lines[2:], 3):
        fields = line.split()
        if fields and (len(fields) != len(names) + 1 or not set(fields[1:]) <= {"1", "-1"}):
            fail(f"line {n} of {path} is not a file name and {len(names)} values of 1 or -1")
        if fields:
            codes[fields[0]] = sum(2 ** (len(attrs) - 1 - j) for j, c in enumerate(columns) if fields[c] == "1")
    missing = [p for p in data.files if p.name not in codes]
    if missing:
        fail(f"{missing[0]} has no line in {path}" + (f" (nor have {len(missing) - 1} other images)" if len(missing) > 1 else ""))
    classes = [",".join(f"{a}={code >> (len(attrs) - 1 - j) & 1}" for j, a in enumerate(attrs)) for code in range(2 ** len(attrs))]
    return ImageData(data.images, data.files, torch.tensor([codes[p.name] for p in data.files]), classes)


def class_labels(data: ImageData, args: Args) -> ImageData:
    """The data with a class for every image: CelebA's from --celeba-attrs, the others' from load_dataset."""
    if args.dataset == "celeba":
        if not args.celeba_attrs:
            fail("--dataset celeba needs --celeba-attrs (e.g. --celeba-attrs Male Smiling): its classes are combinations of binary attributes")
        root = Path(args.data_dir) if args.data_dir else Path(__file__).resolve().parent / "data"
        data = celeba_attribute_classes(data, args.celeba_attrs, root)
    unlabeled = int((data.labels < 0).sum())
    if unlabeled:
        fail(f"{unlabeled} of {len(data.labels)} images have no class: put every image in a subfolder of --data-dir named after its class (AFHQ: cat/, dog/, wild/)")
    for k in sorted(set(range(len(data.classes))) - set(data.labels.tolist())):
        print(f"note: no image has class {data.classes[k]}: the generator cannot learn it")
    return data


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) uint8 to `channels` channels: gray is repeated to RGB, RGB becomes ITU-R 601 luma."""
    if images.size(1) == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 once, antialiased, in chunks so the float copy stays small."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False) for c in images.split(4096)]
    return torch.cat(chunks).round().clamp(0, 255).to(torch.uint8)


class ImageFiles(torch.utils.data.Dataset):
    """Decode one file in a worker: center square crop, resize (PIL antialiases), (C, S, S) uint8."""

    def __init__(self, files: list, labels: torch.Tensor, image_size: int, channels: int):
        self.files, self.labels, self.image_size, self.channels = files, labels, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
        except Exception as e:
            raise RuntimeError(f"cannot decode image {self.files[i]} ({type(e).__name__}: {e})") from None
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.array(im)).view(self.image_size, self.image_size, self.channels)
        return pixels.permute(2, 0, 1), self.labels[i]


class BatchIndices:
    """Endless batches of indices. Epoch e is a permutation seeded by (seed, e), so batch k is the same
    in a straight run and in a resumed one: the data order needs no saved state. Under torchrun, batch k
    of the whole job holds world_size * batch_size indices and each process takes its own slice."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.rank, self.world_size = n, batch_size, seed, start, rank, world_size

    def __iter__(self):
        job_batch = self.batch_size * self.world_size
        per_epoch = self.n // job_batch  # the last partial batch is dropped
        k, order, order_epoch = self.start, None, -1
        while True:
            epoch, i = divmod(k, per_epoch)
            if epoch != order_epoch:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
                order_epoch = epoch
            first = i * job_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]
            k += 1


def decoded(batches):
    """Batches from DataLoader workers; a file that fails to decode stops with one line naming it."""
    while True:
        try:
            yield next(batches)
        except RuntimeError as e:  # a worker re-raises "cannot decode image ..." inside a long report
            lines = [line for line in str(e).splitlines() if "cannot decode image" in line]
            if lines:
                fail(lines[-1].split("RuntimeError: ")[-1])
            raise
        except StopIteration:
            return


def cached_images(data: ImageData, folder: Path, args: Args) -> ImageData:
    """data.files decoded into one (N, C, S, S) uint8 tensor: read from args.image_cache when it holds
    exactly these files at this size, else decoded once by the DataLoader workers and written there."""
    path = Path(args.image_cache)
    key = {"files": [str(f.relative_to(folder)) for f in data.files], "image_size": args.image_size, "channels": args.channels}
    if path.exists():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            fail(f"cannot read --image-cache {path} ({type(e).__name__}: {str(e).splitlines()[0]})")
        if not isinstance(cache, dict) or {k: cache.get(k) for k in key} != key:
            fail(f"--image-cache {path} holds other images or another size: delete it or name another file")
        return ImageData(cache["images"], data.files, data.labels, data.classes)
    from tqdm import tqdm

    dataset = ImageFiles(data.files, data.labels, args.image_size, args.channels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=args.num_workers)
    images = torch.cat([pixels for pixels, _ in tqdm(decoded(iter(loader)), total=len(loader), desc=f"decoding into {path}")])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {**key, "images": images})  # temporary file + rename: an interrupted decode leaves no cache
    return ImageData(images, data.files, data.labels, data.classes)  # the paths stay: labels can still be looked up by file name


def real_batches(data: ImageData, args: Args, device: torch.device, start: int, rank: int = 0, world_size: int = 1):
    """Yield (images in [-1, 1], labels) on the device forever, beginning with batch number `start`."""
    indices = BatchIndices(len(data.labels), args.batch_size, args.seed, start, rank, world_size)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if data.images is not None:
        all_images, all_labels = data.images.to(device), data.labels.to(device)  # Fashion-MNIST is 60 MB, CelebA 2.5 GB
        source = ((all_images[idx], all_labels[idx]) for idx in (i.to(device) for i in indices))
    else:
        loader = torch.utils.data.DataLoader(
            ImageFiles(data.files, data.labels, args.image_size, args.channels),
            batch_sampler=indices,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its own seed source, so the global RNG (noise, penalty) stays untouched
        )
        source = decoded(iter(loader))
    for pixels, labels in source:
        pixels = pixels.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        yield pixels.float().div_(127.5).sub_(1), labels.to(device, non_blocking=True)


def augment(real: torch.Tensor, flip: bool, degrees: float) -> torch.Tensor:
    """Real images (B, C, S, S) flipped left-right with probability 1/2 and rotated by U[-degrees, degrees], each its own draw.
    Only the reals: the generator then learns the augmented distribution, which these label-preserving changes keep plausible."""
    if flip:
        flipped = torch.rand(real.size(0), 1, 1, 1, device=real.device) < 0.5
        real = torch.where(flipped, real.flip(3), real)
    if degrees > 0:
        angle = (torch.rand(real.size(0), device=real.device) * 2 - 1) * math.radians(degrees)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3) rotations about the centre
        grid = F.affine_grid(theta, list(real.shape), align_corners=False)
        real = F.grid_sample(real, grid, mode="bilinear", padding_mode="border", align_corners=False)  # border: corners repeat the edge, no black wedges
    return real


# ---------------------------------------------------------------------------------------------
# Models: DCGAN layouts that work at any power-of-two size. Each stride-2 layer doubles (generator)
# or halves (critic) the side, and halves or doubles the channels.
# ---------------------------------------------------------------------------------------------
class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, num_classes: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        n_up = int(math.log2(image_size)) - 2  # 4x4 -> image_size
        ch = width * 2 ** (n_up - 1)
        layers = [nn.ConvTranspose2d(latent_dim + embed_dim, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]  # (B, ch, 4, 4)
        for _ in range(n_up - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]  # (B, channels, image_size, image_size)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        zy = torch.cat([z, self.embed(labels)], 1)  # (B, latent_dim + embed_dim)
        return self.net(zy[:, :, None, None])  # (B, latent_dim + embed_dim, 1, 1)


def critic_norm_layer(kind: str, ch: int) -> nn.Module:
    # Each of these normalises one sample at a time; batch norm would mix the samples of a batch,
    # and the penalty asks for the gradient of each sample's score with respect to that sample alone.
    if kind == "layer":
        return nn.GroupNorm(1, ch)  # one group: layer norm over (C, H, W) with a per-channel affine
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    return nn.Identity()


class Critic(nn.Module):
    """D(x, y): the unconditional score of x plus, for the projection critic, <embed(y), phi(x)> with phi(x) the
    sum-pooled last features; the concat critic sees embed(y) as extra input channels instead. With `classify`, a
    linear head on phi(x) also returns class logits (AC-GAN)."""

    def __init__(self, channels: int, image_size: int, width: int, norm: str, num_classes: int, cond: str, embed_dim: int, classify: bool):
        super().__init__()
        self.cond = cond
        n_down = int(math.log2(image_size)) - 2  # image_size -> 4x4
        in_ch = channels + (embed_dim if cond == "concat" else 0)
        layers = [nn.Conv2d(in_ch, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]  # (B, width, S/2, S/2); no norm on raw pixels
        ch = width
        for _ in range(n_down - 1):  # (B, ch, s, s) -> (B, 2ch, s/2, s/2)
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=norm == "none"), critic_norm_layer(norm, 2 * ch), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.net = nn.Sequential(*layers)  # (B, ch, 4, 4)
        self.out = nn.Conv2d(ch, 1, 4, 1, 0)  # (B, 1, 1, 1): an unbounded score, no sigmoid
        self.embed = nn.Embedding(num_classes, embed_dim if cond == "concat" else ch)
        if cond == "projection":
            # <embed(y), phi(x)> is the output conv with embed(y) at each of its 4x4 positions: drawn at that conv's scale
            # (PyTorch's U(+-1/sqrt(fan_in))), the critic's input gradient starts near the unconditional one's (0.55 vs 0.42
            # at init), where Glorot's init makes it 10x and the first penalties huge.
            nn.init.uniform_(self.embed.weight, -1 / math.sqrt(16 * ch), 1 / math.sqrt(16 * ch))
        self.classifier = nn.Linear(ch, num_classes) if classify else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(B, C, S, S) images and (B,) labels -> (B,) scores and (B, num_classes) class logits, or None without the classifier."""
        y = self.embed(labels)
        if self.cond == "concat":
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, x.size(2), x.size(3))], 1)  # (B, C + embed_dim, S, S)
        h = self.net(x)
        phi = h.sum((2, 3))  # (B, ch): global sum pooling
        scores = self.out(h).flatten()  # (B,)
        if self.cond == "projection":
            scores = scores + (y * phi).sum(1)
        return scores, self.classifier(phi) if self.classifier is not None else None


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """GP = E_x^[(||grad_x^ D(x^)||_2 - 1)^2] with x^ = eps * x + (1 - eps) * x~, eps ~ U[0, 1] per sample.

    `scale` multiplies the scores before the gradient and divides it out after: PyTorch's AMP recipe
    for a gradient penalty under fp16, where the unscaled inner gradient would underflow.
    """
    if eps is None:
        eps = torch.rand(real.size(0), 1, 1, 1, device=real.device)  # (B, 1, 1, 1): one mix per sample
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    scores = critic(x_hat).float()
    (grad,) = torch.autograd.grad(scores.sum() * scale, x_hat, create_graph=True)  # create_graph: the penalty is trained through
    grad = grad.float() / scale
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)  # (B,): over all pixels of a sample; eps keeps d/dgrad finite at 0
    return (norm - 1).pow(2).mean()


def auxiliary_classifier_loss(logits: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """AC-GAN's class term: L_AC = E[-log C(y | x)], the cross-entropy of the critic's class logits; 0 without its classifier.

    As in Gulrajani et al.'s AC-WGAN-GP, the critic learns it on real images and the generator on its own: classifying
    fakes as their requested class would let the critic reward the generator's mistakes."""
    if logits is None:
        return torch.zeros((), device=labels.device)
    return F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------------------------------------
# Helpers: EMA, images, checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):  # batch-norm running statistics
        ema_buffer.copy_(buffer)


def grid_inputs(noise: torch.Tensor, num_classes: int) -> tuple:
    """Noise and labels of a grid with one row per class (the first GRID_ROWS) and one column per noise vector,
    so that a column shows one z under every label: (rows * columns, latent_dim) and (rows * columns,)."""
    rows = min(num_classes, GRID_ROWS)
    return noise.repeat(rows, 1), torch.arange(rows, device=noise.device).repeat_interleave(len(noise))


def folder_name(class_name: str) -> str:
    """A class name as a folder name on any filesystem: "T-shirt/top" -> "T-shirt_top"."""
    return re.sub(r"[^\w.,=+-]+", "_", class_name).strip(".") or "_"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] -> one (3, H, W) uint8 grid."""
    import torchvision

    return torchvision.utils.make_grid(to_uint8(images).cpu(), nrow=nrow, padding=2)


def save_png(image: torch.Tensor, path: Path) -> None:
    """(C, H, W) uint8 -> PNG, grayscale when C is 1."""
    from PIL import Image

    pixels = image.permute(1, 2, 0).numpy()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)


def write_gif(frames_dir: Path, path: Path) -> None:
    """The fixed-noise grids of a run, in step order, as one animated GIF."""
    from PIL import Image

    frames = [Image.open(p) for p in sorted(frames_dir.glob("step_*.png"))]
    if frames:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=300, loop=0)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename it: a crash mid-write never leaves a half checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain types only, so a downloaded checkpoint cannot run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        other = ckpt.get("kind") if isinstance(ckpt, dict) else None
        fail(f"{path} is not a {CHECKPOINT_KIND}.py checkpoint" + (f" (it comes from {other}.py)" if other else ""))
    return ckpt


def load_weights(module: nn.Module, state: dict, path: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key(s)" in line), str(e))
        fail(f"checkpoint {path} does not fit this {type(module).__name__}: {detail}")


def pick_device(name: Optional[str]) -> torch.device:
    """--device, or cuda when available, else cpu; an unusable name stops with one line. Under torchrun,
    a bare "cuda" becomes this process's GPU, cuda:<LOCAL_RANK>."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        fail(f"--device {name}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: this machine has no CUDA GPU that PyTorch can use")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): every process trains on its own slice of each batch and the
# gradients are averaged before every optimizer step, so all processes keep the same weights.
# ---------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple:
    """(rank, world_size): torchrun sets RANK and WORLD_SIZE; a plain `python script.py` is (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return torch.distributed.get_rank(), world_size


def average_gradients(module: nn.Module, world_size: int) -> None:
    """Average the parameter gradients over all processes, in place: one all-reduce of one flat buffer.

    Called after .backward() instead of wrapping the networks in DistributedDataParallel. DDP
    all-reduces from hooks that fire while .backward() fills each gradient, and it expects each
    forward of a wrapped module to be followed by such a backward. Here the critic (discriminator)
    also runs frozen in the generator step and, in the gradient-penalty scripts, inside the
    penalty, where torch.autograd.grad differentiates it with respect to its input and fills no
    parameter gradient. Averaging once .backward() has finished covers every path a gradient came
    by, the penalty's double backward included. The cost: communication does not overlap the
    backward pass, small for networks of a few MB.
    """
    if world_size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)  # sums; a non-finite fp16 gradient on one process reaches all, so all skip the step
    flat /= world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def any_process(flag: bool, world_size: int, group) -> bool:
    """True on every process when `flag` is true on one: a stop request must end all processes at the same step."""
    if world_size == 1:
        return flag
    flags = torch.tensor([int(flag)])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)  # a CPU tensor: gloo, no GPU sync
    return bool(flags.item())


def saved_args(ckpt: dict) -> Args:
    names = {f.name for f in dataclasses.fields(Args)}
    return Args(**{k: v for k, v in ckpt["args"].items() if k in names})


@torch.no_grad()
def generate(args: Args) -> None:
    """Write args.num_images generator samples as PNGs into one folder per class, image i of class i mod K
    (or all of class --label), plus a grid of one row per class beside them."""
    check_args(args)
    ckpt = load_checkpoint(args.generate)
    saved = saved_args(ckpt)
    classes = ckpt["classes"]
    if args.label is not None and not 0 <= args.label < len(classes):
        fail(f"--label {args.label} is not a class of {args.generate}: its {len(classes)} classes are " + ", ".join(f"{k} {name}" for k, name in enumerate(classes)))
    device = pick_device(args.device)
    generator = Generator(saved.latent_dim, saved.channels, saved.image_size, saved.g_width, len(classes), saved.embed_dim)
    load_weights(generator, ckpt["ema"] or ckpt["generator"], args.generate)  # EMA weights when the run kept them
    generator.to(device).eval()
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.generate).parent / "generated"
    folders = [out_dir / folder_name(name) for name in classes]
    for k in [args.label] if args.label is not None else range(min(len(classes), args.num_images)):
        folders[k].mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    grid_path = out_dir.parent / f"{out_dir.name}_grid.png"  # beside the folder: FID tools read every file in it
    save_png(image_grid(generator(*grid_inputs(torch.randn(GRID_COLUMNS, saved.latent_dim, device=device), len(classes))), nrow=GRID_COLUMNS), grid_path)
    for start in range(0, args.num_images, 500):
        index = torch.arange(start, min(start + 500, args.num_images))
        labels = torch.full_like(index, args.label) if args.label is not None else index % len(classes)
        z = torch.randn(len(index), saved.latent_dim, device=device)
        images = generator(z, labels.to(device))
        for i, k, image in zip(index.tolist(), labels.tolist(), to_uint8(images).cpu()):
            save_png(image, folders[k] / f"{i:06d}.png")  # the index runs over all classes: file names stay unique when folders are merged
    print(f"wrote {args.num_images} images to {out_dir}/<class>/ and a grid to {grid_path}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.generate:
        generate(args)
        sys.exit(0)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        args = tyro.cli(Args, default=dataclasses.replace(saved_args(ckpt), resume=args.resume))  # flags given now win
    check_args(args)
    device = pick_device(args.device)
    rank, world_size = init_distributed(device)
    is_main = rank == 0  # under torchrun only process 0 logs, writes grids and checkpoints
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        fail("--sync-bn needs CUDA GPUs: SyncBatchNorm has no CPU implementation")
    data = class_labels(load_dataset(args), args)  # before the run folder exists: bad data leaves nothing behind
    if ckpt and len(ckpt["classes"]) != len(data.classes):
        fail(f"{args.resume} was trained on {len(ckpt['classes'])} classes, the data has {len(data.classes)}: resume on the same classes")
    if len(data.labels) < args.batch_size * world_size:
        fail(f"the dataset has {len(data.labels)} images, fewer than one batch of {world_size} processes x --batch-size {args.batch_size}")

    if ckpt:
        run_dir = Path(args.resume).parent
    else:
        args.run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.runs_dir) / args.run_name
        if (run_dir / "checkpoint.pt").exists():
            fail(f"{run_dir} already holds a run: continue it with --resume {run_dir / 'checkpoint.pt'} or pick another --run-name")
    start_step = ckpt["step"] if ckpt else 0
    writer = None
    if is_main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if ckpt else None)  # drop events logged after the checkpoint
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    torch.manual_seed(args.seed)
    amp_dtype = None  # the CPU runs fp32: bf16 convolutions are slower than fp32 on CPUs without AMX
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # picks the fastest conv algorithms for our fixed shapes
        amp_dtype = {"auto": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    num_classes = len(data.classes)
    generator = Generator(args.latent_dim, args.channels, args.image_size, args.g_width, num_classes, args.embed_dim).to(device, memory_format=memory_format)
    critic = Critic(args.channels, args.image_size, args.d_width, args.critic_norm, num_classes, args.critic_cond, args.embed_dim, args.lambda_ac > 0).to(device, memory_format=memory_format)
    if args.sync_bn and world_size > 1:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if args.ema_decay > 0 else None
    # The penalty's double backward (create_graph=True) always runs the eager critic: torch.compile's
    # AOTAutograd does not support double backward, so only the plain forward passes are compiled.
    generator_fwd = torch.compile(generator) if args.compile else generator
    critic_fwd = torch.compile(critic) if args.compile else critic
    fused = device.type == "cuda"  # one kernel for the whole Adam update
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    opt_d = torch.optim.Adam(critic.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused)
    scaler_g = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    scaler_d = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fixed_noise = torch.randn(GRID_COLUMNS, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    label_pool = data.labels.to(device)  # the generator step draws its labels from it: each class as often as in the data

    if ckpt:
        load_weights(generator, ckpt["generator"], args.resume)
        load_weights(critic, ckpt["critic"], args.resume)
        if ema is not None:
            load_weights(ema, ckpt["ema"] or ckpt["generator"], args.resume)
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        if ckpt["scaler_g"] and scaler_g.is_enabled():  # empty when saved without fp16
            scaler_g.load_state_dict(ckpt["scaler_g"])
            scaler_d.load_state_dict(ckpt["scaler_d"])
        fixed_noise = ckpt["fixed_noise"].to(device)
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    if rank > 0:  # every process built the same weights from args.seed; the others reseed to draw noise of their own
        torch.manual_seed(args.seed + 1_000_003 * rank + start_step)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / "checkpoint.pt", {
            "kind": CHECKPOINT_KIND, "args": dataclasses.asdict(args), "step": step,
            "generator": generator.state_dict(), "critic": critic.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
            "fixed_noise": fixed_noise.cpu(), "classes": data.classes, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        })  # fmt: skip

    @torch.no_grad()
    def sample_grid(step: int) -> None:
        sampler = ema if ema is not None else generator.eval()
        grid = image_grid(sampler(*grid_inputs(fixed_noise, num_classes)), nrow=GRID_COLUMNS)
        generator.train()
        writer.add_image("samples/fixed_noise", grid, step)
        save_png(grid, run_dir / "samples" / f"step_{step:07d}.png")

    stop_signal = []  # Ctrl-C or SIGTERM: finish the step, save, exit; a second one kills at once

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    stop_group = torch.distributed.new_group(backend="gloo") if world_size > 1 else None  # CPU flags even when NCCL moves the gradients

    from tqdm import tqdm

    batches = real_batches(data, args, device, start=start_step * args.n_critic, rank=rank, world_size=world_size)  # each critic step takes one batch
    loss_names = ["losses/critic", "losses/wasserstein_estimate", "losses/gradient_penalty", "losses/generator"]
    loss_sums = torch.zeros(len(loss_names), device=device)  # summed on the device; read every log_every steps
    step, logged_step, logged_time, stopping = start_step, start_step, time.perf_counter(), False
    if step == 0 and is_main:
        sample_grid(0)
    with tqdm(total=args.total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not is_main) as progress:  # closed even on errors
        while step < args.total_steps and not stopping:
            lr_scale = 1 - step / args.total_steps if args.lr_decay else 1.0
            for group in opt_g.param_groups:
                group["lr"] = args.lr_g * lr_scale
            for group in opt_d.param_groups:
                group["lr"] = args.lr_d * lr_scale

            for i in range(args.n_critic):
                real, labels = next(batches)
                real = augment(real, args.augment_flip, args.augment_rotate)
                z = torch.randn(args.batch_size, args.latent_dim, device=device)
                with autocast:
                    with torch.no_grad():
                        # The fakes get the real batch's labels: each interpolate of the penalty lies between two images of one class.
                        fake = generator_fwd(z, labels)  # no graph into the generator: this step trains the critic only
                    # One forward for real and fake: the critic has no batch-coupled layers, so this equals two.
                    scores, logits = critic_fwd(torch.cat([real, fake]), torch.cat([labels, labels]))
                    d_real, d_fake = scores.float().chunk(2)
                    wasserstein = d_real.mean() - d_fake.mean()
                    # The penalty holds the labels fixed: gradient_penalty differentiates a function of the images alone.
                    gp = torch.zeros((), device=device)
                    if (step * args.n_critic + i) % args.gp_every == 0:  # every critic step unless --gp-every > 1
                        # Weighted by gp_every, so the penalty's weight per critic step stays lambda on average.
                        gp = args.gp_every * gradient_penalty(lambda x: critic(x, labels)[0], real, fake.float(), scale=scaler_d.get_scale())  # get_scale syncs, under fp16 only
                    ac = auxiliary_classifier_loss(logits[: args.batch_size] if logits is not None else None, labels)  # reals only
                    # L_D = E[D(x~, y)] - E[D(x, y)] + lambda * E[(||grad_x D(x^, y)||_2 - 1)^2] + lambda_ac * E[-log C(y | x)]
                    d_loss = -wasserstein + args.lambda_gp * gp + args.lambda_ac * ac
                opt_d.zero_grad(set_to_none=True)
                scaler_d.scale(d_loss).backward()
                average_gradients(critic, world_size)
                scaler_d.step(opt_d)
                scaler_d.update()
                loss_sums[:3] += torch.stack([d_loss, wasserstein, gp]).detach() / args.n_critic

            critic.requires_grad_(False)  # the generator step needs gradients through the critic, not of its weights
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            fake_labels = label_pool[torch.randint(len(label_pool), (args.batch_size,), device=device)]
            with autocast:
                scores, logits = critic_fwd(generator_fwd(z, fake_labels), fake_labels)
                # L_G = -E[D(G(z, y), y)] + lambda_ac * E[-log C(y | G(z, y))]
                g_loss = -scores.float().mean() + args.lambda_ac * auxiliary_classifier_loss(logits, fake_labels)
            opt_g.zero_grad(set_to_none=True)
            scaler_g.scale(g_loss).backward()
            average_gradients(generator, world_size)
            scaler_g.step(opt_g)
            scaler_g.update()
            critic.requires_grad_(True)
            if ema is not None:
                update_ema(ema, generator, min(args.ema_decay, (1 + step) / (10 + step)))  # warm-up: early weights fade fast
            loss_sums[3] += g_loss.detach()
            step += 1
            progress.update(1)
            stopping = any_process(bool(stop_signal), world_size, stop_group)

            if is_main and (step % args.log_every == 0 or step == args.total_steps or stopping):
                values = (loss_sums / (step - logged_step)).tolist()  # the one sync point of the interval
                elapsed = time.perf_counter() - logged_time
                for name, value in zip(loss_names, values):
                    writer.add_scalar(name, value, step)
                writer.add_scalar("charts/images_per_sec", (step - logged_step) * args.n_critic * args.batch_size * world_size / elapsed, step)
                writer.add_scalar("charts/learning_rate", opt_g.param_groups[0]["lr"], step)
                progress.set_postfix(critic=f"{values[0]:.3f}", gen=f"{values[3]:.3f}", w=f"{values[1]:.3f}")
                loss_sums.zero_()
                logged_step, logged_time = step, time.perf_counter()
            if is_main and (step % args.sample_every == 0 or step == args.total_steps or stopping):
                sample_grid(step)
            if is_main and (step % args.save_every == 0 or step == args.total_steps or stopping):
                checkpoint(step)

    if world_size > 1:
        torch.distributed.destroy_process_group()
    if is_main:
        write_gif(run_dir / "samples", run_dir / "progress.gif")
        writer.close()
        print(f"{'stopped' if stopping else 'finished'} at step {step}: {run_dir}")
        if stopping:
            print(f"continue with: python {os.path.basename(__file__)} --resume {run_dir / 'checkpoint.pt'}")
    if stopping:
        sys.exit(128 + (stop_signal[0] if stop_signal else signal.SIGTERM))
