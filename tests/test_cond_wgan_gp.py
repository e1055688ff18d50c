"""cond_wgan_gp.py: labels change what the networks do, every class can be generated, the label sources
(classes, class subfolders, CelebA attributes), the projection critic and its AC term, the flip augmentation,
and bad input."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import tyro
from conftest import copy_run, expect_error, load, load_checkpoint, recorder, run, tiny
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import CELEBA_ATTRIBUTES, write_celeba

cond = load("cond_wgan_gp")
# class folders under data/, as the tests below write them, at 16 pixels
CLASS_FOLDERS = ["--dataset", "folder", "--data-dir", "data", "--image-size", "16"]
# the class folders --generate writes: "T-shirt/top" becomes T-shirt_top
FASHION = [name.replace("/", "_") for name in torchvision.datasets.FashionMNIST.classes]


def pairwise_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> the N*(N-1) mean absolute differences between distinct samples."""
    d = (x[:, None] - x[None]).abs().flatten(2).mean(2)
    return d[~torch.eye(len(x), dtype=torch.bool)]


@torch.no_grad()
def test_generator_output_changes_with_the_label_for_a_fixed_noise():
    torch.manual_seed(0)
    generator = cond.Generator(
        16, 1, 32, 8, 10, 16
    ).eval()  # eval: batch norm uses running statistics, samples independent
    z = torch.randn(1, 16).repeat(10, 1)
    by_label = generator(z, torch.arange(10))
    assert torch.equal(
        generator(z, torch.full((10,), 3)), by_label[3].expand(10, -1, -1, -1)
    )  # same z, same label: same image
    by_noise = generator(torch.randn(10, 16), torch.full((10,), 3))
    # At init every one of the 45 label pairs differs by 0.0024-0.0048 per pixel (seed 0), the same order as a change
    # of z (0.0033 on average); a generator that ignored its label would give exactly 0.
    noise_effect = (by_noise - by_label[3]).abs().flatten(1).mean(1).mean()
    assert pairwise_mean_abs(by_label).min() > 0.3 * noise_effect > 0


def test_critic_score_depends_on_the_label():
    torch.manual_seed(0)
    critic = cond.Critic(1, 32, 8, 10, False)
    x = torch.randn(1, 1, 32, 32).repeat(10, 1, 1, 1)
    scores, logits = critic(x, torch.arange(10))
    assert logits is None and scores.shape == (10,)
    assert (
        pairwise_mean_abs(scores[:, None]).min() > 1e-4
    )  # ten labels, ten different scores of one image
    assert scores.std() > 0.1


def test_projection_adds_the_inner_product_of_the_class_embedding_with_the_pooled_features():
    torch.manual_seed(0)
    critic = cond.Critic(3, 32, 8, 5, False)
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    scores, _ = critic(x, labels)
    h = critic.net(x)  # (6, 32, 4, 4)
    expected = critic.out(h).flatten() + (critic.embed.weight[labels] * h.sum((2, 3))).sum(1)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("image_size", [32, 64])
def test_critic_and_generator_have_their_shapes(image_size):
    torch.manual_seed(0)
    projection = cond.Critic(3, image_size, 8, 7, True)
    plain = cond.Critic(3, image_size, 8, 7, False)
    top = 8 * 2 ** (
        int(math.log2(image_size)) - 3
    )  # channels of the last 4x4 features: 32 at 32 px, 64 at 64 px
    assert projection.net[0].in_channels == 3 and projection.embed.weight.shape == (7, top)
    assert plain.classifier is None and projection.classifier.weight.shape == (7, top)
    x, labels = torch.randn(4, 3, image_size, image_size), torch.tensor([0, 6, 2, 6])
    scores, logits = projection(x, labels)
    assert scores.shape == (4,) and logits.shape == (4, 7)
    scores, logits = plain(x, labels)
    assert scores.shape == (4,) and logits is None
    generator = cond.Generator(16, 3, image_size, 8, 7, 5)
    assert generator.net[1].in_channels == 16 + 5  # after the unflatten to (B, 16 + 5, 1, 1)
    assert generator(torch.randn(4, 16), labels).shape == (4, 3, image_size, image_size)


def test_auxiliary_classifier_loss_is_the_cross_entropy_and_zero_when_off():
    torch.manual_seed(0)
    critic = cond.Critic(1, 32, 8, 10, True)
    labels = torch.arange(8) % 10
    _, logits = critic(torch.randn(8, 1, 32, 32), labels)
    loss = cond.auxiliary_classifier_loss(logits, labels)
    assert torch.isfinite(loss) and loss.item() > 0.5  # about log 10 = 2.3 for an untrained head
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert cond.auxiliary_classifier_loss(torch.zeros(8, 10), labels).item() == pytest.approx(
        math.log(10)
    )
    assert cond.auxiliary_classifier_loss(None, labels).item() == 0.0
    loss.backward()
    assert (
        critic.classifier.weight.grad.abs().sum() > 0 and critic.net[0].weight.grad.abs().sum() > 0
    )  # it trains the features too


