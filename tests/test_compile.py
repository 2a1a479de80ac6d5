"""``torch.compile(fullgraph=True)`` of the functional API, the modules and LongNetLM on the
CPU: compiled == eager, forward and gradients (the attention runs as a custom operator)."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
from distributed_utils import spawn
from torch._dynamo.testing import CompileCounterWithBackend

from dilated_attention_pytorch import (
    BlockSparseAttention,
    DilatedAttention,
    DistributedRingAttention,
    EnterpriseDistributedDilatedAttention,
    HilbertRingMultiheadAttention,
    MultiheadDilatedAttention,
    PyTorchBackend,
    RingBlockSparseAttention,
    RingMultiheadDilatedAttention,
    create_block_sparse_attention,
    dilated_attention,
    ring_dilated_attention,
)
from dilated_attention_pytorch.distributed.comm import RingStats
from dilated_attention_pytorch.models import LongNetLM
from dilated_attention_pytorch.ops import _backward, _forward
from dilated_attention_pytorch.sparse.ops import _backward as bs_backward
from dilated_attention_pytorch.sparse.ops import _forward as bs_forward
from dilated_attention_pytorch.sparse.ops import pattern_spec

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(fn, *inputs):
    out = fn(*inputs)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    return (out, *torch.autograd.grad(loss, inputs))


def _assert_same(compiled, eager, *inputs) -> None:
    for a, b in zip(_grads(compiled, *inputs), _grads(eager, *inputs)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("mixing", "is_causal", "masked"), [("softmax", True, False),
                                                            ("head_split", False, True)])  # fmt: skip
def test_functional_compiles_without_graph_breaks(mixing, is_causal, masked) -> None:
    q, k, v = (torch.randn(2, 48, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 48) < 0.2 if masked else None

    def fn(q, k, v):
        out, lse = dilated_attention(q, k, v, [16, 32], [1, 2], is_causal=is_causal,
                                     branch_mixing=mixing, key_padding_mask=mask,
                                     return_lse=True)  # fmt: skip
        return out + lse[..., None]

    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)


def test_dropout_draws_its_seed_inside_the_graph() -> None:
    # Compiled random ops draw from their own stream unless fallback_random is set; with
    # it, the compiled call draws the eager call's seed and drops the same entries.
    with inductor_config.patch(fallback_random=True):
        _dropout_case()


def _dropout_case() -> None:
    q, k, v = (torch.randn(1, 32, 2, 8, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: dilated_attention(q, k, v, [16], [1], dropout_p=0.5)
    compiled = torch.compile(fn, fullgraph=True)
    torch.manual_seed(5)
    a = _grads(compiled, q, k, v)
    torch.manual_seed(5)
    b = _grads(fn, q, k, v)
    for x, y in zip(a, b):  # the same seed from the same generator state: the same entries
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(compiled(q, k, v), a[0])  # a new seed per call


def test_modules_and_language_model_compile() -> None:
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(32, 4, [16, 32], [1, 2])
    x = torch.randn(2, 64, 32, requires_grad=True)
    fn = lambda x: layer(x, is_causal=True)[0]
    _assert_same(torch.compile(fn, fullgraph=True), fn, x)
    attn = DilatedAttention([16, 32], [1, 2])
    q, k, v = (torch.randn(1, 64, 4, 8, requires_grad=True) for _ in range(3))
    _assert_same(torch.compile(attn, fullgraph=True), attn, q, k, v)
    model = LongNetLM(256, 32, 4, 2, [16, 32, 64], [1, 2, 4])
    ids = torch.randint(0, 256, (2, 65))
    compiled = torch.compile(model, fullgraph=True)
    loss_c, loss_e = compiled(ids[:, :-1], ids[:, 1:]), model(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_custom_ops_pass_opcheck_with_transposed_inputs() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        # (B, H, N, D) tensors passed as .transpose(1, 2): strided, not contiguous.
        q, k, v = (torch.randn(2, 4, 24, 8, dtype=dtype).transpose(1, 2) for _ in range(3))
        args = ([8, 16], [1, 2], "softmax", 0.3, True, 0.0, None, torch.zeros(1, dtype=torch.long), "pytorch")  # fmt: skip
        torch.library.opcheck(_forward, (q, k, v, *args))
        out, lse = _forward(q, k, v, *args)
        torch.library.opcheck(_backward, (torch.randn_like(out), q, k, v, out, lse, *args))


def test_custom_ops_pass_opcheck_with_fewer_kv_heads() -> None:
    # Grouped-query attention: the fakes give dk, dv the K/V heads' shape.
    q = torch.randn(1, 24, 6, 8)
    k, v = torch.randn(1, 24, 2, 8), torch.randn(1, 24, 2, 8)
    args = ([8, 16], [1, 3], "softmax", 0.3, True, 0.0, None, torch.zeros(1, dtype=torch.long), "pytorch")  # fmt: skip
    torch.library.opcheck(_forward, (q, k, v, *args))
    out, lse = _forward(q, k, v, *args)
    torch.library.opcheck(_backward, (torch.randn_like(out), q, k, v, out, lse, *args))


def test_grouped_query_attention_compiles_without_graph_breaks() -> None:
    q = torch.randn(1, 32, 8, 8, requires_grad=True)
    k, v = (torch.randn(1, 32, 2, 8, requires_grad=True) for _ in range(2))
    fn = lambda q, k, v: dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)


def test_transposed_inputs_compile_forward_and_backward() -> None:
    q, k, v = (torch.randn(2, 4, 24, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    fn = lambda q, k, v: dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)


def test_a_backend_instance_compiles_too() -> None:
    q, k, v = (torch.randn(1, 32, 2, 8, requires_grad=True) for _ in range(3))
    math_kernel = PyTorchBackend(kernel="math")
    fn = lambda q, k, v: dilated_attention(q, k, v, [8, 16], [1, 2], backend=math_kernel)
    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)


def test_block_sparse_modules_compile_without_graph_breaks() -> None:
    # The pattern is built inside the operator (its knob search reads tensor values).
    attn = BlockSparseAttention(block_size=16, sparsity_ratio=0.5, pattern_type="random",
                                num_heads=4)  # fmt: skip
    q, k, v = (torch.randn(1, 64, 4, 16, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: attn(q, k, v, is_causal=True)
    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)
    layer = create_block_sparse_attention(embed_dim=64, num_heads=4, sparsity_ratio=0.5,
                                          pattern_type="dilated_sparse", block_size=16)  # fmt: skip
    x = torch.randn(2, 64, 64, requires_grad=True)
    fn = lambda x: layer(x, is_causal=True)[0]
    _assert_same(torch.compile(fn, fullgraph=True), fn, x)


def test_block_sparse_grouped_query_and_a_second_head_count_compile() -> None:
    # Grouped-query K/V through the operator; then a per-head module with another head
    # count in the same process, where dynamo makes the head count symbolic (its check
    # used to reject the right count there).
    for H, H_kv, kw in ((4, 2, {}), (6, 3, {"pattern_type": "random", "num_heads": 6})):
        attn = BlockSparseAttention(block_size=16, sparsity_ratio=0.5, **kw)
        q = torch.randn(1, 64, H, 16, requires_grad=True)
        k, v = (torch.randn(1, 64, H_kv, 16, requires_grad=True) for _ in range(2))
        _assert_same(torch.compile(attn, fullgraph=True), attn, q, k, v)


def test_compiled_block_sparse_module_checks_per_head_patterns() -> None:
    attn = BlockSparseAttention(block_size=16, sparsity_ratio=0.5, pattern_type="random",
                                num_heads=2)  # fmt: skip
    q = torch.randn(1, 64, 4, 16)
    # fullgraph=True reports the module's ValueError through dynamo's own exception.
    with pytest.raises(Exception, match="one block mask per head for 2 heads, but q has 4"):
        torch.compile(attn, fullgraph=True, backend="eager")(q, q, q)
    with pytest.raises(ValueError, match="one block mask per head for 2 heads, but q has 4"):
        torch.compile(attn, backend="eager")(q, q, q)


def test_custom_ops_pass_opcheck_with_packed_documents() -> None:
    q, k, v = (torch.randn(1, 40, 4, 8, dtype=torch.float64) for _ in range(3))
    cu, longest = torch.tensor([0, 13, 13, 40], dtype=torch.int32), torch.tensor(27)
    args = ([8, 16], [1, 2], "softmax", 0.3, True, 0.0, None, torch.zeros(1, dtype=torch.long),
            "pytorch", cu, longest)  # fmt: skip
    torch.library.opcheck(_forward, (q, k, v, *args))
    out, lse = _forward(q, k, v, *args)
    torch.library.opcheck(_backward, (torch.randn_like(out), q, k, v, out, lse, *args))


def test_block_sparse_ops_pass_opcheck() -> None:
    spec = pattern_spec("local_window", block_size=16, sparsity_ratio=0.5)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (torch.randn(2, 4, 48, 16, dtype=dtype).transpose(1, 2) for _ in range(3))
        args = (spec, True, 0.3, 0.0, torch.zeros(1, dtype=torch.long), "pytorch")
        torch.library.opcheck(bs_forward, (q, k, v, *args))
        out, lse = bs_forward(q, k, v, *args)
        torch.library.opcheck(bs_backward, (torch.randn_like(out), q, k, v, out, lse, *args))


def test_packed_documents_compile_without_graph_breaks() -> None:
    # The offsets go into the operator as a tensor and are read there; the pytorch backend
    # runs the documents one by one inside it (triton, in one launch per branch: on the GPU).
    backend = "pytorch"
    torch.manual_seed(0)
    lengths = [20, 0, 37, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 64, 4, 16, requires_grad=True)
    k, v = (torch.randn(1, 64, 2, 16, requires_grad=True) for _ in range(2))  # GQA too

    def fn(q, k, v):
        out, lse = dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True, cu_seqlens=cu,
                                     max_seqlen=37, return_lse=True, backend=backend)  # fmt: skip
        return out + lse[..., None]

    _assert_same(torch.compile(fn, fullgraph=True), fn, q, k, v)
    # Checked inside the operator: bad offsets raise the eager call's errors.
    bad = torch.tensor([0, 40, 30, 64], dtype=torch.int32)
    compiled = torch.compile(
        lambda q: dilated_attention(q, q, q, [8], [1], cu_seqlens=bad, backend=backend),
        fullgraph=True,
    )
    with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
        compiled(q.detach())
    short = torch.compile(
        lambda q: dilated_attention(q, q, q, [8], [1], cu_seqlens=cu, max_seqlen=36),
        fullgraph=True,
    )
    with pytest.raises(ValueError, match="max_seqlen=36 is shorter"):
        short(q.detach())


def test_compiled_layer_with_packed_documents_and_dropout() -> None:
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(32, 4, [16, 32], [1, 2], dropout=0.0)
    cu = torch.tensor([0, 24, 64], dtype=torch.int64)
    x = torch.randn(1, 64, 32, requires_grad=True)
    fn = lambda x: layer(x, is_causal=True, cu_seqlens=cu)[0]
    _assert_same(torch.compile(fn, fullgraph=True), fn, x)
    # With dropout, each document draws its own entries inside the operator (not the same
    # pattern repeated): two equal documents give different outputs.
    same = torch.cat([x[:, :32]] * 2, 1).detach()
    q = same.view(1, 64, 4, 8)
    cu2 = torch.tensor([0, 32, 64])
    out = torch.compile(
        lambda q: dilated_attention(q, q, q, [16], [1], dropout_p=0.5, cu_seqlens=cu2),
        fullgraph=True,
    )(q)
    assert not torch.allclose(out[:, :32], out[:, 32:])


def _recomputing_graph_ops(fn, *inputs) -> list[str]:
    """The dilated_attention_pytorch operators in the graph ``fn`` compiles to."""
    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(fn, fullgraph=True, backend=counter)(*inputs)
    return [
        str(node.target) for graph in counter.graphs for node in graph.graph.nodes
        if "dilated_attention_pytorch" in str(node.target)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "call"),
    [
        ({}, {"is_causal": True}),
        ({"num_kv_heads": 2, "branch_mixing": "head_split", "bias": False}, {}),
        ({}, {"cu_seqlens": torch.tensor([0, 24, 64]), "is_causal": True}),
        ({"dropout": 0.3}, {"is_causal": True}),
    ],
)
def test_layer_recomputing_qkv_compiles(kwargs, call) -> None:
    """The recompute_qkv node compiles as its own operators (no graph break), equal to
    eager forward and gradients of the input and every parameter (dropout: the same
    seed drawn from the same generator state, as for the functional API)."""
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(32, 4, [16, 32], [1, 2], **kwargs)
    x = torch.randn(1, 64, 32, requires_grad=True)
    fn = lambda x: layer(x, **call)[0]
    ops = _recomputing_graph_ops(fn, x)
    assert "dilated_attention_pytorch.projected_forward.default" in ops, ops
    assert "dilated_attention_pytorch.forward.default" not in ops

    def grads(f):
        torch.manual_seed(3)
        out = f(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        return (out, *torch.autograd.grad(loss, [x, *layer.parameters()]))

    with inductor_config.patch(fallback_random=True):
        compiled = grads(torch.compile(fn, fullgraph=True))
    # Inductor fuses the norm's and out_proj's backward, so the operator's incoming
    # gradient differs in the last fp32 bits; a weight gradient sums 64 tokens' products
    # with cancellation, which leaves ~1e-4 relative (the operators themselves are eager).
    for a, b in zip(compiled, grads(fn), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_recomputing_ops_pass_opcheck() -> None:
    from dilated_attention_pytorch.projected import _backward_op, _forward_op
    from dilated_attention_pytorch.rotary import rotary_tables

    torch.manual_seed(0)
    seed = torch.zeros(1, dtype=torch.long)
    cos, sin = rotary_tables(torch.arange(24), 8)
    for dtype, kv, with_bias, rotary in [
        (torch.float32, 4, True, False), (torch.float64, 2, False, True),
        (torch.bfloat16, 1, True, True),
    ]:  # fmt: skip
        x = torch.randn(2, 24, 32, dtype=dtype)
        wq = torch.randn(32, 32, dtype=dtype)
        wk, wv = (torch.randn(kv * 8, 32, dtype=dtype) for _ in range(2))
        biases = (
            (torch.randn(32, dtype=dtype), torch.randn(kv * 8, dtype=dtype),
             torch.randn(kv * 8, dtype=dtype)) if with_bias else (None, None, None)
        )  # fmt: skip
        settings = (4, kv, 8, [8, 16], [1, 2], "softmax", 0.3, True, 0.0, None, seed, "pytorch",
                    None, None, *((cos, sin) if rotary else (None, None)))  # fmt: skip
        torch.library.opcheck(_forward_op, (x, wq, wk, wv, *biases, *settings))
        out, lse = _forward_op(x, wq, wk, wv, *biases, *settings)
        dout = torch.randn_like(out)
        torch.library.opcheck(_backward_op, (dout, x, wq, wk, wv, *biases, out, lse, *settings))


def _counted_packed_call(q: torch.Tensor, stats: RingStats) -> torch.Tensor:
    cu = torch.tensor([0, 5, 16, 20, 31, 32])  # every document inside a shard
    return ring_dilated_attention(q, q, q, [8], [1], cu_seqlens=cu, max_seqlen=11, stats=stats)


def _ring_compile_worker(rank: int, world_size: int, _: object) -> dict[str, object]:
    torch.manual_seed(0)  # the same whole tensors on every rank
    N, L = 32, 16
    q = torch.randn(1, N, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(1, N, 2, 8, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(1, N) < 0.2
    part = slice(rank * L, (rank + 1) * L)
    shards = [t[:, part].clone().requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):  # a local branch and one spanning both ranks (its K/V travel)
        return ring_dilated_attention(q, k, v, [8, 32], [1, 2], is_causal=True,
                                      key_padding_mask=mask[:, part])  # fmt: skip

    p2p = []
    original = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: p2p.append(len(ops)) or original(ops)
    try:
        # aot_eager: the operators, fake implementations and autograd rule, without the
        # minutes inductor's code generation would take on two CPU processes.
        compiled = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), *shards)
    finally:
        dist.batch_isend_irecv = original
    eager = _grads(fn, *shards)
    # The multi-head ring layer on this rank's shard of x (already_split=True).
    layer = RingMultiheadDilatedAttention(32, 4, [8, 32], [1, 2], dtype=torch.float64)
    x = torch.randn(1, N, 32, dtype=torch.float64)[:, part].clone().requires_grad_()
    layer_fn = lambda x: layer(x, is_causal=True, already_split=True)[0]
    compiled += _grads(torch.compile(layer_fn, fullgraph=True, backend="aot_eager"), x)
    eager += _grads(layer_fn, x)
    # ... and on the whole sequence (already_split=False: shard, ring, gather, as operators).
    whole = torch.randn(1, N, 32, dtype=torch.float64, requires_grad=True)
    whole_fn = lambda x: layer(x, is_causal=True)[0]
    compiled += _grads(torch.compile(whole_fn, fullgraph=True, backend="aot_eager"), whole)
    eager += _grads(whole_fn, whole)
    # The other ring modules, on whole sequences.
    others = {
        "hilbert": HilbertRingMultiheadAttention(
            32, 4, [8, 32], [1, 2], grid_size=(4, 8), dtype=torch.float64
        ),  # fmt: skip
        "enterprise": EnterpriseDistributedDilatedAttention(
            32, 4, [8, 32], [1, 2], dtype=torch.float64
        ),  # fmt: skip
    }
    for module in others.values():
        module_fn = lambda x, m=module: m(x, is_causal=True)[0]
        compiled += _grads(torch.compile(module_fn, fullgraph=True, backend="aot_eager"), whole)
        eager += _grads(module_fn, whole)
    qkv = torch.randn(1, N, 4, 8, dtype=torch.float64, requires_grad=True)
    unmonitored = DistributedRingAttention([8, 32], [1, 2], enable_monitoring=False)
    dist_fn = lambda t: unmonitored(t, t, t, is_causal=True)
    compiled += _grads(torch.compile(dist_fn, fullgraph=True, backend="aot_eager"), qkv)
    eager += _grads(dist_fn, qkv)
    # Packed documents: inside shards (eager cuts them and calls dilated_attention, the
    # operator runs them as units that send nothing) and spanning both ranks (a ring over
    # the documents' segments).
    for cu in (torch.tensor([0, 5, 16, 20, 31, 32]), torch.tensor([0, 3, 21, 21, 32])):
        packed_fn = lambda q, k, v, cu=cu: ring_dilated_attention(  # noqa: E731
            q, k, v, [8, 16], [1, 2], is_causal=True, cu_seqlens=cu
        )
        compiled += _grads(torch.compile(packed_fn, fullgraph=True, backend="aot_eager"), *shards)
        eager += _grads(packed_fn, *shards)
    # A group of its own: the operator finds it again by name.
    sub = dist.new_group([0, 1])
    sub_fn = lambda q, k, v: ring_dilated_attention(q, k, v, [8, 32], [1, 2], group=sub)
    compiled += _grads(torch.compile(sub_fn, fullgraph=True, backend="aot_eager"), *shards)
    eager += _grads(sub_fn, *shards)
    errors = {}
    bad = torch.compile(
        lambda q: ring_dilated_attention(q, q, q, [8, 32], [1, 2], is_causal=rank == 0),
        fullgraph=True, backend="aot_eager",
    )  # fmt: skip
    try:
        bad(shards[0].detach())
    except ValueError as exc:  # the collective check runs inside the operator
        errors["mismatch"] = str(exc)
    # Monitoring counts inside the operators: the same bytes, steps and calls as eager,
    # also after a reset (which makes a new counter).
    # The zigzag layout (compiled == eager on the same shards).
    zigzag_fn = lambda q, k, v: ring_dilated_attention(  # noqa: E731
        q, k, v, [4, 32], [1, 2], is_causal=True, layout="zigzag"
    )
    compiled += _grads(torch.compile(zigzag_fn, fullgraph=True, backend="aot_eager"), *shards)
    eager += _grads(zigzag_fn, *shards)
    dropped = torch.compile(
        lambda q: ring_dilated_attention(q, q, q, [8], [1], cu_seqlens=torch.tensor([0, 10, 32]),
                                         dropout_p=0.1),
        fullgraph=True, backend="aot_eager",
    )  # fmt: skip
    try:
        dropped(shards[0].detach())
    except ValueError as exc:
        errors["packed-dropout"] = str(exc)
    monitored = DistributedRingAttention([8, 32], [1, 2])
    counted = {}
    forward = lambda t: monitored(t, t, t, is_causal=True)  # noqa: E731
    for mode, fn in (("eager", forward),
                     ("compiled", torch.compile(forward, fullgraph=True, backend="aot_eager")),
                     ("after_reset", None)):  # fmt: skip
        if mode == "after_reset":
            monitored.reset_communication_stats()
            fn = counted.pop("fn")
            with torch.compiler.set_stance("fail_on_recompile"):  # a reset keeps the graph
                fn(qkv).sum().backward()
        else:
            fn(qkv).sum().backward()
        stats = monitored.get_communication_stats()
        counted[mode] = [stats[k] for k in ("bytes_sent", "bytes_received", "ring_steps", "calls")]
        counted["fn"] = fn
        monitored.reset_communication_stats()
    counted.pop("fn")
    # Packed documents inside shards count one call, no step, no byte either way; a second
    # RingStats through the same compiled code recompiles (its key is a string, never a
    # symbolic integer) and counts on its own.
    counted_fn = torch.compile(_counted_packed_call, fullgraph=True, backend="aot_eager")
    for mode, fn in (("packed-eager", _counted_packed_call), ("packed-compiled", counted_fn),
                     ("packed-second-stats", counted_fn)):  # fmt: skip
        stats = RingStats()
        fn(shards[0].detach(), stats).sum()
        counted[mode] = [stats.bytes_sent, stats.ring_steps, stats.calls]
    return {
        "pairs": list(zip(compiled, eager, strict=True)),
        "p2p": len(p2p),
        "errors": errors,
        "counted": counted,
    }


@pytest.mark.distributed
def test_ring_compiles_without_graph_breaks_on_two_ranks() -> None:
    # ring_dilated_attention and the ring layer on shards and on the whole sequence;
    # compiled == eager (both run the same ring loop, which test_ring.py compares with
    # single-process attention).
    for rank, res in enumerate(spawn(_ring_compile_worker, 2)):
        for got, want in res["pairs"]:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        assert res["p2p"] > 0, f"rank {rank}: the compiled ring sent nothing"
        assert "is_causal" in res["errors"]["mismatch"], res["errors"]
        assert "does not take dropout yet" in res["errors"]["packed-dropout"]
        counted = res["counted"]
        assert counted["eager"][0] > 0 and counted["eager"][3] == 1, counted
        want = [0, 0, 1]
        assert counted["packed-eager"] == counted["packed-compiled"] == want, counted
        assert counted["packed-second-stats"] == want, counted
        assert counted["compiled"] == counted["eager"] == counted["after_reset"], counted


def _sparse_ring_compile_worker(rank: int, world_size: int, _: object) -> dict[str, object]:
    torch.manual_seed(0)  # the same whole tensors and weights on every rank
    N, L = 128, 64
    q, k, v = (torch.randn(1, N, 4, 8, dtype=torch.float64) for _ in range(3))
    part = slice(rank * L, (rank + 1) * L)
    shards = [t[:, part].clone().requires_grad_() for t in (q, k, v)]
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ring = RingBlockSparseAttention(block_size=16, sparsity_ratio=0.5, pattern_type="local_window")
    sent = [0]
    original = dist.batch_isend_irecv

    def p2p(ops):
        sent[0] += sum(op.tensor.numel() for op in ops if op.op is dist.isend)
        return original(ops)

    compiled, eager, counted = [], [], {}
    dist.batch_isend_irecv = p2p
    try:
        for name, fn, inputs in (
            ("shards", lambda a, b, c: ring(a, b, c, is_causal=True, already_split=True), shards),
            ("whole", lambda a, b, c: ring(a, b, c), whole),
        ):
            sent[0] = 0
            eager += _grads(fn, *inputs)
            counted[f"{name}-eager"] = sent[0]
            sent[0] = 0
            compiled += _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), *inputs)
            counted[f"{name}-compiled"] = sent[0]
    finally:
        dist.batch_isend_irecv = original
    # Grouped-query attention: 2 K/V heads for the 4 query heads.
    kv2 = [t[:, part, :2].clone().requires_grad_() for t in (k, v)]
    gqa = lambda a, b, c: ring(a, b, c, is_causal=True, already_split=True)  # noqa: E731
    eager += _grads(gqa, shards[0], *kv2)
    compiled += _grads(torch.compile(gqa, fullgraph=True, backend="aot_eager"), shards[0], *kv2)
    layer = create_block_sparse_attention(embed_dim=32, num_heads=4, sparsity_ratio=0.5,
                                          block_size=16, dtype=torch.float64)  # fmt: skip
    layer.attention = RingBlockSparseAttention(block_size=16, sparsity_ratio=0.5)
    x = torch.randn(1, N, 32, dtype=torch.float64, requires_grad=True)
    layer_fn = lambda x: layer(x, is_causal=True)[0]  # noqa: E731
    compiled += _grads(torch.compile(layer_fn, fullgraph=True, backend="aot_eager"), x)
    eager += _grads(layer_fn, x)
    fresh = RingBlockSparseAttention(block_size=16, sparsity_ratio=0.5)  # nothing validated yet
    bad = torch.compile(lambda a: fresh(a, a, a, is_causal=rank == 0, already_split=True),
                        fullgraph=True, backend="aot_eager")  # fmt: skip
    try:
        bad(shards[0].detach())
        error = ""
    except ValueError as exc:  # the collective check runs inside the operator
        error = str(exc)
    return {"pairs": list(zip(compiled, eager, strict=True)), "counted": counted, "error": error}


@pytest.mark.distributed
def test_ring_block_sparse_compiles_without_graph_breaks_on_two_ranks() -> None:
    # RingBlockSparseAttention on shards and on the whole sequence, and in a multi-head
    # layer: compiled == eager (test_block_sparse_ring.py compares eager with dense
    # attention masked by the pattern).
    results = spawn(_sparse_ring_compile_worker, 2)
    for res in results:
        for got, want in res["pairs"]:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        assert "ranks of a ring disagree" in res["error"], res["error"]
    for name in ("shards", "whole"):
        # Compiled, the backward receives the kept K/V blocks again instead of saving
        # them: the ranks that send K/V send more, no rank sends less.
        eager = [res["counted"][f"{name}-eager"] for res in results]
        compiled = [res["counted"][f"{name}-compiled"] for res in results]
        assert all(0 < e <= c for e, c in zip(eager, compiled, strict=True)), (eager, compiled)
        assert sum(eager) < sum(compiled), (eager, compiled)


def _float_settings_worker(rank: int, world_size: int, _: object) -> list:
    """Modules that differ only in a float setting (dropout, scale, sparsity), through the
    same compiled code: the second compilation may make the float symbolic; the ring
    operators take floats as arguments, so it compiles, and each module computes what it
    does eagerly (with dropout: the same entries for the same seed)."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 32, dtype=torch.float64)[:, rank * 16 : (rank + 1) * 16]
    qkv = x.unflatten(-1, (4, 8))
    families = {
        "ring": [
            DistributedRingAttention([8, 32], [1, 2], dropout=p, scale=s, enable_monitoring=False)
            for p, s in ((0.1, 0.3), (0.2, 0.4))
        ],
        "block_sparse_ring": [
            RingBlockSparseAttention(
                block_size=8, pattern_type="local_window", sparsity_ratio=r, dropout=p, scale=s
            )  # fmt: skip
            for r, p, s in ((0.5, 0.1, 0.3), (0.7, 0.2, 0.4))
        ],
        "layer_node": [
            RingMultiheadDilatedAttention(
                32, 4, [8, 32], [1, 2], dropout=p, scale=s, dtype=torch.float64
            )  # fmt: skip
            for p, s in ((0.1, 0.3), (0.2, 0.4))
        ],
    }
    pairs = []
    for name, modules in families.items():
        if name == "layer_node":
            inp = x

            def run(m, t):
                return m(t, already_split=True)[0]
        else:
            inp = qkv

            def run(m, t):
                return m(t, t, t, already_split=True)

        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        for module in modules:
            module.train()
            results = []
            for fn in (compiled, run):
                t = inp.clone().requires_grad_()
                torch.manual_seed(1)
                out = fn(module, t)
                results.append([out.detach(), *torch.autograd.grad(out.sum(), [t])])
            pairs += list(zip(*results, strict=True))
    return pairs


@pytest.mark.distributed
def test_ring_modules_differing_in_float_settings_share_compiled_code() -> None:
    for pairs in spawn(_float_settings_worker, 2):
        for got, want in pairs:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
