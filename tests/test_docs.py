"""The method pages in docs/ agree with the scripts: the line ranges they cite and the pictures
they show (tests/test_readme.py: the scalars); benchmarks/curves.py draws every logged scalar."""

import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS, run, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter


def page(script: str) -> str:
    return (ROOT / "docs" / f"{script}.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_line_ranges_a_page_cites_are_the_scripts(script):
    source = (ROOT / f"{script}.py").read_text()
    spans = {
        n.name: (n.lineno, n.end_lineno)
        for n in ast.parse(source).body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }
    cited = re.findall(r"`(\w+)` \(lines (\d+)-(\d+)\)", page(script))
    assert len(cited) >= 3, "a page cites the networks and the loss by their lines"
    for name, first, last in cited:
        assert spans.get(name) == (int(first), int(last)), f"{name}: {spans.get(name)}"
    lines = source.splitlines()
    begin = next(i for i, line in enumerate(lines, 1) if "# ---- The GAN step" in line)
    end = next(i for i, line in enumerate(lines, 1) if "# ---- End of the GAN step" in line)
    for first, last in re.findall(r"the GAN step \(lines (\d+)-(\d+)\)", page(script)):
        assert begin <= int(first) <= int(last) <= end, (first, last, begin, end)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_page_shows_its_healthy_and_failing_curves_and_every_picture_it_shows_exists(script):
    pictures = re.findall(r"!\[[^\]]*\]\(\.\./(assets/[\w./-]+)\)", page(script))
    assert {f"assets/curves-{script}.png", f"assets/failing-{script}.png"} <= set(pictures)
    for picture in pictures:
        assert (ROOT / picture).is_file(), picture


def curves(*flags, cwd):
    command = [sys.executable, str(ROOT / "benchmarks/curves.py"), *flags]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_curves_draw_every_scalar_of_the_runs_and_refuse_a_healthy_run_that_lacks_one(tmp_path):
    for name, flags in [
        ("a", ["--seed", "1"]),
        ("b", ["--seed", "2"]),
        ("bad", ["--lambda-gp", "0"]),
    ]:
        common = ["--total-steps", "4", "--log-every", "2", "--sample-every", "4"]
        result = run("wgan_gp", *tiny("wgan_gp"), *common, *flags, "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    runs = tmp_path / "runs"
    logged = (
        EventAccumulator(str(runs / "a"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]
    )
    out = tmp_path / "curves.png"
    result = curves(
        "--healthy", "runs/a", "runs/b", "--failing", "runs/bad", "--out", str(out), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(result.stdout.split()) == sorted(logged) and len(logged) == 4
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A healthy run that logged only one of the scalars is refused, by name.
    with SummaryWriter(runs / "c") as writer:
        writer.add_scalar("losses/generator", 1.0, 2)
    result = curves("--healthy", "runs/a", "runs/c", "--out", str(out), cwd=tmp_path)
    missing = "losses/critic losses/gradient_penalty losses/wasserstein_estimate"
    assert (
        result.returncode == 1
        and result.stderr.strip() == f"error: runs/c lacks the scalars {missing}"
    )
    (runs / "d").mkdir()
    result = curves("--healthy", "runs/d", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: no event files in runs/d"
