"""Budgets files: parsing, validation messages, verdict lines, in-place update, and the pytest fixture."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actpass.budget import Budget, BudgetError, Verdict, dump_toml, load_budgets, update_text, write_updated

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "budgets.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_load_valid_file_with_every_field(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """
        tolerance = 0.05
        [[model]]
        path = "models/a.py"
        max_saved_bytes = 1000
        [[model]]
        name = "bee"
        path = "b.py"
        max_saved_bytes = 0
        baseline_bytes = 4000
        tolerance = 0.0
        model_attr = "net"
        inputs_attr = "batch"
        loss_attr = "my_loss"
        device = "cpu"
        [model.options]
        bits = 4
        exclude = ["head"]
        """,
    )
    b = load_budgets(p)
    a, bee = b.models
    assert a.name == "a" and a.path == tmp_path / "models/a.py" and a.max_saved_bytes == 1000
    assert a.tolerance == 0.05 and a.options == {} and a.config().bits == 8
    assert bee.name == "bee" and bee.max_saved_bytes == 0 and bee.baseline_bytes == 4000 and bee.tolerance == 0.0
    assert (bee.model_attr, bee.inputs_attr, bee.loss_attr, bee.device) == ("net", "batch", "my_loss", "cpu")
    assert bee.config().bits == 4 and bee.config().exclude == ("head",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[model]\npath = 'a.py'\n", "malformed budgets file"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\ncolour = 'red'\n", "unknown key(s) 'colour'"),
        ("budget = 3\n[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\n", "unknown top-level key(s) 'budget'"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = -1\n", "non-negative integer (bytes), got -1"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1.5\n", "non-negative integer (bytes), got 1.5"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = '100'\n", "non-negative integer (bytes), got '100'"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = true\n", "non-negative integer (bytes), got True"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\nbaseline_bytes = -5\n", "baseline_bytes must be"),
        ("[[model]]\nmax_saved_bytes = 1\n", "missing `path`"),
        ("[[model]]\npath = 'a.py'\n", "missing `max_saved_bytes` (run `actpass check --update`"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\ntolerance = -0.1\n", "tolerance must be a fraction >= 0"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\n[model.options]\nbits = 3\n", "bits must be one of"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\n[model.options]\ncolour = 1\n", "unknown option(s)"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\noptions = 3\n", "options must be a table"),
        ("model = 3\n", "must be an array of tables"),
        ("tolerance = 0.1\n", "no [[model]] entries"),
        ("[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\n[[model]]\npath = 'a.py'\nmax_saved_bytes = 1\n", "duplicate"),
    ],
)
def test_bad_budgets_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(BudgetError) as info:
        load_budgets(p)
    msg = str(info.value)
    assert message in msg
    assert msg.startswith("actpass: ") and "\n" not in msg and str(p) in msg


def test_missing_file_and_missing_budget_under_update(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="budgets file not found"):
        load_budgets(tmp_path / "nope.toml")
    p = _write(tmp_path, "[[model]]\npath = 'a.py'\n")
    assert load_budgets(p, require_budgets=False).models[0].max_saved_bytes is None


def _budget(limit: int, tolerance: float = 0.0) -> Budget:
    return Budget(index=0, name="m", path=Path("m.py"), raw_path="m.py", max_saved_bytes=limit, tolerance=tolerance)


def test_verdict_lines() -> None:
    over = Verdict(_budget(1000), 1100)
    assert over.over and over.difference == 100
    assert over.line() == "OVER m (m.py): measured 1,100 B, budget 1,000 B, difference +100 B (+10.0%)"
    under = Verdict(_budget(1000), 900)
    assert not under.over
    assert under.line() == "ok   m (m.py): measured 900 B, budget 1,000 B, difference -100 B (-10.0%)"
    assert not Verdict(_budget(1000, tolerance=0.1), 1100).over
    assert Verdict(_budget(1000, tolerance=0.1), 1101).over
    assert "tolerance 10%" in Verdict(_budget(1000, tolerance=0.1), 1101).line()
    assert Verdict(_budget(0), 1).over and "+inf%" in Verdict(_budget(0), 1).line()


UPDATABLE = """\
# budgets for CI
tolerance = 0.01  # 1%

