"""DCGAN: a GAN of two convolutional networks, with the tricks that face generation uses.

Radford et al. 2015 (arXiv:1511.06434) with the non-saturating loss; off by default: label
smoothing, noisy labels. Trains on Fashion-MNIST by default; see docs/dcgan.md.
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
    total_steps: int = 15000
    """generator steps"""
    batch_size: int = 64
    """images per step and process"""
    latent_dim: int = 100
    """size of z"""
    lr_g: float = 2e-4
    """G's learning rate"""
    lr_d: float = 2e-4
    """D's learning rate"""
    beta1: float = 0.5
    """Adam's beta1"""
    beta2: float = 0.999
    """Adam's beta2"""
    ema_halflife: float = 10000.0
    """half-life in images of G's moving average, which samples; 0: off"""
    g_width: Optional[int] = None
    """G's last hidden channels; default 32 up to 32 px, else 64"""
    d_width: Optional[int] = None
    """D's first channels; default 32 up to 32 px, else 64"""
    real_label: tuple[float, ...] = (1.0,)
    """reals' target: 0.9 (label smoothing), or LOW HIGH drawn per image"""


# ---- The method ----
def init_weights(m):  # Radford et al.: weights ~ N(0, 0.02), BN's scales ~ N(1, 0.02)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)


class Generator(nn.Sequential):
    def __init__(self, latent_dim, channels, image_size, width):
        n_up = int(math.log2(image_size)) - 2
        ch = width * 2 ** (n_up - 1)
        layers = [nn.Unflatten(1, (latent_dim, 1, 1))]
        layers += [nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False)]  # (B, ch, 4, 4)
        layers += [nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n_up - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]  # (B, C, S, S)
        super().__init__(*layers)
        self.apply(init_weights)


class Discriminator(nn.Sequential):
    def __init__(self, channels, image_size, width):
        n_down = int(math.log2(image_size)) - 2
        layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for _ in range(n_down - 1):  # (B, ch, s, s) -> (B, 2ch, s/2, s/2)
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0), nn.Flatten(0)]  # (B,) logits
        super().__init__(*layers)
        self.apply(init_weights)


# D(x) = sigmoid(logit); BCE on logits is autocast-safe, where sigmoid and BCELoss are not
def discriminator_loss(real_logits, fake_logits, targets):
    """L_D = -E[y log D(x) + (1 - y) log(1 - D(x))] - E[log(1 - D(G(z)))], y: targets."""
    real = nn.functional.binary_cross_entropy_with_logits(real_logits, targets)
    zeros = torch.zeros_like(fake_logits)
    return real + nn.functional.binary_cross_entropy_with_logits(fake_logits, zeros)


