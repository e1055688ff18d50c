"""The data block on fixtures in each dataset's real on-disk format, and the resumable data order. The block is
byte-identical in every script (test_structure.py), so it is tested on one."""

import multiprocessing
import os
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, SCRIPTS, SHARED_SCRIPT, expect_error, load, run, tiny
from PIL import Image

data = load(SHARED_SCRIPT)


def args_for(**overrides):
    args = data.Args(**{"batch_size": 2, **overrides})
    data.check_args(args)
    return args


def write_idx(path, array: np.ndarray):
    with open(path, "wb") as f:
        f.write(
            b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        )
        f.write(array.astype(np.uint8).tobytes())


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
# Flags a script needs to train on CelebA: the conditional one takes its classes from attributes.
CELEBA_FLAGS = {"cond_wgan_gp": ["--celeba-attrs", "Male", "Smiling", "Young"]}


def write_celeba(root, n: int, attributes=None):
    """torchvision's CelebA layout: <root>/celeba/img_align_celeba/000001.jpg, 178x218 like the aligned set, and
    list_attr_celeba.txt (a count, the 40 names, a line of 1/-1 per image; `attributes` maps image i to its list).
    Each image is green in the middle and red in the top and bottom 20 rows, which the center crop removes."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    for i in range(n):
        pixels = np.zeros((218, 178, 3), np.uint8)
        pixels[:, :, 1] = 200
        pixels[:20], pixels[-20:] = (255, 0, 0), (255, 0, 0)
        Image.fromarray(pixels).save(folder / f"{i + 1:06d}.jpg", quality=98)
        # Male, Smiling, Young: bits 2, 1, 0 of i
        values = (
            attributes(i) if attributes else [1 if (i >> (k % 3)) & 1 else -1 for k in range(40)]
        )
        lines.append(
            f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in values)
        )  # CelebA pads the values to width 2
    (root / "celeba" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_batch_indices_resume_mid_stream_and_cover_each_epoch():
    stream = data.batch_indices(10, 3, seed=7, start=0)
    first = [next(stream) for _ in range(7)]
    resumed = data.batch_indices(10, 3, seed=7, start=4)
    for k in range(4, 7):
        assert torch.equal(next(resumed), first[k])
    epoch = torch.cat(first[:3])  # 3 full batches of 3 per epoch, the 10th image dropped
    assert len(set(epoch.tolist())) == 9
    assert not torch.equal(torch.cat(first[3:6]), epoch)  # a new order each epoch


def test_batch_indices_of_two_ranks_split_each_batch_of_the_job():
    job = data.batch_indices(24, 6, seed=3, start=0)
    ranks = [data.batch_indices(24, 3, seed=3, start=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # one and a half epochs
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), next(job))


def test_shipped_fashion_mnist_is_extracted_and_read_by_torchvision():
    args = args_for()
    images, source = data.load_dataset(args)
    assert images.shape == (60000, 1, 32, 32) and images.dtype == torch.uint8 and args.channels == 1
    assert isinstance(source, torchvision.datasets.FashionMNIST)  # the dataset, not a list of files
    labels = torch.as_tensor(source.targets)
    assert torch.bincount(labels).tolist() == [6000] * 10 and source.classes[9] == "Ankle boot"
    raw = ROOT / "data" / "FashionMNIST" / "raw"
    assert (
        raw / "train-images-idx3-ubyte"
    ).stat().st_size == 16 + 60000 * 28 * 28  # the extracted idx file
    assert not list(raw.glob("*.tmp"))
    # The resize to 32 px keeps the picture: mean brightness within 1 of the 28 px original (72.94 for the train set).
    assert abs(images.float().mean().item() - 72.94) < 1


def test_mnist_in_torchvision_layout_keeps_its_one_channel(tmp_path):
    """The channels come from the data (--channels is no flag any more): MNIST's gray stays one channel."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (12, 28, 28))
    for split in ("train", "t10k"):  # torchvision checks that all four files are there
        write_idx(raw / f"{split}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(12) % 10)
    args = args_for(dataset="mnist", data_dir=str(tmp_path), image_size=16)
    images, source = data.load_dataset(args)
    assert images.shape == (12, 1, 16, 16) and images.dtype == torch.uint8 and args.channels == 1
    assert torch.as_tensor(source.targets).tolist() == [i % 10 for i in range(12)]


def test_cifar10_python_pickles_in_rgb(tmp_path, monkeypatch):
    # A fixture cannot match the md5s of the real files that torchvision checks; the pickles are in their format.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 3072), dtype=np.uint8) for _ in range(5)]
    for i, pixels in enumerate(batches, 1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({"data": pixels, "labels": [i] * 4}))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"class{k}" for k in range(10)]})
    )
    args = args_for(dataset="cifar10", data_dir=str(tmp_path))
    images, source = data.load_dataset(args)
    assert images.shape == (20, 3, 32, 32) and args.channels == 3 and source.classes[1] == "class1"
    assert torch.equal(
        images[4], torch.from_numpy(batches[1][0]).view(3, 32, 32)
    )  # no resize at 32 px
    assert source.targets == [i for i in range(1, 6) for _ in range(4)]


