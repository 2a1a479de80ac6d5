"""``MultiheadDilatedAttention(recompute_qkv=True)``: the projections and the attention as
one node whose backward recomputes q, k, v a chunk of heads at a time.

Against the layer written out on the dense oracle (``test_modules._manual_multihead``)
and against the same layer with ``recompute_qkv=False`` (separate autograd nodes), in
float64: both sides then differ by roundoff only (1e-10, as in ``test_modules``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from test_memory_estimate import LiveStorageBytes
from test_modules import F64, _manual_multihead, _padding_mask

from dilated_attention_pytorch import MultiheadDilatedAttention
from dilated_attention_pytorch.backends import ForwardContext, get_backend
from dilated_attention_pytorch.memory import get_memory_estimate
from dilated_attention_pytorch.plan import heads_plan, make_plan
from dilated_attention_pytorch.projected import HEAD_CHUNKS, head_chunks
from dilated_attention_pytorch.rotary import rotary_tables

F64_ = torch.float64


def _nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``out``."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


RECOMPUTED = "_ProjectedAttentionFunctionBackward"


def _layer(recompute: bool, seed: int = 0, **kwargs) -> MultiheadDilatedAttention:
    torch.manual_seed(seed)
    kwargs.setdefault("dtype", F64_)
    E, H = kwargs.pop("E", 48), kwargs.pop("H", 12)
    ws, rs = kwargs.pop("ws", [8, 16, 32]), kwargs.pop("rs", [1, 2, 4])
    layer = MultiheadDilatedAttention(E, H, ws, rs, recompute_qkv=recompute, **kwargs)
    if layer.layer_norm:
        with torch.no_grad():
            layer.norm.weight.normal_()
            layer.norm.bias.normal_()
    return layer


def _grads(layer, x, call_kwargs, dout_seed=1):
    out, _ = layer(x, **call_kwargs)
    torch.manual_seed(dout_seed)
    dout = torch.randn_like(out)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    inputs = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, inputs, dout), _nodes(out)


CASES = {
    "plain": ({}, {}),
    "causal": ({}, {"is_causal": True}),
    "head_split": ({"branch_mixing": "head_split"}, {"is_causal": True}),
    "gqa": ({"num_kv_heads": 4}, {"is_causal": True}),
    "mqa": ({"num_kv_heads": 1}, {}),
    "no_bias_no_norm": ({"bias": False, "layer_norm": False}, {}),
    "one_head_chunks": ({"E": 20, "H": 5, "ws": [6, 15], "rs": [2, 5]}, {}),
    "many_heads": ({"E": 64, "H": 32, "ws": [8, 16], "rs": [1, 2]}, {"is_causal": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recompute_matches_separate_nodes_and_oracle(case: str) -> None:
    layer_kwargs, call_kwargs = CASES[case]
    B, N = 2, 70  # not a multiple of any segment length: short last segments
    x = torch.randn(B, N, layer_kwargs.get("E", 48), dtype=F64_, requires_grad=True)
    out, grads, nodes = _grads(_layer(True, **dict(layer_kwargs)), x, call_kwargs)
    assert RECOMPUTED in nodes
    ref, ref_grads, ref_nodes = _grads(_layer(False, **dict(layer_kwargs)), x, call_kwargs)
    assert RECOMPUTED not in ref_nodes
    torch.testing.assert_close(out, ref, **F64)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)
    if "num_kv_heads" not in layer_kwargs:  # the oracle layer has H K/V heads
        layer = _layer(True, **dict(layer_kwargs))
        oracle = _manual_multihead(layer, x, x, x, is_causal=call_kwargs.get("is_causal", False))
        torch.testing.assert_close(layer(x, **call_kwargs)[0], oracle, **F64)
        dout = torch.randn_like(oracle)
        params = list(layer.parameters())
        got = torch.autograd.grad(layer(x, **call_kwargs)[0], [x, *params], dout)
        want = torch.autograd.grad(oracle, [x, *params], dout)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **F64)


def test_key_padding_mask() -> None:
    B, N = 3, 50
    x = torch.randn(B, N, 48, dtype=F64_, requires_grad=True)
    mask = _padding_mask(B, N)
    layer = _layer(True)
    out, grads, nodes = _grads(layer, x, {"key_padding_mask": mask, "is_causal": True})
    assert RECOMPUTED in nodes
    oracle = _manual_multihead(layer, x, x, x, key_padding_mask=mask, is_causal=True)
    torch.testing.assert_close(out, oracle, **F64)
    ref, ref_grads, _ = _grads(_layer(False), x, {"key_padding_mask": mask, "is_causal": True})
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)


def test_packed_documents() -> None:
    cu = torch.tensor([0, 13, 13, 60, 90])
    x = torch.randn(1, 90, 48, dtype=F64_, requires_grad=True)
    call = {"cu_seqlens": cu, "is_causal": True}
    out, grads, nodes = _grads(_layer(True), x, call)
    assert RECOMPUTED in nodes
    ref, ref_grads, _ = _grads(_layer(False), x, call)
    torch.testing.assert_close(out, ref, **F64)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)
    # Each document on its own through the oracle.
    layer = _layer(True)
    parts = [
        _manual_multihead(layer, x[:, a:b], x[:, a:b], x[:, a:b], is_causal=True)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        if b > a
    ]
    torch.testing.assert_close(layer(x, **call)[0], torch.cat(parts, 1), **F64)


def test_dropout_drops_what_the_separate_nodes_drop() -> None:
    """The chunks draw every head's dropout streams of the whole plan: with the same seed
    both forms drop the same entries (dropout 0.3 changes the output, so a wrong stream
    would show)."""
    x = torch.randn(2, 64, 48, dtype=F64_, requires_grad=True)
    results = []
    for recompute in (True, False):
        layer = _layer(recompute, dropout=0.3).train()
        torch.manual_seed(5)
        results.append(_grads(layer, x, {"is_causal": True}))
    (out, grads, nodes), (ref, ref_grads, _) = results
    assert RECOMPUTED in nodes
    torch.testing.assert_close(out, ref, **F64)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)
    no_dropout = _layer(True).eval()
    assert not torch.allclose(out, no_dropout(x, is_causal=True)[0])


def test_frozen_parameters_and_input() -> None:
    layer = _layer(True)
    layer.q_proj.weight.requires_grad_(False)
    layer.v_proj.bias.requires_grad_(False)
    x = torch.randn(2, 40, 48, dtype=F64_)  # no gradient for the input
    out, _ = layer(x, is_causal=True)
    assert RECOMPUTED in _nodes(out)
    out.square().sum().backward()
    ref_layer = _layer(False)
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.q_proj.weight.requires_grad_(False)
    ref_layer.v_proj.bias.requires_grad_(False)
    ref_layer(x, is_causal=True)[0].square().sum().backward()
    assert layer.q_proj.weight.grad is None and layer.v_proj.bias.grad is None
    for (name, p), rp in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, rp.grad, **F64, msg=name)


@pytest.mark.parametrize(
    "shape,cu", [((2, 0), None), ((0, 9), None), ((1, 0), [0, 0]), ((1, 5), [0, 0, 5])]
)
def test_empty_inputs(shape, cu) -> None:
    call = {} if cu is None else {"cu_seqlens": torch.tensor(cu)}
    results, x0 = [], torch.randn(*shape, 48, dtype=F64_)
    for recompute in (True, False):
        x = x0.clone().requires_grad_()
        layer = _layer(recompute)
        out, _ = layer(x, **call)
        out.sum().backward()
        results.append((out, x.grad, [p.grad for p in layer.parameters()]))
    (out, gx, gp), (ref, ref_gx, ref_gp) = results
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(gx, ref_gx, **F64)
    for g, rg in zip(gp, ref_gp, strict=True):
        torch.testing.assert_close(g, rg, **F64)


def test_weight_gradients_have_their_own_storage() -> None:
    layer = _layer(True)
    x = torch.randn(1, 20, 48, dtype=F64_)
    out, _ = layer(x)
    assert RECOMPUTED in _nodes(out)
    out.sum().backward()
    grads = [p.grad for m in (layer.q_proj, layer.k_proj, layer.v_proj) for p in m.parameters()]
    for g in grads:
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size()


class _ScaledLinear(torch.nn.Linear):
    """A LoRA-like subclass: its forward is not ``F.linear`` of its weight."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def _hooked(layer, how: str):
    if how == "forward_hook":
        layer.q_proj.register_forward_hook(lambda m, i, o: o * 3.0)
    elif how == "pre_hook_on_attention":
        layer.attention.register_forward_pre_hook(lambda m, args: (args[0] * 2.0, *args[1:]))
    elif how == "subclass":
        sub = _ScaledLinear(48, 48, dtype=F64_)
        sub.load_state_dict(layer.v_proj.state_dict())
        layer.v_proj = sub
    elif how == "pruning":
        prune.l1_unstructured(layer.q_proj, "weight", amount=0.5)
    return layer


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook_on_attention", "subclass", "pruning"])
def test_hooks_and_subclasses_take_the_separate_nodes(how: str) -> None:
    """The node never calls the projections or the inner attention, so a layer whose
    modules would do something else than ``F.linear`` / the attention takes the separate
    nodes: the same results as with ``recompute_qkv=False``."""
    x = torch.randn(2, 30, 48, dtype=F64_, requires_grad=True)
    out, grads, nodes = _grads(_hooked(_layer(True), how), x, {"is_causal": True})
    assert RECOMPUTED not in nodes
    ref, ref_grads, _ = _grads(_hooked(_layer(False), how), x, {"is_causal": True})
    torch.testing.assert_close(out, ref, **F64)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)


