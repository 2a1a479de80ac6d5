"""The ring layers with ``recompute_qkv=True``: the projections and the ring attention of a
rank's shard as one node whose backward recomputes q, k, v a chunk of heads at a time.

On gloo (CPU), float64, against the layer written out on the dense oracle over the whole
sequence (``test_modules._manual_multihead``) and against the same ring layer with
``recompute_qkv=False`` (separate autograd nodes). Both differ from the node by roundoff
only (1e-10, as in ``test_ring_modules``). One spawn per world size runs every case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import FLOAT64_RING_TOL, spawn
from test_modules import _manual_multihead
from test_recompute_qkv import RECOMPUTED, _nodes

from dilated_attention_pytorch import (
    DilatedAttention,
    DistributedRingAttention,
    HilbertRingAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    shard_sequence,
)
from dilated_attention_pytorch.distributed.comm import RingStats
from dilated_attention_pytorch.models import LocalShardRing, RotaryAttention
from dilated_attention_pytorch.rotary import rotary_tables

pytestmark = pytest.mark.distributed

F64 = torch.float64
# Segments: local (4), one shard (16 on 2 ranks), across ranks (32, 64).
WS, RS = (4, 16, 32, 64), (1, 2, 4, 2)

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": ({}, {}),
    "causal": ({}, {"is_causal": True}),
    "key_padding_mask": ({}, {"is_causal": True, "mask": True}),
    "head_split": ({"branch_mixing": "head_split"}, {}),
    "gqa": ({"num_kv_heads": 2}, {"is_causal": True}),
    "zigzag": ({"layout": "zigzag"}, {"is_causal": True}),
    "no_bias_no_norm": ({"bias": False, "layer_norm": False}, {}),
}


def _layer(recompute: bool, world_size: int, **kwargs: Any) -> RingMultiheadDilatedAttention:
    torch.manual_seed(0)  # the same weights on every rank and for both settings
    layer = RingMultiheadDilatedAttention(
        32, 8, WS, RS, ring_size=world_size, dtype=F64, validate="always", **kwargs
    )
    layer.recompute_qkv = recompute
    if layer.layer_norm:
        with torch.no_grad():
            layer.norm.weight.normal_()
            layer.norm.bias.normal_()
    return layer


def _shard(t: torch.Tensor, layout: str) -> torch.Tensor:
    return shard_sequence(t, dim=1, layout=layout).contiguous()


def _run(layer, x_whole, dout_whole, mask_whole, call: dict[str, Any], layout: str):
    """Output, dx and the summed parameter gradients of this rank's shard, and the
    autograd node names."""
    x = _shard(x_whole, layout).requires_grad_()
    mask = None if mask_whole is None else _shard(mask_whole, layout)
    out, _ = layer(x, key_padding_mask=mask, already_split=True, **call)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(out, [x, *params], _shard(dout_whole, layout))
    summed = []
    for g in grads[1:]:
        g = g.clone()
        dist.all_reduce(g)  # each rank holds its share of the parameter gradients
        summed.append(g)
    return out.detach(), [grads[0], *summed], _nodes(out)


def _cases(rank: int, world_size: int, _: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    N, B = 64, 2
    for name, (layer_kwargs, call) in CASES.items():
        call = dict(call)
        use_mask = call.pop("mask", False)
        layout = layer_kwargs.get("layout", "contiguous")
        torch.manual_seed(1)
        x = torch.randn(B, N, 32, dtype=F64)
        dout = torch.randn(B, N, 32, dtype=F64)
        mask = None
        if use_mask:
            mask = torch.rand(B, N) < 0.3
            mask[0, : N // 2] = True  # rank 0's keys of batch 0 all padded
        node = _layer(True, world_size, **layer_kwargs)
        got, got_grads, nodes = _run(node, x, dout, mask, call, layout)
        sep = _layer(False, world_size, **layer_kwargs)
        want, want_grads, sep_nodes = _run(sep, x, dout, mask, call, layout)
        entry: dict[str, Any] = {
            "node_used": RECOMPUTED in nodes and RECOMPUTED not in sep_nodes,
            "vs_separate": [(got, want), *zip(got_grads, want_grads, strict=True)],
        }
        if "num_kv_heads" not in layer_kwargs:  # the written-out layer has H K/V heads
            xw = x.clone().requires_grad_()
            oracle = _manual_multihead(
                node, xw, xw, xw, is_causal=call.get("is_causal", False), key_padding_mask=mask
            )
            params = list(node.parameters())
            o_grads = torch.autograd.grad(oracle, [xw, *params], dout)
            entry["vs_oracle"] = [
                (got, _shard(oracle.detach(), layout)),
                (got_grads[0], _shard(o_grads[0], layout)),
                *zip(got_grads[1:], o_grads[1:], strict=True),
            ]
        results[name] = entry
    results["dropout"] = _dropout(world_size)
    results["fallbacks"] = _fallbacks(world_size)
    results["stats"] = _stats(world_size)
    results["rotary"] = _rotary_local_shard_ring(rank, world_size)
    results["inner_modules"] = _inner_modules(world_size)
    results["compiled"] = _compiled(world_size)
    results["errors"] = _errors(rank, world_size)
    return results


def _errors(rank: int, world_size: int) -> dict[str, str]:
    """Ranks that would run different backwards (a hook on one rank's projection makes
    it run the separate nodes) and a bad rotary table on one rank: a ValueError on every
    rank, from the collective check."""
    errors = {}
    layer = _layer(True, world_size, timeout=60.0)
    if rank == 1:
        layer.q_proj.register_forward_hook(lambda *args: None)
    x = _shard(torch.randn(1, 64, 32, dtype=F64), "contiguous").requires_grad_()
    try:
        layer(x, already_split=True)
    except ValueError as exc:
        errors["paths"] = str(exc)
    ring = StandardRingAttention(WS, RS, ring_size=world_size, timeout=60.0)
    node = MultiheadDilatedAttention(32, 4, attention=RotaryAttention(LocalShardRing(ring)),
                                     dtype=F64)  # fmt: skip
    n = 64 // world_size - (rank == 1)  # rank 1's tables are one position short
    cos, sin = rotary_tables(torch.arange(n), 8, dtype=F64)
    try:
        node(x, rotary=(cos, sin))
    except ValueError as exc:
        errors["rotary"] = str(exc)
    return errors


def _compiled(world_size: int) -> dict[str, Any]:
    """Under torch.compile (fullgraph, aot_eager: the operators, their fake
    implementations and autograd rule) the node runs as its custom operators: the same
    results as eager, with causal masks, a key padding mask, GQA and dropout; monitoring
    counts the same bytes and one call."""
    out: dict[str, Any] = {"pairs": []}
    for layer_kwargs, call, mask in (
        ({}, {"is_causal": True}, True),
        ({"num_kv_heads": 2, "dropout": 0.2}, {}, False),
    ):
        torch.manual_seed(8)
        x = torch.randn(2, 64, 32, dtype=F64)
        m = torch.rand(2, 64) < 0.3 if mask else None
        layer = _layer(True, world_size, **layer_kwargs).train()
        results = []
        for compiled in (True, False):
            xs = _shard(x, "contiguous").requires_grad_()
            ms = None if m is None else _shard(m, "contiguous")

            def fn(t, layer=layer, ms=ms, call=call):
                return layer(t, key_padding_mask=ms, already_split=True, **call)[0]

            if compiled:
                fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
            torch.manual_seed(9)
            y = fn(xs)
            grads = torch.autograd.grad(y, [xs, *layer.parameters()], torch.ones_like(y))
            results.append([y.detach(), *grads])
        out["pairs"] += list(zip(*results, strict=True))
    from test_compile import _recomputing_graph_ops

    layer = _layer(True, world_size)
    xs = _shard(torch.randn(2, 64, 32, dtype=F64), "contiguous").requires_grad_()
    out["graph_ops"] = _recomputing_graph_ops(lambda t: layer(t, already_split=True)[0], xs)
    # The operators' registrations (schema, fake implementations, autograd rule), on
    # every rank together (each check runs the ring).
    text = ";".join(
        f"{name}={value!r}"
        for name, value in dict(
            segment_lengths=WS, dilation_rates=RS, ring_size=world_size, is_causal=True,
            branch_mixing="softmax", layout="contiguous", backend="auto", validate=True,
            group=dist.group.WORLD.group_name, stats="",
        ).items()
    )  # fmt: skip
    weights = [p.detach().requires_grad_() for p in (layer.q_proj.weight, layer.k_proj.weight,
                                                     layer.v_proj.weight)]  # fmt: skip
    biases = [p.detach().requires_grad_() for p in (layer.q_proj.bias, layer.k_proj.bias,
                                                    layer.v_proj.bias)]  # fmt: skip
    torch.library.opcheck(
        torch.ops.dilated_attention_pytorch.projected_ring_forward,
        (xs, *weights, *biases, None, text, torch.zeros(1, dtype=torch.long), 8, 8, 0.0, None,
         None),
    )  # fmt: skip
    monitored = DistributedRingAttention(WS, RS, ring_size=world_size)
    layer = MultiheadDilatedAttention(32, 8, attention=monitored, dtype=F64)
    x = _shard(torch.randn(1, 64, 32, dtype=F64), "contiguous").requires_grad_()
    counts = {}
    for mode in ("eager", "compiled"):
        fn = lambda t: layer(t, already_split=True)[0]  # noqa: E731
        if mode == "compiled":
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        monitored.reset_communication_stats()
        fn(x).sum().backward()
        stats = monitored.get_communication_stats()
        counts[mode] = [stats[k] for k in ("bytes_sent", "bytes_received", "ring_steps", "calls")]
    out["counts"] = counts
    return out


def _rotary_local_shard_ring(rank: int, world_size: int) -> dict[str, Any]:
    """``parallelize_longnet``'s form: RotaryAttention(LocalShardRing(ring)) with the
    tables of the shard's global positions, against the single-device layer with
    RotaryAttention(DilatedAttention) on the whole sequence (separate nodes)."""
    N, E, H = 64, 32, 4
    torch.manual_seed(6)
    ring = StandardRingAttention(WS, RS, ring_size=world_size)
    node = MultiheadDilatedAttention(
        E, H, attention=RotaryAttention(LocalShardRing(ring)), dtype=F64
    )
    whole = MultiheadDilatedAttention(
        E, H, attention=RotaryAttention(DilatedAttention(WS, RS)), recompute_qkv=False, dtype=F64
    )
    whole.load_state_dict(node.state_dict())
    x = torch.randn(2, N, E, dtype=F64, requires_grad=True)
    dout = torch.randn(2, N, E, dtype=F64)
    cos, sin = rotary_tables(torch.arange(N), E // H, dtype=F64)
    want, _ = whole(x, is_causal=True, rotary=(cos, sin))
    want_grads = torch.autograd.grad(want, [x, *whole.parameters()], dout)
    L = N // world_size
    part = slice(rank * L, (rank + 1) * L)
    shard = x.detach()[:, part].clone().requires_grad_()
    got, _ = node(shard, is_causal=True, rotary=(cos[part], sin[part]))
    grads = list(torch.autograd.grad(got, [shard, *node.parameters()], dout[:, part]))
    for g in grads[1:]:
        dist.all_reduce(g)
    return {
        "node_used": RECOMPUTED in _nodes(got),
        "pairs": [
            (got.detach(), want.detach()[:, part]),
            (grads[0], want_grads[0][:, part]),
            *zip(grads[1:], want_grads[1:], strict=True),
        ],
    }


def _inner_modules(world_size: int) -> dict[str, bool]:
    """Which inner ring modules run the node: a DistributedRingAttention (its monitor
    counting the call), not with use_checkpointing, not a HilbertRingAttention (a
    subclass that reorders tokens and does not define the node)."""
    torch.manual_seed(7)
    x = torch.randn(1, 64 // world_size, 32, dtype=F64, requires_grad=True)
    used = {}
    inner = {
        "distributed": DistributedRingAttention(WS, RS, ring_size=world_size),
        "distributed_checkpointing": DistributedRingAttention(
            WS, RS, ring_size=world_size, use_checkpointing=True
        ),
        "hilbert": HilbertRingAttention(WS, RS, ring_size=world_size),
    }
    for name, attention in inner.items():
        layer = MultiheadDilatedAttention(32, 8, attention=attention, dtype=F64)
        out, _ = layer(x, already_split=True)
        used[name] = RECOMPUTED in _nodes(out)
        out.sum().backward()
    used["distributed_calls"] = inner["distributed"].get_communication_stats()["calls"]
    return used


def _dropout(world_size: int) -> list:
    """Dropout draws the same entries as the separate nodes (the same seed, the same
    streams of every head in every chunk)."""
    torch.manual_seed(2)
    x = torch.randn(2, 64, 32, dtype=F64)
    dout = torch.randn(2, 64, 32, dtype=F64)
    pairs = []
    results = []
    for recompute in (True, False):
        layer = _layer(recompute, world_size, dropout=0.3).train()
        torch.manual_seed(3)
        results.append(_run(layer, x, dout, None, {"is_causal": True}, "contiguous"))
    (got, got_grads, nodes), (want, want_grads, _) = results
    assert RECOMPUTED in nodes
    pairs = [(got, want), *zip(got_grads, want_grads, strict=True)]
    return pairs


def _fallbacks(world_size: int) -> dict[str, bool]:
    """Whole-sequence calls (already_split=False) run the separate nodes, with the
    single-device result."""
    layer = _layer(True, world_size)
    torch.manual_seed(4)
    x = torch.randn(1, 64, 32, dtype=F64, requires_grad=True)
    out, _ = layer(x)
    return {"whole_sequence_separate": RECOMPUTED not in _nodes(out)}


def _stats(world_size: int) -> dict[str, int]:
    """The backward runs one ring pass per chunk of heads: the same bytes as one pass of
    every head (the forward: one pass)."""
    counts = {}
    for recompute in (True, False):
        layer = _layer(recompute, world_size)
        stats = RingStats()
        layer.attention._stats = stats
        torch.manual_seed(5)
        x = torch.randn(1, 64, 32, dtype=F64)
        _run(layer, x, torch.randn(1, 64, 32, dtype=F64), None, {}, "contiguous")
        counts[recompute] = (stats.bytes_sent, stats.bytes_received, stats.calls)
    return {"node": counts[True], "separate": counts[False]}


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def results(request) -> list[dict[str, Any]]:
    return spawn(_cases, request.param)


def _assert_close(pairs, what: str) -> None:
    for i, (got, want) in enumerate(pairs):
        torch.testing.assert_close(
            got, want, **FLOAT64_RING_TOL, msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


@pytest.mark.parametrize("case", list(CASES))
def test_node_matches_separate_nodes_and_oracle(results, case: str) -> None:
    for rank, r in enumerate(results):
        entry = r[case]
        assert entry["node_used"], f"rank {rank}: the call did not run the recomputing node"
        _assert_close(entry["vs_separate"], f"rank {rank} {case} vs separate nodes")
        if "vs_oracle" in entry:
            _assert_close(entry["vs_oracle"], f"rank {rank} {case} vs oracle")


def test_dropout_drops_what_the_separate_nodes_drop(results) -> None:
    for rank, r in enumerate(results):
        _assert_close(r["dropout"], f"rank {rank} dropout")


def test_whole_sequence_calls_run_the_separate_nodes(results) -> None:
    assert all(r["fallbacks"]["whole_sequence_separate"] for r in results)


def test_the_backward_moves_the_same_bytes(results) -> None:
    for r in results:
        node, separate = r["stats"]["node"], r["stats"]["separate"]
        assert node[:2] == separate[:2] and node[0] > 0
        assert node[2] == separate[2] == 1


def test_rotary_local_shard_ring_matches_the_single_device_layer(results) -> None:
    for rank, r in enumerate(results):
        assert r["rotary"]["node_used"]
        _assert_close(r["rotary"]["pairs"], f"rank {rank} rotary")


def test_which_inner_ring_modules_run_the_node(results) -> None:
    for r in results:
        used = r["inner_modules"]
        assert used["distributed"] and used["distributed_calls"] == 1
        assert not used["distributed_checkpointing"] and not used["hilbert"]


def test_compiled_node_matches_eager(results) -> None:
    for rank, r in enumerate(results):
        _assert_close(r["compiled"]["pairs"], f"rank {rank} compiled")
        ops = r["compiled"]["graph_ops"]
        assert ops == ["dilated_attention_pytorch.projected_ring_forward.default"], ops
        counts = r["compiled"]["counts"]
        assert counts["compiled"] == counts["eager"] and counts["eager"][3] == 1, counts


def test_a_rank_on_another_path_or_with_bad_tables_raises_everywhere(results) -> None:
    for r in results:
        assert "every rank runs the same backward" in r["errors"]["paths"], r["errors"]
        assert "rotary tables" in r["errors"]["rotary"], r["errors"]