def test_celeba_layout_is_center_cropped_then_resized(tmp_path):
    write_celeba(tmp_path, 3)
    args = args_for(dataset="celeba", data_dir=str(tmp_path))
    images, files = data.load_dataset(args)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8 and args.image_size == 64
    assert [f.name for f in files] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert (
        images[:, 0].float().mean() < 10 and images[:, 1].float().mean() > 190
    )  # the red bands were cropped away


def test_folder_is_recursive_skips_non_images_and_decodes_gray_as_rgb(tmp_path):
    """(The class labels of a folder's subfolders are cond_wgan_gp's: test_cond_wgan_gp.py.)"""
    for sub, n in (("cats", 2), ("dogs/big", 3)):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (40, 30), color=i * 50).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "top.png").write_bytes((tmp_path / "cats" / "0.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image, and not named like one")
    args = args_for(dataset="folder", data_dir=str(tmp_path), image_size=16)
    images, files = data.load_dataset(args)
    assert [str(f.relative_to(tmp_path)) for f in files] == [
        "cats/0.png",
        "cats/1.png",
        "dogs/big/0.png",
        "dogs/big/1.png",
        "dogs/big/2.png",
        "top.png",
    ]
    assert images.shape == (6, 3, 16, 16) and args.channels == 3  # a folder always decodes as RGB
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert images[:, 0, 0, 0].tolist() == [0, 50, 0, 50, 100, 0]  # each file's own gray


def test_16_bit_png_keeps_its_brightness(tmp_path):
    """PIL opens a 16-bit grayscale PNG as mode I;16, and convert("L") clips every value above 255 to white."""
    (tmp_path / "images").mkdir()
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520, mean 32760
    Image.fromarray(ramp).save(tmp_path / "images" / "a.png")
    assert Image.open(tmp_path / "images" / "a.png").mode == "I;16"
    args = args_for(
        dataset="folder", data_dir=str(tmp_path / "images"), image_size=64, batch_size=1
    )
    images = data.load_dataset(args)[0].float()
    assert images.shape == (1, 3, 64, 64)
    # 128, where clipping gives 254
    assert abs(images.mean().item() - 32760 / 256) < 1.5, images.mean()


def test_every_image_is_decoded_before_training_and_a_broken_one_is_named(tmp_path):
    """A truncated JPEG whose header reads fine stops the run before any run folder exists, naming the file."""
    folder = write_celeba(tmp_path / "data", 16)
    broken = folder / "000007.jpg"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) * 2 // 3])  # the header reads, the pixels do not
    flags = [*tiny(SHARED_SCRIPT), *"--dataset celeba --data-dir data --image-size 32".split()]
    result = run(SHARED_SCRIPT, *flags, "--total-steps", "3", cwd=tmp_path)
    expect_error(
        result,
        r"^error: data/celeba/img_align_celeba/000007\.jpg is not an image that torchvision reads$",
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_on_celeba(script, tmp_path):
    write_celeba(tmp_path / "data", 16)
    flags = [*tiny(script), *"--dataset celeba --data-dir data --image-size 32".split()]
    flags += ["--total-steps", "2"]
    result = run(script, *flags, *CELEBA_FLAGS.get(script, []), "--run-name", "faces", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"decoding: 100%\|[^|]*\| 16/16 ", result.stderr), result.stderr[-3000:]
    rows = {"cond_wgan_gp": 8}.get(script, 8)  # cond: one row per class, 2^3 classes
    with Image.open(tmp_path / "runs/faces/samples/0000002.png") as grid:
        assert grid.mode == "RGB" and grid.size == (8 * 34 + 2, rows * 34 + 2)


def test_a_phone_photo_decodes_the_way_up_its_exif_orientation_says(tmp_path):
    """Orientation 6: the sensor's pixels are to be turned 90 degrees clockwise, as every viewer shows them."""
    (tmp_path / "images").mkdir()
    sensor = np.zeros((32, 64, 3), np.uint8)
    sensor[:, :32] = 255  # as stored: white on the left half, 64 wide and 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(sensor).save(tmp_path / "images" / "phone.jpg", exif=exif, quality=95)
    decoded = data.decode(tmp_path / "images" / "phone.jpg", 16)
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
    pixels = decoded[0].float()
    # Shown: 32 wide and 64 high, white on top; its center square is 32x32 of the middle, resized to 16
    assert (
        pixels[:8].mean() > 200 and pixels[8:].mean() < 50
    )  # upright, not sideways (left/right halves)


@pytest.mark.parametrize("mode, values", [("F", np.float32(0.5)), ("I", np.int32(30000))])
def test_32_bit_tiffs_are_skipped_with_a_note(mode, values, tmp_path, capsys):
    """A float32 TIFF of 0.5 once decoded to black and an int32 one of 30000 to white: no range is agreed on. TIFF is
    no type that is read: such a file is left out, and named, not decoded to a wrong brightness."""
    write_folder(tmp_path / "images", 2)
    Image.fromarray(np.full((8, 8), values)).save(tmp_path / "images" / "deep.tif")
    assert Image.open(tmp_path / "images" / "deep.tif").mode == mode
    images, files = data.load_dataset(args_for(dataset="folder", data_dir=str(tmp_path / "images")))
    assert [f.name for f in files] == ["000.jpg", "001.jpg"] and len(images) == 2
    note = f"note: skipped the types .tif in {tmp_path / 'images'}"
    assert note in capsys.readouterr().err.splitlines()


def test_symlinked_folders_are_followed_and_an_unreadable_one_stops_the_run(tmp_path, monkeypatch):
    for folder, shade in (("real/cats", 0), ("elsewhere/dogs", 200)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16), color=shade + i).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "real" / "dogs").symlink_to(
        tmp_path / "elsewhere" / "dogs", target_is_directory=True
    )
    args = args_for(dataset="folder", data_dir=str(tmp_path / "real"), image_size=16)
    images, files = data.load_dataset(args)
    assert [f.relative_to(tmp_path / "real").parts[0] for f in files] == ["cats"] * 2 + ["dogs"] * 2
    assert images[:2].float().mean() < 10 and images[2:].float().mean() > 190
    scandir = (
        data.os.scandir
    )  # as root every folder reads: a scandir that refuses one stands for chmod 000

    def refusing(path="."):
        if str(path).endswith("dogs"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(data.os, "scandir", refusing)
    with pytest.raises(SystemExit, match=r"^error: Permission denied: .*real/dogs$"):
        data.load_dataset(args)  # not 2 of 4 images in silence


# Shared memory full, as in a container with Docker's 64 MB of /dev/shm: every attempt of a process to share a tensor
# through it fails the way torch's does there.
NO_SHARED_MEMORY = """
import torch
def full(*args, **kwargs):
    raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_1_1>: No space left on device (28)")
torch.UntypedStorage._share_fd_cpu_ = torch.UntypedStorage._share_filename_cpu_ = full
"""


def write_folder(folder, n: int, size: int = 40) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 3 % 256, 100, 50)).save(folder / f"{i:03d}.jpg")