[[model]]
name = "a"
path = "a.py"    # the first
max_saved_bytes = 10  # old value

[model.options]
bits = 4

[[model]]
path = "b.py"
[model.options]
exclude = ["x",
  "y"]
"""


def test_update_text_keeps_comments_and_other_fields() -> None:
    new = update_text(UPDATABLE, [{"max_saved_bytes": 123, "baseline_bytes": 456}, {"max_saved_bytes": 7}])
    assert "# budgets for CI" in new and "# the first" in new and "max_saved_bytes = 123  # old value" in new
    data = tomllib.loads(new)
    assert data["tolerance"] == 0.01
    a, b = data["model"]
    assert a == {"name": "a", "path": "a.py", "max_saved_bytes": 123, "baseline_bytes": 456, "options": {"bits": 4}}
    assert b == {"path": "b.py", "max_saved_bytes": 7, "options": {"exclude": ["x", "y"]}}


def test_update_text_inserts_missing_keys_in_each_entry() -> None:
    text = '# head\n[[model]]\nname = "a"\npath = "a.py"\n\n[[model]]\npath = "b.py"\n'
    new = update_text(text, [{"max_saved_bytes": 1, "baseline_bytes": 2}, {"max_saved_bytes": 3}])
    assert new == (
        '# head\n[[model]]\nname = "a"\npath = "a.py"\nmax_saved_bytes = 1\nbaseline_bytes = 2\n\n'
        '[[model]]\npath = "b.py"\nmax_saved_bytes = 3\n'
    )


def test_update_text_falls_back_to_a_full_rewrite_for_inline_tables() -> None:
    text = 'model = [{path = "a.py", max_saved_bytes = 1, options = {bits = 2}}]\n'
    new = update_text(text, [{"max_saved_bytes": 5, "baseline_bytes": 6}])
    assert tomllib.loads(new) == {
        "model": [{"path": "a.py", "max_saved_bytes": 5, "baseline_bytes": 6, "options": {"bits": 2}}]
    }


def test_dump_toml_round_trips() -> None:
    data = {
        "tolerance": 0.5,
        "model": [{"path": 'we"ird.py', "max_saved_bytes": 3, "options": {"exclude": ["a"], "overrides": {"x*": 4}}}],
    }
    assert tomllib.loads(dump_toml(data)) == data


def test_write_updated_rewrites_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, UPDATABLE)
    b = load_budgets(p, require_budgets=False)
    write_updated(b, [{"max_saved_bytes": 1}, {"max_saved_bytes": 2}])
    assert [m.max_saved_bytes for m in load_budgets(p).models] == [1, 2]
    assert not (tmp_path / "budgets.toml.tmp").exists()


# ------------------------------------------------------------------------------------------------ pytest fixture

PLUGIN_TEST = """
import torch
from torch import nn


def test_model_file_within_budget(actpass_budget):
    measured = actpass_budget("tiny_mlp.py", max_saved_bytes=10**9, inner="eager")
    assert measured.total > 0


def test_module_within_budget(actpass_budget):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    measured = actpass_budget.check(model, torch.randn(32, 64), max_saved_bytes=10**9, options={"inner": "eager"})
    assert measured.storages > 0


def test_module_over_budget(actpass_budget):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    actpass_budget.check(model, (torch.randn(32, 64),), max_saved_bytes=100, inner="eager", name="mlp")


def test_missing_model_file(actpass_budget):
    actpass_budget("nope.py", max_saved_bytes=1)
"""


def test_pytest_fixture(tmp_path: Path) -> None:
    (tmp_path / "tiny_mlp.py").write_text((FIXTURES / "tiny_mlp.py").read_text())
    (tmp_path / "test_budget_demo.py").write_text(PLUGIN_TEST)
    installed = any(e.value == "actpass.pytest_plugin" for e in importlib.metadata.entry_points(group="pytest11"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_budget_demo.py"]
    if not installed:
        cmd[3:3] = ["-p", "actpass.pytest_plugin"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert "2 failed, 2 passed" in out, out
    assert "OVER mlp: measured " in out and "budget 100 B, difference +" in out, out
    assert "actpass: model file not found:" in out, out
    assert "Traceback" not in out and "actpass/budget.py" not in out, out
