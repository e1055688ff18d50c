"""Conditional WGAN-GP: a Wasserstein GAN with a gradient penalty that draws the class asked for.

Gulrajani et al. 2017 (arXiv:1704.00028) on DCGAN's networks; G takes the label's embedding
beside z (Mirza & Osindero 2014); D is a projection discriminator (Miyato & Koyama 2018);
optional AC-GAN loss (Odena et al. 2017). Trains on Fashion-MNIST by default;
a folder's subfolders are its classes; see docs/cond_wgan_gp.md.
"""

import atexit
import contextlib
import copy
import dataclasses
import fcntl
import gzip
import io
import itertools
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclasses.dataclass
class Args:
    run_name: Optional[str] = None
    """under runs/; default <dataset>__<script>__<seed>__<time>"""
    seed: int = 1
    """seed of all randomness"""
    device: Optional[str] = None
    """cpu, cuda or cuda:N; default cuda if any"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """autocast dtype; auto: bf16 if native, else fp16 on GPUs, fp32"""
    compile: bool = False
    """torch.compile the forwards"""
    log_every: int = 50
    """steps between loss logs"""
    sample_every: int = 500
    """steps between grids and checkpoints"""
    resume: Optional[str] = None
    """checkpoint to continue; flags override its settings"""
    generate: Optional[str] = None
    """checkpoint to draw num_images PNGs from, into generated/ beside it"""
    num_images: int = 10000
    """PNGs --generate writes"""
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "celeba", "folder"] = "fashion-mnist"
    """fashion-mnist is in data/; folder: JPEG, PNG, WebP"""
    data_dir: Optional[str] = None
    """default data/ beside the script"""
    image_size: Optional[int] = None
    """16 to 256; default 32, 64 for celeba and folder"""
    channels: tyro.conf.Suppress[int] = 1  # from the data
    max_images: Optional[int] = None
    """the first N images only"""
    total_steps: int = 30000
    """generator steps"""
    batch_size: Optional[int] = None
    """per step and process; default 32 on CPUs, 64"""
    latent_dim: int = 128
    """size of z"""
    lr_g: float = 1e-4
    """G's learning rate"""
    lr_d: float = 1e-4
    """D's learning rate"""
    beta1: float = 0.0
    """Adam's beta1"""
    beta2: float = 0.9
    """Adam's beta2"""
    ema_halflife: float = 0.0
    """half-life in images of G's moving average, which samples; 0: off"""
    n_critic: int = 5
    """critic steps per generator step"""
    lambda_gp: float = 10.0
    """weight of the gradient penalty"""
    gp_every: Optional[int] = None
    """GP every k-th critic step, times k; default 4 on CPUs, 1"""
    g_width: Optional[int] = None
    """G's last hidden channels; default 32 up to 32 px, else 64"""
    d_width: Optional[int] = None
    """D's first channels; default 32 up to 32 px, else 64"""
    embed_dim: int = 32
    """size of G's label embedding"""
    lambda_ac: float = 0.0
    """weight of AC-GAN's classifier loss; 0: off"""
    celeba_attrs: Optional[tuple[str, ...]] = None
    """celeba: k binary attributes (Male Smiling ...), 2^k classes"""
    augment_flip: bool = False
    """flip each real image horizontally with probability 1/2"""


# ---- The method ----
class Generator(nn.Module):  # DCGAN's, given z beside y's embedding
    def __init__(self, latent_dim, channels, image_size, width, num_classes, embed_dim):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        n_up = int(math.log2(image_size)) - 2
        ch, zy = width * 2 ** (n_up - 1), latent_dim + embed_dim
        layers = [nn.Unflatten(1, (zy, 1, 1)), nn.ConvTranspose2d(zy, ch, 4, 1, 0, bias=False)]
        layers += [nn.BatchNorm2d(ch), nn.ReLU(True)]  # (B, ch, 4, 4)
        for _ in range(n_up - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]  # (B, C, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, z, labels):  # G(z, y)
        return self.net(torch.cat([z, self.embed(labels)], 1))


