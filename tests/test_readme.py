"""The README's commands and tables agree with what CI runs and what the scripts log."""

import re

import pytest
from conftest import ROOT, SCRIPTS


def test_ci_runs_the_readme_test_command_word_for_word():
    ci_command = [
        line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line and not line.startswith("#")
    ]
    assert len(ci_command) == 1
    assert f"```bash\n{ci_command[0]}\n```" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_logged_scalar_is_explained_in_the_readme(script):
    logged = set(re.findall(r'"((?:losses|charts)/[a-z_]+)"', (ROOT / f"{script}.py").read_text()))
    assert len(logged) >= 4
    readme = (ROOT / "README.md").read_text()
    for key in logged:
        assert f"| `{key}` |" in readme, key


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_line_counts_in_the_readme_are_the_scripts(script):
    lines = len((ROOT / f"{script}.py").read_text().splitlines())
    assert f"| [`{script}.py`]({script}.py) | {lines} |" in (ROOT / "README.md").read_text()


def test_the_time_to_quality_table_in_the_readme_is_the_measured_one():
    stored = (ROOT / "benchmarks/results/time-to-quality.md").read_text()
    table = [line for line in stored.splitlines() if line[:1] == "|"]
    assert len(table) >= 2 + 8  # the header and one row per script and reference
    assert "\n".join(table) in (ROOT / "README.md").read_text()
