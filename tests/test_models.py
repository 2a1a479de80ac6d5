"""LongNetLM / LongNet: shapes, exactness against dense attention, rotary positions,
causality, errors, and parallelize_longnet on gloo against the single-process model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention
from dilated_attention_pytorch.models import (
    DenseAttention,
    LongNet,
    LongNetLM,
    apply_rotary,
    mesh_mean_loss,
    parallelize_longnet,
    rotary_tables,
    shard_batch,
)

DT = torch.float64


def _lm(attention: str = "dilated", **kw) -> LongNetLM:
    torch.manual_seed(0)
    args = dict(vocab_size=256, embed_dim=32, num_heads=4, num_layers=2, dtype=DT)
    if attention == "dilated":
        args.update(segment_lengths=kw.pop("segment_lengths", [16, 32, 64]),
                    dilation_rates=kw.pop("dilation_rates", [1, 2, 4]))  # fmt: skip
    return LongNetLM(**args, attention=attention, **kw)


def _ids(b: int = 2, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def test_lm_shapes_loss_and_generate() -> None:
    model = _lm()
    ids = _ids()
    assert model(ids).shape == (2, 64, 256)
    loss = model.loss(ids)
    assert loss.shape == () and loss.dtype == DT
    # Untrained, with 0.02-scale embeddings: close to a uniform guess over 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.5
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    out = model.generate(ids[:, :10], 5, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :10], ids[:, :10])
    assert torch.equal(out, model.generate(ids[:, :10], 5, temperature=0))  # greedy: same
    # The greedy token is the argmax of the logits of the prefix.
    assert torch.equal(out[:, 10], model(ids[:, :10])[:, -1].argmax(-1))
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(ids[:, :10], 3, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(sampled, out[:, :13])  # top_k=1 is greedy too
    assert model.head.weight is model.embed.weight  # tied
    untied = _lm(tie_embeddings=False)
    assert untied.num_parameters() == model.num_parameters() + 256 * 32


def test_targets_are_the_shifted_sequence() -> None:
    model = _lm()
    ids = _ids(n=65)
    explicit = model(ids[:, :-1], ids[:, 1:])
    assert torch.equal(model.loss(ids), explicit)
    logits = model(ids[:, :-1])
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(explicit, manual)
    masked = ids[:, 1:].clone()
    masked[:, :32] = -100  # ignored positions
    manual = torch.nn.functional.cross_entropy(logits[:, 32:].flatten(0, 1), ids[:, 33:].flatten())
    torch.testing.assert_close(model(ids[:, :-1], masked), manual)


def test_one_dense_segment_equals_dense_attention() -> None:
    # w = N, r = 1: dilated attention is dense causal attention, so the two models with
    # the same weights give the same logits and gradients (float64).
    dilated = _lm(segment_lengths=[64], dilation_rates=[1])
    dense = _lm("dense")
    dense.load_state_dict(dilated.state_dict())
    ids = _ids()
    torch.testing.assert_close(dilated(ids), dense(ids), atol=1e-10, rtol=1e-10)
    dilated.loss(ids).backward()
    dense.loss(ids).backward()
    for (name, a), b in zip(dilated.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_one_dense_segment_equals_dense_attention_with_kv_heads() -> None:
    # The same with grouped-query attention: dense SDPA with enable_gqa on one side.
    kw = dict(num_kv_heads=2, segment_lengths=[64], dilation_rates=[1])
    dilated = _lm(**kw)
    dense = _lm("dense", num_kv_heads=2)
    dense.load_state_dict(dilated.state_dict())
    ids = _ids()
    torch.testing.assert_close(dilated(ids), dense(ids), atol=1e-10, rtol=1e-10)


def test_rotary_scores_depend_on_distance_only() -> None:
    # One query vector and one key vector, the same at every position: the scores then
    # differ only through the rotation, and equal q . R((n - m) theta) k.
    d = 8
    q = torch.randn(d, dtype=DT).expand(1, 6, 1, d)
    k = torch.randn(d, dtype=DT).expand(1, 6, 1, d)

    def scores(offset: int) -> torch.Tensor:
        cos, sin = rotary_tables(torch.arange(6) + offset, d, dtype=DT)
        return torch.einsum("bqhd,bkhd->qk", apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))

    theta = 10000.0 ** (-torch.arange(d // 2, dtype=DT) / (d // 2))
    q1, q2, k1, k2 = (
        q[0, 0, 0, : d // 2],
        q[0, 0, 0, d // 2 :],
        k[0, 0, 0, : d // 2],
        k[0, 0, 0, d // 2 :],
    )
    for m, n in [(0, 0), (0, 3), (5, 1), (2, 4)]:
        angle = (n - m) * theta  # key at n, query at m
        expected = ((q1 * k1 + q2 * k2) * angle.cos() - (q1 * k2 - q2 * k1) * angle.sin()).sum()
        torch.testing.assert_close(scores(0)[m, n], expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(scores(0)[0, 1], scores(0)[0, 2])  # distance matters
    torch.testing.assert_close(scores(2**24), scores(0), atol=1e-6, rtol=1e-6)  # shift: no
    cos, sin = rotary_tables(torch.arange(6), d, dtype=DT)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_logits_are_causal_and_shift_invariant() -> None:
    model = _lm()
    ids = _ids()
    base = model(ids)
    changed = ids.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :40], base[:, :40], atol=1e-12, rtol=0)
    assert not torch.allclose(model(changed)[:, 40:], base[:, 40:])
    # Rotary positions are relative: the same tokens at positions 1000.. give the same logits.
    shifted = model(ids, positions=torch.arange(64) + 1000)
    torch.testing.assert_close(shifted, base, atol=1e-9, rtol=1e-9)


def test_encoder_shapes_padding_and_hilbert_order() -> None:
    torch.manual_seed(0)
    enc = LongNet(32, 4, 2, [16, 64], [1, 2], hilbert_grid=(8, 8), dtype=DT)
    plain = LongNet(32, 4, 2, [16, 64], [1, 2], dtype=DT)
    plain.load_state_dict(enc.state_dict())
    x = torch.randn(2, 64, 32, dtype=DT)
    y = enc(x)
    assert y.shape == x.shape
    # hilbert_grid = running the plain stack on the curve-ordered patches and putting
    # the result back in row-major order.
    order = enc.hilbert_order
    torch.testing.assert_close(y[:, order], plain(x[:, order]), atol=1e-12, rtol=0)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 60:] = True
    torch.testing.assert_close(
        enc(x, key_padding_mask=mask)[:, order], plain(x[:, order], mask[:, order]),
        atol=1e-12, rtol=0,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"hilbert_grid=\(8, 8\) holds 64 patches, but x has N = 32"
    ):
        enc(x[:, :32])


def test_dense_attention_padding_with_causal() -> None:
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=DT) for _ in range(3))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 2] = True
    out = DenseAttention()(q, k, v, is_causal=True, key_padding_mask=mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    allowed = torch.ones(8, 8, dtype=torch.bool).tril() & ~mask[0][None, :]
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v)
    torch.testing.assert_close(out, ref)


def test_model_errors_say_what_to_do() -> None:
    model = _lm(max_seq_len=64)
    with pytest.raises(TypeError, match=r"input_ids must be a \(B, N\) tensor"):
        model(torch.zeros(64, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 token ids, got torch.float32"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="targets must have input_ids' shape"):
        model(_ids(), _ids(n=63))
    with pytest.raises(ValueError, match="position 64 is beyond max_seq_len=64"):
        model(_ids(n=65))
    with pytest.raises(ValueError, match=r"positions must be \(N,\) = \(64,\)"):
        model(_ids(), positions=torch.arange(63))
    with pytest.raises(ValueError, match="even integer"):
        LongNetLM(256, 20, 4, 1, [8], [1])  # head dim 5
    with pytest.raises(TypeError, match="needs segment_lengths and dilation_rates"):
        LongNetLM(256, 32, 4, 1)
    with pytest.raises(ValueError, match="attention must be one of"):
        LongNetLM(256, 32, 4, 1, [8], [1], attention="sparse")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(_ids(n=4), 1, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(_ids(n=4), -1)
    with pytest.raises(
        TypeError, match=r"temperature must be a number >= 0 \(0: greedy\), got NoneType"
    ):
        model.generate(_ids(n=4), 1, temperature=None)
    with pytest.raises(
        ValueError, match=r"a prompt of at least one token, got input_ids of shape \(2, 0\)"
    ):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 1)
    np = pytest.importorskip("numpy")  # numpy and 0-d tensor numbers are numbers
    LongNetLM(256, 32, 4, 1, [8], [1], rotary_base=np.float32(10000.0))
    model.generate(_ids(n=4), 1, temperature=torch.tensor(0.0))
    with pytest.raises(TypeError, match=r"rotary_base must be a number .* got str '1e4'"):
        LongNetLM(256, 32, 4, 1, [8], [1], rotary_base="1e4")
    with pytest.raises(TypeError, match="targets must be an int64 tensor"):
        model(_ids(), _ids().float())
    with pytest.raises(TypeError, match="positions must be an int64 tensor"):
        model(_ids(), positions=torch.arange(64.0))
    with pytest.raises(ValueError, match="reduction must be one of"):
        model(_ids(), _ids(), reduction="none")
    dropout_model = _lm(dropout=0.5)
    assert dropout_model.training
    first = dropout_model.generate(_ids(n=8), 4, temperature=0)
    assert torch.equal(first, dropout_model.generate(_ids(n=8), 4, temperature=0))  # no dropout
    assert dropout_model.training  # back in training mode


def test_parallelize_without_a_mesh_checkpoints_blocks_and_keeps_results() -> None:
    model = _lm()
    ref = copy.deepcopy(model)
    ids = _ids()
    out = parallelize_longnet(model, None, activation_checkpointing=True)
    assert out is model
    assert model.state_dict().keys() == ref.state_dict().keys()
    model.loss(ids).backward()
    ref.loss(ids).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    assert shard_batch(ids, None, None)[2].tolist() == list(range(64))
    with pytest.raises(TypeError, match="takes a LongNetLM or LongNet"):
        parallelize_longnet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="data_parallel must be one of"):
        parallelize_longnet(_lm(), None, data_parallel="zero")


# ---------------------------------------------------------------- gloo, 2 processes


def _parallel_worker(rank: int, world: int, _payload) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    failures: list[str] = []
    ids = _ids(2, 129, seed=5)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    cases = (((1, 2), False, "ddp"), ((1, 2), True, "ddp"), ((2, 1), False, "ddp"),
             ((1, 2), True, "fsdp"))  # fmt: skip
    for shape, ckpt, mode in cases:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "sp"))
        ref = _lm(segment_lengths=[32, 64, 128], dilation_rates=[1, 2, 4])
        model = copy.deepcopy(ref)
        trained = parallelize_longnet(
            model, mesh, data_parallel=mode, activation_checkpointing=ckpt
        )
        # Data parallel ranks take different sequences; sequence ranks share one.
        dp = mesh.get_local_rank("dp")
        mine = slice(dp, dp + 1) if shape[0] == 2 else slice(0, 2)
        x, t, pos = shard_batch(inputs[mine], targets[mine], mesh)
        loss = trained(x, t, positions=pos)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref_loss = ref(inputs, targets)
        ref_loss.backward()
        tag = f"mesh {shape} {mode} checkpointing={ckpt}"
        if not torch.allclose(total / world, ref_loss.detach(), atol=1e-10, rtol=0):
            failures.append(f"{tag}: loss {float(total / world)} vs {float(ref_loss)}")
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            grad = a.grad.full_tensor() if mode == "fsdp" else a.grad  # FSDP2: sharded DTensor
            if not torch.allclose(grad, b.grad, atol=1e-10, rtol=1e-7):
                failures.append(f"{tag}: grad {name} off by {(grad - b.grad).abs().max():.2e}")
    # Ignored targets spread unevenly (all of rank 1's shard): mesh_mean_loss keeps the
    # loss and the gradients those of one process.
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "sp"))
    ref = _lm(segment_lengths=[32, 64, 128], dilation_rates=[1, 2, 4])
    model = copy.deepcopy(ref)
    trained = parallelize_longnet(model, mesh)
    uneven = targets.clone()
    uneven[:, 100:] = -100
    uneven[0, :10] = -100
    x, t, pos = shard_batch(inputs, uneven, mesh)
    loss = mesh_mean_loss(trained(x, t, positions=pos, reduction="sum"), t, mesh)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    ref_loss = ref(inputs, uneven)
    ref_loss.backward()
    if not torch.allclose(total / world, ref_loss.detach(), atol=1e-10, rtol=0):
        failures.append(f"uneven targets: loss {float(total / world)} vs {ref_loss.item()}")
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        if not torch.allclose(a.grad, b.grad, atol=1e-10, rtol=1e-7):
            failures.append(
                f"uneven targets: grad {name} off by {(a.grad - b.grad).abs().max():.2e}"
            )
    try:
        trained(x, t)  # positions forgotten: rotary would read every shard as the start
        failures.append("no error without positions under sequence parallelism")
    except ValueError as e:
        if "pass each rank's global token positions" not in str(e):
            failures.append(f"wrong error without positions: {e}")
    untouched = _lm()
    for bad, match in (
        (lambda: parallelize_longnet(_lm("dense"), mesh), "attention='dense' has no ring form"),
        (lambda: parallelize_longnet(untouched, mesh, data_parallel="none"), "averaged over"),
        (
            lambda: parallelize_longnet(LongNet(32, 4, 1, [16], [1], hilbert_grid=(4, 4)), mesh),
            "put the patches in Hilbert order before sharding",
        ),
    ):
        try:
            bad()
            failures.append(f"no error for {match!r}")
        except (ValueError, TypeError) as e:
            if match not in str(e):
                failures.append(f"wrong error {e!r} for {match!r}")
    if type(untouched.blocks[0].attn.attention.inner) is not DilatedAttention:
        failures.append("a refused parallelize_longnet changed the model")
    return failures


@pytest.mark.distributed
def test_parallelized_model_matches_the_single_process_model() -> None:
    from distributed_utils import spawn

    for failures in spawn(_parallel_worker, 2):
        assert not failures, failures