class Critic(nn.Module):
    """D(x, y) = score(x) + <embed(y), phi(x)>, phi the summed last features: a projection
    discriminator; with `classify`, also class logits from phi(x) (AC-GAN's head)."""

    def __init__(self, channels, image_size, width, num_classes, classify):
        super().__init__()
        n_down = int(math.log2(image_size)) - 2
        layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(n_down - 1):  # (B, ch, s, s) -> (B, 2ch, s/2, s/2)
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False)]
            # layer norm: a score depends on its sample alone, as GP needs
            layers += [nn.GroupNorm(1, 2 * ch), nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.net, self.out = nn.Sequential(*layers), nn.Conv2d(ch, 1, 4, 1, 0)
        self.embed = nn.Embedding(num_classes, ch)
        # at the output's scale: moderate first penalties
        nn.init.uniform_(self.embed.weight, -1 / math.sqrt(16 * ch), 1 / math.sqrt(16 * ch))
        self.classifier = nn.Linear(ch, num_classes) if classify else None

    def forward(self, x, labels):  # (B,) scores, and (B, K) logits or None
        h = self.net(x)  # (B, ch, 4, 4)
        phi = h.sum((2, 3))  # (B, ch)
        scores = self.out(h).flatten() + (self.embed(labels) * phi).sum(1)
        return scores, self.classifier(phi) if self.classifier else None


def auxiliary_classifier_loss(logits, labels):
    """AC-GAN's E[-log C(y | x)]: D learns it on reals only, where fakes of the wrong
    class would teach it G's errors (Gulrajani et al.'s AC-WGAN-GP); G learns it on fakes."""
    if logits is None:
        return torch.zeros((), device=labels.device)
    return nn.functional.cross_entropy(logits.float(), labels)


def celeba_classes(files, attrs, path):  # labels, names: k attributes, 2^k classes
    rows = [line.split() for line in path.read_text().splitlines()]
    names = rows[1] if len(rows) > 1 else []
    table = {row[0]: row[1:] for row in rows[2:] if row}
    unknown = " ".join(a for a in attrs if a not in names)
    if unknown:
        fail(f"--celeba-attrs: {unknown} not in {path} ({' '.join(names) or 'empty'})")
    missing = [f.name for f in files if len(table.get(f.name, ())) != len(names)]
    if missing:
        fail(f"{missing[0]} has no line of {len(names)} values in {path}")
    bits = [[table[f.name][names.index(a)] == "1" for a in attrs] for f in files]
    labels = torch.tensor([int("".join("01"[b] for b in row), 2) for row in bits])
    bit_rows = itertools.product("01", repeat=len(attrs))  # in the order of the labels
    return labels, [",".join(f"{a}={b}" for a, b in zip(attrs, bits)) for bits in bit_rows]


def gradient_penalty(critic, real, fake, eps=None, loss_scale=1.0):
    """GP = E[(||grad D(x^)||_2 - 1)^2], x^ = eps x + (1 - eps) x~, eps ~ U[0, 1]."""
    if eps is None:
        eps = torch.rand(len(real), 1, 1, 1, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    score = critic(x_hat).float().mean()  # mean, not sum: far from fp16's overflow
    scaled = score * loss_scale  # fp16: small gradients would underflow to 0
    # create_graph: D trains through grad
    (grad,) = torch.autograd.grad(scaled, x_hat, create_graph=True)
    grad = grad / loss_scale * len(x_hat)  # grad D(x^_i): scale and 1/B undone
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + 1e-12)  # no NaN at 0
    return (norm - 1).pow(2).mean()


# ---- Data: decoded once, a uint8 tensor (N, C, S, S) ----
TYPES = (".jpg", ".jpeg", ".png", ".webp")


def load_dataset(args):  # images, and the files or torchvision's dataset
    root = Path(args.data_dir or Path(__file__).resolve().parent / "data")
    if args.dataset in ("celeba", "folder"):
        folder = root / "celeba/img_align_celeba" if args.dataset == "celeba" else root
        walk = os.walk(folder, onerror=unreadable, followlinks=True)
        found = [Path(parent, name) for parent, _, names in walk for name in names]
        files = sorted(f for f in found if f.suffix.lower() in TYPES)[: args.max_images]
        if not files:
            fail(f"no images in {folder} (looked for {' '.join(TYPES)})")
        others = " ".join(sorted({f.suffix.lower() or f.name for f in found} - set(TYPES)))
        if others:
            print(f"note: skipped the types {others} in {folder}", file=sys.stderr)
        with tqdm(files, "decoding", disable=not sys.stderr) as decoding:
            images = torch.stack([decode(f, args.image_size) for f in decoding])
        source = files
    else:
        name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
        name = name[args.dataset]
        for gz in (root / name / "raw").glob("*-ubyte.gz"):
            extract(gz)
        try:
            source = getattr(torchvision.datasets, name)(str(root), download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1]
            fail(f"no {args.dataset} in {root}, and no download ({reason}): try --data-dir")
        images = torch.as_tensor(source.data)[: args.max_images]
        images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
        size = [args.image_size] * 2
        images = torch.cat([TF.resize(x, size, antialias=True) for x in images.split(4096)])
    one_batch = args.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    if len(images) < one_batch:
        fail(f"the dataset has {len(images)} images, fewer than one batch of {one_batch}")
    args.channels = images.size(1)
    return images, source


def unreadable(error):
    fail(f"{error.strerror}: {error.filename}")


def extract(gz):
    if not gz.with_suffix("").exists():
        try:
            write_atomic(gz.with_suffix(""), gzip.decompress(gz.read_bytes()))
        except Exception as e:
            fail(f"{gz} is damaged ({e}): delete it to download it again, or copy it anew")


def decode(file, size):
    try:
        image = torchvision.io.decode_image(str(file), "RGB", apply_exif_orientation=True)
    except RuntimeError:
        fail(f"{file} is not an image that torchvision reads")
    image = TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs
    return TF.center_crop(TF.resize(image, size, antialias=True), size)


def batch_indices(n, batch_size, seed, start, rank=0, world_size=1):
    """This process's share of each batch from `start` on, the same on a resume."""
    per_epoch = n // (batch_size * world_size)
    for k in itertools.count(start):
        epoch, i = divmod(k, per_epoch)
        if k == start or i == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9999 + epoch))
        yield order[(i * world_size + rank) * batch_size :][:batch_size]


