"""The real ``actpass`` command, in subprocesses: every mode, format and exit code, and the JSON schema.

Most runs use ``--inner eager --baseline aot_eager_decomp_partition`` (the min-cut partition Inductor uses, without
Inductor's code generation) to keep the file fast; the default Inductor path runs once, through the console script.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FAST = ("--inner", "eager", "--baseline", "aot_eager_decomp_partition")


def _env(extra_path: Path | None = None) -> dict[str, str]:
    paths = [str(p) for p in (extra_path, REPO) if p is not None]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def actpass(*args: str | Path, cwd: Path = REPO, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "actpass", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(extra_path), capture_output=True, text=True, timeout=600)


def assert_bad_input(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, exactly one line on stderr starting with 'actpass:', no traceback, nothing on stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("actpass: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------------------- inspect


def test_inspect_default_inductor_through_the_console_script() -> None:
    exe = shutil.which("actpass")
    cmd = [exe] if exe else [sys.executable, "-m", "actpass"]
    path = FIXTURES / "tiny_mlp.py"
    proc = subprocess.run([*cmd, "inspect", path], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"actpass inspect {path}  (mesa: bits=8, stats=dynamic, inner=inductor)" in out
    # fc1's output stored as 8-bit codes; the GELU output rebuilt from it in backward.
    assert re.search(r"graph 0: 4 saved tensors, 1 quantized, 1 recomputed, 64\.0 KiB -> [0-9.]+ KiB", out), out
    assert "measured (inductor -> mesa)  65,536 B" in out
    assert "before (inductor): agree" in out and "after (mesa): agree" in out
    assert "Traceback" not in proc.stderr


def test_inspect_json_schema() -> None:
    # --max-error inf: every storage that can take codes gets them, so every layout shows in the JSON.
    args = ("--format", "json", "--exclude", "heda", "--max-error", "inf")
    proc = actpass("inspect", FIXTURES / "tiny_attn.py", *args, *FAST)
    assert proc.returncode == 0, proc.stderr
    # A glob that matches nothing: one warning line naming it and the nearest module path.
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("actpass: warning:")]
    assert warned == ["actpass: warning: exclude glob 'heda' matches no module in the compiled graphs; nearest: head"]
    d = json.loads(proc.stdout)
    assert d["schema_version"] == 1
    assert set(d) == {
        "schema_version",
        "versions",
        "model",
        "config",
        "baseline_backend",
        "totals",
        "reconciliation",
        "measured",
        "graphs",
        "modules",
        "notes",
    }
    assert set(d["versions"]) == {"actpass", "torch"}
    assert d["model"]["path"].endswith("tiny_attn.py") and d["model"]["loss"] == "default"
    assert d["model"]["model_attr"] == "model" and d["model"]["inputs_attr"] == "example_inputs"
    assert d["model"]["device"] == "cpu" and d["model"]["parameters"] > 0 and d["model"]["parameter_bytes"] > 0
    assert d["config"]["inner"] == "eager" and d["config"]["bits"] == 8
    assert d["baseline_backend"] == "aot_eager_decomp_partition"
    t = d["totals"]
    assert set(t) == {
        "saved_bytes_before",
        "saved_bytes_after",
        "ratio",
        "measured_bytes_before",
        "measured_bytes_after",
        "measured_ratio",
        "graphs",
        "saved_tensors",
        "quantized_tensors",
    }
    assert all(isinstance(t[k], int) for k in t if k.endswith("bytes_before") or k.endswith("bytes_after"))
    assert 0 < t["saved_bytes_after"] < t["saved_bytes_before"]
    assert t["ratio"] == pytest.approx(t["saved_bytes_after"] / t["saved_bytes_before"])
    assert t["graphs"] == len(d["graphs"]) == 1 and t["quantized_tensors"] > 0
    for side in ("before", "after"):
        r = d["reconciliation"][side]
        assert set(r) == {
            "planned",
            "measured",
            "difference",
            "agree",
            "explanation",
            "explained",
            "unexplained_bytes",
            "causes",
        }
        assert r["planned"] == t[f"saved_bytes_{side}"] and r["measured"] == t[f"measured_bytes_{side}"]
        assert r["difference"] == r["measured"] - r["planned"] and isinstance(r["explanation"], list)
        assert r["agree"] == (r["difference"] == 0)
    assert d["reconciliation"]["after"]["agree"] is True  # the mesa run saves exactly what the plan says
    m = d["measured"]["after"]
    assert set(m) == {
        "backend",
        "total",
        "storages",
        "saved_tensors",
        "by_dtype",
        "excluded_bytes",
        "excluded_tensors",
        "eager_bytes",
        "graphs",
        "seconds",
    }
    assert m["backend"] == "mesa" and m["total"] == t["measured_bytes_after"] and "torch.uint8" in m["by_dtype"]
    (g,) = d["graphs"]
    assert set(g) == {
        "graph_id",
        "name",
        "saved_bytes_before",
        "saved_bytes_after",
        "shared_bytes",
        "skipped",
        "pass_seconds",
        "tensors",
    }
    assert g["graph_id"] == 0 and g["skipped"] is None and len(g["tensors"]) == t["saved_tensors"]
    assert set(g["pass_seconds"]) == {"analysis", "rewrite"} and 0 < g["pass_seconds"]["analysis"] < 60
    keys = [
        "index",
        "name",
        "tensor_id",
        "producer",
        "module_path",
        "source",
        "shape",
        "dtype",
        "layout",
        "heads",
        "decision",
        "reason",
        "detail",
        "bits",
        "bytes_before",
        "bytes_after",
        "counted",
        "input_name",
        "role",
        "est_error",
        "recompute",
        "recompute_from",
    ]
    assert all(list(row) == keys for row in g["tensors"])
    names = {row["input_name"] for row in g["tensors"] if not row["counted"]}
    assert "block.proj.weight" in names and "x" in names  # graph inputs by parameter / argument name
    per_head = [row for row in g["tensors"] if row["layout"] == "per-head"]
    assert per_head and all(row["heads"] == 4 for row in per_head)
    assert {row["decision"] for row in g["tensors"]} <= {"quantized", "kept", "recomputed"}
    assert all(row["bits"] == 8 for row in g["tensors"] if row["decision"] == "quantized")
    assert sum(mod["saved_bytes_after"] for mod in d["modules"]) >= t["saved_bytes_after"]


def test_inspect_vit_table_fits_a_terminal() -> None:
    """`actpass inspect examples/vit.py`, as is (Inductor): at most 120 columns and 60 lines, with override ids."""
    proc = actpass("inspect", "examples/vit.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 120, (len(lines), max(lines, key=len))
    header = next(ln for ln in lines if "tensor id" in ln)
    assert header.split()[:2] == ["tensor", "id"]
    assert any(ln.strip().startswith("blocks.*.attn:sdpa.0#0 ") and "x4" in ln for ln in lines)
    lse = next(ln for ln in lines if "sdpa.1#0" in ln)
    assert "row statistic" in lse and "policy" not in lse
    assert any("29 parameters and inputs" in ln for ln in lines)
    # Inductor's copies of the patch embedding's input and weight account for every byte of the difference.
    assert "before (inductor): explained (copies of parameters or inputs +540,672 B)" in lines
    assert "after (mesa): explained (copies of parameters or inputs +540,672 B)" in lines
    # Less those copies, the measurement is what the plan (and a budget) covers: the same bytes as planned.
    planned = next(ln for ln in lines if ln.strip().startswith("planned ")).split()
    less = next(ln for ln in lines if ln.strip().startswith("measured, less param/input copies")).split()
    assert less[4:] == planned[1:], (less, planned)
    assert not any("_scaled_dot_product" in ln or ln.strip().startswith(":input#") for ln in lines)


def test_inspect_markdown_to_file_with_plot_and_progress(tmp_path: Path) -> None:
    has_mpl = _has_matplotlib()
    md, png = tmp_path / "report.md", tmp_path / "bars.png"
    extra = ("--plot", png) if has_mpl else ()
    proc = actpass("inspect", FIXTURES / "tiny_mlp.py", "--format", "markdown", "-o", md, "--progress", *extra, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    text = md.read_text()
    assert text.startswith("### actpass inspect `") and "| planned | 65,536 B" in text and "<details>" in text
    assert "[aot_eager_decomp_partition] compiling graph 0" in proc.stderr
    assert "[mesa] compiling graph 0" in proc.stderr and "graph 0 compiled in" in proc.stderr
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_custom_names_bits_and_no_baseline() -> None:
    proc = actpass(
        "inspect",
        FIXTURES / "custom_loss.py",
        "--model",
        "net",
        "--inputs",
        "batch",
        "--bits",
        "4",
        "--baseline",
        "none",
        "--inner",
        "eager",
        "--format",
        "json",
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["config"]["bits"] == 4 and d["model"]["loss"] == "custom" and d["model"]["model_attr"] == "net"
    assert d["totals"]["measured_bytes_before"] is None and d["baseline_backend"] is None
    assert d["reconciliation"]["before"]["agree"] is None and d["reconciliation"]["after"]["agree"] is True
    assert any(r["bits"] == 4 for g in d["graphs"] for r in g["tensors"])


def test_inspect_explains_a_difference() -> None:
    # A graph break hands an activation to the second graph as an input: the plan counts (and quantizes) it like
    # any activation, so plan and measurement agree; the baseline's own partition is what differs.
    proc = actpass("inspect", FIXTURES / "graph_break.py", "--format", "json", *FAST)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["totals"]["graphs"] == 2
    handed = [t for g in d["graphs"] for t in g["tensors"] if "handed over by a graph break" in t["detail"]]
    assert handed and all(t["counted"] and t["decision"] == "quantized" for t in handed)
    r = d["reconciliation"]["after"]
    assert r["difference"] == r["measured"] - r["planned"]
    if not r["agree"]:
        text = "\n".join(r["explanation"])
        assert f"measured - planned = {r['difference']:+,} B" in text


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plot_without_matplotlib_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when it is not installed
    proc = _main(capsys, "inspect", FIXTURES / "tiny_mlp.py", "--plot", tmp_path / "x.png")
    assert_bad_input(proc, "--plot needs matplotlib", "pip install 'actpass[plot]'")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------------- bad input
# Every bad-input case of the issue runs as a real subprocess. They only import torch and fail, so they run a few at a
# time (one module-scoped fixture) to keep this file fast on 2 cores.

BAD_INSPECT: dict[str, tuple[tuple[str | Path, ...], tuple[str, ...]]] = {
    "missing-file": (("nonexistent.py",), ("model file not found: nonexistent.py",)),
    "raises-on-import": (
        (FIXTURES / "bad_import.py",),
        ("raised on import: ValueError: fixture failed on purpose (width 16)", "bad_import.py:6)"),
    ),
    "no-model": ((FIXTURES / "no_model.py",), ("defines no `model`", "it defines: example_inputs, net")),
    "inputs-do-not-fit": (
        (FIXTURES / "bad_inputs.py",),
        ("the inputs do not fit the model", "mat1 and mat2 shapes cannot be multiplied", "bad_inputs.py)"),
    ),
    "nothing-to-train": ((FIXTURES / "frozen.py",), ("nothing to train", "none of its 2 parameters requires grad")),
}

_MLP = "[[model]]\npath = 'models/tiny_mlp.py'\n"
BAD_CHECK: dict[str, tuple[str, tuple[str, ...]]] = {
    "malformed": ("[[model]\npath = 'models/tiny_mlp.py'\n", ("malformed budgets file", "(at line 1")),
    "unknown-key": (_MLP + "max_saved_bytes = 1\nowner = 'me'\n", ("unknown key(s) 'owner'",)),
    "float": (_MLP + "max_saved_bytes = 2.5\n", ("got 2.5",)),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    jobs: dict[str, tuple[tuple[str | Path, ...], Path]] = {}
    for key, (args, _) in BAD_INSPECT.items():
        jobs[f"inspect/{key}"] = (("inspect", *args), REPO)
    for key, (text, _) in BAD_CHECK.items():
        budgets = _project(tmp_path_factory.mktemp(key), text)
        jobs[f"check/{key}"] = (("check", "--budgets", budgets), REPO)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(actpass, *args, cwd=cwd) for k, (args, cwd) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", sorted(BAD_INSPECT))
def test_inspect_bad_input(bad_runs: dict, case: str) -> None:
    assert_bad_input(bad_runs[f"inspect/{case}"], *BAD_INSPECT[case][1])


@pytest.mark.parametrize("case", sorted(BAD_CHECK))
def test_check_bad_input(bad_runs: dict, case: str) -> None:
    assert_bad_input(bad_runs[f"check/{case}"], *BAD_CHECK[case][1])


def test_missing_budgets_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    proc = _main(capsys, "check", cwd=tmp_path)
    assert_bad_input(proc, "budgets file not found: actpass-budgets.toml")


# The same code paths, in-process (no torch start-up per case): more argument and config errors.
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("inspect", FIXTURES), ("model file is not a file",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--bits", "3"), ("bits must be one of (2, 4, 8), got 3",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--inner", "tvm"), ("inner must be one of",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--min-bytes", "-1"), ("min_bytes must be a non-negative integer",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--override", "nobits"), ("--override must be GLOB=BITS",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--override", "x=3"), ("bits must be 0 (exact) or one of",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--format", "xml"), ("invalid choice: 'xml'",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--bit", "4"), ("unrecognized arguments: --bit 4",)),  # no abbreviations
        (("inspect", FIXTURES / "tiny_mlp.py", "--exclude-o", "x"), ("unrecognized arguments: --exclude-o",)),
        (("inspect", FIXTURES / "no_model.py", "--model", "net", "--inputs", "nope"), ("defines no `nope`",)),
        (("inspect", FIXTURES / "tiny_mlp.py", "--baseline", "nosuch", "--inner", "eager"), ("unknown torch.compile",)),
        (("inspect",), ("the following arguments are required: MODEL.py",)),
        ((), ("required",)),
        (("check", "--budgets", FIXTURES / "nope.toml"), ("budgets file not found",)),
    ],
    ids=lambda v: None,
)
def test_more_bad_input_in_process(capsys: pytest.CaptureFixture[str], args: tuple, needles: tuple) -> None:
    assert_bad_input(_main(capsys, *args), *needles)


def _main(
    capsys: pytest.CaptureFixture[str], *args: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    from actpass.cli import main

    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors exit from inside the parser
        rc = exc.code
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def test_syntax_error_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nmodel = torch.nn.Linear(2,\n")
    assert_bad_input(_main(capsys, "inspect", broken), "raised on import: SyntaxError:", "broken.py:3)")


@pytest.mark.parametrize(
    ("budgets", "needles"),
    [
        (_MLP + "max_saved_bytes = -3\n", ("must be a non-negative integer (bytes), got -3",)),
        (_MLP + "max_saved_bytes = '10 MB'\n", ("got '10 MB'",)),
        (
            "[[model]]\npath = 'models/bad_inputs.py'\nmax_saved_bytes = 1\n",
            ("the inputs do not fit the model", "model 1]"),
        ),
        (_MLP + "max_saved_bytes = true\n", ("got True",)),
        (_MLP + "max_saved_bytes = 1\n[model.options]\nbits = 5\n", ("bad options: bits must be",)),
        ("[[model]]\npath = 'models/gone.py'\nmax_saved_bytes = 1\n", ("model file not found",)),
        (_MLP, ("missing `max_saved_bytes`",)),
        ("title = 'x'\n" + _MLP + "max_saved_bytes = 1\n", ("unknown top-level key(s) 'title'",)),
    ],
    ids=lambda v: None,
)
def test_check_bad_input_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path, budgets: str, needles) -> None:
    p = _project(tmp_path, budgets)
    assert_bad_input(_main(capsys, "check", "--budgets", p), *needles)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    from actpass.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "inspect" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata
    import platform

    import actpass
    from actpass.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    out = capsys.readouterr().out.strip()
    torch_version = importlib.metadata.version("torch")
    assert info.value.code == 0
    assert out == f"actpass {actpass.__version__} (torch {torch_version}, Python {platform.python_version()})"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{actpass.__version__}"' in pyproject


# Each MesaConfig field, a flag value and the config value it must give (a new field fails here until it is added).
_TABLE = REPO / "actpass" / "sensitivity.json"
FLAG_VALUES = {
    "bits": (["--bits", "4"], 4),
    "stats": (["--stats", "running"], "running"),
    "rounding": (["--rounding", "stochastic"], "stochastic"),
    "decay": (["--decay", "0.5"], 0.5),
    "min_bytes": (["--min-bytes", "0"], 0),
    "include": (["--include", "a*", "--include", "b"], ("a*", "b")),
    "exclude": (["--exclude", "head"], ("head",)),
    "include_ops": (["--include-op", "gelu*"], ("gelu*",)),
    "exclude_ops": (["--exclude-op", "div*"], ("div*",)),
    "overrides": (["--override", "blocks.0*=0", "--override", "*:gelu#*=4"], (("blocks.0*", 0), ("*:gelu#*", 4))),
    "inner": (["--inner", "eager"], "eager"),
    "quantize_outputs": (["--no-quantize-outputs"], False),
    "recompute": (["--no-recompute"], False),
    "rerun_attention": (["--no-rerun-attention"], False),
    "max_error": (["--max-error", "0.02"], 0.02),
    "budget": (["--budget", "0.25"], 0.25),
    "codec": (["--codec", "kernels"], "kernels"),
    "sensitivity": (["--sensitivity", str(_TABLE)], str(_TABLE)),
}


def test_every_config_field_has_a_flag() -> None:
    import dataclasses

    from actpass.cli import build_parser, config_from_args
    from actpass.config import MesaConfig

    fields = [f.name for f in dataclasses.fields(MesaConfig)]
    assert sorted(FLAG_VALUES) == sorted(fields)
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["inspect"].format_help()
    for name, (argv, expected) in FLAG_VALUES.items():
        assert argv[0] in help_text, name
        config = config_from_args(parser.parse_args(["inspect", "m.py", *argv]))
        assert getattr(config, name) == expected, name
        assert config_from_args(parser.parse_args(["inspect", "m.py"])) == MesaConfig()
    on = config_from_args(parser.parse_args(["inspect", "m.py", "--quantize-outputs"]))
    assert on.quantize_outputs is True
    assert config_from_args(parser.parse_args(["inspect", "m.py", "--budget", "2000000"])).budget == 2_000_000


# ------------------------------------------------------------------------------------------------------------ check


def _project(tmp_path: Path, budgets: str) -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    for name in ("tiny_mlp.py", "tiny_attn.py", "bad_inputs.py"):
        shutil.copy(FIXTURES / name, models / name)
    p = tmp_path / "actpass-budgets.toml"
    p.write_text(textwrap.dedent(budgets))
    return p


BUDGETS = """\
# activation budgets (test)
[[model]]
path = "models/tiny_mlp.py"   # relative to this file
max_saved_bytes = 1000000000
[model.options]
inner = "eager"

