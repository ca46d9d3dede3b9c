"""pytest plugin: the ``actpass_budget`` fixture asserts an activation-memory budget inside a user's test suite.

Installed with actpass (``pytest11`` entry point), so no ``conftest.py`` is needed::

    def test_vit_activation_budget(actpass_budget):
        actpass_budget("examples/vit.py", max_saved_bytes=4_500_000)

    def test_my_model_budget(actpass_budget):
        measured = actpass_budget.check(MyModel(), (torch.randn(8, 3, 64, 64),), max_saved_bytes=4_500_000, bits=8)
        assert measured.storages > 0

A model over its budget fails the test with the same line as ``actpass check`` (budget, measured, difference,
percent), without a traceback into actpass. Bad input (a missing file, inputs that do not fit) fails it the same way.

This module imports nothing heavy at import time: pytest loads it in every session of an environment with actpass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest


class ActpassBudget:
    """What the ``actpass_budget`` fixture returns. Call it with a model file, or use :meth:`check` on a module."""

    def __init__(self, rootpath: Path) -> None:
        self._root = rootpath

    def __call__(
        self,
        path: str | Path,
        max_saved_bytes: int,
        *,
        tolerance: float = 0.0,
        model_attr: str = "model",
        inputs_attr: str = "example_inputs",
        loss_attr: str = "loss",
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> Any:
        """Load a model file (relative paths: from pytest's rootdir) and assert its budget.

        Args:
            path: the model file (the ``actpass inspect`` contract: ``model``, ``example_inputs``, optional ``loss``).
            max_saved_bytes: the budget: activation bytes saved for backward with the mesa backend.
            tolerance: fraction over budget still accepted (0.02 = 2%).
            options, **config: MesaConfig fields, e.g. ``bits=4``.

        Returns:
            The :class:`actpass.measure.SavedBytes` measured.
        """
        from actpass.modelfile import ModelFileError, check_trainable, load_model_file

        p = Path(path)
        if not p.is_absolute():
            p = self._root / p
        try:
            spec = load_model_file(
                p, model_attr=model_attr, inputs_attr=inputs_attr, loss_attr=loss_attr, device=device
            )
            check_trainable(spec)
        except ModelFileError as exc:
            pytest.fail(str(exc), pytrace=False)
        return self.check(
            spec.model,
            spec.args,
            max_saved_bytes,
            kwargs=spec.kwargs,
            loss=spec.loss_fn,
            tolerance=tolerance,
            options=options,
            name=str(path),
            **config,
        )

    def measure(
        self,
        model: Any,
        inputs: Any,
        *,
        kwargs: Mapping[str, Any] | None = None,
        loss: Callable[[Any], Any] | None = None,
        options: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> Any:
        """Measure the activation bytes ``model`` saves for backward with mesa (no assertion)."""
        import torch

        from actpass.backend import mesa
        from actpass.config import MesaConfig
        from actpass.measure import measure_saved_bytes

        try:
            cfg = MesaConfig.from_dict({**dict(options or {}), **config})
        except (TypeError, ValueError) as exc:
            pytest.fail(str(exc), pytrace=False)
        args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        try:
            return measure_saved_bytes(model, args, loss, mesa(cfg), kwargs=kwargs)
        finally:
            torch._dynamo.reset()

    def check(
        self,
        model: Any,
        inputs: Any,
        max_saved_bytes: int,
        *,
        kwargs: Mapping[str, Any] | None = None,
        loss: Callable[[Any], Any] | None = None,
        tolerance: float = 0.0,
        options: Mapping[str, Any] | None = None,
        name: str | None = None,
        **config: Any,
    ) -> Any:
        """Measure ``model(*inputs, **kwargs)`` with mesa and fail the test if it saves more than the budget.

        Args:
            model: an ``nn.Module``.
            inputs: a tensor or a tuple of positional inputs.
            max_saved_bytes: the budget in bytes.
            loss: output -> scalar loss (default: mean square of the first tensor output).
            tolerance: fraction over budget still accepted.
            options, **config: MesaConfig fields.

        Returns:
            The :class:`actpass.measure.SavedBytes` measured.
        """
        from actpass.budget import Budget, Verdict

        if isinstance(max_saved_bytes, bool) or not isinstance(max_saved_bytes, int) or max_saved_bytes < 0:
            pytest.fail(f"actpass: max_saved_bytes must be a non-negative integer, got {max_saved_bytes!r}", False)
        measured = self.measure(model, inputs, kwargs=kwargs, loss=loss, options=options, **config)
        label = name or type(model).__name__
        budget = Budget(
            index=0,
            name=label,
            path=Path(label),
            raw_path=label,
            max_saved_bytes=max_saved_bytes,
            tolerance=tolerance,
        )
        verdict = Verdict(budget, measured.total)
        if verdict.over:
            pytest.fail(verdict.line(), pytrace=False)
        return measured


@pytest.fixture
def actpass_budget(request: pytest.FixtureRequest) -> ActpassBudget:
    """Assert activation-memory budgets: ``actpass_budget("model.py", max_saved_bytes=...)`` or ``.check(...)``."""
    return ActpassBudget(Path(str(request.config.rootpath)))
