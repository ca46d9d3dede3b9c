"""Load a model file for ``actpass inspect`` / ``actpass check`` and check that it can be trained.

A model file is a Python file that defines:

* ``model``: an ``nn.Module``, or a zero-argument callable (a function, a class) that returns one;
* ``example_inputs``: a tuple of positional inputs, or a zero-argument callable that returns one. A single tensor is
  taken as a 1-tuple, and a dict as keyword arguments (handy for Hugging Face models);
* optionally ``loss(output) -> Tensor``; by default the loss is the mean square of the first floating-point tensor in
  the output (a tensor, a tuple/list, a dict, or a Hugging Face ``ModelOutput``, whose ``logits`` come first).

Everything the user can get wrong raises :class:`ModelFileError` with a one-line message that names the file and,
where there is one, the user's line, so the CLI can print it without a traceback.

Example:
    >>> spec = load_model_file("examples/vit.py")  # doctest: +SKIP
    >>> spec.model, spec.args, spec.kwargs  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import os
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_counter = itertools.count()


class ModelFileError(ValueError):
    """The model file or its inputs are not usable; the message is one line meant for the user."""


@dataclasses.dataclass
class ModelSpec:
    """A loaded model file: the module, its example inputs and the loss to train it with."""

    path: Path
    model: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loss_fn: Callable[[Any], torch.Tensor]
    model_attr: str = "model"
    inputs_attr: str = "example_inputs"
    custom_loss: bool = False  # whether the file defines its own loss

    def inputs(self) -> list[Any]:
        """All example inputs, positional then keyword values."""
        return [*self.args, *self.kwargs.values()]


def _where(exc: BaseException, path: Path) -> str:
    """``file:line`` of the innermost traceback frame in the user's code: the model file if it appears, else the
    innermost frame outside torch and the standard library, else the model file itself."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_rel(Path(exc.filename))}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    target = os.path.realpath(path)
    mine = [f for f in frames if os.path.realpath(f.filename) == target]
    if not mine:
        skip = (os.path.realpath(os.path.dirname(os.__file__)), os.path.realpath(os.path.dirname(__file__)))
        try:
            import torch

            skip += (os.path.realpath(os.path.dirname(torch.__file__)),)
        except ImportError:  # pragma: no cover
            pass
        mine = [f for f in frames if not os.path.realpath(f.filename).startswith(skip)]
    if not mine:
        return _rel(path)
    return f"{_rel(Path(mine[-1].filename))}:{mine[-1].lineno}"


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def describe_exception(exc: BaseException, path: Path) -> str:
    """One line: ``ValueError: message (file.py:12)``."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if isinstance(exc, SyntaxError):
        first = exc.msg or first
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"{text} ({_where(exc, path)})"


def import_model_file(path: str | os.PathLike[str]) -> Any:
    """Import ``path`` as a fresh module (its folder goes on ``sys.path`` first so it can import its neighbours)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"actpass: model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"actpass: model file is not a file: {p}")
    name = f"_actpass_model_{next(_counter)}_{p.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"actpass: cannot import {p}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(p.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # the user's code: anything can happen, report it in one line
        sys.modules.pop(name, None)
        raise ModelFileError(f"actpass: {p} raised on import: {describe_exception(exc, p)}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def default_loss(output: Any) -> torch.Tensor:
    """Mean square of the first floating-point tensor in ``output`` (tensors, sequences, dicts, ``ModelOutput``).

    Example:
        >>> default_loss(torch.ones(2, 3))  # doctest: +SKIP
        tensor(1.)
    """
    t = first_tensor(output)
    if t is None:
        raise TypeError(f"the model output ({type(output).__name__}) holds no floating-point tensor to train on")
    return t.float().pow(2).mean()


def first_tensor(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() or output.is_complex() else None
    if isinstance(output, Mapping):  # dict and HF ModelOutput (an OrderedDict whose first field is `logits`/`loss`)
        items = list(output.values())
        if "logits" in output:
            items.insert(0, output["logits"])
        for v in items:
            t = first_tensor(v)
            if t is not None:
                return t
        return None
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return first_tensor({f.name: getattr(output, f.name) for f in dataclasses.fields(output)})
    if isinstance(output, (tuple, list)):
        for v in output:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def _resolve(module: Any, attr: str, what: str, path: Path) -> Any:
    if not hasattr(module, attr):
        names = sorted(
            n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
        )
        hint = f"; it defines: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names else ""
        raise ModelFileError(f"actpass: {path} defines no `{attr}` ({what}){hint}")
    return getattr(module, attr)


def _call0(value: Any, attr: str, path: Path) -> Any:
    try:
        inspect.signature(value).bind()
    except TypeError as exc:
        raise ModelFileError(f"actpass: `{attr}` in {path} must be callable with no arguments: {exc}") from None
    except ValueError:  # no signature (some builtins): just try
        pass
    try:
        return value()
    except Exception as exc:
        raise ModelFileError(f"actpass: calling `{attr}` in {path} failed: {describe_exception(exc, path)}") from exc


def load_model_file(
    path: str | os.PathLike[str],
    *,
    model_attr: str = "model",
    inputs_attr: str = "example_inputs",
    loss_attr: str = "loss",
    device: str | None = None,
) -> ModelSpec:
    """Import a model file and build its model, inputs and loss (see the module docstring for the contract).

    Args:
        path: the model file.
        model_attr, inputs_attr, loss_attr: names to look up in the file.
        device: move the model and the tensor inputs there (default: leave them where the file put them).

    Returns:
        A :class:`ModelSpec`. Raises :class:`ModelFileError` for anything the user must fix.
    """
    import torch

    p = Path(path)
    module = import_model_file(p)
    obj = _resolve(module, model_attr, "an nn.Module or a zero-argument callable returning one", p)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ModelFileError(f"actpass: `{model_attr}` in {p} is a {type(obj).__name__}, not an nn.Module")
        obj = _call0(obj, model_attr, p)
        if not isinstance(obj, torch.nn.Module):
            raise ModelFileError(f"actpass: `{model_attr}()` in {p} returned a {type(obj).__name__}, not an nn.Module")
    inputs = _resolve(module, inputs_attr, "a tuple or dict of inputs, or a zero-argument callable returning one", p)
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs = _call0(inputs, inputs_attr, p)
    args, kwargs = _split_inputs(inputs, inputs_attr, p)
    loss_fn = getattr(module, loss_attr, None)
    custom = loss_fn is not None
    if custom and not callable(loss_fn):
        raise ModelFileError(f"actpass: `{loss_attr}` in {p} is a {type(loss_fn).__name__}, not a function")
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ModelFileError(f"actpass: bad device {device!r}: {exc}") from exc
        try:
            obj = obj.to(dev)
            args = tuple(_to(a, dev) for a in args)
            kwargs = {k: _to(v, dev) for k, v in kwargs.items()}
        except (RuntimeError, AssertionError) as exc:
            raise ModelFileError(f"actpass: cannot move the model to {device!r}: {str(exc).splitlines()[0]}") from exc
    obj.train()
    return ModelSpec(
        path=p,
        model=obj,
        args=args,
        kwargs=kwargs,
        loss_fn=loss_fn or default_loss,
        model_attr=model_attr,
        inputs_attr=inputs_attr,
        custom_loss=custom,
    )


def _to(value: Any, device: torch.device) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _split_inputs(inputs: Any, attr: str, path: Path) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        if not all(isinstance(k, str) for k in inputs):
            raise ModelFileError(f"actpass: `{attr}` in {path} is a dict whose keys are not all strings")
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise ModelFileError(
        f"actpass: `{attr}` in {path} is a {type(inputs).__name__}; expected a tuple of inputs or a dict of keyword "
        "arguments"
    )


def check_trainable(spec: ModelSpec) -> None:
    """Run the model eagerly once (forward and loss) so bad inputs fail here, in one line, and not inside compilation.

    Raises:
        ModelFileError: nothing requires grad, the inputs do not fit the model, or the loss is not a trainable scalar.
    """
    import torch

    params = [p for p in spec.model.parameters() if p.requires_grad]
    if not params:
        total = sum(1 for _ in spec.model.parameters())
        why = "it has no parameters" if total == 0 else f"none of its {total} parameters requires grad"
        raise ModelFileError(f"actpass: nothing to train in {spec.path}: {why}")
    try:
        output = spec.model(*spec.args, **spec.kwargs)
    except Exception as exc:
        raise ModelFileError(
            f"actpass: the inputs do not fit the model in {spec.path}: {describe_exception(exc, spec.path)}"
        ) from exc
    try:
        loss = spec.loss_fn(output)
    except Exception as exc:
        what = "`loss`" if spec.custom_loss else "the default loss"
        raise ModelFileError(
            f"actpass: {what} failed on the output of {spec.path}: {describe_exception(exc, spec.path)}"
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ModelFileError(f"actpass: the loss of {spec.path} must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ModelFileError(
            f"actpass: nothing to train in {spec.path}: the loss does not depend on any parameter that requires grad"
        )
    del output, loss