def test_augmentation_flips_about_half_of_the_reals_and_nothing_when_off(tmp_path):
    """Recorded in runs on images white on the left and black on the right: each real image the critic sees is
    that image or its mirror, mirrored about half the time with --augment-flip and never without it."""
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.zeros((16, 16, 3), np.uint8)
            pixels[:, :8] = 255
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    flags = [*tiny("cond_wgan_gp"), *CLASS_FOLDERS]
    mirrored = {}
    for flip in (True, False):
        out = tmp_path / f"records_{flip}.pt"
        option = ["--augment-flip"] if flip else []
        result = run("cond_wgan_gp", *flags, *option, "--total-steps", "4", "--run-name", f"flip_{flip}",
                     cwd=tmp_path, prelude=recorder(out, ("Critic",)))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        # The reals are exactly -1 and 1 (0 and 255); fakes, interpolates and the grid's samples are not.
        reals = [
            x[0]
            for _, training, _, x, _ in torch.load(out, weights_only=False)
            if training and torch.isin(x[0], torch.tensor([-1.0, 1.0])).all()
        ]
        assert len(reals) == 4 * 2  # one batch of 8 a critic step, 2 critic steps a step
        reals = torch.cat(reals)
        left = reals[..., :8] == 1
        # whole images, flipped or not
        assert bool((left.all((1, 2, 3)) | (~left).all((1, 2, 3))).all())
        mirrored[flip] = int((~left).all((1, 2, 3)).sum())
    assert 16 <= mirrored[True] <= 48  # of 64: 32 expected, sd 4
    assert mirrored[False] == 0