def test_global_module_hooks_take_the_separate_nodes() -> None:
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        out, _ = _layer(True)(torch.randn(1, 16, 48, dtype=F64_, requires_grad=True))
    finally:
        handle.remove()
    assert RECOMPUTED not in _nodes(out)
    assert "Linear" in seen and "DilatedAttention" in seen


def test_instance_level_attend_override_takes_the_separate_nodes() -> None:
    layer = _layer(True)
    calls = []

    def attend(q, k, v, **kw):
        calls.append(q.shape)
        return MultiheadDilatedAttention._attend(layer, q, k, v, **kw)

    layer._attend = attend
    out, _ = layer(torch.randn(1, 16, 48, dtype=F64_, requires_grad=True))
    assert calls and RECOMPUTED not in _nodes(out)


@pytest.mark.parametrize(
    "call",
    ["cross", "no_grad", "frozen", "recompute_off", "autocast", "cache"],
)
def test_other_calls_run_separate_nodes(call: str) -> None:
    layer = _layer(call != "recompute_off", dtype=torch.float32)
    x = torch.randn(2, 32, 48, requires_grad=True)
    if call == "cross":
        out, _ = layer(x, x.detach().clone().requires_grad_())
    elif call == "no_grad":
        with torch.no_grad():
            out, _ = layer(x)
        assert out.grad_fn is None
        return
    elif call == "frozen":
        layer.requires_grad_(False)
        out, _ = layer(x.detach())
        assert out.grad_fn is None
        return
    elif call == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(x)
    elif call == "cache":
        layer.eval()
        out, _ = layer(x, is_causal=True, cache=layer.attention.new_cache(12))
    else:
        out, _ = layer(x)
    assert RECOMPUTED not in _nodes(out)
    assert "_DilatedAttentionFunctionBackward" in _nodes(out)


