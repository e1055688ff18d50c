"""The README's commands and tables agree with what CI runs and with the scripts; the method pages it links
explain what the scripts log."""

import re

import pytest
from conftest import ROOT, SCRIPTS


def test_ci_runs_the_readme_test_command_word_for_word():
    lines = (ROOT / ".ci/run").read_text().splitlines()
    ci_command = [line for line in lines if "pytest" in line and not line.startswith("#")]
    assert len(ci_command) == 1
    assert f"```bash\n{ci_command[0]}\n```" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_method_page_explains_every_scalar_the_script_logs(script, trained):
    """The README links each script's page, which holds "its logged scalars": a table row for each tag that a run
    writes, and none for a tag that it does not."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert f"(docs/{script}.md)" in (ROOT / "README.md").read_text()
    logged = set(EventAccumulator(str(trained(script))).Reload().Tags()["scalars"])
    assert len(logged) >= 4
    page = (ROOT / "docs" / f"{script}.md").read_text()
    assert set(re.findall(r"^\| `((?:losses|charts)/[a-z_]+)` \|", page, re.MULTILINE)) == logged


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_character_counts_in_the_readme_are_the_scripts(script):
    """The README: "The characters are each file's size, newlines included"."""
    size = len((ROOT / f"{script}.py").read_text())
    assert f"| [`{script}.py`]({script}.py) | {size:,} |" in (ROOT / "README.md").read_text()


def test_the_time_to_quality_table_in_the_readme_is_the_measured_one():
    stored = (ROOT / "benchmarks/results/time-to-quality.md").read_text()
    table = [line for line in stored.splitlines() if line[:1] == "|"]
    assert len(table) >= 2 + 8  # the header and one row per script and reference
    assert "\n".join(table) in (ROOT / "README.md").read_text()
    # and the real-vs-real floor the README quotes beside it
    floor = re.search(r"real-vs-real floor (\d+\.\d+)", stored)[1]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"two sets of real images score {floor}." in readme


def test_the_readme_is_short_and_it_and_the_pages_need_no_issue_tracker():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found = re.search(r"\b[Ii]ssues? *#?\d+", path.read_text())
        assert not found, f"{path.name}: {found and found.group()}"