# ---- Plumbing ----
def fail(message):  # bad input: one line, no traceback
    if progress:
        progress.close()
    raise SystemExit("error: " + message.replace("\n", "\\n"))


def excepthook(kind, error, traceback):  # a full disk, no memory: one line
    line = f"{kind.__name__}: {error}".splitlines()[0]
    outside = issubclass(kind, (OSError, MemoryError, KeyboardInterrupt, torch.OutOfMemoryError))
    outside = outside or "can't allocate" in line or "gloo" in line or "NCCL" in line
    if progress:
        progress.close()
    if outside or kind.__module__.startswith("torch._inductor"):  # no compiler
        print(f"error: {line}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


stop_requests = []
progress = None  # the bar: closed before an error


def request_stop(signum, frame):  # save after this step; a second stops at once
    stop_requests.append(signum)
    signal.signal(signum, signal.SIG_DFL)


def check_args(args):
    attrs = args.celeba_attrs or ()
    if (args.dataset == "celeba") != bool(attrs) or len(set(attrs)) != len(attrs) or len(attrs) > 8:
        fail(f"--dataset celeba takes --celeba-attrs: 1 to 8 different attributes; got {attrs}")
    args.image_size = args.image_size or (64 if args.dataset in ("celeba", "folder") else 32)
    width = 32 if args.image_size <= 32 else 64
    args.g_width = args.g_width or width
    args.d_width = args.d_width or width
    counts = "total_steps batch_size latent_dim n_critic gp_every g_width d_width embed_dim"
    counts += " log_every sample_every num_images max_images"
    rules = [
        ("image_size", lambda v: v in (16, 32, 64, 128, 256), "a power of two from 16 to 256"),
        ("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
        (counts, lambda v: v is None or v >= 1, ">= 1"),
        ("lr_g lr_d", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("lambda_gp lambda_ac ema_halflife", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ]
    for names, ok, rule in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    # CPU: batch 32, lazy GP: 10-minute FD 17.44, not 21.86
    cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
    args.batch_size = args.batch_size or (64 if cuda else 32)
    args.gp_every = args.gp_every or (1 if cuda else 4)


def setup_device(args):
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            index = device.index if device.index is not None else os.environ.get("LOCAL_RANK")
            device = torch.device("cuda", int(index or 0))
            torch.cuda.set_device(device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {args.device}: {str(e).splitlines()[0]}")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: cpu or cuda only")
    cuda = device.type == "cuda"
    if cuda:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    else:  # private: a later torch may lack them
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        bf16 = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    if args.precision == "auto":
        args.precision = "bf16" if bf16 else "fp16" if cuda else "fp32"
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not world_size.isdigit() or int(world_size) > 1 and "MASTER_PORT" not in os.environ:
        fail(f"WORLD_SIZE={world_size}: start several processes with torchrun")
    if int(world_size) <= 1:
        return device, 0, 1
    torch.distributed.init_process_group(device_id=device if cuda else None)
    sys.excepthook = excepthook  # torch's prefixes [rank0]
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def optimizer_step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # fp16: skipped on an overflow
    scaler.update()


def load_checkpoint(path):
    try:  # weights_only: no code runs
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != Path(__file__).stem:
        fail(f"{path} is not a checkpoint of {Path(__file__).name}")
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    missing = " ".join(k for k in vars(Args()) if k not in saved)
    if missing:
        fail(f"{path} lacks the settings {missing}")
    if type(ckpt.get("step")) is not int or ckpt["step"] < 0:
        fail(f"{path} has a malformed step: {ckpt.get('step')!r}")
    return ckpt | {"args": Args(**{k: saved[k] for k in vars(Args())})}


def restore(ckpt, state, path):
    for key, obj in state.items():
        if obj is None:
            continue
        try:
            obj.load_state_dict(ckpt.get(key))
        except Exception as e:
            fail(f"the {key} of {path} does not fit this run ({str(e).strip()[:200]!r})")
        for p, moments in getattr(obj, "state", {}).items():  # Adam's moments
            if any(m.shape not in ((), p.shape) for m in moments.values()):
                fail(f"the {key} of {path} does not fit this run (a moment's shape)")


def write_atomic(path, data):  # never half a file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror})")
    finally:
        tmp.unlink(missing_ok=True)


def claim(run_dir, new):  # one process a run folder; the lock ends with it
    run_dir.mkdir(parents=True, exist_ok=not new)
    folder = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"{run_dir} is in use by another run")
    if new:
        atexit.register(remove_unless_saved, run_dir)


def remove_unless_saved(run_dir):  # a failed start blocked a retry of its name
    if not (run_dir / "checkpoint.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def save_png(images, path, nrow=8):
    pixels = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    image = pixels[0] if len(pixels) == 1 else torchvision.utils.make_grid(pixels, nrow)
    write_atomic(path, torchvision.io.encode_png(image).numpy().tobytes())
    return image


if __name__ == "__main__":
    # ---- Plumbing: settings, data, networks ----
    sys.excepthook = excepthook
    # TensorBoard's thread: add_scalar raises it again
    threading.excepthook = lambda hook: None
    for signum in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal
        signal.signal(signum, signal.default_int_handler)
    args = tyro.cli(Args)
    path = args.generate or args.resume
    ckpt = load_checkpoint(path) if path else None
    if ckpt:  # its settings, then the flags given
        saved = dataclasses.replace(ckpt["args"], resume=args.resume, generate=args.generate)
        args = tyro.cli(Args, default=saved)
    check_args(args)
    if ckpt and not args.generate and ckpt["step"] >= args.total_steps:
        fail(f"{path} is at step {ckpt['step']}: nothing to train; raise --total-steps")
    if ckpt and args.run_name != ckpt["args"].run_name:
        fail(f"{path} stays in its folder: --run-name cannot move it")
    device, rank, world_size = setup_device(args)
    if not args.generate:
        images, source = load_dataset(args)
        if args.dataset == "folder":  # the top-level subfolders are the classes
            classes = sorted(p.name for p in Path(args.data_dir).iterdir() if p.is_dir())
            parts = [f.relative_to(args.data_dir).parts for f in source]
            labels = torch.tensor([classes.index(t[0]) if len(t) > 1 else -1 for t in parts])
            if (labels < 0).any():
                fail(f"{int((labels < 0).sum())} images are in no class folder (such as cat/)")
            empty = " ".join(c for k, c in enumerate(classes) if not (labels == k).any())
            if empty:
                fail(f"no images in the class folders {empty}: add some, or remove them")
        elif args.dataset == "celeba":  # the classes: combinations of attributes
            attributes = source[0].parents[1] / "list_attr_celeba.txt"
            labels, classes = celeba_classes(source, args.celeba_attrs, attributes)
        else:
            classes = source.classes
            labels = torch.as_tensor(source.targets)[: args.max_images]
        if ckpt and ckpt["classes"] != classes:
            fail(f"{path} was trained on the classes {ckpt['classes']}, the data has {classes}")
    classes = ckpt["classes"] if args.generate else classes
    script = Path(__file__).stem
    args.run_name = args.run_name or f"{args.dataset}__{script}__{args.seed}__{int(time.time())}"
    run_dir = Path(path).resolve().parent if ckpt else Path("runs", args.run_name)

    torch.manual_seed(args.seed)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    # channels_last, (B, H, W, C) in memory: 1.13-1.30x CPU steps
    fast = dict(device=device, memory_format=torch.channels_last)
    k, classify = len(classes), args.lambda_ac > 0  # classify: AC-GAN's head in D
    generator = Generator(args.latent_dim, args.channels, args.image_size, args.g_width, k,
                          args.embed_dim).to(**fast)  # fmt: skip
    critic = Critic(args.channels, args.image_size, args.d_width, k, classify).to(**fast)
    ema = copy.deepcopy(generator).requires_grad_(False) if args.ema_halflife else None
    sample_net = generator if ema is None else ema
    G, D = generator, critic
    if world_size > 1:  # DDP averages the gradients
        G, D = (nn.parallel.DistributedDataParallel(m) for m in (G, D))
    D_eager = D  # GP's double backward: compiled code has none
    if args.compile:
        G, D = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), args.lr_g, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), args.lr_d, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    rows = min(k, 16)  # the grids: a row per class (the first 16), a noise per column
    fixed_noise = torch.randn(8, args.latent_dim).repeat(rows, 1).to(device)
    fixed_labels = torch.arange(rows, device=device).repeat_interleave(8)
    state = dict(generator=generator, critic=critic, ema=ema, opt_g=opt_g)
    state.update(opt_d=opt_d, scaler=scaler)
    if ckpt:
        restore(ckpt, state, path)
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):
            opt.param_groups[0].update(lr=lr, betas=betas)

    if args.generate:  # num_images PNGs into generated/<class>/
        out = run_dir / "generated"
        tmp = run_dir / f"generated.{os.getpid()}.tmp"
        if out.is_symlink() or out.is_file():
            fail(f"{out} is a link or a file: --generate replaces it")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        folders = [tmp / name.replace("/", "_") for name in classes]  # T-shirt/top: T-shirt_top
        with torch.no_grad():
            sample_net.eval()
            for i in range(args.num_images):  # image i: of class i % k
                y = torch.tensor([i % k], device=device)
                z = torch.randn(1, args.latent_dim, device=device)
                save_png(sample_net(z, y), folders[i % k] / f"{i:06d}.png")
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)  # all or nothing: no half folder
        print(f"wrote {args.num_images} images to {out}/<class>/")
        sys.exit()

    if rank == 0:
        claim(run_dir, new=not ckpt)
        writer = SummaryWriter(run_dir, purge_step=ckpt["step"] + 1 if ckpt else None)
    of_class = (labels == torch.arange(rows)[:, None]) + 1e-9  # 8 reals a row (any if none)
    real_grid = images[torch.multinomial(of_class, 8, True).flatten()] / 127.5 - 1
    images, labels = images.to(**fast), labels.to(device)
    step = ckpt["step"] if ckpt else 0
    first = step * args.n_critic
    batches = batch_indices(len(images), args.batch_size, args.seed, first, rank, world_size)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    stopping = False
    gp = torch.zeros((), device=device)  # logged: the last GP

    progress = tqdm(total=args.total_steps, initial=step, disable=rank or not sys.stderr)
    while step < args.total_steps and not stopping:
        torch.manual_seed(hash((args.seed, rank, step)))  # step k's noise, as resumed

        # ---- The GAN step (Algorithm 1), conditioned on y ----
        # The critic: n_critic steps on L_D = E[D(x~, y)] - E[D(x, y)] + lambda GP
        #   + lambda_ac E[-log C(y | x)]
        for i in range(args.n_critic):
            batch = next(batches)
            x, y = images[batch].float() / 127.5 - 1, labels[batch]  # x, y ~ P_r
            if args.augment_flip:  # each image's own coin
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            with autocast:
                with torch.no_grad():  # the fakes take the reals' labels: x^ has one class
                    x_fake = G(z, y)  # x~ = G(z, y), no gradient into G
                (d_real, logits), (d_fake, _) = D(x, y), D(x_fake, y)
                wasserstein = d_real.float().mean() - d_fake.float().mean()
                ac = auxiliary_classifier_loss(logits, y)
                d_loss = -wasserstein + args.lambda_ac * ac
                if (step * args.n_critic + i) % args.gp_every == 0:  # lazy: times gp_every
                    # D(., y): the scores alone
                    critic_of_y = lambda x_hat: D_eager(x_hat, y)[0]  # noqa: E731, B023
                    gp = gradient_penalty(critic_of_y, x, x_fake, None, scaler.get_scale())
                    d_loss = d_loss + args.gp_every * args.lambda_gp * gp
            optimizer_step(d_loss, opt_d, scaler)

        # The generator: one step on L_G = -E[D(G(z, y), y)] + lambda_ac E[-log C(y | G(z, y))]
        y = labels[torch.randint(len(labels), (args.batch_size,), device=device)]  # as the data
        critic.requires_grad_(False)  # gradients through D, none for it
        z = torch.randn_like(z)  # a fresh z
        with autocast:
            scores, logits = D(G(z, y), y)
            g_loss = -scores.float().mean() + args.lambda_ac * auxiliary_classifier_loss(logits, y)
        optimizer_step(g_loss, opt_g, scaler)
        critic.requires_grad_(True)
        # ---- End of the GAN step ----

        # ---- Plumbing: EMA, logs, checkpoints, stops ----
        if ema is not None:  # weights of ema_halflife images ago count half
            decay = 0.5 ** (args.batch_size * world_size / args.ema_halflife)
            decay = min(decay, (1 + step) / (10 + step))
            for average, weight in zip(ema.parameters(), generator.parameters()):
                average.lerp_(weight, 1 - decay)
            ema.load_state_dict(dict(generator.named_buffers()), strict=False)
        step += 1
        progress.update()
        stopping = bool(stop_requests)
        if world_size > 1:  # one process's stop stops all (a GPU sync)
            stop = torch.tensor(float(stopping), device=device)
            torch.distributed.all_reduce(stop, torch.distributed.ReduceOp.MAX)
            stopping = bool(stop)
        save = step % args.sample_every == 0 or step == args.total_steps or stopping
        if rank == 0 and (save or step % args.log_every == 0):
            # diverged: a weight not finite in the autocast dtype, or fp16's scale < 1
            weights = itertools.chain(generator.parameters(), critic.parameters())
            finite = all(w.to(amp_dtype or w.dtype).isfinite().all() for w in weights)
            if not finite or scaler.get_scale() < 1:
                fail(f"training diverged at step {step}: a weight is not finite; not saved")
            losses = {"wasserstein_estimate": wasserstein, "gradient_penalty": gp}
            # L_D with the last GP: a lazy GP skips steps
            d_loss = -wasserstein + args.lambda_gp * gp + args.lambda_ac * ac
            losses.update(critic=d_loss, generator=g_loss)
            for name, value in losses.items():
                if value.isfinite():  # fp16 skips a step that overflowed
                    writer.add_scalar(f"losses/{name}", value, step)
        if rank == 0 and save:
            with torch.no_grad():
                samples = sample_net.eval()(fixed_noise, fixed_labels).cpu().float()
                grid = save_png(samples, run_dir / f"samples/{step:07d}.png")
                pairs = torch.cat(
                    [real_grid.unflatten(0, (-1, 8)), samples.unflatten(0, (-1, 8))], 1
                )
                save_png(pairs.flatten(0, 1), run_dir / "real_vs_fake.png", 16)
            writer.add_image("samples/fixed_noise", grid, step)
            generator.train()
            saved = {k: v.state_dict() if v is not None else None for k, v in state.items()}
            saved.update(kind=script, args=dataclasses.asdict(args), step=step, classes=classes)
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            write_atomic(run_dir / "checkpoint.pt", buffer.getvalue())

    # ---- Plumbing: the end ----
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        writer.close()
        end = f"finished at step {step}: {run_dir}"
        if stopping:
            path = shlex.quote(f"{run_dir}/checkpoint.pt")
            end = f"stopped at step {step}: {run_dir}; continue with: "
            end += f"python {script}.py --resume {path}"
        with contextlib.suppress(OSError):  # a closed terminal
            print(end)
    if stopping:
        sys.exit(128 + (stop_requests[0] if stop_requests else signal.SIGTERM))
