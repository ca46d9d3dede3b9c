"""Memory budgets for ``actpass check``: read, validate, compare and rewrite an ``actpass-budgets.toml`` file.

Format (every field but ``path`` and ``max_saved_bytes`` is optional; unknown keys are an error)::

    tolerance = 0.0                # default for every model: fraction over budget still accepted (0.02 = 2%)

    [[model]]
    name = "vit"                   # label in the output (default: the file's stem)
    path = "examples/vit.py"       # model file, relative to this budgets file
    max_saved_bytes = 12345678     # activation bytes saved for backward with mesa, as measured (integer >= 0)
    baseline_bytes = 45678901      # for information: the same count with torch.compile(backend="inductor")
    tolerance = 0.01               # this model's tolerance (overrides the default)
    model_attr = "model"           # names looked up in the model file
    inputs_attr = "example_inputs"
    loss_attr = "loss"
    device = "cpu"
    [model.options]                # MesaConfig fields, as torch.compile(..., options={...}); a `sensitivity`
                                   # table (actpass calibrate) is relative to this budgets file
    bits = 8

``--update`` rewrites ``max_saved_bytes`` (and ``baseline_bytes``) in place, keeping comments and every other field.

This module does not import torch, so bad budgets files are reported in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

from actpass.config import MesaConfig

DEFAULT_FILE = "actpass-budgets.toml"

_TOP_KEYS = {"model", "tolerance"}
_MODEL_KEYS = {
    "name",
    "path",
    "max_saved_bytes",
    "baseline_bytes",
    "tolerance",
    "model_attr",
    "inputs_attr",
    "loss_attr",
    "device",
    "options",
}


class BudgetError(ValueError):
    """The budgets file is missing or malformed; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """One ``[[model]]`` entry."""

    index: int  # position in the file, from 0
    name: str
    path: Path  # resolved against the budgets file's folder
    raw_path: str  # as written
    max_saved_bytes: int | None  # None only for an entry not measured yet (``--update`` fills it in)
    baseline_bytes: int | None = None
    tolerance: float = 0.0
    model_attr: str = "model"
    inputs_attr: str = "example_inputs"
    loss_attr: str = "loss"
    device: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self) -> MesaConfig:
        return MesaConfig.from_dict(self.options)

    @property
    def label(self) -> str:
        return self.name if self.name == self.raw_path else f"{self.name} ({self.raw_path})"


@dataclasses.dataclass(frozen=True)
class BudgetsFile:
    path: Path
    models: tuple[Budget, ...]
    tolerance: float = 0.0
    text: str = ""


def _nonneg_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BudgetError(f"actpass: {where}: {key} must be a non-negative integer (bytes), got {value!r}")
    if value < 0:
        raise BudgetError(f"actpass: {where}: {key} must be a non-negative integer (bytes), got {value}")
    return value


