"""The design, checked: the four scripts share their plumbing byte for byte (so `diff wgan_gp.py dcgan.py` shows the
method alone), each stays within its budget of characters, lines of at most 100 and a mean line of 60, and each reads in the same order, the method first."""

import ast

import pytest
from conftest import ROOT, SCRIPTS

# Characters of each file's text, newlines included: a line budget invites wide lines.
BUDGETS = {"wgan_gp": 24000, "dcgan": 24000, "resnet_sn_wgan_gp": 26000, "cond_wgan_gp": 30000}
# Defined in every script but different by design: the settings, the networks and the checks of the method's settings.
METHOD = {"Args", "Generator", "Critic", "check_args"}
# The plumbing every script has; a name missing from one script would split the shared design.
SHARED = {"load_dataset", "decode", "extract", "unreadable", "batch_indices", "fail", "excepthook"}
SHARED |= {"request_stop", "setup_device", "optimizer_step", "load_checkpoint", "restore"}
SHARED |= {"write_atomic", "claim", "remove_unless_saved", "save_png"}


def definitions(script: str) -> dict:
    """Each top-level function and class of a script: its source text, exactly as written."""
    source = (ROOT / f"{script}.py").read_text()
    tree = ast.parse(source)
    return {
        n.name: ast.get_source_segment(source, n)
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }


def test_shared_functions_and_classes_are_identical_in_every_script():
    defs = {script: definitions(script) for script in SCRIPTS}
    for script in SCRIPTS:
        assert SHARED <= set(defs[script]), f"{script}.py lacks {SHARED - set(defs[script])}"
    names = {name for d in defs.values() for name in d}
    for name in sorted(names - METHOD):
        copies = {script: d[name] for script, d in defs.items() if name in d}
        if len(copies) > 1:  # a name in two scripts must be the same code in both
            assert len(set(copies.values())) == 1, f"{name} differs between {sorted(copies)}"
    assert len({defs[s]["gradient_penalty"] for s in SCRIPTS if "gradient_penalty" in defs[s]}) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_size_in_characters_line_length_and_mean_line(script):
    text = (ROOT / f"{script}.py").read_text()
    lines = text.splitlines()
    filled = [line for line in lines if line.strip()]
    mean = sum(map(len, filled)) / len(filled)
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    print(f"{script}.py: {len(text):,} characters of {BUDGETS[script]:,}, {len(lines)} lines, "
          f"mean non-blank line {mean:.1f}, lines over 100 characters: {len(long)}")  # fmt: skip
    assert len(text) <= BUDGETS[script], (
        f"{script}.py has {len(text):,} characters, its budget is {BUDGETS[script]:,}"
    )
    assert not long, f"{script}.py: lines over 100 characters: {long}"
    assert mean <= 60, f"{script}.py: the mean non-blank line has {mean:.1f} characters, over 60"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_gan_step_stands_in_one_marked_block_and_the_plumbing_is_marked(script):
    main = (ROOT / f"{script}.py").read_text().split('if __name__ == "__main__":')[1]
    begin, end = main.index("# ---- The GAN step"), main.index("# ---- End of the GAN step ----")
    block = main[begin:end]
    assert block.count("optimizer_step(") == 2, "both updates stand inside the block"
    for plumbing in ("write_atomic", "add_scalar", "stop_requests", "isfinite"):
        assert plumbing not in block, f"{plumbing} belongs to the plumbing, outside the GAN step"
    assert main.index("# ---- Plumbing: EMA, logs, checkpoints, stops ----") > end


@pytest.mark.parametrize("script", SCRIPTS)
def test_order_docstring_imports_args_method_data_helpers_main(script):
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    kinds = []
    for node in tree.body:
        name = getattr(node, "name", "")
        if isinstance(node, ast.Expr) and node is tree.body[0]:
            kinds.append("docstring")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            kinds.append("imports")
        elif name == "Args":
            kinds.append("args")
        elif name in (
            "Generator",
            "Critic",
            "Discriminator",
            "gradient_penalty",
            "discriminator_loss",
        ):
            kinds.append("method")
        elif name == "load_dataset":
            kinds.append("data")
        elif name in SHARED:
            kinds.append("helpers")
        elif isinstance(node, ast.If):
            kinds.append("main")
    order = ["docstring", "imports", "args", "method", "data", "helpers", "main"]
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == order
    generator = next(n for n in tree.body if getattr(n, "name", "") == "Generator")
    assert generator.lineno <= 150, f"class Generator starts at line {generator.lineno}"
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    top_level = {alias.name.split(".")[0] for n in imports for alias in n.names} | {
        n.module.split(".")[0] for n in imports if isinstance(n, ast.ImportFrom)
    }
    assert not top_level & set(SCRIPTS), "a script imports another file of the repository"


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_network_steps_once_per_step_and_ddp_alone_averages_the_gradients(script):
    """DDP averages the gradients over processes; the one all_reduce is the stop flag's."""
    source = (ROOT / f"{script}.py").read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.If))  # the main block
    calls = [
        n.func.id
        for n in ast.walk(main)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    assert calls.count("optimizer_step") == 2
    assert source.count("DistributedDataParallel(") == 1
    assert source.count("torch.distributed.all_reduce(") == 1
