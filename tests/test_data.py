"""The data block on fixtures in each dataset's real on-disk format, and the resumable data order."""

import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, tiny, last_line, load, run
from PIL import Image


def args_for(script, **overrides):
    module = load(script)
    args = module.Args(**{"batch_size": 2, **overrides})
    module.check_args(args)
    return module, args


def write_idx(path, array: np.ndarray):
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair "
    "Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
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
        values = attributes(i) if attributes else [1 if (i >> (k % 3)) & 1 else -1 for k in range(40)]  # Male, Smiling, Young: bits 2, 1, 0
        lines.append(f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in values))  # CelebA pads the values to width 2
    (root / "celeba" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_indices_resume_mid_stream_and_cover_each_epoch(script):
    BatchIndices = load(script).BatchIndices
    stream = iter(BatchIndices(10, 3, seed=7, start=0))
    first = [next(stream) for _ in range(7)]
    resumed = iter(BatchIndices(10, 3, seed=7, start=4))
    for k in range(4, 7):
        assert torch.equal(next(resumed), first[k])
    epoch = torch.cat(first[:3])  # 3 full batches of 3 per epoch, the 10th image dropped
    assert len(set(epoch.tolist())) == 9
    assert not torch.equal(torch.cat(first[3:6]), epoch)  # a new order each epoch


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_indices_of_two_ranks_split_each_batch_of_the_job(script):
    BatchIndices = load(script).BatchIndices
    job = iter(BatchIndices(24, 6, seed=3, start=0))
    ranks = [iter(BatchIndices(24, 3, seed=3, start=0, rank=r, world_size=2)) for r in range(2)]
    for _ in range(6):  # one and a half epochs
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), next(job))


@pytest.mark.parametrize("script", SCRIPTS)
def test_embedded_fashion_mnist(script):
    module, args = args_for(script)
    data = module.load_dataset(args)
    assert data.images.shape == (60000, 1, 32, 32) and data.images.dtype == torch.uint8
    assert args.channels == 1
    assert torch.bincount(data.labels).tolist() == [6000] * 10
    assert data.classes[9] == "Ankle boot"


@pytest.mark.parametrize("script", SCRIPTS)
def test_mnist_in_torchvision_layout(script, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (12, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", pixels)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    module, args = args_for(script, dataset="mnist", data_dir=str(tmp_path), image_size=16, channels=3)
    data = module.load_dataset(args)
    assert data.images.shape == (12, 3, 16, 16)
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # gray repeated into RGB
    assert data.labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_cifar10_python_pickles(script, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 3072), dtype=np.uint8) for _ in range(5)]
    for i, data in enumerate(batches, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [i] * 4}, f)
    module, args = args_for(script, dataset="cifar10", data_dir=str(tmp_path))
    data = module.load_dataset(args)
    assert data.images.shape == (20, 3, 32, 32) and args.channels == 3
    assert torch.equal(data.images[4], torch.from_numpy(batches[1][0]).view(3, 32, 32))  # no resize at 32 px
    assert data.labels.tolist() == [i for i in range(1, 6) for _ in range(4)]
    module, args = args_for(script, dataset="cifar10", data_dir=str(tmp_path), channels=1)
    gray = module.load_dataset(args).images[0, 0].float()
    rgb = torch.from_numpy(batches[0][0]).view(3, 32, 32).float()
    assert (gray - (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])).abs().max() <= 0.5


@pytest.mark.parametrize("script", SCRIPTS)
def test_celeba_layout_is_center_cropped_then_resized(script, tmp_path):
    write_celeba(tmp_path, 3)
    module, args = args_for(script, dataset="celeba", data_dir=str(tmp_path))
    data = module.load_dataset(args)
    assert len(data.files) == 3 and data.images is None and args.image_size == 64 and args.channels == 3
    pixels, _ = module.ImageFiles(data.files, data.labels, args.image_size, args.channels)[0]
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
    assert pixels[0].float().mean() < 10 and pixels[1].float().mean() > 190  # the red bands were cropped away


@pytest.mark.parametrize("script", SCRIPTS)
def test_folder_is_recursive_and_skips_non_images(script, tmp_path):
    for sub, n in (("cats", 2), ("dogs/big", 3)):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (40, 30), color=i * 50).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "top.png").write_bytes((tmp_path / "cats" / "0.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image, and not named like one")
    module, args = args_for(script, dataset="folder", data_dir=str(tmp_path), image_size=16, channels=1)
    data = module.load_dataset(args)
    assert len(data.files) == 6
    assert data.classes == ["cats", "dogs"]
    assert sorted(data.labels.tolist()) == [-1, 0, 0, 1, 1, 1]
    pixels, _ = module.ImageFiles(data.files, data.labels, 16, 1)[0]
    assert pixels.shape == (1, 16, 16)


@pytest.mark.parametrize("script", SCRIPTS)
def test_image_cache_is_written_once_then_read_and_checked(script, tmp_path):
    folder = write_celeba(tmp_path, 5)
    cache = tmp_path / "cache" / "celeba32.pt"
    module, args = args_for(script, dataset="celeba", data_dir=str(tmp_path), image_size=32, num_workers=0, image_cache=str(cache))
    data = module.load_dataset(args)
    files = module.ImageFiles(sorted(folder.glob("*.jpg")), data.labels, 32, 3)
    streamed = torch.stack([files[i][0] for i in range(5)])
    assert data.images.shape == (5, 3, 32, 32) and torch.equal(data.images, streamed)  # the same pixels as streaming
    assert cache.exists() and not list(cache.parent.glob("*.tmp"))
    stored = torch.load(cache, weights_only=True)
    stored["images"].zero_()  # a marker: a second run must take its pixels from the cache, not decode again
    torch.save(stored, cache)
    assert module.load_dataset(args).images.max() == 0
    _, other = args_for(script, dataset="celeba", data_dir=str(tmp_path), image_size=16, num_workers=0, image_cache=str(cache))
    with pytest.raises(SystemExit, match=r"^error: --image-cache .*celeba32.pt holds other images or another size: delete it or name another file$"):
        module.load_dataset(other)


@pytest.mark.parametrize("script", SCRIPTS)
def test_idx_file_that_is_not_one_is_refused(script, tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"GIF89a, not idx")
    with pytest.raises(SystemExit, match="is not an idx file"):
        load(script).read_idx(tmp_path / "train-images-idx3-ubyte")


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_streams_celeba_through_workers(script, tmp_path):
    write_celeba(tmp_path / "data", 16)
    flags = [*tiny(script), "--dataset", "celeba", "--data-dir", "data", "--image-size", "32", "--num-workers", "2", "--total-steps", "2", *CELEBA_FLAGS.get(script, [])]
    result = run(script, *flags, "--run-name", "faces", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(tmp_path / "runs/faces/samples/step_0000002.png") as grid:
        assert grid.mode == "RGB" and grid.size == (8 * 34 + 2, 8 * 34 + 2)


@pytest.mark.parametrize("script", SCRIPTS)
def test_image_that_breaks_mid_file_is_named(script, tmp_path):
    folder = write_celeba(tmp_path / "data", 16)
    broken = folder / "000007.jpg"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) * 2 // 3])  # the header reads, the pixels do not
    flags = [*tiny(script), "--dataset", "celeba", "--data-dir", "data", "--image-size", "32", "--num-workers", "1", "--total-steps", "3", *CELEBA_FLAGS.get(script, [])]
    result = run(script, *flags, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result.stderr).startswith(f"error: cannot decode image data/celeba/img_align_celeba/000007.jpg"), last_line(result.stderr)