def test_a_folder_decodes_when_shared_memory_is_full(tmp_path):
    """Decoding workers' batches once went through /dev/shm: there, full, they died in the worker's sending thread
    and the run waited for them for ever. The decode is serial now; a full /dev/shm must not matter."""
    write_folder(tmp_path / "images", 16)
    flags = [
        *tiny(SHARED_SCRIPT),
        "--dataset",
        "folder",
        "--data-dir",
        "images",
        "--image-size",
        "16",
    ]
    result = run(SHARED_SCRIPT, *flags, "--max-images", "16", "--total-steps", "1", cwd=tmp_path, timeout=60,
                 prelude=NO_SHARED_MEMORY, fresh=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"decoding: 100%\|[^|]*\| 16/16 ", result.stderr), result.stderr[-3000:]


def can_mount_a_small_dev_shm() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(
    not can_mount_a_small_dev_shm(), reason="needs root and unshare to mount a small /dev/shm"
)
def test_a_folder_decodes_with_a_real_256_kb_dev_shm(tmp_path):
    write_folder(
        tmp_path / "images", 64, size=80
    )  # one batch of 64 images at 64 px: 786 KB, over the 256 KB
    command = [
        sys.executable,
        str(ROOT / f"{SHARED_SCRIPT}.py"),
        *tiny(SHARED_SCRIPT),
        "--dataset",
        "folder",
    ]
    command += ["--data-dir", "images", "--image-size", "64", "--total-steps", "1"]
    mount = "mount -t tmpfs -o size=256k tmpfs /dev/shm && exec " + shlex.join(command)
    result = subprocess.run(["unshare", "-m", "sh", "-c", mount], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and "finished at step 1" in result.stdout, result.stderr[-3000:]


def test_a_folder_decodes_in_the_main_process_with_no_child_process(tmp_path, monkeypatch):
    """Decoding once ran in DataLoader workers, and a worker killed by the out-of-memory killer stopped the run.
    Now every file is decoded in turn in the main process, in its main thread: no process is started, none can die."""
    write_folder(tmp_path / "images", 16)

    def no_child(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(os, "fork", no_child)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_child)
    monkeypatch.setattr(subprocess.Popen, "__init__", no_child)
    main, decoded, decode = os.getpid(), [], data.decode

    def recording(file, size):
        decoded.append(
            (file.name, os.getpid(), threading.current_thread() is threading.main_thread())
        )
        return decode(file, size)

    monkeypatch.setattr(data, "decode", recording)
    args = args_for(dataset="folder", data_dir=str(tmp_path / "images"), image_size=16)
    images, files = data.load_dataset(args)
    assert decoded == [(f"{i:03d}.jpg", main, True) for i in range(16)]
    assert images.shape == (16, 3, 16, 16) and len(files) == 16
    assert abs(images[:, 1].float().mean().item() - 100) < 3  # the green of write_folder's images


def test_a_truncated_archive_is_named_and_not_extracted(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in (ROOT / "data" / "FashionMNIST" / "raw").glob("*.gz"):
        shutil.copy(archive, raw)
    cut = raw / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:100_000])  # a download cut short
    with pytest.raises(SystemExit) as stop:
        data.load_dataset(args_for(data_dir=str(tmp_path)))
    assert str(stop.value) == (
        f"error: {cut} is damaged (Compressed file ended before the end-of-stream marker was reached): delete it to "
        "download it again, or copy it anew"
    )
    assert not (raw / "train-images-idx3-ubyte").exists()


def test_files_of_types_that_are_not_read_are_named(tmp_path, capsys):
    """Only JPEG, PNG, GIF and WebP are read; BMP, TIFF, AVIF and HEIC files are skipped, and their types named."""
    write_folder(tmp_path / "images", 2)
    for kind in ("avif", "bmp", "tif"):  # each a real image of its type, which PIL would read
        Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "images" / f"modern.{kind}")
    (tmp_path / "images" / "phone.HEIC").write_bytes(
        b"\x00\x00\x00\x18ftypheic"
    )  # needs a plugin: skipped
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "images" / "sub" / "notes.txt").write_text("a caption")
    images, files = data.load_dataset(args_for(dataset="folder", data_dir=str(tmp_path / "images")))
    assert [f.name for f in files] == ["000.jpg", "001.jpg"] and len(images) == 2
    note = f"note: skipped the types .avif .bmp .heic .tif .txt in {tmp_path / 'images'}"
    assert note in capsys.readouterr().err.splitlines()
