"""LongNet models: a causal language model and an encoder, built from dilated-attention blocks.

Both are stacks of pre-norm blocks, ``x + attn(norm(x))`` then ``x + ffn(norm(x))``,
whose attention is a :class:`~dilated_attention_pytorch.MultiheadDilatedAttention`
(with its sub-LayerNorm, as in LongNet's MAGNETO blocks). The models hold no
distributed code: :func:`dilated_attention_pytorch.models.parallelize_longnet` turns the
same model object into its sequence-parallel (ring) and data-parallel form from outside.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoding import DilatedKVCache
from ..hilbert import hilbert_permutation, inverse_permutation
from ..modules import DilatedAttention, MultiheadDilatedAttention
from ..rotary import RotaryAttention, apply_rotary, rotary_tables
from ..validation import (
    check_bool,
    check_choice,
    check_dropout,
    check_key_padding_mask,
    check_num_kv_heads,
    check_optional_positive_int,
    check_positive_int,
)

__all__ = [
    "DenseAttention",
    "LongNet",
    "LongNetBlock",
    "LongNetLM",
    "RotaryAttention",
    "apply_rotary",
    "rotary_tables",
]

ATTENTION_KINDS = ("dilated", "dense")


class DenseAttention(nn.Module):
    """Dense softmax attention on ``(B, N, H, D)`` q, k, v: one
    ``torch.nn.functional.scaled_dot_product_attention`` call.

    The baseline that dilated attention is compared against (same call signature as
    :class:`~dilated_attention_pytorch.DilatedAttention`): its time grows as ``N^2``.
    PyTorch's fused kernels do not store the scores; with both ``is_causal`` and a
    ``key_padding_mask`` an ``(B, 1, N, N)`` mask is built.
    """

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = check_dropout(dropout)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, N, H, D)`` q, k, v -> ``(B, N, H, D)``; ``key_padding_mask`` ``(B, N)``,
        ``True`` marks padding keys."""
        key_padding_mask = check_key_padding_mask(key_padding_mask, q)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # True = attend
            if is_causal:
                n = q.shape[1]
                causal = torch.ones(n, k.shape[1], dtype=torch.bool, device=q.device).tril()
                mask = mask & causal
                is_causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=k.shape[2] != q.shape[2],  # k, v with fewer heads (grouped-query)
        )
        return out.transpose(1, 2)


def make_attention(
    kind: str,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    *,
    dropout: float,
    branch_mixing: str,
    backend: str,
) -> nn.Module:
    """The inner ``(B, N, H, D)`` attention of one block: dilated or dense."""
    kind = check_choice("attention", kind, ATTENTION_KINDS)
    if kind == "dense":
        return DenseAttention(dropout)
    if segment_lengths is None or dilation_rates is None:
        raise TypeError(
            "attention='dilated' needs segment_lengths and dilation_rates (e.g. "
            "segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4]); pass "
            "attention='dense' for dense attention."
        )
    return DilatedAttention(
        segment_lengths, dilation_rates, branch_mixing=branch_mixing, dropout=dropout,
        backend=backend,
    )  # fmt: skip