def _tolerance(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BudgetError(f"actpass: {where}: tolerance must be a fraction >= 0 (0.02 = 2%), got {value!r}")
    return float(value)


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise BudgetError(f"actpass: {where}: {key} must be a non-empty string, got {value!r}")
    return value


def load_budgets(path: str | os.PathLike[str], *, require_budgets: bool = True) -> BudgetsFile:
    """Read and validate a budgets file.

    Args:
        path: the TOML file.
        require_budgets: whether every entry must have ``max_saved_bytes`` (``--update`` fills in missing ones).

    Raises:
        BudgetError: missing file, TOML syntax error, unknown keys, bad values (with the file and entry named).
    """
    p = Path(path)
    if not p.is_file():
        raise BudgetError(f"actpass: budgets file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetError(f"actpass: cannot read budgets file {p}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BudgetError(f"actpass: malformed budgets file {p}: {exc}") from None
    return _validate(p, data, text, require_budgets)


def _validate(p: Path, data: dict[str, Any], text: str, require_budgets: bool) -> BudgetsFile:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise BudgetError(
            f"actpass: {p}: unknown top-level key(s) {', '.join(map(repr, unknown))}; known: model, tolerance"
        )
    default_tol = _tolerance(data["tolerance"], str(p)) if "tolerance" in data else 0.0
    entries = data.get("model")
    if entries is None:
        raise BudgetError(f"actpass: {p}: no [[model]] entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BudgetError(f"actpass: {p}: `model` must be an array of tables ([[model]] sections)")
    if not entries:
        raise BudgetError(f"actpass: {p}: no [[model]] entries")
    models = []
    names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"{p}: model {i + 1}" + (f" ({e['path']})" if isinstance(e.get("path"), str) else "")
        unknown = sorted(set(e) - _MODEL_KEYS)
        if unknown:
            raise BudgetError(
                f"actpass: {where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(_MODEL_KEYS))}"
            )
        if "path" not in e:
            raise BudgetError(f"actpass: {where}: missing `path` (the model file, relative to the budgets file)")
        raw_path = _string(e["path"], where, "path")
        if "max_saved_bytes" in e:
            budget: int | None = _nonneg_int(e["max_saved_bytes"], where, "max_saved_bytes")
        elif require_budgets:
            raise BudgetError(
                f"actpass: {where}: missing `max_saved_bytes` (run `actpass check --update` to measure it)"
            )
        else:
            budget = None
        baseline = _nonneg_int(e["baseline_bytes"], where, "baseline_bytes") if "baseline_bytes" in e else None
        options = e.get("options", {})
        if not isinstance(options, dict):
            raise BudgetError(f"actpass: {where}: options must be a table, got {options!r}")
        options = dict(options)
        if isinstance(options.get("sensitivity"), str):  # a calibrated table: relative to this file, like `path`
            options["sensitivity"] = str(p.parent / options["sensitivity"])
        try:
            MesaConfig.from_dict(options)
        except (ValueError, TypeError) as exc:
            msg = str(exc).removeprefix("actpass: ")
            raise BudgetError(f"actpass: {where}: bad options: {msg}") from None
        device = _string(e["device"], where, "device") if "device" in e else None
        name = _string(e["name"], where, "name") if "name" in e else Path(raw_path).stem
        if name in names:
            raise BudgetError(f"actpass: {where}: duplicate name {name!r} (set `name` to tell the entries apart)")
        names.add(name)
        models.append(
            Budget(
                index=i,
                name=name,
                path=(p.parent / raw_path),
                raw_path=raw_path,
                max_saved_bytes=budget,
                baseline_bytes=baseline,
                tolerance=_tolerance(e["tolerance"], where) if "tolerance" in e else default_tol,
                model_attr=_string(e.get("model_attr", "model"), where, "model_attr"),
                inputs_attr=_string(e.get("inputs_attr", "example_inputs"), where, "inputs_attr"),
                loss_attr=_string(e.get("loss_attr", "loss"), where, "loss_attr"),
                device=device,
                options=dict(options),
            )
        )
    return BudgetsFile(path=p, models=tuple(models), tolerance=default_tol, text=text)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One model measured against its budget."""

    budget: Budget
    measured: int

    @property
    def limit(self) -> int:
        """The largest accepted measurement: the budget plus its tolerance."""
        assert self.budget.max_saved_bytes is not None
        return math.floor(self.budget.max_saved_bytes * (1.0 + self.budget.tolerance))

    @property
    def over(self) -> bool:
        return self.measured > self.limit

    @property
    def difference(self) -> int:
        assert self.budget.max_saved_bytes is not None
        return self.measured - self.budget.max_saved_bytes

    def line(self) -> str:
        """``OVER vit (examples/vit.py): measured 1,234 B, budget 1,000 B, difference +234 B (+23.4%)``."""
        b = self.budget.max_saved_bytes
        assert b is not None
        pct = f"{100.0 * self.difference / b:+.1f}%" if b else ("+inf%" if self.difference else "+0.0%")
        tol = f", tolerance {100.0 * self.budget.tolerance:g}%" if self.budget.tolerance else ""
        status = "OVER" if self.over else "ok  "
        return (
            f"{status} {self.budget.label}: measured {self.measured:,} B, budget {b:,} B, "
            f"difference {self.difference:+,} B ({pct}){tol}"
        )


# ----------------------------------------------------------------------------------------------------------- update

_HEADER = re.compile(r"^\s*\[\[\s*model\s*\]\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def _key_line(key: str) -> re.Pattern[str]:
    return re.compile(rf"^(\s*{key}\s*=\s*)([^#\r\n]*?)(\s*(?:#.*)?)$")


def update_text(text: str, values: Sequence[Mapping[str, int]]) -> str:
    """Set integer keys of each ``[[model]]`` entry, editing the text in place (comments and layout are kept).

    Args:
        text: the budgets file.
        values: per entry, in file order, the keys to set, e.g. ``{"max_saved_bytes": 123, "baseline_bytes": 456}``.

    Returns:
        The new text. Falls back to writing the whole file (comments lost) if the layout is too unusual to edit.
    """
    data = tomllib.loads(text)
    expected = json.loads(json.dumps(data))
    for entry, vals in zip(expected.get("model", []), values, strict=False):
        entry.update(vals)
    try:
        new = _edit_lines(text, values)
        if tomllib.loads(new) == expected:
            return new
    except (ValueError, tomllib.TOMLDecodeError):
        pass
    return dump_toml(expected)


def _edit_lines(text: str, values: Sequence[Mapping[str, int]]) -> str:
    lines = text.splitlines(keepends=True)
    # Direct-key region of each [[model]] entry: from its header to the next table header.
    regions: list[list[int]] = []
    for i, line in enumerate(lines):
        if _ANY_HEADER.match(line) and regions and regions[-1][1] == len(lines):
            regions[-1][1] = i
        if _HEADER.match(line):
            regions.append([i, len(lines)])
    if len(regions) != len(values):
        raise ValueError("entries not all written as [[model]] sections")
    # Edit from the last entry so earlier line numbers stay valid.
    for (start, end), vals in reversed(list(zip(regions, values, strict=True))):
        for key, value in vals.items():
            pat = _key_line(key)
            for j in range(start + 1, end):
                body = lines[j].rstrip("\r\n")
                m = pat.match(body)
                if m:
                    lines[j] = f"{m.group(1)}{value}{m.group(3)}" + lines[j][len(body) :]
                    break
            else:
                after = start
                for j in range(start + 1, end):
                    if re.match(r"^\s*(path|max_saved_bytes)\s*=", lines[j]):
                        after = j
                if not lines[after].endswith("\n"):
                    lines[after] += "\n"
                lines.insert(after + 1, f"{key} = {value}\n")
                end += 1
    return "".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a budgets document (top-level scalars, then ``[[model]]`` sections with an optional options table)."""
    out = [f"{k} = {_toml_value(v)}\n" for k, v in data.items() if k != "model"]
    for entry in data.get("model", []):
        out.append("\n[[model]]\n")
        tables = {k: v for k, v in entry.items() if isinstance(v, Mapping)}
        out += [f"{k} = {_toml_value(v)}\n" for k, v in entry.items() if k not in tables]
        for k, v in tables.items():
            out.append(f"[model.{k}]\n")
            out += [f"{json.dumps(str(kk))} = {_toml_value(vv)}\n" for kk, vv in v.items()]
    return "".join(out).lstrip("\n")


def write_updated(budgets: BudgetsFile, values: Sequence[Mapping[str, int]]) -> None:
    """Rewrite ``budgets.path`` with new measured values (atomically: a temporary file, then a rename)."""
    new = update_text(budgets.text, values)
    tmp = budgets.path.with_name(budgets.path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, budgets.path)
