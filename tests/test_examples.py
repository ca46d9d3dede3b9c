"""The example model files: the model-file contract, and eager training on their tiny presets.

Each file is imported by path, as ``actpass inspect`` does, but without registering it in ``sys.modules`` (the
stricter way: dataclasses and Hugging Face subclasses must still work). The mesa backend is tested elsewhere.
"""

import doctest
import importlib.util
import math
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PLAIN = ("vit", "gpt")
HF = ("hf_bert", "hf_llama")
ALL = (*PLAIN, *HF, "timm_vit")
NEEDS = {"hf_bert": "transformers", "hf_llama": "transformers", "timm_vit": "timm"}

_loaded: dict[str, ModuleType] = {}


def _import(name: str) -> ModuleType:
    """Execute ``examples/<name>.py`` as a fresh module that is not in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example(name: str) -> ModuleType:
    """The example module, once per test session; skips when its optional dependency is missing."""
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    if name not in _loaded:
        _loaded[name] = _import(name)
    return _loaded[name]


def _tiny(name: str, attn: str = "sdpa") -> tuple[ModuleType, nn.Module, tuple[Any, ...]]:
    ex = _example(name)
    return ex, ex.build_model("tiny_test", attn=attn), ex.make_inputs("tiny_test", batch=2)


@pytest.mark.parametrize("name", ALL)
def test_contract_and_cheap_import(name: str) -> None:
    ex = _example(name)
    # model and example_inputs are factories: importing allocates no parameters and no inputs.
    assert callable(ex.model) and not isinstance(ex.model, nn.Module)
    assert callable(ex.example_inputs) and not isinstance(ex.example_inputs, tuple)
    assert callable(ex.loss)
    assert not [k for k, v in vars(ex).items() if isinstance(v, (Tensor, nn.Module))]
    assert {"tiny_test", "cpu" if name != "timm_vit" else "deit_small"} <= set(ex.PRESETS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_tiny_forward_backward(name: str, attn: str) -> None:
    ex, model, inputs = _tiny(name, attn)
    assert model.training
    value = ex.loss(model(*inputs))
    assert value.dim() == 0 and math.isfinite(value.item())
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ALL)
def test_sdpa_and_eager_attention_agree(name: str) -> None:
    ex, sdpa, inputs = _tiny(name, "sdpa")
    eager = ex.build_model("tiny_test", attn="eager")
    sdpa.eval(), eager.eval()  # BERT's dropout
    with torch.no_grad():
        a, b = ex.loss(sdpa(*inputs)), ex.loss(eager(*inputs))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_module_level_model_fits_its_inputs(name: str) -> None:
    ex = _example(name)
    if name == "timm_vit":
        pytest.skip("deit_small at 224x224 is too slow for a unit test; the tiny preset is covered above")
    rng = torch.get_rng_state()
    model = ex.model()
    assert torch.equal(torch.get_rng_state(), rng), "building the model must leave the global RNG alone"
    p0 = next(model.parameters())
    assert torch.equal(p0, next(ex.model().parameters())), "weights must come from a fixed seed"
    with torch.no_grad():
        value = ex.loss(model(*ex.example_inputs()))
    assert value.dim() == 0 and math.isfinite(value.item())


def test_gpt_output_and_shift() -> None:
    ex, model, (idx, targets) = _tiny("gpt")
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    out = model(idx)
    assert out.loss is None and out.logits.shape == (*idx.shape, ex.PRESETS["tiny_test"].vocab_size)
    with pytest.raises(ValueError, match="without targets"):
        ex.loss(out)


def test_vit_labels_are_fixed() -> None:
    ex = _example("vit")
    logits = torch.randn(5, 7)
    labels = ex.fixed_labels(logits)
    assert torch.equal(labels, ex.fixed_labels(torch.randn(5, 7))) and int(labels.max()) < 7


def test_llama_uses_grouped_query_attention() -> None:
    ex = _example("hf_llama")
    for preset in ex.PRESETS.values():
        assert preset.config["num_key_value_heads"] < preset.config["num_attention_heads"]


def test_bert_inputs_are_padded_and_masked() -> None:
    ex = _example("hf_bert")
    ids, mask, labels = ex.make_inputs("tiny_test", batch=4)
    assert (mask == 0).any() and (labels != -100).any()
    assert ((labels != -100) <= (ids == ex.MASK_ID)).all()  # only masked tokens are scored
    assert (ids[mask == 0] == ex.PAD_ID).all()


@pytest.mark.parametrize(
    ("name", "package"), [("hf_bert", "transformers"), ("hf_llama", "transformers"), ("timm_vit", "timm")]
)
def test_missing_dependency_says_how_to_install(name: str, package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    with pytest.raises(ImportError, match=f"pip install {package}"):
        _import(name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_demo_loop(dtype: str) -> None:
    train, gpt = _import("_train"), _example("gpt")
    args = train.parse_args(
        "demo",
        gpt.PRESETS,
        "tiny_test",
        2,
        argv=["--backend", "eager", "--steps", "3", "--dtype", dtype, "--attn", "eager"],
    )
    lines: list[str] = []
    losses = train.run(
        gpt.build_model(args.preset, args.attn),
        gpt.make_inputs(args.preset, args.batch),
        gpt.loss,
        args,
        log=lines.append,
    )
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0]  # three AdamW steps on one fixed batch
    assert len(lines) == 4 and "loss" in lines[-1]


def test_training_demo_rejects_bad_arguments() -> None:
    train = _import("_train")
    with pytest.raises(SystemExit):
        train.parse_args("demo", {"tiny_test": None}, "tiny_test", 2, argv=["--backend", "nope"])
    with pytest.raises(SystemExit):
        train.parse_args("demo", {"tiny_test": None}, "tiny_test", 2, argv=["--steps", "0"])


@pytest.mark.parametrize("name", PLAIN)
def test_main_runs_as_a_script(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (runpy) rather than a subprocess: the same __main__ code and sys.path trick, without a second
    # interpreter importing torch.
    argv = [f"{name}.py", "--backend", "eager", "--steps", "2", "--preset", "tiny_test", "--batch", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "_train", raising=False)
    try:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    finally:
        sys.modules.pop("_train", None)
    assert capsys.readouterr().out.count(" loss ") == 2


@pytest.mark.parametrize("name", [*ALL, "_train"])
def test_docstring_examples(name: str) -> None:
    ex = _example(name)
    result = doctest.testmod(ex, verbose=False)
    assert result.failed == 0
