"""Conditional WGAN-GP: a Wasserstein GAN with gradient penalty that generates the class it is asked for.

Gulrajani et al. 2017 (https://arxiv.org/abs/1704.00028), Algorithm 1, on the DCGAN architecture, conditioned on the
data's classes: G takes the label's embedding beside z (Mirza & Osindero 2014); the critic is a projection discriminator
(Miyato & Koyama 2018) or sees the label as input channels; optional AC-GAN loss (Odena et al. 2017). Links: README.

    python cond_wgan_gp.py --dataset folder --data-dir ~/data/afhq/train  # AFHQ cat, dog, wild; no flags: Fashion-MNIST
"""

import atexit
import contextlib
import copy
import ctypes
import dataclasses
import fcntl
import functools
import gzip
import itertools
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Literal, NoReturn, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro
from PIL import Image, ImageOps
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2
from tqdm import tqdm


@dataclasses.dataclass
class Args:
    run_name: Optional[str] = None
    """folder of the run under runs/, or a path; default <dataset>__<script>__<seed>__<unix time>"""
    seed: int = 1
    """seed of the initial weights, the noise and the data order"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default cuda when available, else cpu (under torchrun: cuda:<local rank>)"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """autocast dtype; auto: bf16 where the device has it natively, else fp16 (GPU, with a GradScaler) or fp32 (CPU)"""
    compile: bool = False
    """compile the forward passes of both networks with torch.compile (the first steps are slow)"""
    log_every: int = 50
    """generator steps between scalar logs (each log is one GPU sync)"""
    sample_every: int = 500
    """generator steps between fixed-noise grids and checkpoints (both also at the end, and a checkpoint on Ctrl-C)"""
    resume: Optional[str] = None
    """checkpoint to continue from, in its folder and with its settings; flags given now override them"""
    generate: Optional[str] = None
    """checkpoint to generate from: write num_images PNGs to <its folder>/generated and a grid beside it, then exit"""
    num_images: int = 10000
    """number of images --generate writes"""
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "celeba", "folder"] = "fashion-mnist"
    """fashion-mnist (in data/), mnist and cifar10 (downloaded when missing), celeba, folder (any images)"""
    data_dir: Optional[str] = None
    """where the dataset is or is downloaded to (folder: the image folder); default data/ beside this script"""
    image_size: Optional[int] = None
    """side of the square images, a power of two from 16 to 256; default 32, or 64 for celeba and folder"""
    channels: Optional[int] = None
    """1 (grayscale) or 3 (RGB); default follows the data"""
    max_images: Optional[int] = None
    """use only the first N images (64 with batch size 64 trains on one batch: a sanity check)"""
    total_steps: int = 30000
    """generator steps to train for (what they cost on a CPU and when the first grids come: README)"""
    batch_size: Optional[int] = None
    """images per critic step and per generator step, per process (torchrun); default 32 on CPU (README), 64 on GPU"""
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
    ema_halflife: float = 0.0
    """half-life in images of a moving average of the generator that draws the samples; 0 (scored better) is off"""
    # WGAN-GP
    n_critic: int = 5
    """critic steps per generator step"""
    lambda_gp: float = 10.0
    """weight of the gradient penalty"""
    gp_every: Optional[int] = None
    """lazy penalty: every k-th critic step only, weighted by k (StyleGAN2's R1); default 4 on CPU (README), 1 on GPU"""
    g_width: Optional[int] = None
    """channels of the generator's last hidden layer, doubled in each one before; default 32 up to 32 px, else 64"""
    d_width: Optional[int] = None
    """channels of the critic's first layer, doubled in each one after; default 32 up to 32 px, else 64"""
    # Conditioning
    critic_cond: Literal["projection", "concat"] = "projection"
    """how the critic sees the label: projection adds <embed(y), features(x)> to its score; concat adds channels"""
    embed_dim: int = 32
    """size of the generator's label embedding (beside z) and of the concat critic's label channels"""
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


# Models: DCGAN layouts at any power-of-two size, conditioned on a class label; stride-2 layers double/halve the side.
class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, num_classes: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        n_up = int(math.log2(image_size)) - 2  # 4x4 -> image_size
        ch = width * 2 ** (n_up - 1)
        zy = latent_dim + embed_dim  # z and the label's embedding side by side
        layers = [nn.Unflatten(1, (zy, 1, 1)), nn.ConvTranspose2d(zy, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch)]
        layers += [nn.ReLU(True)]  # (B, ch, 4, 4)
        for _ in range(n_up - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh())  # (B, channels, S, S)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(labels)], 1))  # G(z, y): z beside the label's embedding


class Critic(nn.Module):
    """D(x, y) = score(x) + <embed(y), phi(x)>, phi the sum-pooled last features (projection), or the score of x with
    embed(y) as extra input channels (concat); with `classify` also class logits from phi(x) (AC-GAN's head)."""

    def __init__(self, channels, image_size, width, num_classes, cond: str, embed_dim: int, classify: bool):
        super().__init__()
        self.cond = cond
        n_down = int(math.log2(image_size)) - 2  # image_size -> 4x4
        in_ch = channels + (embed_dim if cond == "concat" else 0)
        layers, ch = [nn.Conv2d(in_ch, width, 4, 2, 1), nn.LeakyReLU(0.2, True)], width  # (B, width, S/2, S/2); no norm
        # Layer norm (GroupNorm with one group) normalises each sample alone: the penalty takes the gradient of each
        # sample's score with respect to that sample, and batch norm would mix the samples of a batch.
        for _ in range(n_down - 1):  # (B, ch, s, s) -> (B, 2ch, s/2, s/2); the norm's shift replaces the conv's bias
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.GroupNorm(1, 2 * ch), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.net, self.out = nn.Sequential(*layers), nn.Conv2d(ch, 1, 4, 1, 0)  # (B, ch, 4, 4) -> (B, 1, 1, 1)
        self.embed = nn.Embedding(num_classes, embed_dim if cond == "concat" else ch)
        if cond == "projection":  # at the output conv's scale (fan-in 16 ch): the first penalties stay moderate
            nn.init.uniform_(self.embed.weight, -1 / math.sqrt(16 * ch), 1 / math.sqrt(16 * ch))
        self.classifier = nn.Linear(ch, num_classes) if classify else None  # AC-GAN's head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(B, C, S, S) images, (B,) labels -> (B,) scores, and (B, num_classes) class logits or None."""
        y = self.embed(labels)
        if self.cond == "concat":
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, x.size(2), x.size(3))], 1)  # (B, C + embed_dim, S, S)
        phi = (h := self.net(x)).sum((2, 3))  # (B, ch): the last features h (B, ch, 4, 4), summed over space
        scores = self.out(h).flatten() + ((y * phi).sum(1) if self.cond == "projection" else 0)
        return scores, self.classifier(phi) if self.classifier is not None else None


