"""The inspect report from hand-built plans: reconciliation, JSON schema, table, markdown and plot."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from actpass.config import MesaConfig
from actpass.measure import SavedBytes, StorageRecord
from actpass.plan import Decision, GraphPlan, Layout, Reason, SavedTensor
from actpass.report import (
    CAUSE_COPIES,
    SCHEMA_VERSION,
    TENSOR_KEYS,
    PlotUnavailable,
    Report,
    human_bytes,
    id_glob,
    module_bars,
    plot,
    reconcile,
    render_json,
    render_markdown,
    render_table,
    to_json,
)


def _t(index: int, shape: tuple, before: int, after: int | None = None, **kw) -> SavedTensor:
    quantized = after is not None and after != before
    fields = dict(
        index=index,
        name=f"n{index}",
        tensor_id=f"{kw.get('module_path', 'm')}:op#{index}",
        producer="aten.gelu.default",
        module_path="blocks.0.mlp",
        source="model.py:3",
        shape=shape,
        dtype="torch.float32",
        layout=Layout.CHANNEL_LAST,
        heads=None,
        decision=Decision.QUANTIZED if quantized else Decision.KEPT,
        reason=Reason.QUANTIZED if quantized else Reason.TOO_SMALL,
        detail="8-bit" if quantized else "under min_bytes",
        bytes_before=before,
        bytes_after=after if after is not None else before,
        bits=8 if quantized else None,
    )
    fields.update(kw)
    return SavedTensor(**fields)


def _plan() -> GraphPlan:
    return GraphPlan(
        graph_id=0,
        name="graph 0",
        tensors=(
            _t(0, (8, 64), 2048, reason=Reason.PARAM_OR_INPUT, producer="input", module_path=""),
            _t(1, (8, 256), 8192, 2560),
            _t(2, (2, 4, 8, 8), 2048, 640, layout=Layout.PER_HEAD, heads=4, module_path="blocks.0.attn"),
            _t(3, (8, 4), 128),
        ),
    )


def _rec(shape: tuple, dtype: str, nbytes: int, graph: int | None = 0, **kw) -> StorageRecord:
    return StorageRecord(
        shape=shape,
        dtype=dtype,
        nbytes=nbytes,
        tensor_nbytes=kw.pop("tensor_nbytes", nbytes),
        saves=kw.pop("saves", 1),
        compiled=graph is not None,
        graph=graph,
    )


def _measured(backend: str, records: list[StorageRecord], plan_graphs: dict[int, int] | None = None) -> SavedBytes:
    return SavedBytes(
        backend=backend,
        total=sum(r.nbytes for r in records),
        storages=len(records),
        saved_tensors=sum(r.saves for r in records),
        by_dtype={},
        excluded_bytes=2048,
        excluded_tensors=1,
        graphs=1,
        seconds=0.1,
        records=tuple(records),
        plan_graphs=dict(plan_graphs or {0: 0}),
    )


BEFORE = [_rec((8, 256), "torch.float32", 8192), _rec((2, 4, 8, 8), "torch.float32", 2048), _rec((8, 4), "f", 128)]
AFTER = [
    _rec((8, 256), "torch.uint8", 2048),
    _rec((256,), "torch.float32", 512),
    _rec((2, 4, 8, 8), "torch.uint8", 512),
    _rec((4, 16), "torch.float32", 128),
    _rec((8, 4), "torch.float32", 128),
]


def _report(before=BEFORE, after=AFTER) -> Report:
    return Report.build(
        [_plan()],
        MesaConfig(),
        measured_before=_measured("inductor", before),
        measured_after=_measured("mesa", after),
        model_path="model.py",
        model={"parameters": 10},
    )


def test_plan_totals_match_hand_count() -> None:
    r = _report()
    assert (r.saved_bytes_before, r.saved_bytes_after) == (8192 + 2048 + 128, 2560 + 640 + 128)
    assert (r.measured_bytes_before, r.measured_bytes_after) == (10368, 3328)


def test_agreeing_totals() -> None:
    rec = _report().reconciliation()
    assert rec["before"].agree and rec["after"].agree and rec["after"].state == "agree"
    assert rec["before"].difference == 0 and rec["after"].explanation == ("planned and measured agree",)


def test_difference_is_computed_and_explained() -> None:
    extra = _rec((32, 256), "torch.float32", 32768)
    eager = _rec((3, 3), "torch.float32", 36, graph=None)
    r = reconcile("before", [_plan()], _measured("inductor", [*BEFORE, extra, eager]), {0: 0})
    assert r.difference == 32768 + 36 and not r.agree
    assert r.unexplained == 32768 and r.state == "differ" and not r.explained  # the eager 36 B have a cause
    text = "\n".join(r.explanation)
    assert "measured - planned = +32,804 B" in text
    assert "saved by code outside the compiled graphs" in text and "[3, 3] float32 36 B" in text
    assert "match no planned tensor by size: [32, 256] float32 32,768 B" in text


def test_activation_entering_as_graph_input_is_named() -> None:
    # The plan leaves out graph inputs; an activation from before a graph break enters as one, and is counted.
    r = reconcile("before", [_plan()], _measured("inductor", [*BEFORE, _rec((8, 64), "torch.float32", 2048)]))
    assert r.difference == 2048 and r.state == "explained"
    assert any("graph inputs that the plan leaves out" in line for line in r.explanation)


def test_copy_of_a_parameter_is_named() -> None:
    # Inductor may save a channels-last copy of a convolution weight: same values, another storage, extra memory.
    copy = dataclasses.replace(_rec((8, 64), "torch.float32", 2048), copy=True)
    r = reconcile("before", [_plan()], _measured("inductor", [*BEFORE, copy]))
    assert r.difference == 2048
    assert any("copies of parameters or inputs" in line for line in r.explanation)
    assert not any("graph break" in line for line in r.explanation)
    # Every byte has a cause: "explained", not "differ" (Inductor's copies of a conv's input and weight on the ViT).
    assert r.causes == ((CAUSE_COPIES, 2048),) and r.unexplained == 0 and r.state == "explained"
    assert r.to_dict()["explained"] is True and r.to_dict()["unexplained_bytes"] == 0


def test_missing_planned_tensor_and_view_excess_are_named() -> None:
    short = [_rec((8, 256), "torch.float32", 16384, tensor_nbytes=8192), _rec((8, 4), "torch.float32", 128)]
    text = "\n".join(reconcile("before", [_plan()], _measured("inductor", short)).explanation)
    assert "planned tensor(s) (2,048 B) match no measured storage" in text and "blocks.0.attn" not in text.split(":")[0]
    assert "+8,192 B on storages matched to planned tensors: the measurement counts whole storages" in text


def test_quantized_remainder_is_compared_in_total() -> None:
    r = reconcile("after", [_plan()], _measured("mesa", [*AFTER, _rec((9,), "torch.float32", 64)]))
    assert r.difference == 64 and r.unexplained == 64 and r.state == "differ"
    assert any("quantized tensors plan 3,200 B" in line and "hold 3,264 B" in line for line in r.explanation)


def test_not_measured() -> None:
    r = Report.build([_plan()], MesaConfig(), measured_before=None, measured_after=_measured("mesa", AFTER))
    d = to_json(r)
    assert d["totals"]["measured_bytes_before"] is None and d["totals"]["measured_ratio"] is None
    assert d["baseline_backend"] is None and d["reconciliation"]["before"]["agree"] is None


def test_json_schema_v1() -> None:
    d = json.loads(render_json(_report()))
    assert d["schema_version"] == SCHEMA_VERSION == 1
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
    t = d["totals"]
    assert t["saved_bytes_before"] == 10368 and t["saved_bytes_after"] == 3328
    assert t["measured_bytes_before"] == 10368 and t["measured_bytes_after"] == 3328
    assert t["ratio"] == pytest.approx(3328 / 10368) and t["graphs"] == 1
    assert t["saved_tensors"] == 4 and t["quantized_tensors"] == 2
    (g,) = d["graphs"]
    assert list(g["tensors"][0]) == list(TENSOR_KEYS)
    attn = g["tensors"][2]
    assert attn["layout"] == "per-head" and attn["heads"] == 4 and attn["shape"] == [2, 4, 8, 8]
    assert g["tensors"][0]["counted"] is False and g["tensors"][0]["reason"] == "parameter or input"
    assert d["config"] == MesaConfig().to_dict() and d["model"] == {"path": "model.py", "parameters": 10}
    assert {m["module_path"] for m in d["modules"]} == {"blocks.0.mlp", "blocks.0.attn"}
    assert d["reconciliation"]["after"] == {
        "planned": 3328,
        "measured": 3328,
        "difference": 0,
        "agree": True,
        "explanation": ["planned and measured agree"],
        "explained": True,
        "unexplained_bytes": 0,
        "causes": [],
    }
    assert g["pass_seconds"] is None and g["tensors"][0]["input_name"] == ""
    assert d["measured"]["before"]["total"] == 10368 and d["measured"]["after"]["backend"] == "mesa"


def test_symbolic_shapes_serialize_as_strings() -> None:
    p = GraphPlan(0, "graph 0", (_t(0, ("s0", 64), 2048),))
    d = to_json(Report.build([p], MesaConfig(), measured_before=None, measured_after=None))
    assert d["graphs"][0]["tensors"][0]["shape"] == ["s0", 64]


def test_table_and_markdown() -> None:
    table = render_table(_report())
    assert "graph 0: 4 saved tensors, 2 quantized" in table
    assert "per-head H=4" in table and "blocks.0.attn" in table and "8-bit" in table
    assert "10,368 B" in table and "3,328 B" in table and "before (inductor): agree" in table
    md = render_markdown(_report(after=[*AFTER, _rec((1,), "torch.float32", 4)]))
    assert md.startswith("### actpass inspect `model.py`")
    assert "| planned | 10,368 B" in md and "<details>" in md and "**differ**" in md and "+4 B" in md
    odd = GraphPlan(0, "graph 0", (_t(0, (4,), 16, module_path="a|b"),))
    md = render_markdown(Report.build([odd], MesaConfig(), measured_before=None, measured_after=None))
    assert "| a\\|b:op#0 |" in md


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, -2048)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "-2.0 KiB",
    ]


def test_module_bars_group_deep_paths() -> None:
    tensors = tuple(_t(i, (4,), 100, 50, module_path=f"blocks.{i}.mlp.fc") for i in range(40))
    r = Report.build([GraphPlan(0, "graph 0", tensors)], MesaConfig(), measured_before=None, measured_after=None)
    bars = module_bars(r, max_bars=32)
    assert bars == [("blocks", 4000, 2000)]
    assert len(module_bars(r, max_bars=64)) == 40


def test_plot_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bars.png"
    plot(_report(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'actpass\[plot\]'"):
        plot(_report(), tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ the readable table


def _vit_like_plan(depth: int = 4) -> GraphPlan:
    """A ViT's graph 0 in miniature: parameters, an sdpa per block (root + 2 views), long module paths."""
    rows: list[SavedTensor] = [
        _t(
            0,
            (192, 3, 8, 8),
            147456,
            reason=Reason.PARAM_OR_INPUT,
            producer="input",
            module_path="",
            tensor_id=":input#0",
            input_name="patch_embed.weight",
        ),
        _t(
            1,
            (8, 3, 64, 64),
            393216,
            reason=Reason.PARAM_OR_INPUT,
            producer="input",
            module_path="",
            tensor_id=":input#1",
            input_name="images",
        ),
    ]
    for b in range(depth):
        mod = f"encoder.transformer_blocks.{b}.self_attention.query_key_value"
        rows.append(
            _t(
                len(rows),
                (8, 3, 65, 64),
                399360,
                99840,
                module_path=mod,
                tensor_id=f"{mod}:addmm#0",
                detail="8-bit, per-group statistics over 144 groups (4 adjacent channels ...)",
                groups=144,
            )
        )
        for _ in range(2):
            rows.append(
                _t(
                    len(rows),
                    (8, 3, 65, 64),
                    0,
                    0,
                    module_path=mod,
                    tensor_id=f"{mod}:addmm#0",
                    decision=Decision.QUANTIZED,
                    reason=Reason.QUANTIZED,
                    bits=8,
                    detail="shares storage",
                )
            )
        attn = f"encoder.transformer_blocks.{b}.self_attention"
        rows.append(
            _t(
                len(rows),
                (8, 3, 65),
                6240,
                module_path=attn,
                tensor_id=f"{attn}:sdpa[1]#0",
                reason=Reason.ROW_STATISTIC,
                detail="row statistic (normalization/attention): kept exact",
            )
        )
    return GraphPlan(0, "graph 0", tuple(rows))


