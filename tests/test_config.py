from __future__ import annotations

import pytest

from actpass.config import Inner, MesaConfig, Rounding, Stats


def test_defaults():
    c = MesaConfig()
    assert (c.bits, c.stats, c.rounding, c.inner) == (8, Stats.DYNAMIC, Rounding.NEAREST, Inner.INDUCTOR)


def test_round_trip():
    c = MesaConfig(bits=4, stats="running", rounding="stochastic", exclude=["head"], overrides={"blocks.0*": 0})
    d = c.to_dict()
    assert d["stats"] == "running" and d["exclude"] == ["head"] and d["overrides"] == {"blocks.0*": 0}
    assert MesaConfig.from_dict(d) == c
    assert hash(c) == hash(MesaConfig.from_dict(d))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "bits must be one of .* got 3"),
        ({"bits": True}, "bits must be one of"),
        ({"stats": "ema"}, "stats must be one of .* got 'ema'"),
        ({"rounding": "up"}, "rounding must be one of .* got 'up'"),
        ({"decay": 1.0}, r"decay must be a number in \[0, 1\), got 1.0"),
        ({"min_bytes": -1}, "min_bytes must be a non-negative integer, got -1"),
        ({"exclude": [3]}, "exclude must hold non-empty strings, got 3"),
        ({"overrides": {"x": 5}}, "override 'x' bits must be 0 .* got 5"),
        ({"inner": "aot_eager"}, "inner must be one of .* got 'aot_eager'"),
        ({"max_error": 0}, r"max_error must be a positive number \(or inf\), got 0"),
        ({"max_error": -0.01}, "max_error must be a positive number"),
        ({"max_error": float("nan")}, "max_error must be a positive number"),
        ({"max_error": "small"}, "max_error must be a positive number .* got 'small'"),
        ({"max_error": True}, "max_error must be a positive number"),
    ],
)
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MesaConfig(**kwargs)


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown option.*'bitz'"):
        MesaConfig.from_dict({"bitz": 8})