# Loss: the critic minimises E[D(x~)] - E[D(x)] + lambda * GP, the generator -E[D(x~)] (in the training loop).
def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, eps=None, scale=lambda t: t) -> torch.Tensor:
    """GP = E_x^[(||grad_x^ D(x^)||_2 - 1)^2] with x^ = eps * x + (1 - eps) * x~, eps ~ U[0, 1] per sample. `scale`
    is fp16's GradScaler.scale: PyTorch's AMP recipe scales the mean score, so that its gradient does not underflow in
    fp16, and unscales that gradient; a score's share, loss scale / B, stays far below fp16's maximum of 65504."""
    if eps is None:
        eps = torch.rand(real.size(0), 1, 1, 1, device=real.device)  # (B, 1, 1, 1): one mix per sample
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # create_graph: the penalty is a function of the critic's weights, trained through its own gradient
    (grad,) = torch.autograd.grad(scale(score := critic(x_hat).float().mean()), x_hat, create_graph=True)
    grad = grad * (len(x_hat) / scale(torch.ones_like(score)))  # fp32 like x^: sample i's gradient of D(x^_i)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)  # (B,) in fp32, over all pixels; finite d/dgrad at 0
    return (norm - 1).pow(2).mean()


def auxiliary_classifier_loss(logits: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """AC-GAN's class term E[-log C(y | x)], 0 without a classifier. As in Gulrajani et al.'s AC-WGAN-GP the critic
    learns it on real images and the generator on its own: rewarding fakes of the wrong class would teach mistakes."""
    return nn.functional.cross_entropy(logits.float(), labels) if logits is not None else torch.zeros_like(labels[0])


def augment(real: torch.Tensor, flip: bool, degrees: float) -> torch.Tensor:
    """Per image (a transform on a batch draws once for all): flip with p = 1/2, rotate by U[-degrees, degrees]."""
    rotate = v2.RandomRotation(degrees, v2.InterpolationMode.BILINEAR, fill=-1.0)
    transform = v2.Compose([v2.RandomHorizontalFlip(flip / 2), rotate])
    return torch.stack([transform(image) for image in real]) if flip or degrees > 0 else real


def celeba_classes(files: list, attrs: tuple, path: Path) -> tuple:
    """(labels, names) from list_attr_celeba.txt: k binary attributes, the first the highest bit, make 2^k classes."""
    rows = [line.split() for line in path.read_text().splitlines()]
    names, table = (rows[1], {row[0]: row[1:] for row in rows[2:] if row}) if len(rows) > 1 else ([], {})
    if unknown := [a for a in attrs if a not in names]:
        fail(f"--celeba-attrs: {' '.join(unknown)} not in {path} (its attributes: {' '.join(names) or 'none'})")
    if missing := [p.name for p in files if len(table.get(p.name, ())) != len(names)]:
        fail(f"{missing[0]} has no line of {len(names)} values in {path} ({len(missing)} images lack one)")
    k, bits = len(attrs), [[table[p.name][names.index(a)] == "1" for a in attrs] for p in files]
    labels = torch.tensor([sum(b << (k - 1 - j) for j, b in enumerate(row)) for row in bits])
    return labels, [",".join(f"{a}={c >> (k - 1 - j) & 1}" for j, a in enumerate(attrs)) for c in range(2**k)]


# Data: every dataset is decoded once into a uint8 tensor (N, C, S, S); a batch is an index slice of it.
def load_dataset(args: Args) -> tuple:
    """(images (N, C, S, S) uint8, labels (N,), class names, image files); a label is -1 where the data has none."""
    root = Path(args.data_dir) if args.data_dir else Path(__file__).resolve().parent / "data"
    if args.dataset in ("celeba", "folder"):
        folder = root / "celeba" / "img_align_celeba" if args.dataset == "celeba" else root
        types = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".avif", ".tif", ".tiff")
        walk = list(os.walk(folder, onerror=lambda e: fail(f"{e.strerror}: {e.filename}"), followlinks=True))
        files = sorted(Path(d, n) for d, _, ns in walk for n in ns if n.lower().endswith(types))[: args.max_images]
        if not files:
            fail(f"no images in {folder} (looked for {' '.join(types)} in it and its subfolders)")
        others = sorted({Path(n).suffix.lower() or n for _, _, ns in walk for n in ns if not n.lower().endswith(types)})
        if others:  # .heic, say: PIL reads it only with a plugin; a skipped photo is named, not silently left out
            print(f"note: skipped the files of other types in {folder}: {' '.join(others)}", file=sys.stderr)
        # The top-level subfolders are the classes (AFHQ: cat/, dog/, wild/); files at the top have none.
        tops = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in files]
        classes = sorted(walk[0][1])
        labels = torch.tensor([classes.index(top) if top else -1 for top in tops])
        # Every file decoded once, by DataLoader workers, before training: a broken image stops the run before step 0.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        decode = functools.partial(decode_files, size=args.image_size, channels=args.channels or 3)
        loader = torch.utils.data.DataLoader(files, 64, num_workers=min(8, cores), collate_fn=decode)
        images = torch.empty(len(files), args.channels or 3, args.image_size, args.image_size, dtype=torch.uint8)
        progress = tqdm(loader, f"decoding {len(files)} images", unit="batch", disable=sys.stderr is None)
        try:  # a worker killed (out of memory) or crashed in an image library: its error, in one line
            for k, (pixels, error) in enumerate(progress):
                if error:
                    fail(error)
                images[64 * k : 64 * k + len(pixels)] = torch.from_numpy(pixels)
        except RuntimeError as e:
            fail(f"decoding stopped: {str(e).strip().splitlines()[0]}")
    else:
        name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}[args.dataset]
        for gz in (root / name / "raw").glob("*-ubyte.gz"):  # ours ship gzipped with md5s torchvision lacks:
            if not gz.with_suffix("").exists():  # extracted as its download would
                try:
                    write_atomic(gz.with_suffix(""), gzip.decompress(gz.read_bytes()))
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a download cut short, a bad copy
                    fail(f"{gz} is damaged ({e}): delete it to download it again, or copy it anew")
        try:
            data = getattr(torchvision.datasets, name)(str(root), train=True, download=True)
        except Exception as e:  # urllib and torchvision raise many kinds; all mean the same to the user
            fail(f"no {args.dataset} in {root}, and no download ({str(e).strip().splitlines()[-1]}): try --data-dir")
        images = torch.as_tensor(data.data)[: args.max_images]  # (N, 28, 28); CIFAR-10 (N, 32, 32, 3)
        images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
        labels, classes = torch.as_tensor(data.targets)[: args.max_images], data.classes
        if images.size(1) != (args.channels or images.size(1)):  # RGB becomes luma, gray is repeated
            images = TF.rgb_to_grayscale(images) if args.channels == 1 else images.expand(-1, 3, -1, -1)
        size = [args.image_size] * 2  # resized in chunks: a float copy of the whole set would be 4x its size
        images, files = torch.cat([TF.resize(c, size, antialias=True) for c in images.split(4096)]), []
    if len(images) < (need := args.batch_size * int(os.environ.get("WORLD_SIZE", "1"))):  # a batch for every process
        fail(f"the dataset has {len(images)} images, fewer than one batch of {need} (--batch-size x processes)")
    args.channels = images.size(1)
    return images, labels, classes, files