def test_table_fits_120_columns_and_folds_repeated_blocks() -> None:
    r = Report.build([_vit_like_plan()], MesaConfig(), measured_before=None, measured_after=None, model_path="m.py")
    table = render_table(r)
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    # Four blocks fold into one row per kind, whose id is the glob that --override would need.
    qkv = [ln for ln in lines if ":addmm#0" in ln]
    assert len(qkv) == 1 and "x4" in qkv[0] and "144 groups" in qkv[0] and "1.5 MiB" in qkv[0]
    assert "encoder.transformer_blocks.*" in qkv[0] or "~" in qkv[0]  # cut only if it must
    lse = [ln for ln in lines if "sdpa[1]#0" in ln]
    assert len(lse) == 1 and "row statistic" in lse[0] and "exact" in lse[0] and "policy" not in lse[0]
    assert "+ 2 parameters and inputs (528.0 KiB, kept: alive anyway) and 8 more views" in table
    assert "patch_embed.weight" not in table and "shares storage" not in table


def test_table_all_lists_inputs_by_name_and_every_view() -> None:
    plan = _vit_like_plan()
    r = Report.build([plan], MesaConfig(), measured_before=None, measured_after=None)
    lines = render_table(r, all_rows=True).splitlines()
    assert any(ln.strip().startswith("patch_embed.weight ") for ln in lines)
    assert any(ln.strip().startswith("images ") for ln in lines)
    assert sum(":addmm#0" in ln for ln in lines) == 12 and not any(" x4 " in ln for ln in lines)


