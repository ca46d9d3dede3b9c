"""Saved-bytes measurement (saved-tensor hooks) and model-file loading."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import actpass.backend as backend_mod
from actpass.config import MesaConfig
from actpass.measure import SavedTensorCounter, measure_saved_bytes
from actpass.modelfile import ModelFileError, check_trainable, default_loss, load_model_file

FIXTURES = Path(__file__).parent / "fixtures"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))


# ------------------------------------------------------------------------------------------------------- counter


def test_counter_dedupes_storage_and_leaves_out_excluded_tensors() -> None:
    a = torch.randn(10, requires_grad=True)
    with SavedTensorCounter(exclude=[a], backend="eager") as counter:
        b = a * 2  # saves nothing (scalar multiplier)
        c = b[:5] * b[5:]  # saves two views of b's storage
        d = a.sin()  # saves a: excluded
    r = counter.result()
    assert r.total == 40 and r.storages == 1 and r.saved_tensors == 2
    (rec,) = r.records
    assert rec.saves == 2 and rec.nbytes == 40 and rec.tensor_nbytes == 20 and rec.dtype == "torch.float32"
    assert not rec.compiled and rec.graph is None and r.eager_bytes == 40
    assert r.excluded_bytes == 40 and r.excluded_tensors == 1
    assert r.by_dtype == {"torch.float32": 40}
    (c.sum() + d.sum()).backward()


def test_counter_marks_copies_of_parameters() -> None:
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(4, 4, requires_grad=True)
    with SavedTensorCounter(exclude=[w]) as counter:
        y = x * w.clone()  # saves x and the copy of w
    r = counter.result()
    assert r.storages == 2 and sorted(rec.copy for rec in r.records) == [False, True]
    y.sum().backward()


def test_measure_baseline_counts_activations_only() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    r = measure_saved_bytes(model, (x,), backend="aot_eager_decomp_partition")
    # Min-cut partition saves the first matmul's output and the GELU output: 2 x [32, 256] float32.
    assert r.total == 2 * 32 * 256 * 4 and r.storages == 2
    assert all(rec.compiled and rec.graph == 0 for rec in r.records)
    assert r.excluded_bytes > 0  # the input and/or a weight were saved, and left out
    assert r.graphs == 1 and r.backend == "aot_eager_decomp_partition"
    assert all(p.grad is None for p in model.parameters())  # gradients restored


def test_measure_restores_existing_gradients() -> None:
    model = _mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    measure_saved_bytes(model, (torch.randn(4, 64),), backend="aot_eager")
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_mesa_measurement_matches_the_plan() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    be = backend_mod.mesa(MesaConfig(inner="eager"))
    r = measure_saved_bytes(model, (x,), backend=be)
    assert len(be.plans) == 1 and r.plan_graphs == {0: 0}
    assert r.total == be.plans[0].saved_bytes_after < be.plans[0].saved_bytes_before
    assert "torch.uint8" in r.by_dtype


def test_inductor_baseline_matches_the_plan_before() -> None:
    model, x = _mlp(), torch.randn(32, 64)
    base = measure_saved_bytes(model, (x,), backend="inductor")
    be = backend_mod.mesa(MesaConfig(inner="eager"))
    after = measure_saved_bytes(model, (x,), backend=be)
    assert base.total == be.plans[0].saved_bytes_before
    assert after.total == be.plans[0].saved_bytes_after


def test_graph_break_tags_storages_by_graph() -> None:
    spec = load_model_file(FIXTURES / "graph_break.py")
    be = backend_mod.mesa(MesaConfig(inner="eager"))
    r = measure_saved_bytes(spec.model, spec.args, backend=be)
    assert r.graphs == 2 and r.plan_graphs == {0: 0, 1: 1}
    per_graph = collections.Counter(rec.graph for rec in r.records)
    assert set(per_graph) == {0, 1}
    assert r.graph_total(0) == be.plans[0].saved_bytes_after


def test_progress_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="actpass.measure"):
        measure_saved_bytes(_mlp(), (torch.randn(4, 64),), backend="aot_eager")
    assert "[aot_eager] compiling graph 0" in caplog.text and "graph 0 compiled in" in caplog.text


# ----------------------------------------------------------------------------------------------------- modelfile


def test_load_module_and_tuple() -> None:
    spec = load_model_file(FIXTURES / "tiny_mlp.py")
    assert isinstance(spec.model, nn.Sequential) and len(spec.args) == 1 and spec.kwargs == {}
    assert not spec.custom_loss and spec.model.training
    check_trainable(spec)


def test_load_callables_dict_inputs_and_dict_output() -> None:
    spec = load_model_file(FIXTURES / "tiny_attn.py", device="cpu")
    assert spec.args == () and set(spec.kwargs) == {"x"}
    check_trainable(spec)
    out = spec.model(**spec.kwargs)
    assert default_loss(out) == out["logits"].pow(2).mean()


def test_custom_names_and_loss() -> None:
    spec = load_model_file(FIXTURES / "custom_loss.py", model_attr="net", inputs_attr="batch")
    assert spec.custom_loss
    check_trainable(spec)


@dataclasses.dataclass
class _Out:
    loss: torch.Tensor | None
    hidden: torch.Tensor


def test_default_loss_finds_the_first_float_tensor() -> None:
    x = torch.full((2,), 3.0)
    assert default_loss(x) == 9.0
    assert default_loss((torch.ones(2, dtype=torch.long), [x])) == 9.0
    assert default_loss({"ids": torch.ones(1, dtype=torch.long), "logits": x}) == 9.0
    assert default_loss(_Out(loss=None, hidden=x)) == 9.0
    ordered = collections.OrderedDict(hidden=torch.ones(1), logits=x)  # ModelOutput is an OrderedDict: logits first
    assert default_loss(ordered) == 9.0
    with pytest.raises(TypeError, match="no floating-point tensor"):
        default_loss((torch.ones(1, dtype=torch.long),))


def test_default_loss_on_a_hugging_face_model_output() -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")
    logits = torch.full((2, 3), 2.0)
    out = outputs.CausalLMOutputWithPast(loss=None, logits=logits, hidden_states=(torch.zeros(1),))
    assert default_loss(out) == 4.0
    assert default_loss(outputs.MaskedLMOutput(logits=logits)) == 4.0


@pytest.mark.parametrize(
    ("fixture", "attr", "message"),
    [
        ("nonexistent.py", "load", "model file not found"),
        ("bad_import.py", "load", "raised on import: ValueError: fixture failed on purpose (width 16)"),
        ("no_model.py", "load", "defines no `model`"),
        ("bad_inputs.py", "check", "the inputs do not fit the model in"),
        ("frozen.py", "check", "nothing to train in"),
    ],
)
def test_bad_model_files(fixture: str, attr: str, message: str) -> None:
    path = FIXTURES / fixture
    with pytest.raises(ModelFileError) as info:
        spec = load_model_file(path)
        if attr == "check":
            check_trainable(spec)
    msg = str(info.value)
    assert message in msg and "\n" not in msg and msg.startswith("actpass: ")
    if fixture == "bad_import.py":
        assert msg.endswith("bad_import.py:6)")


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.py"
    p.write_text("import torch\nmodel = torch.nn.Linear(2,\n")
    with pytest.raises(ModelFileError, match=r"raised on import: SyntaxError: .*broken.py:2\)"):
        load_model_file(p)


def test_bad_shapes_of_the_contract(tmp_path: Path) -> None:
    cases = {
        "model = 3\nexample_inputs = ()\n": "is a int, not an nn.Module",
        "def model(x):\n    pass\nexample_inputs = ()\n": "must be callable with no arguments",
        "def model():\n    return 3\nexample_inputs = ()\n": "returned a int, not an nn.Module",
        "import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = 5\n": "expected a tuple of inputs",
        "import torch\nmodel = torch.nn.Linear(2, 2)\n": "defines no `example_inputs`",
        "import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = (torch.ones(2),)\nloss = 1\n": "not a function",
    }
    for i, (text, message) in enumerate(cases.items()):
        p = tmp_path / f"m{i}.py"
        p.write_text(text)
        with pytest.raises(ModelFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_model_file(p)


def test_loss_must_be_a_scalar(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = (torch.ones(3, 2),)\n")
    spec = load_model_file(p)
    spec.loss_fn = lambda out: out
    with pytest.raises(ModelFileError, match=r"must be a scalar tensor, got \(3, 2\)"):
        check_trainable(spec)


def test_returned_kv_cache_is_counted_and_reported():
    """A Hugging Face model trained with use_cache on returns its KV cache; the report tells the user the fix."""
    from types import SimpleNamespace

    from actpass.measure import returned_cache_bytes

    k, v = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8, 16)

    class Cache:  # the shape of transformers' DynamicCache: layers holding key/value tensors
        def __init__(self):
            self.layers = [SimpleNamespace(keys=k, values=v), SimpleNamespace(keys=k, values=v)]

    out = SimpleNamespace(loss=torch.tensor(0.0), logits=torch.zeros(2, 8, 10), past_key_values=Cache())
    assert returned_cache_bytes(out) == 2 * k.numel() * 4  # k and v once each: shared storages counted once
    assert returned_cache_bytes({"past_key_values": ((k, v),)}) == 2 * k.numel() * 4
    assert returned_cache_bytes(SimpleNamespace(logits=k, past_key_values=None)) == 0

    from actpass.config import MesaConfig
    from actpass.measure import SavedBytes
    from actpass.report import Report

    measured = SavedBytes("mesa", 0, 0, 0, {}, 0, 0, 1, 0.0, returned_cache_bytes=4096)
    report = Report.build([], MesaConfig(), measured_before=None, measured_after=measured)
    assert report.notes() and "use_cache=False" in report.notes()[0]