def decode_files(files: list, size: int, channels: int) -> tuple:
    """(B, C, S, S) uint8, each file's center square resized, and "" or what failed (runs in a DataLoader worker).
    A NumPy array, not a tensor: a worker's tensor travels through /dev/shm (64 MB in Docker), which, once full,
    killed the batch in the worker's sending thread and left the run waiting for it for ever."""
    images = torch.zeros(len(files), channels, size, size, dtype=torch.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as im:
                if im.mode in ("F", "I"):  # no brightness range that viewers agree on: refused; below, EXIF's rotation
                    return (
                        images.numpy(),
                        f"{file} has 32-bit pixels (mode {im.mode}): save it with 8 or 16 bits a channel",
                    )
                im = ImageOps.exif_transpose(im.point(lambda v: v / 256) if im.mode.startswith("I;16") else im)
                im = TF.center_crop(TF.resize(im.convert("RGB" if channels == 3 else "L"), size), size)
                images[i] = TF.pil_to_tensor(im)
        except Exception as e:  # PIL raises many kinds
            return images.numpy(), f"{file} is not a readable image ({type(e).__name__}: {e})"
    return images.numpy(), ""


def batch_indices(n: int, batch_size: int, seed: int, start: int, rank: int = 0, world_size: int = 1):
    """Index batches from batch `start` on; epoch e's order is seeded by (seed, e): a resumed run draws the same."""
    for k in itertools.count(start):
        epoch, i = divmod(k, n // (batch_size * world_size))  # the last partial batch of an epoch is dropped
        if k == start or i == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield order[(i * world_size + rank) * batch_size :][:batch_size]  # under torchrun, this process's share


# Helpers: checks, devices and processes, checkpoints, images, generation.
CHECKPOINT_KIND = "cond_wgan_gp"  # stored in every checkpoint: one from another script is refused


def fail(message: str) -> NoReturn:  # one line on stderr and exit code 1: bad input gets a message, not a traceback
    raise SystemExit("error: " + message.replace("\n", "\\n"))  # even a file name's newline stays on the line


def one_line(kind, error, traceback) -> None:  # sys.excepthook: what comes from outside the code is one line (README)
    outside = issubclass(kind, (OSError, MemoryError, KeyboardInterrupt)) or "can't allocate memory" in str(error)
    if outside or kind.__module__.startswith("torch._inductor"):  # a full disk, too little memory, no C++ compiler
        return print(f"error: {kind.__name__}: {error}".splitlines()[0].rstrip(": "), file=sys.stderr)
    sys.__excepthook__(kind, error, traceback)  # anything else is a bug: its traceback


def check_args(args: Args) -> None:
    """Fill in the defaults that depend on other settings; refuse settings that cannot train, before any writing."""
    if args.image_size is None:
        args.image_size = 64 if args.dataset in ("celeba", "folder") else 32
    width = 32 if args.image_size <= 32 else 64  # 32 at 32 px: as good per step on Fashion-MNIST, 3x faster (README)
    args.g_width, args.d_width = (width if w is None else w for w in (args.g_width, args.d_width))
    args.label = args.label if args.generate else None  # --generate's option: not saved with a run, not reused
    attrs = args.celeba_attrs or ()
    if (args.dataset == "celeba") != bool(attrs) or len(set(attrs)) != len(attrs) or len(attrs) > 8:
        fail(f"--dataset celeba takes --celeba-attrs: 1 to 8 different attributes, e.g. Male Smiling; got {attrs}")
    counts = "total_steps batch_size latent_dim n_critic gp_every g_width d_width log_every sample_every num_images"
    for names, ok, rule in [
        ("image_size", lambda v: v in (16, 32, 64, 128, 256), "a power of two from 16 to 256"),
        ("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
        ("channels", lambda v: v in (None, 1, 3), "1 or 3"),
        (counts + " embed_dim max_images", lambda v: v is None or v >= 1, ">= 1"),
        ("lr_g lr_d", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("lambda_gp lambda_ac ema_halflife", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("augment_rotate", lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
        ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ]:
        for name in names.split():
            if not ok(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    cuda = torch.cuda.is_available() if not args.device else args.device.startswith("cuda")  # CPU: more steps a minute
    args.batch_size, args.gp_every = args.batch_size or (64 if cuda else 32), args.gp_every or (1 if cuda else 4)


def setup_device(args: Args) -> tuple:
    """(device, rank, world_size); joins torchrun's group (it sets WORLD_SIZE); resolves --precision auto (README)."""
    try:  # bare cuda is cuda:LOCAL_RANK
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":  # raises where there is no such GPU
            torch.cuda.set_device(device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {args.device}: {next(iter(str(e).splitlines()), '')}")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: this script runs on cpu or cuda")
    cuda = device.type == "cuda"  # GPUs before Ampere only emulate bf16; torch.cpu's checks are private (fp32 without)
    cpu_bf16 = any(getattr(torch.cpu, f"_is_{n}_supported", lambda: False)() for n in ("avx512_bf16", "amx_tile"))
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_bf16
    args.precision = ("bf16" if bf16 else "fp16" if cuda else "fp32") if args.precision == "auto" else args.precision
    if device.type == "cpu" and sys.platform == "linux":  # glibc hands freed blocks over 128 KB back, so a step's
        ctypes.CDLL(None).mallopt(-3, 32 << 20), ctypes.CDLL(None).mallopt(-1, 1 << 30)  # would fault in anew: README
    world_size = os.environ.get("WORLD_SIZE", "1")  # set by torchrun, with RANK and the rendezvous address
    if not world_size.isdigit() or int(world_size) < 1:
        fail(f"WORLD_SIZE={world_size} is not a number of processes")
    if int(world_size) == 1:
        return device, 0, 1
    if not all(os.environ.get(name) for name in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        fail(f"WORLD_SIZE={world_size} without RANK, MASTER_ADDR and MASTER_PORT: start the processes with torchrun")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def optimizer_step(loss, optimizer, scaler, module: nn.Module, world_size: int, sums, logged: list) -> None:
    """Backward (scaled), average the gradients over processes, step; count `logged` in sums unless fp16 skipped it."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world_size > 1 and (grads := [p.grad for p in module.parameters() if p.grad is not None]):  # why not DDP: README
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce of one flat buffer, after the backward
        all_reduce(flat)  # a sum: a non-finite fp16 gradient reaches all, and all skip the step
        nn.utils.vector_to_parameters(flat.div_(world_size), grads)
    scale = scaler.scale(torch.ones((), device=loss.device))  # a tensor (get_scale() syncs), halved on a skip:
    scaler.step(optimizer)
    scaler.update()
    logged = torch.stack(logged).detach().float()
    sums += torch.stack([logged, torch.ones_like(logged)]).where(scaler.scale(torch.ones_like(scale)) >= scale, 0)


def all_reduce(tensor: torch.Tensor, op=torch.distributed.ReduceOp.SUM, group=None) -> None:
    """torch.distributed.all_reduce; when another process of the job has died, one line instead of gloo's traceback."""
    try:
        torch.distributed.all_reduce(tensor, op, group=group)
    except RuntimeError as e:  # gloo: "[.../pair.cc:545] Read error [addr]: Connection reset by peer. This is ..."
        fail(f"another process of the job stopped ({str(e).splitlines()[0].split('] ', 1)[-1].split('. ')[0]})")


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, with its settings as Args; one line when it is missing, unreadable, foreign or
    malformed: a setting it lacks would silently take its default (a seed, say), a malformed one fail mid-run."""
    try:  # weights_only: tensors and plain types only, so a downloaded checkpoint cannot run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {next(iter(str(e).splitlines()), '')})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND or "reals" not in ckpt:
        fail(f"{path} is not a checkpoint of this version of {CHECKPOINT_KIND}.py")
    saved, fields = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}, get_type_hints(Args)
    if missing := [name for name in fields if name not in saved]:
        fail(f"{path} lacks the settings {' '.join(missing)}")
    if wrong := [f"{name}={saved[name]!r}" for name, hint in fields.items() if not has_type(saved[name], hint)]:
        fail(f"{path} has malformed settings: {' '.join(wrong)}")
    if type(ckpt.get("step")) is not int or ckpt["step"] < 0:
        fail(f"{path} has a malformed step: {ckpt.get('step')!r}")
    reals, shape = ckpt["reals"], (saved["channels"], saved["image_size"], saved["image_size"])
    if not torch.is_tensor(reals) or reals.dtype != torch.uint8 or reals.dim() != 4 or reals.shape[1:] != shape:
        fail(f"{path} has malformed reals: not a uint8 tensor of images of shape {shape}")
    return ckpt | {"args": Args(**{name: saved[name] for name in fields})}


def has_type(value, hint) -> bool:
    """Whether a saved setting is of its Args field's type (hint): int, float, bool, str, Optional, Literal, tuple."""
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if get_origin(hint) is Union:  # Optional[X]: X or None
        return any(has_type(value, h) for h in get_args(hint))
    if get_origin(hint) is tuple:  # tuple[float, ...]
        return isinstance(value, tuple) and all(has_type(v, get_args(hint)[0]) for v in value)
    return type(value) is hint or (hint is float and type(value) is int)


def write_atomic(path: Path, data) -> None:
    """Write bytes (or call data(file)) to a temporary file, then rename it: never a half-written file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk in torch.save: RuntimeError("unexpected pos"), from an OSError
        fail(f"cannot write {path} ({getattr(e.__context__ or e, 'strerror', None) or e})")
    finally:
        if tmp.is_file():  # gone after the rename; never made where the folder could not be
            tmp.unlink()


def lock(run_dir: Path) -> int:
    """Hold the run folder while this process lives (the kernel lets go at any exit, kill -9 too): a second run in it,
    a --resume started twice, would mix its checkpoints and TensorBoard events with this one's."""
    folder = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"{run_dir} is in use by another run: one process trains a run at a time")
    return folder


def remove_unless_saved(run_dir: Path) -> None:  # at exit
    if not (run_dir / "checkpoint.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def stopped(signum: int, frame) -> NoReturn:  # SIGTERM, SIGHUP outside training: an exception, so cleanups run
    print(f"error: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(128 + signum)


def save_png(images: torch.Tensor, path: Path, nrow: int = 8) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] -> a PNG of the one image, or of a grid of nrow columns; returned as (C, H, W) uint8."""
    pixels = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    image = pixels[0] if len(pixels) == 1 else torchvision.utils.make_grid(pixels, nrow=nrow, padding=2)
    write_atomic(path, torchvision.io.encode_png(image).numpy().tobytes())
    return image


if __name__ == "__main__":
    sys.excepthook, args = one_line, tyro.cli(Args)  # below: TensorBoard's thread's OSError comes again in add_scalar
    threading.excepthook = lambda e: issubclass(e.exc_type, OSError) or threading.__excepthook__(e)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # until training starts: one line, and the cleanups at exit run
        signal.signal(signum, stopped)
    ckpt = load_checkpoint(args.generate or args.resume) if args.generate or args.resume else None  # both: generate
    if ckpt:  # the run's saved settings; the flags given now override them
        args = tyro.cli(Args, default=dataclasses.replace(ckpt["args"], resume=args.resume, generate=args.generate))
    check_args(args)
    if ckpt and not args.generate and ckpt["step"] >= args.total_steps:
        fail(f"{args.resume} is at step {ckpt['step']}: nothing to train up to --total-steps {args.total_steps}")
    device, rank, world_size = setup_device(args)
    if not args.generate:  # before anything is written: bad data leaves nothing behind
        images, labels, classes, files = load_dataset(args)
        if args.dataset == "celeba":  # the classes: combinations of binary attributes
            labels, classes = celeba_classes(files, args.celeba_attrs, files[0].parents[1] / "list_attr_celeba.txt")
        if (labels < 0).any():
            fail(f"{int((labels < 0).sum())} of {len(labels)} images are in no class subfolder (such as cat/, dog/)")
        if empty := [c for k, c in enumerate(classes) if args.dataset == "folder" and not (labels == k).any()]:
            fail(f"no images in the class folders {' '.join(empty)} of {args.data_dir}: add some, or remove them")
        if ckpt and ckpt["classes"] != classes:
            fail(f"{args.resume} was trained on the classes {ckpt['classes']}, the data has {classes}")
    classes = ckpt["classes"] if args.generate else classes
    if ckpt and args.run_name != ckpt["args"].run_name:
        fail(f"{args.generate or args.resume} belongs to the run in its folder: --run-name cannot move it")
    args.run_name = args.run_name or f"{args.dataset}__{Path(__file__).stem}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.generate or args.resume).resolve().parent if ckpt else Path("runs", args.run_name)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    torch.backends.cudnn.benchmark = device.type == "cuda"  # picks the fastest conv algorithms for our fixed shapes
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]  # None: autocast off
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    fmt = torch.channels_last  # (B, H, W, C) in memory: faster convolutions on GPUs and on the CPU too (README)
    k, classify = len(classes), args.lambda_ac > 0  # the number of classes; whether the critic has AC-GAN's head
    generator = Generator(args.latent_dim, args.channels, args.image_size, args.g_width, k, args.embed_dim)
    critic = Critic(args.channels, args.image_size, args.d_width, k, args.critic_cond, args.embed_dim, classify)
    generator, critic = generator.to(device, memory_format=fmt), critic.to(device, memory_format=fmt)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if args.ema_halflife > 0 else None
    sampler = ema if ema is not None else generator  # draws the grids: the moving average when there is one
    # The penalty's double backward runs the eager critic (torch.compile has none); static graphs for B and 2B images.
    generator_fwd, critic_fwd = (torch.compile(m, dynamic=False) if args.compile else m for m in (generator, critic))
    adam = {"betas": (args.beta1, args.beta2), "fused": device.type == "cuda"}  # fused: one kernel per update
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, **adam)
    opt_d = torch.optim.Adam(critic.parameters(), lr=args.lr_d, **adam)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # one for both: PyTorch's recipe
    rows = min(len(classes), 16)  # the grid: one row per class (the first 16), one noise vector per column
    fixed_noise = torch.randn(8, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)).repeat(rows, 1)
    fixed_noise, fixed_labels = fixed_noise.to(device), torch.arange(rows, device=device).repeat_interleave(8)
    if not args.generate:  # real_vs_fake.png: 8 real images of each class in the grid (any, where a class has none)
        reals = images[torch.multinomial((labels == torch.arange(rows)[:, None]) + 1e-9, 8, True).flatten()]
    stateful = dict(generator=generator, critic=critic, ema=ema, opt_g=opt_g, opt_d=opt_d, scaler=scaler)
    if ckpt:
        ckpt["ema"] = ckpt.get("ema") or ckpt.get("generator")  # an EMA turned on at resume starts from the weights
        try:
            for key, obj in stateful.items():
                if key == "scaler" and ckpt.get(key) == {} and ckpt["args"].precision != "fp16":
                    continue  # the state of a GradScaler saved without fp16
                if obj is not None and not (isinstance(ckpt.get(key), dict) and ckpt[key]):
                    fail(f"{args.generate or args.resume} lacks the state of its {key}")
                if obj is not None:
                    obj.load_state_dict(ckpt[key])
            for opt in (opt_g, opt_d):  # Adam loads moments of any shape, and would fail at its first step
                for p in opt.param_groups[0]["params"]:
                    if any(not torch.is_tensor(v) or v.dim() and v.shape != p.shape for v in opt.state[p].values()):
                        raise ValueError(f"an Adam moment is not of its weight's shape {tuple(p.shape)}")
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # a mismatch: "size mismatch for net.0.weight ..."
            fail(f"checkpoint {args.generate or args.resume} does not fit this run: {str(e).splitlines()[-1].strip()}")
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):  # the rates and betas given now, not the saved ones
            opt.param_groups[0].update(lr=lr, betas=(args.beta1, args.beta2))
    if args.generate:  # num_images PNGs in <checkpoint folder>/generated/<class>/; the fixed-noise grids beside it
        if args.label is not None and not 0 <= args.label < len(classes):
            fail(f"--label {args.label} is not a class of {args.generate}: {list(enumerate(classes))}")
        out, tmp, old = (run_dir / f"generated{end}" for end in ("", f".{os.getpid()}.tmp", f".{os.getpid()}.old"))
        if out.is_symlink() or (out.exists() and not out.is_dir()):  # the images of a linked folder would stay
            fail(f"{out} is a link or a file: --generate replaces that folder whole, so move it away")
        for folder in (tmp, old):  # written to tmp, then renamed: generated/ holds this call's images or is as it was
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        folders = [tmp / name.replace("/", "_") for name in classes]  # "T-shirt/top": T-shirt_top
        torch.manual_seed(args.seed)
        with torch.no_grad():
            save_png(sampler.eval()(fixed_noise, fixed_labels), run_dir / "generated_grid.png")
            for i in range(args.num_images):  # image i of class i % K or --label: i is unique over the class folders
                y = torch.tensor([args.label if args.label is not None else i % len(classes)], device=device)
                save_png(sampler(torch.randn(1, args.latent_dim, device=device), y), folders[y] / f"{i:06d}.png")
        if out.exists():  # moved aside, then the new one in its place, then deleted: no half-deleted generated/
            os.rename(out, old)
        os.rename(tmp, out)
        print(f"wrote {args.num_images} images to {out}/<class>/ and their grid beside it")
        sys.exit()
    if rank == 0:  # under torchrun only process 0 logs, writes grids and checkpoints
        run_dir.mkdir(parents=True, exist_ok=bool(ckpt))  # a new run, a new folder: two runs never share one
        run_lock = lock(run_dir)  # held until this process ends
        if not ckpt:  # a run that fails before its first checkpoint leaves no folder to block a retry of its name
            atexit.register(remove_unless_saved, run_dir)
        writer = SummaryWriter(str(run_dir), purge_step=ckpt["step"] + 1 if ckpt else None)  # drops later events
    stop_signal = []  # Ctrl-C, SIGTERM or SIGHUP (a closed terminal): finish the step, save, exit; again: at once
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda s, _: (stop_signal.append(s), signal.signal(s, signal.SIG_DFL)))
    stop_group = torch.distributed.new_group(backend="gloo") if world_size > 1 else None  # CPU flags, also under NCCL
    images, labels = images.to(device), labels.to(device)  # on a GPU, batches become index slices in its memory
    step = log_step = ckpt["step"] if ckpt else 0
    log_time, stopping = time.perf_counter(), False
    batches = batch_indices(len(images), args.batch_size, args.seed, step * args.n_critic, rank, world_size)
    loss_names = ["losses/critic", "losses/wasserstein_estimate", "losses/gradient_penalty", "losses/generator"]
    loss_sums = torch.zeros(2, len(loss_names), device=device)  # sums and counts on the device, read every log_every
    with tqdm(
        total=args.total_steps, initial=step, unit="step", dynamic_ncols=True, disable=rank > 0 or sys.stderr is None
    ) as progress:
        while step < args.total_steps and not stopping:
            torch.manual_seed(hash((args.seed, rank, step)))  # step k draws from (seed, rank, k): resumed or not
            for i in range(args.n_critic):
                idx = next(batches).to(device)
                real, y = images[idx].contiguous(memory_format=fmt).float() / 127.5 - 1, labels[idx]
                real = augment(real, args.augment_flip, args.augment_rotate)
                z = torch.randn(args.batch_size, args.latent_dim, device=device)
                with autocast:
                    with torch.no_grad():  # the fakes get the reals' labels: each interpolate lies within one class
                        fake = generator_fwd(z, y)  # no graph into the generator: this step trains the critic only
                    # One forward for real and fake: the critic has no batch-coupled layers, so this equals two.
                    scores, logits = critic_fwd(torch.cat([real, fake]), torch.cat([y, y]))
                    d_real, d_fake = scores.float().chunk(2)
                    wasserstein = d_real.mean() - d_fake.mean()
                    gp = torch.zeros((), device=device)
                    if (step * args.n_critic + i) % args.gp_every == 0:  # every step, or every k-th weighted by k
                        critic_y = lambda x: critic(x, y)[0]  # the labels held fixed  # noqa: E731, B023 (used at once)
                        gp = args.gp_every * gradient_penalty(critic_y, real, fake.float(), scale=scaler.scale)
                    ac = auxiliary_classifier_loss(logits[: args.batch_size] if logits is not None else None, y)
                    # L_D = E[D(x~,y)] - E[D(x,y)] + lambda E[(||grad_x D(x^,y)||_2 - 1)^2] + lambda_ac E[-log C(y|x)]
                    d_loss = -wasserstein + args.lambda_gp * gp + args.lambda_ac * ac
                optimizer_step(d_loss, opt_d, scaler, critic, world_size, loss_sums[:, :3], [d_loss, wasserstein, gp])

            critic.requires_grad_(False)  # the generator step needs gradients through the critic, not of its weights
            y = labels[torch.randint(len(labels), (args.batch_size,), device=device)]  # classes as often as in the data
            with autocast:
                scores, logits = critic_fwd(generator_fwd(torch.randn_like(z), y), y)
                # L_G = -E[D(G(z, y), y)] + lambda_ac * E[-log C(y | G(z, y))]
                g_loss = -scores.float().mean() + args.lambda_ac * auxiliary_classifier_loss(logits, y)
            optimizer_step(g_loss, opt_g, scaler, generator, world_size, loss_sums[:, 3:], [g_loss])
            critic.requires_grad_(True)
            if ema is not None:  # weights of ema_halflife images ago count half; the warm-up lets early ones fade fast
                decay = min(0.5 ** (args.batch_size * world_size / args.ema_halflife), (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(generator.parameters()), 1 - decay)
                ema.load_state_dict(dict(generator.named_buffers()), strict=False)  # copies BN's statistics, SN's u, v
            step += 1
            progress.update(1)
            stop = torch.tensor(float(bool(stop_signal)))
            if world_size > 1:  # a stop on one process stops all at the same step (gloo on the CPU: no GPU sync)
                all_reduce(stop, torch.distributed.ReduceOp.MAX, group=stop_group)
            stopping = bool(stop)
            save = step % args.sample_every == 0 or step == args.total_steps or stopping
            if rank == 0 and (save or step % args.log_every == 0):  # a checkpoint is only written after this check
                values, counts = torch.stack([loss_sums[0] / loss_sums[1], loss_sums[1]]).tolist()  # the one sync point
                finite = all(math.isfinite(v) for v, n in zip(values, counts) if n) and scaler.get_scale() >= 1
                if not (finite and all(p.to(amp_dtype or p.dtype).isfinite().all() for p in sampler.parameters())):
                    last = run_dir / "checkpoint.pt"  # written only after this check passed: its step was good
                    kept = f"{last} keeps the last good step" if last.exists() else "no checkpoint was written"
                    fail(f"training diverged at step {step} (a loss or weight is not finite); {kept}")
                seconds, log_time = time.perf_counter() - log_time, time.perf_counter()
                values.append((step - log_step) * args.n_critic * args.batch_size * world_size / seconds)
                for name, value in zip(loss_names + ["charts/images_per_sec"], values):
                    if math.isfinite(value):  # NaN: fp16's scaler skipped every step of the interval (n = 0)
                        writer.add_scalar(name, value, step)
                progress.set_postfix(critic=f"{values[0]:.3f}", gen=f"{values[3]:.3f}", w=f"{values[1]:.3f}")
                loss_sums.zero_()
                log_step = step
            if rank == 0 and save:
                with torch.no_grad():  # the grids (fixed noise; rows of 8 real images, then 8 samples), the checkpoint
                    samples = sampler.eval()(fixed_noise, fixed_labels)
                    grid = save_png(samples, run_dir / f"samples/{step:07d}.png")
                    rows = [x.float().cpu().unflatten(0, (-1, 8)) for x in (reals / 127.5 - 1, samples)]
                    save_png(torch.cat(rows, 1).flatten(0, 1), run_dir / "real_vs_fake.png", nrow=16)
                writer.add_image("samples/fixed_noise", grid, step)
                generator.train()
                state = {key: obj.state_dict() if obj is not None else None for key, obj in stateful.items()}
                state.update(kind=CHECKPOINT_KIND, args=dataclasses.asdict(args), step=step, reals=reals)
                state["classes"] = classes  # --generate names its folders after them
                write_atomic(run_dir / "checkpoint.pt", functools.partial(torch.save, state))  # whole, or the old stays

    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        writer.close()
        how = f"; continue with: python {Path(__file__).name} --resume {shlex.quote(f'{run_dir}/checkpoint.pt')}"
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no more output; the run is saved
            print(f"{'stopped' if stopping else 'finished'} at step {step}: {run_dir}{how if stopping else ''}")
    if stopping:
        sys.exit(128 + (stop_signal[0] if stop_signal else signal.SIGTERM))