def test_table_verbose_and_wide() -> None:
    r = Report.build(
        [_vit_like_plan()], MesaConfig(), measured_before=None, measured_after=None, timings={0: (0.004, 0.2)}
    )
    verbose = render_table(r, verbose=True)
    assert "row statistic (normalization/attention): kept exact" in verbose
    assert "per-group statistics over 144 groups" in verbose and "8-bit, per-group" not in verbose
    assert "[pass: analysis 4.0 ms, rewrite 200.0 ms]" in verbose
    wide = render_table(r, wide=True)
    header = next(ln for ln in wide.splitlines() if "tensor id" in ln)
    assert all(col in header for col in ("#", "producer", "module", "dtype", "source"))
    assert "encoder.transformer_blocks.*.self_attention.query_key_value:addmm#0" in wide  # never cut when wide
    assert to_json(r)["graphs"][0]["pass_seconds"] == {"analysis": 0.004, "rewrite": 0.2}


def test_ids_are_cut_from_the_left_at_a_dot() -> None:
    from actpass.report import _cut

    long = "bert.encoder.layer.*.attention.output.LayerNorm:mul#0"
    assert _cut(long, 60) == long
    assert _cut(long, 28) == "~.output.LayerNorm:mul#0" and len(_cut(long, 28)) <= 28
    assert _cut("a" * 40, 12) == "~" + "a" * 11


def test_id_glob() -> None:
    assert id_glob("blocks.3.mlp.fc1:addmm#0") == "blocks.*.mlp.fc1:addmm#0"
    assert id_glob("layers.10.experts.2:mm#1") == "layers.*.experts.*:mm#1"
    assert id_glob("0.attn:sdpa[0]#0") == "*.attn:sdpa[0]#0"
    assert id_glob(":cat#0") == ":cat#0" and id_glob("fc2:gelu#12") == "fc2:gelu#12"


def test_decision_words() -> None:
    from actpass.report import decision_text, reason_text

    q, kept = _t(1, (8, 256), 8192, 2560, groups=64), _t(3, (8, 4), 128)
    assert (decision_text(q), reason_text(q)) == ("8-bit", "64 groups")
    assert (decision_text(kept), reason_text(kept)) == ("exact", "too small")
    policy = _t(3, (8, 4), 128, reason=Reason.POLICY)
    assert reason_text(policy) == "policy"
