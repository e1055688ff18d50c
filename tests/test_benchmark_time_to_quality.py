"""benchmarks/time_to_quality.py on a tiny run: the generator saved at each wall-clock mark, for one of the scripts
(the conditional one, whose checkpoint and scoring carry the most) and for a reference-like training file from outside
the repository, scored afterwards; then its table and plot."""

import json
import math
import subprocess
import sys

from conftest import ROOT, tiny
from PIL import Image

# A training file in the style of PyTorch-GAN: module-level code, torchvision's MNIST, a global `generator` and its
# optimizer `optimizer_G`, many epochs. The harness must run it unchanged but for the data and the saving.
REFERENCE = """
import os, torch, torch.nn as nn, torchvision, torchvision.transforms as T
latent = 8
os.makedirs("../../data/mnist", exist_ok=True)
data = torchvision.datasets.MNIST("../../data/mnist", train=True, download=True, transform=T.ToTensor())
assert type(data).__name__ == "FashionMNIST" and len(data) == 60000  # the harness's data, read where it lies
generator = nn.Sequential(nn.Linear(latent, 28 * 28), nn.BatchNorm1d(28 * 28), nn.Tanh(), nn.Unflatten(1, (1, 28, 28)))
discriminator = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
optimizer_G = torch.optim.Adam(generator.parameters(), 1e-3)
optimizer_D = torch.optim.Adam(discriminator.parameters(), 1e-3)
loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(256)), batch_size=16, shuffle=True)
for epoch in range(100000):
    for real, _ in loader:
        fake = generator(torch.randn(len(real), latent))
        d_loss = discriminator(fake.detach()).mean() - discriminator(real * 2 - 1).mean()
        optimizer_D.zero_grad(); d_loss.backward(); optimizer_D.step()
        g_loss = -discriminator(fake).mean()
        optimizer_G.zero_grad(); g_loss.backward(); optimizer_G.step()
"""

HARNESS = """
import sys, tyro
sys.path.insert(0, {bench!r})
import time_to_quality as t
reference = t.Reference("pytorch_gan", "reference.py", [], "generator", "optimizer_G", "flat", "latent")
t.REFERENCES["tiny reference"] = reference
t.main(tyro.cli(t.Args))
"""


def test_quality_is_recorded_at_each_mark_for_a_script_and_a_reference_then_tabled_and_plotted(
    tmp_path,
):
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "reference.py").write_text(REFERENCE)
    (tmp_path / "harness.py").write_text(HARNESS.format(bench=str(ROOT / "benchmarks")))
    flags = " ".join(tiny("cond_wgan_gp"))
    command = [sys.executable, str(tmp_path / "harness.py"), "--rows", "cond_wgan_gp.py", "tiny reference",
               "--seeds", "1", "--minutes", "0.08", "0.12", "--num-images", "64", "--pytorch-gan",
               str(tmp_path / "checkout"), f"--script-flags={flags}", "--results-dir", str(tmp_path / "results"),
               "--plot", str(tmp_path / "plot.png"), "--work-dir", str(tmp_path / "work")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    stored = json.loads((tmp_path / "results" / "time-to-quality.json").read_text())
    assert set(stored["rows"]) == {"cond_wgan_gp.py", "tiny reference"}
    for row, seeds in stored["rows"].items():
        points = seeds["1"]
        assert [p["minute"] for p in points] == [0.08, 0.12], row
        assert 0 < points[0]["steps"] <= points[1]["steps"] and all(
            p["fd"] > stored["floor"] for p in points
        ), row
        # Saved at the first step past each mark: the last, long after startup, within a few tiny steps of its time.
        assert (
            all(p["seconds"] >= 60 * p["minute"] for p in points)
            and points[1]["seconds"] < 60 * 0.12 + 3
        ), row
        # The conditional script is also scored on the class asked for (its checkpoint keeps the class names).
        assert all(
            (0 <= p["cond_acc"] <= 1) if row == "cond_wgan_gp.py" else p["cond_acc"] is None
            for p in points
        )
    # Each mark saved while training, at its time: this repository's checkpoint format, the reference's weights.
    ours = tmp_path / "work" / "cond_wgan_gp.py-seed1"
    assert (ours / "0.08min" / "checkpoint.pt").is_file()
    assert (
        len(list((ours / "0.12min" / "generated").glob("*/*.png"))) == 64
    )  # one folder per class, named after it
    reference = tmp_path / "work" / "tiny_reference-seed1"
    assert (reference / "0.12min" / "generator.pt").is_file()
    with Image.open(reference / "0.12min" / "generated" / "000000.png") as image:
        assert image.size == (32, 32)  # resized from the reference's 28 to be scored as ours are
    assert (
        reference / "cwd" / "data" / "mnist"
    ).is_dir()  # its ../../data/mnist stayed inside the run's folder
    # The stored numbers are the scores of the images generated at each mark: scored again here, they match.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    model = quality.load_classifier()
    fit = quality.gaussian_fit(quality.classify(model, quality.load_test_set()[0])[0])
    for row, folder in (("cond_wgan_gp.py", ours), ("tiny reference", reference)):
        for point in stored["rows"][row]["1"]:
            again = quality.evaluate(model, folder / f"{point['minute']}min" / "generated", fit)
            assert math.isclose(again["fd"], point["fd"], rel_tol=1e-6), (row, point["minute"])
    table = (tmp_path / "results" / "time-to-quality.md").read_text()
    assert (
        "| cond_wgan_gp.py |" in table
        and "| tiny reference |" in table
        and "FD after 0.12 min" in table
    )
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.size[0] > 500 and plot.size[1] > 300