def test_double_backward_raises() -> None:
    layer = _layer(True)
    x = torch.randn(1, 32, 48, dtype=F64_, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="recompute_qkv=True.*double backward"):
        gx.sum().backward()


def test_torch_func_grad_takes_the_separate_nodes() -> None:
    layer = _layer(True)
    x = torch.randn(1, 32, 48, dtype=F64_)

    def loss(inp):
        return layer(inp, is_causal=True)[0].square().sum()

    got = torch.func.grad(loss)(x)
    x_ = x.clone().requires_grad_()
    loss(x_).backward()
    torch.testing.assert_close(got, x_.grad, **F64)


# --------------------------------------------------------------------------- the chunks


def test_head_chunks() -> None:
    assert head_chunks(16, 1) == [(2 * i, 2 * i + 2) for i in range(8)]
    assert head_chunks(12, 1) == [(i, i + 1) for i in range(12)]
    assert head_chunks(32, 4) == [(4 * i, 4 * i + 4) for i in range(8)]
    assert head_chunks(8, 8) == [(0, 8)]  # multi-query: one chunk of every head
    for H, g in [(16, 1), (12, 3), (32, 2), (5, 1), (64, 8)]:
        chunks = head_chunks(H, g)
        assert chunks[0][0] == 0 and chunks[-1][1] == H
        assert all(a % g == 0 and b % g == 0 for a, b in chunks)
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))
        assert len(chunks) <= max(HEAD_CHUNKS, H // g)


@pytest.mark.parametrize("mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("kv", [12, 4, 2])
def test_heads_plan_parts_compute_the_whole(mixing: str, kv: int) -> None:
    """Running the parts of a plan (backend forward and backward on head slices) gives the
    whole plan's outputs, LSE and gradients, with dropout (the parts draw the whole
    plan's streams)."""
    B, N, H, D = 2, 45, 12, 8
    ws, rs = [6, 12, 24], [1, 3, 4]
    plan = make_plan(ws, rs, H, mixing, kv)
    q = torch.randn(B, N, H, D, dtype=F64_)
    k, v = (torch.randn(B, N, kv, D, dtype=F64_) for _ in range(2))
    backend = get_backend("pytorch")
    ctx = ForwardContext(plan=plan, scale=0.3, is_causal=True, dropout_p=0.2, seed=11)
    out, lse = backend.forward(q, k, v, ctx)
    dout = torch.randn_like(out)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, ctx)
    g = H // kv
    dk_parts, dv_parts = torch.zeros_like(dk), torch.zeros_like(dv)
    for a, b in [(0, 6), (6, 12)] if g <= 6 else [(0, 12)]:
        sub = heads_plan(plan, a, b)
        assert (sub.num_heads, sub.first_head, sub.parent_heads) == (b - a, a, H)
        c = ForwardContext(plan=sub, scale=0.3, is_causal=True, dropout_p=0.2, seed=11)
        hs, ks = slice(a, b), slice(a // g, b // g)
        o, lse_c = backend.forward(q[:, :, hs], k[:, :, ks], v[:, :, ks], c)
        torch.testing.assert_close(o, out[:, :, hs], **F64)
        torch.testing.assert_close(lse_c, lse[..., hs], **F64)
        gq, gk, gv = backend.backward(
            dout[:, :, hs], q[:, :, hs], k[:, :, ks], v[:, :, ks], out[:, :, hs],
            lse[..., hs], c,
        )  # fmt: skip
        torch.testing.assert_close(gq, dq[:, :, hs], **F64)
        dk_parts[:, :, ks] += gk
        dv_parts[:, :, ks] += gv
    torch.testing.assert_close(dk_parts, dk, **F64)
    torch.testing.assert_close(dv_parts, dv, **F64)


def test_heads_plan_errors() -> None:
    plan = make_plan([8], [2], 8, "softmax", 4)
    for a, b in [(1, 4), (0, 3)]:
        with pytest.raises(ValueError, match=r"split a K/V head's 2 query heads.*multiples of 2"):
            heads_plan(plan, a, b)
    for a, b in [(4, 4), (0, 10), (-2, 2)]:
        with pytest.raises(ValueError, match=r"not a non-empty range of a plan's 8 heads"):
            heads_plan(plan, a, b)


def test_heads_plan_keeps_each_heads_offsets() -> None:
    plan = make_plan([16, 32], [4, 8], 16, "softmax")
    whole = plan.offsets()
    for a, b in head_chunks(16, 1):
        part = heads_plan(plan, a, b).offsets()
        assert [row[a:b] for row in whole] == part


# --------------------------------------------------------------------------- memory


def test_recompute_holds_less_and_the_estimate_follows(monkeypatch) -> None:
    """Measured live tensor bytes (CPU, float32, the math path with a small score-tile
    budget so that the layer's activations dominate): the recomputing layer's peak is
    well under the separate nodes' and the estimate matches both to 1%."""
    from dilated_attention_pytorch import memory
    from dilated_attention_pytorch.backends import blocks

    monkeypatch.setattr(blocks, "_MAX_SCORE_ELEMENTS_CPU", 1 << 16)
    monkeypatch.setattr(memory, "_MAX_SCORE_ELEMENTS", 1 << 16)
    B, N, H, D, ws, rs = 1, 8192, 16, 16, [256, 512, 1024], [1, 2, 4]
    peaks = {}
    for recompute in (True, False):
        with LiveStorageBytes() as tracker:
            layer = MultiheadDilatedAttention(H * D, H, ws, rs, recompute_qkv=recompute)
            # x requires its gradient, as a layer's input does in a model (the estimate
            # counts dx).
            x = torch.randn(B, N, H * D, requires_grad=True)
            y, _ = layer(x)
            y.backward(torch.randn_like(y))
        peaks[recompute] = tracker.peak
        est = get_memory_estimate(
            N, B, H, D, segment_lengths=ws, dilation_rates=rs, dtype=torch.float32,
            embed_dim=H * D, recompute_qkv=recompute,
        )  # fmt: skip
        assert est["bytes_per_device"] == pytest.approx(tracker.peak, rel=0.01)
    assert peaks[True] < 0.7 * peaks[False], peaks


def test_estimate_recompute_for_the_layer_on_one_device_and_on_ring_shards() -> None:
    kw = dict(segment_lengths=[512, 1024], dilation_rates=[1, 2], dtype=torch.bfloat16)
    for extra in ({}, {"ring_size": 2, "already_split": True}):
        on = get_memory_estimate(4096, 1, 8, 64, embed_dim=512, **kw, **extra)
        off = get_memory_estimate(4096, 1, 8, 64, embed_dim=512, recompute_qkv=False, **kw, **extra)
        assert on["bytes_per_device"] < off["bytes_per_device"], extra
    # The attention alone, a forward only, or a ring layer on the whole sequence:
    # recompute_qkv changes nothing.
    for extra in (
        {},
        {"embed_dim": 512, "with_backward": False},
        {"embed_dim": 512, "ring_size": 2, "already_split": False},
    ):
        a = get_memory_estimate(4096, 1, 8, 64, **{**kw, **extra})
        b = get_memory_estimate(4096, 1, 8, 64, recompute_qkv=False, **{**kw, **extra})
        assert a["bytes_per_device"] == b["bytes_per_device"], extra
    with pytest.raises(TypeError, match="recompute_qkv must be a bool"):
        get_memory_estimate(4096, 1, 8, 64, recompute_qkv=1, **kw)


def test_layer_estimate_uses_the_layers_setting() -> None:
    for recompute in (True, False):
        layer = MultiheadDilatedAttention(64, 4, [64, 128], [1, 2], recompute_qkv=recompute)
        est = layer.get_memory_estimate(1024)
        ref = get_memory_estimate(
            1024, 1, 4, 16, segment_lengths=[64, 128], dilation_rates=[1, 2],
            dtype=torch.float32, embed_dim=64, recompute_qkv=recompute,
        )  # fmt: skip
        assert est["bytes_per_device"] == ref["bytes_per_device"]


def test_recompute_qkv_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="recompute_qkv must be a bool, got int"):
        MultiheadDilatedAttention(16, 4, [8], [1], recompute_qkv=1)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_longnet_lm_with_rotary(num_kv_heads) -> None:
    """LongNetLM's layers (rotary q and k inside RotaryAttention) take the recomputing node:
    loss and every parameter's gradient as with separate nodes."""
    from dilated_attention_pytorch import MultiheadDilatedAttention as MHA
    from dilated_attention_pytorch.models import LongNetLM

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 40))
    results = []
    for recompute in (True, False):
        torch.manual_seed(0)
        model = LongNetLM(50, 32, 4, 2, [8, 16], [1, 2], num_kv_heads=num_kv_heads)
        model = model.double()
        for layer in model.modules():
            if isinstance(layer, MHA):
                layer.recompute_qkv = recompute
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        names = _nodes(loss)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads, names))
    (loss, grads, names), (ref, ref_grads, ref_names) = results
    assert RECOMPUTED in names and RECOMPUTED not in ref_names
    torch.testing.assert_close(loss, ref, **F64)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_bf16_gradients_follow_the_gpu_tolerance_rule(num_kv_heads) -> None:
    """bf16 on the CPU against the float32 layer with the same weights: the recomputing
    layer's error (dx accumulated over the chunks of heads in bf16) is at most twice the
    separate nodes' plus 1e-3, the rule of tests/gpu/test_recompute_gpu.py."""
    torch.manual_seed(0)
    ref_layer = MultiheadDilatedAttention(256, 8, [64, 128, 256], [1, 2, 4],
                                          num_kv_heads=num_kv_heads)  # fmt: skip
    x, dout = torch.randn(2, 512, 256), torch.randn(2, 512, 256)

    def step(layer):
        xs = x.to(layer.q_proj.weight.dtype).requires_grad_()
        out, _ = layer(xs, is_causal=True)
        grads = torch.autograd.grad(out, [xs, *layer.parameters()], dout.to(out.dtype))
        return [t.float() for t in (out, *grads)]

    ref = step(ref_layer)
    results = {}
    for recompute in (True, False):
        layer = copy.deepcopy(ref_layer).bfloat16()
        layer.recompute_qkv = recompute
        results[recompute] = step(layer)
    for i, want in enumerate(ref):
        err = (results[True][i] - want).abs().max().item()
        base = (results[False][i] - want).abs().max().item()
        assert err <= 2 * base + 1e-3, (i, err, base)


def test_rotary_tables_without_a_rotary_attention_are_refused_either_way() -> None:
    """``rotary=`` goes to the inner attention only through RotaryAttention: another inner
    module rejects it, with or without the node (never applied in training only)."""
    layer = _layer(True)
    x = torch.randn(1, 32, 48, dtype=F64_, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(32), 4, dtype=F64_)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="rotary"):
            layer(x, rotary=(cos, sin))


def test_estimate_of_a_checkpointing_inner_ring_counts_separate_nodes() -> None:
    from dilated_attention_pytorch import DistributedRingAttention

    ring = DistributedRingAttention([512, 1024], [1, 2], use_checkpointing=True)
    layer = MultiheadDilatedAttention(512, 8, attention=ring)
    est = layer.get_memory_estimate(4096, 1)["bytes_per_device"]
    separate = layer.get_memory_estimate(4096, 1, recompute_qkv=False)["bytes_per_device"]
    assert est == separate
