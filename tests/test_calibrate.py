"""``actpass calibrate``: the error model measured on the model at hand, and the planner using it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _models import Block, grads, rel_err
from test_cli import FIXTURES, _main, assert_bad_input

import actpass
from actpass import cache, calibrate, sensitivity
from actpass.plan import Role


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(64, 4), Block(64, 4, "eager"))  # fused attention, then probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory):
    """A two-block transformer, its input, and its calibrated table (written to a file), all under inner="eager".

    (The estimate is about the error model, which inner="eager" exercises the same way at a twentieth of Inductor's
    compile time on the 2-core CI machine; the Inductor partition's roles are checked on one block below.)"""
    torch.manual_seed(0)
    model, x = TwoBlocks(), torch.randn(2, 65, 64)
    table = calibrate.calibrate(model, (x,), loss_fn=_loss, config=actpass.MesaConfig(inner="eager"))
    path = calibrate.write_table(table, tmp_path_factory.mktemp("cal") / "table.json")
    return model, x, table, path


def _measured(model: nn.Module, x: torch.Tensor, **options) -> tuple[float, list]:
    """One mesa step's global gradient error against eager's, and the plans.

    (Eager, not Inductor, as the reference: Inductor's own difference from eager is ~1e-6 of these errors, and a
    compile costs more than the rest of the test.)"""
    _loss(model(x)).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    be = actpass.mesa(inner="eager", **options)  # as calibrated
    _loss(torch.compile(model, backend=be)(x)).backward()
    got, plans = grads(model), list(be.plans)  # (a dynamo reset empties the backend's records)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    return rel_err(got, ref), plans


def test_the_models_roles_are_measured_and_the_rest_kept(tmp_path: Path):
    """Calibrated under Inductor (the default), on a block with eager attention: probabilities, q/k/v, the GELU's
    input and a LayerNorm output all measured."""
    torch.manual_seed(0)
    table = calibrate.calibrate(Block(64, 4, "eager"), (torch.randn(2, 33, 64),), loss_fn=_loss)
    path = calibrate.write_table(table, tmp_path / "table.json")
    assert sensitivity._invalid(json.loads(path.read_text())) is None
    roles = set(table["calibrated_roles"])
    assert {Role.QKV.value, Role.ACT_INPUT.value, Role.PROBS.value} <= roles
    assert roles & {Role.NORM_HAT.value, Role.NORM_OUTPUT.value}  # which one Inductor's partition saves varies
    rows = table["calibrated"]["rows"]
    for role in roles:
        err = {r["bits"]: r["error"] for r in rows if r["role"] == role and r["layout"] == "channel"}
        if err:
            assert 0 < err[8] < err[4] < err[2], (role, err)  # fewer bits, more error: measured, not copied
    shipped = sensitivity.shipped()
    assert table["s"][Role.QKV.value] != shipped["s"][Role.QKV.value]
    for role in set(shipped["s"]) - roles:  # what the model lacks keeps the suite's values
        assert table["s"][role] == shipped["s"][role]
    # The probabilities' square-root codes are measured too (the shipped value is a trained model's worst case).
    sqrt = [r for r in rows if r["role"] == Role.PROBS.value and r["layout"] == "sqrt"]
    assert {r["bits"] for r in sqrt} == {8, 4}
    assert table["s"][Role.PROBS.value]["sqrt"]["8"] < shipped["s"][Role.PROBS.value]["sqrt"]["8"]


@pytest.mark.parametrize("options", [{"bits": 4}, {"budget": 0.12}], ids=["bits4", "budget12"])
def test_calibrated_estimates_match_the_measured_error(calibrated, options):
    """The calibrated table's estimate of a whole plan lands within 2x of the error mesa's rewrite then measures (same
    batch), and the solver, told what this model's tensors cost, spends the same bytes at least as well."""
    model, x, _table, path = calibrated
    err_cal, plans_cal = _measured(model, x, sensitivity=str(path), **options)
    est_cal = math.sqrt(sum(p.est_error**2 for p in plans_cal))
    err_shipped, plans_shipped = _measured(model, x, **options)
    assert 0.5 < est_cal / err_cal < 2.0, (est_cal, err_cal)
    assert err_cal <= 1.1 * err_shipped, (err_cal, err_shipped)
    assert sum(p.saved_bytes_after for p in plans_cal) <= 1.02 * sum(p.saved_bytes_after for p in plans_shipped)


def test_using_restores_the_previous_table(calibrated):
    _model, _x, table, path = calibrated
    assert sensitivity.table() is sensitivity.shipped()
    with sensitivity.using(path):
        assert sensitivity.table()["calibrated_roles"] == table["calibrated_roles"]
        with sensitivity.using({**table, "default": {"8": 1.0, "4": 2.0, "2": 3.0}}):
            assert sensitivity.table()["default"]["8"] == 1.0
        assert sensitivity.table()["calibrated_roles"] == table["calibrated_roles"]
    assert sensitivity.table() is sensitivity.shipped()


def test_plans_are_cached_under_the_tables_contents(tmp_path: Path, calibrated):
    """Two table files at one path, one after the other: the compiled plans must not be shared."""
    _model, _x, table, _path = calibrated
    path = tmp_path / "t.json"
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    keys = []
    for scale in (1.0, 2.0):
        t = json.loads(json.dumps(table))
        t["default"] = {k: v * scale for k, v in t["default"].items()}
        path.write_text(json.dumps(t))
        cfg = actpass.MesaConfig(sensitivity=str(path)).to_dict()
        keys.append(cache.partitioner_uuid(cfg, "", "", gm))
    assert keys[0] != keys[1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "No such file or directory"),
        ("{not json", "is not JSON"),
        ('{"s": {}}', 'no "default"'),
        ('{"default": {"8": 1, "4": 2, "2": 3}, "s": {"qkv": {"row": {"8": "big"}}}}', '"s"."qkv" is not'),
        ('{"default": {"8": 1, "4": -2, "2": 3}, "s": {}}', 'no "default"'),
    ],
    ids=["missing", "not-json", "no-default", "bad-value", "negative"],
)
def test_a_bad_table_is_a_one_line_error_at_construction(tmp_path: Path, text, needle):
    path = tmp_path / "t.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match="actpass: sensitivity table") as info:
        actpass.MesaConfig(sensitivity=str(path))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_calibrate_writes_a_table_inspect_reads(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    out = tmp_path / "mlp.json"
    proc = _main(capsys, "calibrate", FIXTURES / "tiny_mlp.py", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "act-in" in proc.stdout
    assert sensitivity._invalid(json.loads(out.read_text())) is None
    proc = _main(capsys, "inspect", FIXTURES / "tiny_mlp.py", "--inner", "eager", "--sensitivity", out)
    assert proc.returncode == 0, proc.stderr
    assert f"sensitivity={out}" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("calibrate", "nonexistent.py"), ("model file not found: nonexistent.py",)),
        (("calibrate", FIXTURES / "frozen.py"), ("nothing to train",)),
        (("calibrate", FIXTURES / "tiny_mlp.py", "-o", "/nonexistent/dir/t.json"), ("no such directory",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--sensitivity", "nope.json"), ("sensitivity table 'nope.json'",)),
    ],
    ids=["missing-model", "frozen", "bad-output", "inspect-missing-table"],
)
def test_cli_calibrate_bad_input(capsys: pytest.CaptureFixture[str], args: tuple, needles: tuple) -> None:
    assert_bad_input(_main(capsys, *args), *needles)


def test_a_budgets_file_names_its_table_relative_to_itself(tmp_path: Path):
    from actpass.budget import load_budgets

    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.json").write_text((Path(sensitivity.DATA)).read_text())
    budgets = tmp_path / "actpass-budgets.toml"
    entry = "[[model]]\npath = 'm.py'\nmax_saved_bytes = 1\n"
    budgets.write_text(entry + "[model.options]\nsensitivity = 'tables/t.json'\n")
    (b,) = load_budgets(budgets).models
    assert b.config().sensitivity == str(tmp_path / "tables" / "t.json")
    budgets.write_text(budgets.read_text().replace("tables/t.json", "tables/none.json"))
    with pytest.raises(ValueError, match="bad options: sensitivity table .*none.json"):
        load_budgets(budgets)