def generator_loss(fake_logits):
    """L_G = -E[log D(G(z))]: non-saturating, where E[log(1 - D(G(z)))] would vanish."""
    ones = torch.ones_like(fake_logits)
    return nn.functional.binary_cross_entropy_with_logits(fake_logits, ones)


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
    args.image_size = args.image_size or (64 if args.dataset in ("celeba", "folder") else 32)
    width = 32 if args.image_size <= 32 else 64
    args.g_width = args.g_width or width
    args.d_width = args.d_width or width
    counts = "total_steps batch_size latent_dim g_width d_width"
    counts += " log_every sample_every num_images max_images"
    rules = [
        ("image_size", lambda v: v in (16, 32, 64, 128, 256), "a power of two from 16 to 256"),
        ("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
        (counts, lambda v: v is None or v >= 1, ">= 1"),
        ("lr_g lr_d", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("ema_halflife", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("beta1 beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        # a target is a probability (0.5 100 trained to a loss of -239); ganhacks: up to 1.2
        (
            "real_label",
            lambda v: 0 < len(v) < 3 and 0.5 <= v[0] <= v[-1] <= 1.2,
            "LOW or LOW HIGH in [0.5, 1.2]",
        ),  # fmt: skip
    ]
    for names, ok, rule in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")


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
        images, _ = load_dataset(args)
    script = Path(__file__).stem
    args.run_name = args.run_name or f"{args.dataset}__{script}__{args.seed}__{int(time.time())}"
    run_dir = Path(path).resolve().parent if ckpt else Path("runs", args.run_name)

    torch.manual_seed(args.seed)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    # channels_last, (B, H, W, C) in memory: 1.13-1.30x CPU steps
    fast = dict(device=device, memory_format=torch.channels_last)
    generator = Generator(args.latent_dim, args.channels, args.image_size, args.g_width).to(**fast)
    discriminator = Discriminator(args.channels, args.image_size, args.d_width).to(**fast)
    ema = copy.deepcopy(generator).requires_grad_(False) if args.ema_halflife else None
    sample_net = generator if ema is None else ema
    G, D = generator, discriminator
    if world_size > 1:  # DDP averages the gradients
        G, D = (nn.parallel.DistributedDataParallel(m) for m in (G, D))
    if args.compile:
        G, D = torch.compile(G, dynamic=False), torch.compile(D, dynamic=False)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), args.lr_g, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), args.lr_d, betas=betas)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fixed_noise = torch.randn(64, args.latent_dim).to(device)  # after the weights: as resumed
    state = dict(generator=generator, discriminator=discriminator, ema=ema, opt_g=opt_g)
    state.update(opt_d=opt_d, scaler=scaler)
    if ckpt:
        restore(ckpt, state, path)
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):
            opt.param_groups[0].update(lr=lr, betas=betas)

    if args.generate:
        out = run_dir / "generated"
        tmp = run_dir / f"generated.{os.getpid()}.tmp"
        if out.is_symlink() or out.is_file():
            fail(f"{out} is a link or a file: --generate replaces it")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        with torch.no_grad():
            sample_net.eval()
            for i in range(args.num_images):
                z = torch.randn(1, args.latent_dim, device=device)
                save_png(sample_net(z), tmp / f"{i:06d}.png")
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)  # all or nothing: no half folder
        print(f"wrote {args.num_images} images to {out}")
        sys.exit()

    if rank == 0:
        claim(run_dir, new=not ckpt)
        writer = SummaryWriter(run_dir, purge_step=ckpt["step"] + 1 if ckpt else None)
    real_grid = images[torch.arange(64) % len(images)] / 127.5 - 1  # cycled
    images = images.to(**fast)
    step = ckpt["step"] if ckpt else 0
    first = step  # one batch a step
    batches = batch_indices(len(images), args.batch_size, args.seed, first, rank, world_size)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    stopping = False

    progress = tqdm(total=args.total_steps, initial=step, disable=rank or not sys.stderr)
    while step < args.total_steps and not stopping:
        torch.manual_seed(hash((args.seed, rank, step)))  # step k's noise, as resumed

        # ---- The GAN step: one D step, one G step ----
        x = images[next(batches)].float() / 127.5 - 1  # x ~ P_r, in [-1, 1]
        z = torch.randn(args.batch_size, args.latent_dim, device=device)
        with autocast:
            x_fake = G(z)  # x~ = G(z); its graph serves the G step too
            # reals and fakes apart: D's batch norm normalises each batch alone
            real_logits = D(x).float()
            fake_logits = D(x_fake.detach()).float()  # detached: trains D only
        targets = torch.empty_like(real_logits).uniform_(args.real_label[0], args.real_label[-1])
        d_loss = discriminator_loss(real_logits, fake_logits, targets)
        d_real, d_fake = real_logits.sigmoid().mean(), fake_logits.sigmoid().mean()
        optimizer_step(d_loss, opt_d, scaler)

        discriminator.requires_grad_(False)  # gradients through D, none for it
        with autocast:
            g_loss = generator_loss(D(x_fake).float())
        optimizer_step(g_loss, opt_g, scaler)
        discriminator.requires_grad_(True)
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
            weights = itertools.chain(generator.parameters(), discriminator.parameters())
            finite = all(w.to(amp_dtype or w.dtype).isfinite().all() for w in weights)
            if not finite or scaler.get_scale() < 1:
                fail(f"training diverged at step {step}: a weight is not finite; not saved")
            losses = {"losses/discriminator": d_loss, "losses/generator": g_loss}
            losses.update({"charts/d_real": d_real, "charts/d_fake": d_fake})
            for name, value in losses.items():
                if value.isfinite():  # fp16 skips a step that overflowed
                    writer.add_scalar(name, value, step)
        if rank == 0 and save:
            with torch.no_grad():
                samples = sample_net.eval()(fixed_noise).cpu().float()
                grid = save_png(samples, run_dir / f"samples/{step:07d}.png")
                pairs = torch.cat([real_grid.unflatten(0, (8, 8)), samples.unflatten(0, (8, 8))], 1)
                save_png(pairs.flatten(0, 1), run_dir / "real_vs_fake.png", 16)
            writer.add_image("samples/fixed_noise", grid, step)
            generator.train()
            saved = {k: v.state_dict() if v is not None else None for k, v in state.items()}
            saved.update(kind=script, args=dataclasses.asdict(args), step=step)
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
