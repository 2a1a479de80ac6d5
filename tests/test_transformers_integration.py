"""``attn_implementation="dilated"`` in a Hugging Face model (transformers, CPU, no downloads).

A tiny randomly initialised Llama-style model with grouped-query attention (4 query
heads, 2 K/V heads). With one segment covering the sequence and rate 1, dilated
attention is dense causal attention, so the model's logits equal those of the same
weights on ``attn_implementation="sdpa"`` (float32: both sum the same 64 products per
score in another order; 1e-5 bounds that roundoff after two layers). With real
branches, packed documents must equal the documents run alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dilated_attention_pytorch.integrations.transformers import register  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip


def _model(attn: str, like: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    # Each model its own config: from_config writes the implementation into it.
    model = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(_config()), attn_implementation=attn
    )
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    sdpa = _model("sdpa")
    register([64], [1], name="dilated-dense")
    register([8, 16, 32], [1, 2, 4], name="dilated-test")
    return {
        "sdpa": sdpa,
        "dense": _model("dilated-dense", like=sdpa),
        "dilated": _model("dilated-test", like=sdpa),
    }


def test_one_segment_equals_sdpa(models) -> None:
    ids = torch.randint(0, 128, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 45:] = 0  # right padding: the padded keys are never attended
    with torch.no_grad():
        for attention_mask in (None, mask):
            want = models["sdpa"](ids, attention_mask=attention_mask).logits
            got = models["dense"](ids, attention_mask=attention_mask).logits
            torch.testing.assert_close(got[0], want[0], **TOL)
            torch.testing.assert_close(got[1, :45], want[1, :45], **TOL)


def test_generation_with_a_kv_cache_equals_sdpa(models) -> None:
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        want = models["sdpa"].generate(ids, max_new_tokens=10, do_sample=False)
        got = models["dense"].generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    # With real branches the cached steps give the uncached forward's greedy tokens.
    tokens = ids
    with torch.no_grad():
        for _ in range(6):
            logits = models["dilated"](tokens).logits
            tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        cached = models["dilated"].generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, tokens)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 2])
def test_left_padded_generation_equals_sdpa(models, cache, batch) -> None:
    # generate() fills left padding's positions with 1, so a padded row must not look like
    # packed documents; a static cache holds empty slots past the tokens seen so far.
    torch.manual_seed(batch)
    ids = torch.randint(1, 128, (batch, 12))
    mask = torch.ones(batch, 12, dtype=torch.long)
    mask[-1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True, cache_implementation=cache)  # fmt: skip
    with torch.no_grad():
        want = models["sdpa"].generate(ids, **kw)
        got = models["dense"].generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_loss_is_finite_and_gradients_flow(models) -> None:
    model = models["dilated"]
    model.train()
    try:
        ids = torch.randint(0, 128, (2, 48))
        loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        p.grad = None


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_packed_documents_equal_the_documents_alone(models, flash_kwargs) -> None:
    # DataCollatorWithFlattening packs documents into one row; they are told apart by
    # position_ids restarting at 0, or by cu_seq_lens_q/k with return_flash_attn_kwargs.
    model = models["dilated"]
    torch.manual_seed(3)
    docs = [torch.randint(0, 128, (n,)).tolist() for n in (20, 13, 30)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d} for d in docs])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits
        alone = torch.cat([model(torch.tensor([d])).logits for d in docs], dim=1)
        unpacked = model(batch["input_ids"]).logits  # no document boundaries
    torch.testing.assert_close(packed, alone, **TOL)
    assert not torch.allclose(unpacked[:, 20:], alone[:, 20:], **TOL)


def test_what_it_cannot_do_raises(models) -> None:
    ids = torch.randint(0, 128, (1, 16))
    packed_rows = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with torch.no_grad(), pytest.raises(ValueError, match="packed documents must form one row"):
        models["dilated"](torch.randint(0, 128, (2, 6)), position_ids=packed_rows)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=False"):
        models["dilated"](ids, output_attentions=True)
    cfg = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    mistral = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="dilated-test")
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError,
            match="attn_implementation='dilated-test' does not implement a sliding window",
        ),
    ):
        mistral(ids)
    with pytest.raises(ValueError, match="dilation rate 8 is larger than its segment length 4"):
        register([4], [8], name="bad")
