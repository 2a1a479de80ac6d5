"""``DilatedAttentionConfig``, presets and the factory's loud failures."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import dilated_attention_pytorch.factory as factory
from dilated_attention_pytorch import (
    PRESETS,
    DilatedAttention,
    DilatedAttentionConfig,
    MultiheadDilatedAttention,
    available_attention_kinds,
    create_dilated_attention,
    create_multihead_dilated_attention,
    dilated_attention,
    register_attention_kind,
)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kinds registered by a test disappear afterwards.
    monkeypatch.setattr(factory, "_KINDS", dict(factory._KINDS))


# --- config -----------------------------------------------------------------------


def test_config_normalises_and_is_frozen() -> None:
    cfg = DilatedAttentionConfig(segment_lengths=[64, 128], dilation_rates=[1, 2], dropout=0)
    assert cfg.segment_lengths == (64, 128) and cfg.dilation_rates == (1, 2)
    assert isinstance(cfg.dropout, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dropout = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        DilatedAttentionConfig([64], [1])  # type: ignore[misc]  # keyword-only
    assert hash(cfg) == hash(
        DilatedAttentionConfig(segment_lengths=(64, 128), dilation_rates=(1, 2))
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(segment_lengths=[]), ValueError, r"must be non-empty"),
        (dict(dilation_rates=[1, 2]), ValueError, r"must have the same length"),
        (
            dict(dilation_rates=[65]),
            ValueError,
            r"dilation rate 65 is larger than its segment length 64",
        ),
        (
            dict(segment_lengths=[0]),
            ValueError,
            r"segment_lengths\[0\] must be a positive int, got 0",
        ),
        (
            dict(segment_lengths=[64.0]),
            TypeError,
            r"segment_lengths\[0\] must be an int, got float",
        ),
        (
            dict(branch_mixing="max"),
            ValueError,
            r"branch_mixing must be one of \['softmax', 'head_split'\]",
        ),
        (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        (dict(scale=0.0), ValueError, r"scale must be a finite nonzero number, got 0.0"),
        (
            dict(backend="nope"),
            ValueError,
            r"unknown backend 'nope'; valid backends are \['auto', ",
        ),
        (dict(backend=None), TypeError, r"backend must be a str, got NoneType"),
        (dict(embed_dim=64), ValueError, r"embed_dim and num_heads must be given together"),
        (dict(num_heads=4), ValueError, r"embed_dim and num_heads must be given together"),
        (dict(embed_dim=64, num_heads=5), ValueError, r"embed_dim must be divisible by num_heads"),
        (dict(bias=1), TypeError, r"bias must be a bool, got int 1"),
        (dict(layer_norm="yes"), TypeError, r"layer_norm must be a bool, got str"),
        (
            dict(gamma_init=float("nan")),
            ValueError,
            r"gamma_init must be a positive finite float, got nan",
        ),
    ],
)
def test_config_validation(kwargs, error, match) -> None:
    args = dict(segment_lengths=[64], dilation_rates=[1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        DilatedAttentionConfig(**args)


def test_replace_is_validated() -> None:
    cfg = DilatedAttentionConfig(segment_lengths=[64], dilation_rates=[1])
    assert cfg.replace(dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match=r"dilation rate 128 is larger"):
        cfg.replace(dilation_rates=[128])


def test_presets() -> None:
    cfg = DilatedAttentionConfig.from_preset("longnet_32k", embed_dim=768, num_heads=12)
    assert cfg.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert cfg.dilation_rates == (1, 2, 4, 6, 12)
    assert cfg.num_heads == 12
    for name in PRESETS:  # every preset is a valid config
        DilatedAttentionConfig.from_preset(name)
    with pytest.raises(
        ValueError, match=r"unknown preset 'longnet'; valid presets are \['longnet_32k', 'tiny'\]"
    ):
        DilatedAttentionConfig.from_preset("longnet")


def test_geometric_schedule() -> None:
    cfg = DilatedAttentionConfig.geometric(
        base_segment_length=512, num_branches=4, branch_mixing="head_split"
    )
    assert cfg.segment_lengths == (512, 1024, 2048, 4096)
    assert cfg.dilation_rates == (1, 2, 4, 8)
    # Bounded tokens per segment and head: w / r is the same for every branch.
    assert {w // r for w, r in zip(cfg.segment_lengths, cfg.dilation_rates, strict=True)} == {512}
    assert cfg.branch_mixing == "head_split"
    with pytest.raises(ValueError, match=r"num_branches must be a positive int, got 0"):
        DilatedAttentionConfig.geometric(base_segment_length=512, num_branches=0)


def test_multihead_kwargs_need_dims() -> None:
    cfg = DilatedAttentionConfig(segment_lengths=[64], dilation_rates=[1])
    with pytest.raises(
        ValueError, match=r"cannot build a multi-head layer.*config.replace\(embed_dim="
    ):
        cfg.multihead_kwargs()


# --- factory ----------------------------------------------------------------------


def test_create_dilated_attention_from_kwargs_and_config() -> None:
    attn = create_dilated_attention(
        "dilated", segment_lengths=[8, 16], dilation_rates=[1, 2], dropout=0.1
    )
    assert isinstance(attn, DilatedAttention)
    assert attn.segment_lengths == (8, 16) and attn.dilation_rates == (1, 2) and attn.dropout == 0.1

    cfg = DilatedAttentionConfig(
        segment_lengths=[8], dilation_rates=[2], branch_mixing="head_split", scale=0.5
    )
    attn = create_dilated_attention(config=cfg)
    assert (attn.segment_lengths, attn.dilation_rates, attn.branch_mixing, attn.scale) == (
        (8,),
        (2,),
        "head_split",
        0.5,
    )
    # Explicit keywords override the config.
    assert create_dilated_attention(config=cfg, scale=0.25).scale == 0.25


def test_create_multihead_matches_direct_construction() -> None:
    cfg = DilatedAttentionConfig.from_preset(
        "tiny", embed_dim=32, num_heads=4, gamma_init=0.5, layer_norm=False
    )
    torch.manual_seed(0)
    made = create_multihead_dilated_attention(config=cfg, dtype=torch.float64)
    torch.manual_seed(0)
    direct = MultiheadDilatedAttention(
        32, 4, [64, 128, 256], [1, 2, 4], gamma_init=0.5, layer_norm=False, dtype=torch.float64
    )
    assert type(made) is MultiheadDilatedAttention
    assert made.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(made.state_dict()[name], tensor), name
    x = torch.randn(1, 100, 32, dtype=torch.float64)
    torch.testing.assert_close(made(x)[0], direct(x)[0], atol=0, rtol=0)


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown kind 'ring_v2'; valid kinds are \['auto', 'dilated'"
    ):
        create_dilated_attention("ring_v2", segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(
        ValueError, match=r"unknown kind 'mha'; valid kinds are \['auto', 'multihead_dilated'"
    ):
        create_multihead_dilated_attention(
            "mha", embed_dim=8, num_heads=2, segment_lengths=[8], dilation_rates=[1]
        )


def test_kind_of_the_other_family_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"kind 'multihead_dilated' belongs to create_multihead_dilated_attention"
    ):
        create_dilated_attention("multihead_dilated", segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(ValueError, match=r"kind 'dilated' belongs to create_dilated_attention"):
        create_multihead_dilated_attention("dilated", segment_lengths=[8], dilation_rates=[1])


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(
        TypeError,
        match=r"got unexpected keyword argument\(s\) \['attention_dropout'\]; accepted keywords are "
        r"\['segment_lengths', 'dilation_rates', 'branch_mixing', 'dropout', 'scale', 'backend'\]",
    ):
        create_dilated_attention(segment_lengths=[8], dilation_rates=[1], attention_dropout=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['d_model'\]"):
        create_multihead_dilated_attention(
            d_model=8, embed_dim=8, num_heads=2, segment_lengths=[8], dilation_rates=[1]
        )


def test_missing_keyword_is_a_type_error() -> None:
    with pytest.raises(
        TypeError, match=r"missing required keyword argument\(s\) \['embed_dim', 'num_heads'\]"
    ):
        create_multihead_dilated_attention(segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(
        TypeError, match=r"missing required keyword argument\(s\) \['dilation_rates'\]"
    ):
        create_dilated_attention(segment_lengths=[8])


def test_config_must_be_a_config() -> None:
    with pytest.raises(TypeError, match=r"config must be a DilatedAttentionConfig, got dict"):
        create_dilated_attention(config={"segment_lengths": [8], "dilation_rates": [1]})


def test_auto_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        attn = create_dilated_attention(segment_lengths=[8], dilation_rates=[1])
        layer = create_multihead_dilated_attention(
            embed_dim=8, num_heads=2, segment_lengths=[8], dilation_rates=[1]
        )
    assert isinstance(attn, DilatedAttention) and isinstance(layer, MultiheadDilatedAttention)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(
        m.startswith("create_dilated_attention(kind='auto') chose 'dilated'") for m in messages
    ), messages
    assert any(
        m.startswith("create_multihead_dilated_attention(kind='auto') chose 'multihead_dilated'")
        for m in messages
    ), messages


class _Doubling(nn.Module):
    """A stand-in kind: ``DilatedAttention`` keywords, output doubled."""

    def __init__(self, segment_lengths, dilation_rates, *, factor: float = 2.0) -> None:
        super().__init__()
        self.inner = DilatedAttention(segment_lengths, dilation_rates)
        self.factor = factor

    def forward(self, q, k, v, **kwargs):
        return self.factor * self.inner(q, k, v, **kwargs)


@pytest.mark.usefixtures("isolated_registry")
def test_registered_kind_and_auto_priority(caplog: pytest.LogCaptureFixture) -> None:
    available = {"ok": False}
    register_attention_kind(
        "doubling",
        _Doubling,
        multihead=False,
        auto_priority=1000,
        why_not=lambda: None if available["ok"] else "the test switched it off",
        description="test kind",
    )
    assert {"dilated", "doubling"} <= set(available_attention_kinds(multihead=False))
    assert "doubling" not in available_attention_kinds(multihead=True)

    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        chosen = create_dilated_attention(segment_lengths=[8], dilation_rates=[1])
    assert type(chosen) is DilatedAttention
    assert "skipped: " in caplog.text and "doubling: the test switched it off" in caplog.text
    # Named explicitly while unavailable: an error, never a silent fallback.
    with pytest.raises(
        ValueError, match=r"kind 'doubling' cannot be built here: the test switched it off"
    ):
        create_dilated_attention("doubling", segment_lengths=[8], dilation_rates=[1])

    available["ok"] = True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        chosen = create_dilated_attention(segment_lengths=[8], dilation_rates=[1], factor=3.0)
    assert type(chosen) is _Doubling and chosen.factor == 3.0
    assert "chose 'doubling': test kind" in caplog.text
    # A config's keywords must all be accepted by the kind: _Doubling has no 'dropout'.
    cfg = DilatedAttentionConfig(segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(
        TypeError, match=r"create_dilated_attention\(kind='doubling'\) got unexpected keyword"
    ):
        create_dilated_attention(config=cfg)


@pytest.mark.usefixtures("isolated_registry")
def test_register_rejects_duplicates_and_auto() -> None:
    with pytest.raises(
        ValueError, match=r"attention kind 'dilated' is already registered.*replace=True"
    ):
        register_attention_kind("dilated", _Doubling, multihead=False)
    register_attention_kind("dilated", _Doubling, multihead=False, replace=True)
    assert (
        type(create_dilated_attention("dilated", segment_lengths=[8], dilation_rates=[1]))
        is _Doubling
    )
    with pytest.raises(ValueError, match=r"kind name must be a non-empty str other than 'auto'"):
        register_attention_kind("auto", _Doubling, multihead=False)


@pytest.mark.usefixtures("isolated_registry")
def test_register_checks_its_arguments_at_registration() -> None:
    # A bad registration fails at once, not when the kind is first built.
    with pytest.raises(TypeError, match=r"cls must be an nn.Module subclass .* got <class 'int'>"):
        register_attention_kind("ints", int, multihead=False)
    with pytest.raises(TypeError, match=r"multihead must be a bool, got str 'yes'"):
        register_attention_kind("yes", _Doubling, multihead="yes")
    with pytest.raises(TypeError, match=r"why_not must be a callable"):
        register_attention_kind("why", _Doubling, multihead=False, why_not="no")
    with pytest.raises(TypeError, match=r"auto_priority must be an int or None"):
        register_attention_kind("prio", _Doubling, multihead=False, auto_priority=1.5)
    assert not {"ints", "yes", "why", "prio"} & set(available_attention_kinds())


def test_numpy_integers_are_accepted_as_segment_lengths_and_rates() -> None:
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 32, 2, 8)
    ws, rs = list(np.array([8, 16])), list(np.array([1, 2]))
    assert torch.equal(
        dilated_attention(q, q, q, ws, rs), dilated_attention(q, q, q, [8, 16], [1, 2])
    )
    config = DilatedAttentionConfig(segment_lengths=ws, dilation_rates=rs)
    assert config.segment_lengths == (8, 16) and all(type(w) is int for w in config.segment_lengths)
    with pytest.raises(TypeError, match=r"segment_lengths\[0\] must be an int, got bool"):
        dilated_attention(q, q, q, [np.bool_(True)], [1])
    # embed_dim and num_heads of a multi-head layer too (stored as int).
    layer = MultiheadDilatedAttention(np.int64(16), np.int32(2), segment_lengths=ws,
                                      dilation_rates=rs)  # fmt: skip
    assert (type(layer.embed_dim), type(layer.num_heads), layer.head_dim) == (int, int, 8)
    with pytest.raises(TypeError, match=r"num_heads must be an int, got bool"):
        MultiheadDilatedAttention(16, np.bool_(True), segment_lengths=[8], dilation_rates=[1])