class LongNetBlock(nn.Module):
    """One pre-norm block on ``(B, N, E)``: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``.

    ``attn`` is a :class:`~dilated_attention_pytorch.MultiheadDilatedAttention` around
    ``attention`` (a ``(B, N, H, D)`` module); ``ffn`` is ``Linear -> GELU -> Linear``
    with ``ffn_mult * E`` hidden units. Keywords of ``forward`` other than
    ``is_causal``/``key_padding_mask`` go to the attention module.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: nn.Module,
        *,
        num_kv_heads: int | None = None,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = check_positive_int("ffn_mult", ffn_mult) * embed_dim
        self.norm1 = nn.LayerNorm(embed_dim, **factory)
        self.attn = MultiheadDilatedAttention(
            embed_dim, num_heads, attention=attention, num_kv_heads=num_kv_heads, **factory
        )
        self.norm2 = nn.LayerNorm(embed_dim, **factory)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, hidden, **factory),
            nn.GELU(),
            nn.Linear(hidden, embed_dim, **factory),
        )
        self.dropout = nn.Dropout(check_dropout(dropout))

    def forward(
        self,
        x: Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        **attention_kwargs: Any,
    ) -> Tensor:
        h, _ = self.attn(
            self.norm1(x), is_causal=is_causal, key_padding_mask=key_padding_mask,
            **attention_kwargs,
        )  # fmt: skip
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.norm2(x)))


def block_stack(
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    attention: str,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    *,
    rotary: bool,
    ffn_mult: int,
    dropout: float,
    branch_mixing: str,
    backend: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    num_kv_heads: int | None = None,
) -> nn.ModuleList:
    """``num_layers`` :class:`LongNetBlock` s, each with its own inner attention (wrapped in
    :class:`RotaryAttention` when ``rotary``)."""
    check_positive_int("num_layers", num_layers)

    def inner() -> nn.Module:
        module = make_attention(attention, segment_lengths, dilation_rates, dropout=dropout,
                                branch_mixing=branch_mixing, backend=backend)  # fmt: skip
        return RotaryAttention(module) if rotary else module

    return nn.ModuleList(
        LongNetBlock(
            embed_dim,
            num_heads,
            inner(),
            num_kv_heads=num_kv_heads,
            ffn_mult=ffn_mult,
            dropout=dropout,
            device=device,
            dtype=dtype,
        )  # fmt: skip
        for _ in range(num_layers)
    )


class LongNetLM(nn.Module):
    """A decoder-only LongNet language model: token ids ``(B, N)`` -> logits ``(B, N, V)``.

    Causal dilated attention in every block, rotary positions, a final LayerNorm and an
    output layer tied to the token embedding (``tie_embeddings=True``).

    **Positions: rotary.** Rotary embeddings encode the distance between a query and a
    key inside the attention scores, need no table (a learned table at a million tokens
    would hold ``N * E`` parameters, 768M at ``E = 768``), take any length, and under
    sequence parallelism only need each shard's global positions (``positions=``).
    Angles are computed in float64 so that they stay exact at millions of tokens.

    Args:
        vocab_size: number of token ids (256 for bytes).
        embed_dim: model width ``E``; ``E / num_heads`` must be an even head dim.
        num_heads: attention heads per block.
        num_layers: number of blocks.
        num_kv_heads: key/value heads per block for grouped-query attention (dividing
            ``num_heads``; ``None``: ``num_heads``). Smaller ``k_proj``/``v_proj`` and
            decoding caches; query head ``h`` reads K/V head ``h // (H / H_kv)``.
        segment_lengths, dilation_rates: the LongNet branches of every block (see
            :func:`~dilated_attention_pytorch.dilated_attention`). Unused with
            ``attention="dense"``.
        ffn_mult: the feed-forward layer's hidden width, in multiples of ``E``.
        dropout: dropout on attention probabilities and on each residual branch.
        max_seq_len: if set, positions ``>= max_seq_len`` raise (rotary itself needs no
            limit).
        tie_embeddings: share the output layer's weight with the token embedding.
        rotary_base: the rotary frequencies' base.
        branch_mixing, backend: as in :class:`~dilated_attention_pytorch.DilatedAttention`.
        attention: ``"dilated"`` or ``"dense"`` (one SDPA call per block: the baseline
            with the same parameters, for comparisons).
        device, dtype: of the parameters (e.g. ``torch.bfloat16``: activations follow).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        max_seq_len: int | None = None,
        tie_embeddings: bool = True,
        rotary_base: float = 10000.0,
        branch_mixing: str = "softmax",
        backend: str = "auto",
        attention: str = "dilated",
        num_kv_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_kv_heads = check_num_kv_heads(num_kv_heads, num_heads)
        head_dim = embed_dim // num_heads
        if embed_dim % num_heads or head_dim % 2:
            raise ValueError(
                f"embed_dim / num_heads must be an even integer (rotary rotates pairs of "
                f"channels), got {embed_dim} / {num_heads}; pick e.g. num_heads dividing "
                f"embed_dim / 2."
            )
        self.head_dim = head_dim
        self.max_seq_len = check_optional_positive_int("max_seq_len", max_seq_len)
        if isinstance(rotary_base, bool) or not isinstance(rotary_base, numbers.Real):
            raise TypeError(
                f"rotary_base must be a number (the rotary frequencies' base, e.g. 10000.0), "
                f"got {type(rotary_base).__name__} {rotary_base!r}."
            )
        if not math.isfinite(rotary_base) or rotary_base <= 1.0:
            raise ValueError(f"rotary_base must be a finite number > 1, got {rotary_base!r}.")
        self.rotary_base = float(rotary_base)
        self.attention_kind = check_choice("attention", attention, ATTENTION_KINDS)
        # Set by parallelize_longnet under sequence parallelism: forward then needs the
        # shard's global positions.
        self.positions_required = False
        self.embed = nn.Embedding(vocab_size, embed_dim, **factory)
        self.blocks = block_stack(
            num_layers, embed_dim, num_heads, attention, segment_lengths, dilation_rates,
            rotary=True, ffn_mult=ffn_mult, dropout=dropout, branch_mixing=branch_mixing,
            backend=backend, num_kv_heads=self.num_kv_heads, **factory,
        )  # fmt: skip
        self.norm = nn.LayerNorm(embed_dim, **factory)
        self.head = nn.Linear(embed_dim, vocab_size, bias=False, **factory)
        if check_bool("tie_embeddings", tie_embeddings):
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)
        if not tie_embeddings:
            nn.init.normal_(self.head.weight, std=0.02)

    def num_parameters(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        caches: Sequence[DilatedKVCache] | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Logits ``(B, N, V)`` for ``input_ids`` ``(B, N)``, or the loss given ``targets``.

        Args:
            input_ids: ``(B, N)`` int64 token ids.
            targets: ``(B, N)`` int64, the token that should *follow* each input token
                (already shifted: ``targets[:, t]`` is predicted at position ``t``);
                ``-100`` marks positions without a target. Shifting is left to the caller
                because a shard of a sequence does not hold its next shard's first token.
            positions: ``(N,)`` int64 global positions of the tokens, default
                ``arange(N)``. Under sequence parallelism, the positions of this rank's
                shard (:func:`~dilated_attention_pytorch.models.shard_batch` gives them).
            caches: one decoding cache per block (:meth:`new_caches`): ``input_ids`` are
                then the tokens after the ones the caches have seen (the whole prompt
                first), and ``positions`` default to where the caches stand.
            reduction: with ``targets``, ``"mean"`` (per target token) or ``"sum"`` of the
                cross-entropy; under sequence parallelism
                :func:`~dilated_attention_pytorch.models.mesh_mean_loss` turns each rank's
                sum into the exact mean over every rank's targets.

        Returns:
            ``(B, N, V)`` logits in the parameters' dtype, or with ``targets`` the
            cross-entropy in nats as a float32 scalar (float64 for a float64 model).

        Raises:
            ValueError: after :func:`parallelize_longnet` with sequence parallelism,
                ``positions`` is required (each rank holds a shard; without its global
                positions rotary would read every shard as the sequence's start).
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise TypeError(
                f"input_ids must be a (B, N) tensor of token ids, got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}."
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold int64 token ids, got {input_ids.dtype}.")
        n = input_ids.shape[1]
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(
                f"caches must hold one cache per block ({len(self.blocks)}), got {len(caches)}; "
                f"use model.new_caches()."
            )
        if positions is None:
            if self.positions_required:
                raise ValueError(
                    "this model runs sequence-parallel: pass each rank's global token "
                    "positions, e.g. ids, targets, positions = shard_batch(ids, targets, mesh) "
                    "and model(ids, targets, positions=positions)."
                )
            start = 0 if caches is None else caches[0].position
            positions = torch.arange(start, start + n, device=input_ids.device)
        if not isinstance(positions, Tensor) or positions.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"positions must be an int64 tensor of token positions, got "
                f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}."
            )
        if positions.device != input_ids.device:
            raise ValueError(
                f"positions are on {positions.device}, input_ids on {input_ids.device}; put "
                f"them on the same device."
            )
        if caches is not None and n and positions.shape == (n,):
            if int(positions[0]) != caches[0].position:
                raise ValueError(
                    f"with caches, positions must start at {caches[0].position} (the tokens "
                    f"the caches have seen), got {int(positions[0])}; leave positions out."
                )
        if positions.shape != (n,):
            raise ValueError(
                f"positions must be (N,) = ({n},), one per token of input_ids "
                f"{tuple(input_ids.shape)}; got {tuple(positions.shape)}."
            )
        if self.max_seq_len is not None and n and int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond max_seq_len={self.max_seq_len}; "
                f"pass shorter inputs or build the model with a larger max_seq_len."
            )
        # float32 tables (float64 for a float64 model): the rotation is computed in them.
        table_dtype = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        rotary = rotary_tables(positions, self.head_dim, self.rotary_base, table_dtype)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            extra = {} if caches is None else {"cache": caches[i]}
            x = block(x, is_causal=True, rotary=rotary, **extra)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"targets must be an int64 tensor of token ids (-100 to ignore), got "
                f"{targets.dtype if isinstance(targets, Tensor) else type(targets).__name__}."
            )
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets must have input_ids' shape {tuple(input_ids.shape)}, got "
                f"{tuple(targets.shape)}."
            )
        reduction = check_choice("reduction", reduction, ("mean", "sum"))
        loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return F.cross_entropy(
            logits.to(loss_dtype).flatten(0, 1), targets.flatten().long(), ignore_index=-100,
            reduction=reduction,
        )  # fmt: skip

    def loss(self, input_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``input_ids`` ``(B, N)`` (nats per token): each
        of the first ``N - 1`` tokens predicts the next."""
        return self(input_ids[:, :-1], input_ids[:, 1:])

    def new_caches(self) -> list[DilatedKVCache]:
        """Empty decoding caches, one per block (dilated attention only)."""
        caches = []
        for block in self.blocks:
            inner = getattr(block.attn.attention, "inner", None)
            if type(inner) is not DilatedAttention:
                raise ValueError(
                    f"decoding caches need the single-device DilatedAttention; this model's "
                    f"blocks use {type(inner).__name__} (a dense model, or one parallelized "
                    f"for a ring)."
                )
            caches.append(inner.new_cache(self.num_heads, self.num_kv_heads))
        return caches

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``input_ids`` ``(B, N)`` by ``max_new_tokens`` sampled tokens -> ``(B, N + new)``.

        ``temperature=0`` picks the most likely token (greedy); otherwise tokens are
        drawn from the softmax of ``logits / temperature``, restricted to the ``top_k``
        most likely when given. With dilated attention the prompt runs once and each new
        token then attends a :class:`~dilated_attention_pytorch.decoding.DilatedKVCache`
        per block (``#branches * w / r`` cached positions per head, whatever the length);
        a dense model runs the whole prefix again for each token. The model samples in
        evaluation mode (no dropout) and returns to its previous mode.
        """
        if isinstance(temperature, Tensor) and temperature.numel() == 1:
            temperature = float(temperature)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(
                f"temperature must be a number >= 0 (0: greedy), got "
                f"{type(temperature).__name__} {temperature!r}."
            )
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
        if isinstance(input_ids, Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError(
                f"generate needs a prompt of at least one token, got input_ids of shape "
                f"{tuple(input_ids.shape)}; start from e.g. a beginning-of-sequence token."
            )
        if top_k is not None:
            check_positive_int("top_k", top_k)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            return self._generate(input_ids, max_new_tokens, temperature, top_k, generator)
        finally:
            self.train(was_training)

    def _generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        tokens = input_ids
        caches = self.new_caches() if self.attention_kind == "dilated" else None
        step_input = tokens
        for _ in range(max_new_tokens):
            if caches is None:
                logits = self(tokens)[:, -1].float()
            else:
                logits = self(step_input, caches=caches)[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = logits.softmax(dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            step_input = nxt.to(tokens.dtype)
            tokens = torch.cat((tokens, step_input), dim=1)
        return tokens


class LongNet(nn.Module):
    """A LongNet encoder: a stack of dilated-attention blocks on ``(B, N, E)`` -> ``(B, N, E)``.

    For inputs that are already embedded, such as image patches (add your own position
    embeddings). With ``hilbert_grid=(rows, cols)`` the ``N = rows * cols`` patches of a
    row-major grid are put in Hilbert-curve order before the blocks and back after, so
    that each segment covers a compact 2-D region instead of a few rows.

    Args:
        embed_dim, num_heads, num_layers, segment_lengths, dilation_rates, ffn_mult,
        dropout, branch_mixing, backend, attention, device, dtype: as in
            :class:`LongNetLM`.
        is_causal: causal attention in every block (default: bidirectional); with
            ``hilbert_grid``, causal along the Hilbert curve.
        hilbert_grid: ``(rows, cols)`` of the patch grid, or ``None`` for token order.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        *,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        is_causal: bool = False,
        hilbert_grid: tuple[int, int] | None = None,
        branch_mixing: str = "softmax",
        backend: str = "auto",
        attention: str = "dilated",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.is_causal = check_bool("is_causal", is_causal)
        self.attention_kind = check_choice("attention", attention, ATTENTION_KINDS)
        if hilbert_grid is not None:
            if not isinstance(hilbert_grid, (tuple, list)) or len(hilbert_grid) != 2:
                raise TypeError(f"hilbert_grid must be (rows, cols), got {hilbert_grid!r}.")
            perm = hilbert_permutation(*hilbert_grid, device=device)
            self.register_buffer("hilbert_order", perm, persistent=False)
            self.register_buffer("hilbert_inverse", inverse_permutation(perm), persistent=False)
        self.hilbert_grid = None if hilbert_grid is None else tuple(hilbert_grid)
        self.blocks = block_stack(
            num_layers, embed_dim, num_heads, attention, segment_lengths, dilation_rates,
            rotary=False, ffn_mult=ffn_mult, dropout=dropout, branch_mixing=branch_mixing,
            backend=backend, **factory,
        )  # fmt: skip
        self.norm = nn.LayerNorm(embed_dim, **factory)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, N, E)`` -> ``(B, N, E)``; ``key_padding_mask`` ``(B, N)`` bool, ``True``
        marks padding tokens (in ``x``'s order)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must be (B, N, E) with E = embed_dim = {self.embed_dim}, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}."
            )
        if self.hilbert_grid is not None:
            rows, cols = self.hilbert_grid
            if x.shape[1] != rows * cols:
                raise ValueError(
                    f"hilbert_grid={self.hilbert_grid} holds {rows * cols} patches, but x has "
                    f"N = {x.shape[1]} tokens; pass the whole row-major patch grid."
                )
            x = x[:, self.hilbert_order]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[:, self.hilbert_order]
        for block in self.blocks:
            x = block(x, is_causal=self.is_causal, key_padding_mask=key_padding_mask)
        x = self.norm(x)
        if self.hilbert_grid is not None:
            x = x[:, self.hilbert_inverse]
        return x
