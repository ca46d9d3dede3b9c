"""What a new user reads first: `help(actpass)`, MesaConfig's documentation, the README's list of options."""

from __future__ import annotations

import dataclasses
import pydoc
import re
from pathlib import Path

import actpass
from actpass.config import MesaConfig, Stats

ROOT = Path(__file__).resolve().parent.parent


def test_help_is_short_and_starts_with_the_public_api() -> None:
    text = pydoc.render_doc(actpass, renderer=pydoc.plaintext)
    lines = text.splitlines()
    assert len(lines) < 300, len(lines)
    description = "\n".join(lines[: lines.index("PACKAGE CONTENTS")])
    for name in ('backend="mesa"', "mesa(", "MesaConfig", "MesaBackend", "plans", "actpass inspect"):
        assert name in description, name
    classes = re.findall(r"^    class (\w+)", text, flags=re.MULTILINE)
    assert classes == ["MesaBackend", "MesaConfig"], classes
    assert "Methods inherited from builtins.str" not in text


def test_every_exported_name_is_importable() -> None:
    for name in actpass._EXPORTS:
        assert getattr(actpass, name) is not None, name
    assert set(actpass.__all__) <= set(actpass._EXPORTS)
    doc = actpass.__doc__ or ""
    assert all(f"``{name}" in doc for name in actpass._EXPORTS), [n for n in actpass._EXPORTS if f"``{n}" not in doc]


def test_choices_are_strings_too() -> None:
    config = MesaConfig(stats="running", rounding="stochastic", inner="eager")
    assert config.stats == "running" and config.stats is Stats.RUNNING and config.rounding == "stochastic"
    assert config == MesaConfig.from_dict(config.to_dict())


def test_mesa_config_documents_every_field() -> None:
    doc = MesaConfig.__doc__ or ""
    fields = doc.split("Fields:", 1)[1]
    for f in dataclasses.fields(MesaConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text: declare it with config.option(default, help)"
        assert re.search(rf"^\s+{f.name} \(default ", fields, flags=re.MULTILINE), f.name


def test_readme_lists_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("config = MesaConfig(", 1)[1].split("\n)\n", 1)[0]
    listed = set(re.findall(r"^\s{4}(\w+)=", block, flags=re.MULTILINE))
    assert listed == {f.name for f in dataclasses.fields(MesaConfig)}
    flags = readme.split("Policy options map to `MesaConfig`", 1)[1].split("\n\n", 1)[0]
    for f in dataclasses.fields(MesaConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert f"`{flag}" in flags, flag


def test_examples_readme_says_inputs_may_be_a_dict() -> None:
    text = (ROOT / "examples" / "README.md").read_text()
    contract = text.split("## The model-file contract", 1)[1].split("##", 1)[0]
    assert "dict" in contract and "keyword arguments" in contract
