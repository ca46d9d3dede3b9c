"""The ``actpass`` command: ``inspect`` a model file's saved activations, ``check`` them against budgets.

Exit codes: 0 success (every model within its budget), 1 a model over its budget, 2 bad input (one line on stderr,
no traceback), 3 an internal error (with a traceback: please report it).

Only this module prints; library modules log through ``logging``. Torch is imported only once the cheap checks
(arguments, files, budgets, config) have passed, so bad input is reported in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from actpass.budget import DEFAULT_FILE, BudgetError, load_budgets
from actpass.config import MesaConfig
from actpass.modelfile import ModelFileError

EXIT_OK, EXIT_OVER, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class BadInput(Exception):
    """Bad input from the user: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--bit 4` must not be taken as `--bits 4`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"actpass: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------------------------------------- options


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_attr", default="model", metavar="NAME", help="name of the model in the file")
    p.add_argument(
        "--inputs", dest="inputs_attr", default="example_inputs", metavar="NAME", help="name of the example inputs"
    )
    p.add_argument("--loss", dest="loss_attr", default="loss", metavar="NAME", help="name of the loss function")
    p.add_argument("--device", default=None, help="device to run on (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the model file is imported")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="log each compiled graph to stderr"
    )
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="never log progress")


def _policy_flags() -> list[tuple[str, str, dict[str, Any]]]:
    """``(field, flag, add_argument kwargs)`` for every MesaConfig field, derived from its type and help text.

    A field added to MesaConfig gets a flag here with no change to this module: bool -> ``--x/--no-x``, int and
    float -> a number, an Enum -> its values listed in the help, ``tuple[str, ...]`` -> a repeatable GLOB,
    ``overrides`` -> repeatable GLOB=BITS, anything else -> a string (or a number for ``int | float``) that
    MesaConfig validates. The flag's spelling and metavar can be set next to the field (``config.option``).
    """
    import dataclasses
    import enum
    import types
    import typing

    hints = typing.get_type_hints(MesaConfig)
    out = []
    for f in dataclasses.fields(MesaConfig):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": meta.get("help", "")}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]  # X | None
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint in (int, float):
            kwargs["type"] = hint
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            kwargs.setdefault("metavar", "{" + ",".join(str(m.value) for m in hint) + "}")
        elif f.name == "overrides":
            kwargs["action"] = "append"
        elif typing.get_origin(hint) is tuple:
            kwargs["action"] = "append"
            kwargs["help"] += " (repeat the flag for several)"
        elif set(args) <= {int, float} and args:
            kwargs["type"] = _number
        if isinstance(f.default, (bool, int, float, str, enum.Enum)) and not isinstance(f.default, tuple):
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            kwargs["help"] += f"; default {default}"
        out.append((f.name, flag, kwargs))
    return out


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mesa policy (the fields of MesaConfig; see `help(actpass.MesaConfig)`)")
    for _, flag, kwargs in _policy_flags():
        g.add_argument(flag, **{k: v.replace("%", "%%") if k == "help" else v for k, v in kwargs.items()})


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> MesaConfig:
    """MesaConfig from the policy options (on top of ``base``); raises BadInput with MesaConfig's message."""
    d = dict(base or {})
    for name, flag, _ in _policy_flags():
        v = getattr(args, name, None)
        if v is None:
            continue
        if name == "overrides":
            v = [_override(flag, item) for item in v]
        d[name] = v
    try:
        return MesaConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise _bad_input(exc) from None


def _override(flag: str, item: str) -> tuple[str, int]:
    pattern, sep, bits = item.rpartition("=")
    if not sep or not pattern:
        raise BadInput(f"actpass: {flag} must be GLOB=BITS, got {item!r}")
    try:
        return pattern, int(bits)
    except ValueError:
        raise BadInput(f"actpass: {flag} {item!r}: bits must be an integer") from None


def version_text() -> str:
    """``actpass 0.1.0 (torch 2.13.0, Python 3.11.7)``, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from actpass import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"actpass {__version__} (torch {torch_version}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="actpass",
        description="Inspect and budget the activation memory that torch.compile(backend='mesa') saves for backward.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="{inspect,check,calibrate}", parser_class=_Parser)
    sub.required = True

    ins = sub.add_parser(
        "inspect",
        help="show every saved tensor, the plan's decision and the measured bytes",
        description="Compile MODEL.py with the mesa backend, run one forward and backward, and report every tensor "
        "saved for backward: what the pass decided and why, planned bytes, and bytes measured independently against "
        "torch.compile(backend='inductor').",
    )
    ins.add_argument("path", metavar="MODEL.py", help="model file defining `model` and `example_inputs`")
    ins.add_argument("--format", choices=("table", "json", "markdown"), default="table", help="output format")
    ins.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    ins.add_argument("--plot", metavar="FILE.png", help="also write bars of bytes before/after per module (matplotlib)")
    ins.add_argument(
        "--all",
        dest="all_rows",
        action="store_true",
        help="table: one row per saved tensor (parameters and inputs by name, every view; no folding of repeated "
        "blocks)",
    )
    ins.add_argument("--wide", action="store_true", help="table: every column, no 120-column limit")
    ins.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="table: the long reason of each decision, the pass's own time per graph, the whole reconciliation",
    )
    ins.add_argument(
        "--baseline",
        default="inductor",
        metavar="BACKEND",
        help="torch.compile backend measured for the 'before' column (default: inductor; 'none' to skip)",
    )
    _add_model_options(ins)
    _add_policy_options(ins)

    chk = sub.add_parser(
        "check",
        help="check measured saved bytes against a budgets file (exit 1 if over)",
        description="Measure each model of a budgets file with the mesa backend and compare with its budget. "
        "Exit 0 if all are within budget, 1 if any is over, 2 for bad input.",
    )
    chk.add_argument(
        "--budgets", default=DEFAULT_FILE, metavar="FILE", help=f"budgets file (default: ./{DEFAULT_FILE})"
    )
    chk.add_argument("--update", action="store_true", help="rewrite the budgets with the measured values")
    chk.add_argument(
        "--baseline",
        default="inductor",
        metavar="BACKEND",
        help="with --update: backend measured for baseline_bytes (default: inductor; 'none' to leave it out)",
    )
    chk.add_argument("--device", default=None, help="device for entries that name none (default: cpu)")
    chk.add_argument("--seed", type=int, default=0, help="torch.manual_seed before each model file is imported")
    prog = chk.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None, help="log progress to stderr")
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="never log progress")

    cal = sub.add_parser(
        "calibrate",
        help="measure the planner's error model on MODEL.py; use it with --sensitivity FILE",
        description="Measure, on MODEL.py's example inputs, how much one training step's gradients move when each "
        "kind of saved tensor is stored at 8, 4 or 2 bits, and write the planner's sensitivity table for this model. "
        "inspect/check/torch.compile take it as --sensitivity FILE (MesaConfig(sensitivity=FILE)): budget= and "
        "bits=4/2 plans then spend bytes where this model needs them, and report its error, not a suite-wide bound.",
    )
    cal.add_argument("path", metavar="MODEL.py", help="model file defining `model` and `example_inputs`")
    cal.add_argument(
        "-o", "--output", metavar="FILE", help="where to write the table (default: ./<MODEL>-sensitivity.json)"
    )
    _add_model_options(cal)
    _add_policy_options(cal)
    return parser


# ---------------------------------------------------------------------------------------------------------- helpers


def _setup_progress(enabled: bool | None) -> None:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("actpass")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _require_file(path: str, what: str = "model file") -> None:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"actpass: {what} not found: {path}")
    if not p.is_file():
        raise BadInput(f"actpass: {what} is not a file: {path}")


def _quiet_torch() -> None:
    """Keep the user's stderr to what actpass says: torch's own warnings are not about their input, and actpass's
    warnings are one line each (``actpass: warning: ...``), without the file and line they were raised from."""
    import warnings

    warnings.filterwarnings("ignore", module=r"torch\..*")
    show = warnings.showwarning

    def one_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message)
        if text.startswith("actpass: "):
            print(f"actpass: warning: {text.removeprefix('actpass: ')}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line


def _load(
    path: str | os.PathLike[str], *, model_attr: str, inputs_attr: str, loss_attr: str, device: str | None, seed: int
) -> Any:
    import torch

    from actpass.modelfile import check_trainable, load_model_file

    torch.manual_seed(seed)
    spec = load_model_file(
        path, model_attr=model_attr, inputs_attr=inputs_attr, loss_attr=loss_attr, device=device or "cpu"
    )
    check_trainable(spec)
    return spec


def _load_from_args(args: argparse.Namespace) -> Any:
    """:func:`_load` with the model options of inspect/calibrate (``_add_model_options``)."""
    return _load(
        args.path,
        model_attr=args.model_attr,
        inputs_attr=args.inputs_attr,
        loss_attr=args.loss_attr,
        device=args.device,
        seed=args.seed,
    )


def _bad_input(exc: BaseException) -> BadInput:
    """A ValueError from the library as the CLI's one-line bad input (prefixed ``actpass:`` if it is not)."""
    msg = str(exc)
    return BadInput(msg if msg.startswith("actpass:") else f"actpass: {msg}")


def _measure_mesa(spec: Any, config: MesaConfig) -> tuple[Any, Any]:
    from actpass.backend import mesa
    from actpass.measure import measure_saved_bytes

    backend = mesa(config)
    measured = measure_saved_bytes(spec.model, spec.args, spec.loss_fn, backend, kwargs=spec.kwargs)
    return backend, measured


def _check_backend(name: str) -> None:
    from torch._dynamo import lookup_backend

    try:
        lookup_backend(name)
    except Exception:  # noqa: BLE001 - dynamo raises its own InvalidBackend
        raise BadInput(f"actpass: unknown torch.compile backend for --baseline: {name!r}") from None


def _measure_baseline(spec: Any, backend: str) -> Any:
    from actpass.measure import measure_saved_bytes

    return measure_saved_bytes(spec.model, spec.args, spec.loss_fn, backend, kwargs=spec.kwargs)


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    _require_file(args.path)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BadInput("actpass: --plot needs matplotlib: pip install 'actpass[plot]'") from None
    _setup_progress(args.progress)
    _quiet_torch()
    baseline = None if args.baseline.lower() == "none" else args.baseline
    if baseline:
        _check_backend(baseline)
    spec = _load_from_args(args)
    before = _measure_baseline(spec, baseline) if baseline else None
    backend, after = _measure_mesa(spec, config)
    backend.check_globs()

    from actpass import report as rpt

    params = list(spec.model.parameters())
    model_info = {
        "model_attr": spec.model_attr,
        "inputs_attr": spec.inputs_attr,
        "loss": "custom" if spec.custom_loss else "default",
        "device": str(args.device or "cpu"),
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
    }
    skips = {s.graph_id: f"{s.reason.value}: {s.detail}" for s in getattr(backend, "skips", [])}
    report = rpt.Report.build(
        backend.plans,
        config,
        measured_before=before,
        measured_after=after,
        model_path=args.path,
        model=model_info,
        baseline_backend=baseline,
        skips=skips,
        timings={t.graph_id: (t.analysis_seconds, t.rewrite_seconds) for t in getattr(backend, "timings", [])},
    )
    if args.format == "table":
        text = rpt.render_table(report, all_rows=args.all_rows, wide=args.wide, verbose=args.verbose)
    else:
        text = {"json": rpt.render_json, "markdown": rpt.render_markdown}[args.format](report)
    _write(text, args.output)
    if args.plot:
        try:
            rpt.plot(report, args.plot)
        except rpt.PlotUnavailable as exc:
            raise BadInput(str(exc)) from None
        print(f"actpass: wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------ check


def cmd_check(args: argparse.Namespace) -> int:
    budgets = load_budgets(args.budgets, require_budgets=not args.update)
    for b in budgets.models:
        if not b.path.is_file():
            raise BadInput(f"actpass: {budgets.path}: model {b.index + 1}: model file not found: {b.path}")
    _setup_progress(args.progress)
    _quiet_torch()
    baseline = None if not args.update or args.baseline.lower() == "none" else args.baseline
    if baseline:
        _check_backend(baseline)
    from actpass.budget import Verdict, write_updated

    verdicts: list[Verdict] = []
    updates: list[dict[str, int]] = []
    for b in budgets.models:
        try:
            config = b.config()
            spec = _load(
                b.path,
                model_attr=b.model_attr,
                inputs_attr=b.inputs_attr,
                loss_attr=b.loss_attr,
                device=b.device or args.device,
                seed=args.seed,
            )
        except ModelFileError as exc:
            raise BadInput(f"{exc} [{budgets.path}: model {b.index + 1}]") from None
        logging.getLogger("actpass.cli").info("actpass: measuring %s ...", b.label)
        backend, measured = _measure_mesa(spec, config)
        backend.check_globs()
        if args.update:
            values = {"max_saved_bytes": measured.total}
            note = ""
            if baseline:
                values["baseline_bytes"] = _measure_baseline(spec, baseline).total
                note = f" ({baseline} baseline {values['baseline_bytes']:,} B)"
            updates.append(values)
            old = "unset" if b.max_saved_bytes is None else f"{b.max_saved_bytes:,} B"
            print(f"updated {b.label}: max_saved_bytes {old} -> {measured.total:,} B{note}", flush=True)
        else:
            v = Verdict(b, measured.total)
            verdicts.append(v)
            print(v.line(), flush=True)
    if args.update:
        write_updated(budgets, updates)
        print(f"wrote {budgets.path}")
        return EXIT_OK
    over = [v for v in verdicts if v.over]
    print(f"{len(verdicts)} model(s): {len(verdicts) - len(over)} within budget, {len(over)} over")
    return EXIT_OVER if over else EXIT_OK


# -------------------------------------------------------------------------------------------------------- calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    _require_file(args.path)
    out = Path(args.output or f"{Path(args.path).stem}-sensitivity.json")
    if out.exists() and not out.is_file():
        raise BadInput(f"actpass: --output is not a file: {out}")
    if not out.parent.is_dir():
        raise BadInput(f"actpass: --output: no such directory: {out.parent}")
    _setup_progress(args.progress)
    _quiet_torch()
    spec = _load_from_args(args)
    from actpass import calibrate

    progress = logging.getLogger("actpass.cli")
    progress.info("actpass: calibrating %s ...", args.path)
    try:
        table = calibrate.calibrate(
            spec.model, spec.args, spec.kwargs, spec.loss_fn, config=config, log=lambda m: progress.info("%s", m)
        )
    except ValueError as exc:
        raise _bad_input(exc) from None
    table["calibrated"]["model"] = f"{args.path}:{spec.model_attr}"
    calibrate.write_table(table, out)
    print(f"one step's global gradient error with only that kind of saved tensor rounded ({args.path}):")
    print(calibrate.summary(table))
    print(f"wrote {out}; use it with: actpass inspect {args.path} --sensitivity {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        return cmd_check(args)
    except (BadInput, BudgetError, ModelFileError) as exc:
        print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("actpass: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is our bug: show it whole
        traceback.print_exc()
        print("actpass: internal error (the traceback above); please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