def test_every_class_can_be_generated_into_its_folder(trained, tmp_path):
    checkpoint = copy_run(trained("cond_wgan_gp"), tmp_path / "all")
    assert load_checkpoint(checkpoint)["classes"][0] == "T-shirt/top"
    result = run("cond_wgan_gp", "--generate", str(checkpoint), "--num-images", "25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {p.name: len(list(p.glob("*.png"))) for p in (tmp_path / "all/generated").iterdir()}
    assert counts == {
        name: 3 if k < 5 else 2 for k, name in enumerate(FASHION)
    }  # 25 images, image i of class i % 10
    assert sorted(p.name for p in (tmp_path / "all/generated/Trouser").iterdir()) == [
        "000001.png",
        "000011.png",
        "000021.png",
    ]
    out = (tmp_path / "all/generated").resolve()
    assert result.stdout.strip().splitlines()[-1] == f"wrote 25 images to {out}/<class>/"
    # The folder names match the class names as benchmarks/quality.py compares them ("T-shirt/top": T-shirt_top).
    normalized = lambda name: re.sub(r"[^a-z0-9]", "", name.lower())  # noqa: E731
    assert [normalized(name) for name in FASHION] == [
        normalized(name) for name in load_checkpoint(checkpoint)["classes"]
    ]


def test_celeba_attributes_become_two_to_the_k_classes(tmp_path):
    male, smiling = CELEBA_ATTRIBUTES.index("Male"), CELEBA_ATTRIBUTES.index("Smiling")
    wanted = [(1, -1), (-1, -1), (1, 1), (-1, 1), (1, -1)]  # (Male, Smiling) of images 1-5
    write_celeba(
        tmp_path,
        5,
        lambda i: [
            wanted[i][0] if k == male else wanted[i][1] if k == smiling else -1 for k in range(40)
        ],
    )
    args = cond.Args(
        dataset="celeba", data_dir=str(tmp_path), batch_size=2, celeba_attrs=("Male", "Smiling")
    )
    cond.check_args(args)
    files = cond.load_dataset(args)[1]
    labels, classes = cond.celeba_classes(
        files, args.celeba_attrs, tmp_path / "celeba" / "list_attr_celeba.txt"
    )
    assert classes == [
        "Male=0,Smiling=0",
        "Male=0,Smiling=1",
        "Male=1,Smiling=0",
        "Male=1,Smiling=1",
    ]
    assert labels.tolist() == [2, 0, 3, 1, 2]


def test_run_with_ac_loss_and_augmentation_resumes_with_them(tmp_path):
    options = ["--lambda-ac", "0.5", "--augment-flip"]
    flags = [
        *tiny("cond_wgan_gp"),
        *options,
        "--total-steps",
        "2",
        "--log-every",
        "1",
        "--run-name",
        "all",
    ]
    first = run("cond_wgan_gp", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(
        "cond_wgan_gp", "--resume", "runs/all/checkpoint.pt", "--total-steps", "3", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "runs/all/checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["args"]["lambda_ac"] == 0.5
    assert ckpt["args"]["augment_flip"] is True
    assert ckpt["critic"]["classifier.weight"].shape == (10, 32)
    assert ckpt["critic"]["embed.weight"].shape == (10, 32)  # the projection's class embedding
    events = EventAccumulator(str(tmp_path / "runs/all"), size_guidance={"scalars": 0}).Reload()
    for tag in (
        "losses/critic",
        "losses/wasserstein_estimate",
        "losses/gradient_penalty",
        "losses/generator",
    ):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (tag, values)


def test_folder_without_class_subfolders_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(8):
        Image.new("RGB", (20, 20)).save(tmp_path / "flat" / f"{i}.png")
    result = run(
        "cond_wgan_gp",
        *tiny("cond_wgan_gp"),
        "--dataset",
        "folder",
        "--data-dir",
        "flat",
        cwd=tmp_path,
    )
    expect_error(result, r"^error: 8 images are in no class folder \(such as cat/\)$")
    assert not (tmp_path / "runs").exists()


def test_celeba_attribute_that_does_not_exist_is_refused(tmp_path):
    write_celeba(tmp_path / "data", 8)
    flags = [
        *tiny("cond_wgan_gp"),
        "--dataset",
        "celeba",
        "--data-dir",
        "data",
        "--celeba-attrs",
        "Male",
        "Smilling",
    ]
    result = run("cond_wgan_gp", *flags, cwd=tmp_path)
    pattern = (
        r"^error: --celeba-attrs: Smilling not in data/celeba/list_attr_celeba\.txt "
        r"\(5_o_Clock_Shadow .* Young\)$"
    )
    expect_error(result, pattern)
    assert not (tmp_path / "runs").exists()


def test_checkpoint_with_other_classes_is_refused_naming_both(trained, tmp_path):
    for k, name in enumerate(["cat", "dog", "wild"]):
        (tmp_path / "afhq" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (20, 20), color=60 * k).save(tmp_path / "afhq" / name / f"{i}.png")
    checkpoint = copy_run(trained("cond_wgan_gp"), tmp_path / "run")
    flags = [
        "--resume",
        str(checkpoint),
        "--dataset",
        "folder",
        "--data-dir",
        "afhq",
        "--total-steps",
        "25",
    ]
    pattern = r"checkpoint\.pt was trained on the classes \['T-shirt/top', .*'Ankle boot'\], "
    pattern += r"the data has \['cat', 'dog', 'wild'\]$"
    expect_error(run("cond_wgan_gp", *flags, cwd=tmp_path), pattern)
    assert load_checkpoint(checkpoint)["step"] == 24


def test_missing_celeba_attribute_file_is_one_line(tmp_path):
    write_celeba(tmp_path / "noattrs", 8)
    (tmp_path / "noattrs/celeba/list_attr_celeba.txt").unlink()
    flags = [
        *tiny("cond_wgan_gp"),
        "--dataset",
        "celeba",
        "--data-dir",
        "noattrs",
        "--celeba-attrs",
        "Male",
    ]
    result = run("cond_wgan_gp", *flags, cwd=tmp_path)
    expect_error(
        result,
        r"^error: FileNotFoundError: .*No such file or directory: '.*noattrs/celeba/list_attr_celeba\.txt'$",
    )
    assert not (tmp_path / "runs").exists()


def write_classes(root, sizes: dict) -> None:
    """A folder dataset, one subfolder of 16x16 gray images per class: {"a": 48, "b": 16}."""
    for k, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (16, 16), color=40 + 100 * k + i).save(root / name / f"{i}.png")


def test_fakes_take_the_reals_labels_and_generator_labels_follow_the_data(tmp_path):
    """Recorded in a run on classes of 48 and 16 images: each critic step's fakes and penalty have the real batch's
    labels, and the generator step draws labels as often as they occur in the data (3 to 1)."""
    write_classes(tmp_path / "data", {"a": 48, "b": 16})
    prelude = recorder(tmp_path / "records.pt", ("Generator", "Critic"))
    flags = [*tiny("cond_wgan_gp"), *CLASS_FOLDERS]
    flags += ["--total-steps", "30", "--run-name", "labels"]
    result = run("cond_wgan_gp", *flags, cwd=tmp_path, prelude=prelude)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [
        r for r in torch.load(tmp_path / "records.pt", weights_only=False) if r[1]
    ]  # training mode only
    critic_step, generator_step, drawn, critic_steps, critic_calls = None, None, [], 0, 0
    for name, _, grad, inputs, _ in records:
        labels = inputs[1]
        if name == "Generator":
            critic_step, generator_step = (None, labels) if grad else (labels, None)
            drawn += labels.tolist() if grad else []
            critic_steps += not grad
        elif generator_step is None:  # a critic step's reals, fakes, interpolates: its labels
            assert torch.equal(labels, critic_step)
            critic_calls += 1
        else:
            assert torch.equal(labels, generator_step)
    assert len(drawn) == 30 * 8 and critic_steps == 30 * 2
    # D(x, y) and D(x~, y) in each critic step, and the penalties
    penalties = critic_calls - 2 * critic_steps
    assert penalties == 30 * 2 // 4  # on every 4th critic step
    assert 150 <= drawn.count(0) <= 210  # 180 expected (3 of 4), sd 6.7
    ckpt = load_checkpoint(tmp_path / "runs" / "labels" / "checkpoint.pt")
    assert ckpt["classes"] == ["a", "b"]
    result = run(
        "cond_wgan_gp", "--generate", "runs/labels/checkpoint.pt", "--num-images", "4", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.parent.name for p in (tmp_path / "runs/labels/generated").rglob("*.png")) == [
        "a",
        "a",
        "b",
        "b",
    ]
    # The same number of classes under other names: refused, naming both lists.
    (tmp_path / "data" / "b").rename(tmp_path / "data" / "0")
    flags = ["--resume", "runs/labels/checkpoint.pt", "--total-steps", "31"]
    expect_error(
        run("cond_wgan_gp", *flags, cwd=tmp_path),
        r"trained on the classes \['a', 'b'\], the data has \['0', 'a'\]$",
    )
    # A class folder left empty: refused, naming it.
    (tmp_path / "data" / "c").mkdir()
    (tmp_path / "data" / "0").rename(tmp_path / "data" / "b")
    flags = [*tiny("cond_wgan_gp"), *CLASS_FOLDERS]
    expect_error(
        run("cond_wgan_gp", *flags, cwd=tmp_path),
        r"^error: no images in the class folders c: add some, or remove them$",
    )


ATTRS = r"^error: --dataset celeba takes --celeba-attrs: 1 to 8 different attributes; got "
BAD_OPTIONS = {
    "celeba without attributes": (["--dataset", "celeba", "--data-dir", "data"], ATTRS + r"\(\)$"),
    "attributes without celeba": (["--celeba-attrs", "Male"], ATTRS + r"\('Male',\)$"),
    "repeated attribute": (
        ["--dataset", "celeba", "--celeba-attrs", "Male", "Male"],
        ATTRS + r"\('Male', 'Male'\)$",
    ),
    "negative lambda-ac": (
        ["--lambda-ac", "-1"],
        r"^error: --lambda-ac must be >= 0 and finite, got -1.0$",
    ),
    "embedding of 0": (["--embed-dim", "0"], r"^error: --embed-dim must be >= 1, got 0$"),
    "image without attributes": (
        ["--dataset", "celeba", "--data-dir", "short", "--celeba-attrs", "Male"],
        r"^error: 000003\.jpg has no line of 40 values in short/celeba/list_attr_celeba\.txt$",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_refused_with_one_line(case, tmp_path, monkeypatch):
    """In-process, the checks that the main block runs before it writes anything, in its order."""
    write_celeba(tmp_path / "data", 4)
    write_celeba(tmp_path / "noattrs", 4)
    (tmp_path / "noattrs/celeba/list_attr_celeba.txt").unlink()
    write_celeba(tmp_path / "short", 4)
    attr_file = tmp_path / "short/celeba/list_attr_celeba.txt"
    attr_file.write_text(
        "\n".join(attr_file.read_text().splitlines()[:4]) + "\n"
    )  # the count, the names, images 1, 2
    monkeypatch.chdir(tmp_path)
    flags, pattern = BAD_OPTIONS[case]
    with pytest.raises(SystemExit) as stop:
        args = tyro.cli(cond.Args, args=["--batch-size", "2", *flags])
        cond.check_args(args)
        files = cond.load_dataset(args)[1]
        cond.celeba_classes(files, args.celeba_attrs, files[0].parents[1] / "list_attr_celeba.txt")
    message = str(stop.value.code)
    assert "\n" not in message and re.search(pattern, message), message