[[model]]
name = "attn"
path = "models/tiny_attn.py"
max_saved_bytes = 1000  # far too small
[model.options]
inner = "eager"
"""


def test_check_over_budget_then_update_then_within(tmp_path: Path) -> None:
    budgets = _project(tmp_path, BUDGETS)
    over = actpass("check", "--budgets", budgets, cwd=REPO)
    assert over.returncode == 1, over.stderr
    lines = over.stdout.splitlines()
    assert lines[0].startswith("ok   tiny_mlp (models/tiny_mlp.py): measured ")
    assert ", budget 1,000,000,000 B" in lines[0]
    measured_mlp = int(lines[0].split("measured ")[1].split(" B")[0].replace(",", ""))
    assert 0 < measured_mlp < 65536 / 3  # fc1's output as 8-bit codes, the GELU output rebuilt in backward
    assert lines[1].startswith("OVER attn (models/tiny_attn.py): measured ")
    assert ", budget 1,000 B, difference +" in lines[1] and lines[1].endswith("%)")
    assert lines[2] == "2 model(s): 1 within budget, 1 over"
    measured_attn = int(lines[1].split("measured ")[1].split(" B")[0].replace(",", ""))

    upd = actpass("check", "--budgets", budgets, "--update", "--baseline", "aot_eager_decomp_partition")
    assert upd.returncode == 0, upd.stderr
    assert "updated attn (models/tiny_attn.py): max_saved_bytes 1,000 B -> " in upd.stdout
    assert "(aot_eager_decomp_partition baseline " in upd.stdout
    text = budgets.read_text()
    assert "# activation budgets (test)" in text and "# relative to this file" in text and "# far too small" in text
    assert f"max_saved_bytes = {measured_mlp}" in text and f"max_saved_bytes = {measured_attn}" in text
    assert "baseline_bytes = 65536" in text and 'inner = "eager"' in text

    within = actpass("check", cwd=tmp_path)  # default: ./actpass-budgets.toml
    assert within.returncode == 0, within.stderr
    assert within.stdout.splitlines()[-1] == "2 model(s): 2 within budget, 0 over"
    assert "difference +0 B (+0.0%)" in within.stdout
