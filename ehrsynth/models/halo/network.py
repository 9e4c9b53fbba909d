"""HALO's two modules, the math only (Theodorou et al., Nature Communications 2023, Methods "HALO").

* Coarse (visit-level) module: a GPT-2 style causal transformer (pre-LayerNorm, GELU) over the record's rows.
  Row t is embedded by a bias-free Linear(C -> d) of its multi-hot vector plus a learned position embedding;
  its output h_t summarises rows <= t. Attention keeps an optional KV cache, so sampling pays one position per
  new visit instead of recomputing the prefix.
* Fine (code-level) module: two autoregressive masked linear layers over [h_t ; x_{t+1}] with a ReLU between
  (MADE, Germain et al. 2015), optionally with direct masked input-to-output connections, plus a first-step
  softmax of h_t. The logit of column k of row t+1 depends on h_t and on the columns of row t+1 decided before
  k only, so one pass gives every conditional under teacher forcing (see :mod:`.encoding` for the factors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the positions seen so far, for every layer: (L, B, n_head, n_ctx, head_dim) each.

    ``length`` is the number of filled positions. Rows of the batch can be dropped with :meth:`keep`
    (finished records), which copies only the filled prefix.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, n_ctx: int, head_dim: int, *,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_head, n_ctx, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after the filled positions; return all keys and values so far."""
        stop = self.length + k.shape[2]
        if stop > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; asked for {stop}")
        self.k[layer, :, :, self.length:stop] = k
        self.v[layer, :, :, self.length:stop] = v
        return self.k[layer, :, :, :stop], self.v[layer, :, :, :stop]  # (B, nh, stop, hs)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (indices or a bool mask)."""
        filled = slice(0, self.length)
        k_rows = self.k[:, :, :, filled][:, rows]  # (L, b', nh, length, hs): copies the filled part only
        shape = (*k_rows.shape[:3], self.k.shape[3], self.k.shape[4])
        self.k = self.k.new_empty(shape)
        self.k[:, :, :, filled] = k_rows
        v_rows = self.v[:, :, :, filled][:, rows]
        self.v = self.v.new_empty(shape)
        self.v[:, :, :, filled] = v_rows


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention; ``attn_mask`` (T, T) bool replaces the causal mask (packed records)."""
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, past + T, hs)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new position sees every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new positions after a prefix: causal mask aligned to the end
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_drop(self.c_proj(y))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x)) with a tanh-GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


class CoarseTransformer(nn.Module):
    """Visit-level causal transformer: rows (B, T, C) -> h (B, T, d), h_t depending on rows <= t only.

    With ``tokens=True`` the inputs are token ids (B, T) and ``wte`` an embedding table (the timeline family's
    use): the same transformer, a one-hot row's embedding looked up instead of multiplied.
    """

    def __init__(self, n_columns: int, n_embd: int, n_head: int, n_layer: int, n_ctx: int, *,
                 dropout: float = 0.0, eps: float = 1e-5, tokens: bool = False, n_features: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_ctx = n_head, n_ctx
        # the visit embedding of the multi-hot row, or of the token
        self.wte = nn.Embedding(n_columns, n_embd) if tokens else nn.Linear(n_columns, n_embd, bias=False)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        # per-row numeric inputs (HALO's clock: CLOCK_FEATURES), embedded and added like the position
        self.wfe = nn.Linear(n_features, n_embd, bias=False) if n_features else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, eps) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), zero biases
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def new_cache(self, batch: int) -> KVCache:
        ref = self.wpe.weight
        d = ref.shape[1]
        return KVCache(len(self.blocks), batch, self.n_head, self.n_ctx, d // self.n_head,
                       device=ref.device, dtype=ref.dtype)

    def forward(self, rows: torch.Tensor, cache: KVCache | None = None, *,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """h for ``rows`` (B, T, C); with a cache, the rows continue the cached positions.

        Packed records: several records concatenated along T, with their own ``positions`` (T,) and a
        block-diagonal causal ``attn_mask`` (T, T) bool (True = may attend), see :func:`packed_mask`.
        ``features`` (B, T, n_features): the rows' numeric inputs, required when the module has them.
        """
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + rows.shape[1], device=rows.device)
        h = self.wte(rows) + self.wpe(positions)  # (B, T, d)
        if self.wfe is not None:
            if features is None:
                raise ValueError("this transformer needs its rows' features (HALO's clock)")
            h = h + self.wfe(features)
        h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i, attn_mask)
        if cache is not None:
            cache.length += rows.shape[1]
        return self.ln_f(h)


def packed_mask(record: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, N) bool attention mask of packed rows: row i may see row j of the same record at a position <= its
    own. With it, one sequence of concatenated records gives every record exactly its own causal attention."""
    return (record[:, None] == record[None, :]) & (positions[None, :] <= positions[:, None])


class MaskedLinear(nn.Linear):
    """A Linear whose weight is multiplied by a fixed 0/1 mask (MADE). The mask is rebuilt from the config,
    so it is not saved with the weights."""

    def __init__(self, mask: torch.Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)  # a quarter of a float mask's memory

    def masked_weight(self) -> torch.Tensor:
        return self.weight.masked_fill(~self.mask, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


@dataclass(frozen=True)
class FineWeights:
    """The fine head's weights laid out for incremental sampling (see :func:`fine_weights`), indexed by
    fine-order position (column ``order[i]`` at position i).

    Attributes:
        hist: (d, H) first-layer weights on h, transposed.
        cols: (C, H) first-layer weights on the columns: row i is what a 1 at position i adds to layer 1.
        bias1: (H,).
        out: (H, C) output weights of the logits, transposed.
        bias2: (C,).
        order: (C,) the column at each position.
        first: (d, V + 2) the first-step head's weights, transposed; first_bias (V + 2,).
        direct: (C, C) what a 1 at position i adds to every logit (row i), or None without direct connections.
        prefix_in, prefix_out: (C, r) the low-rank direct term's factors (a 1 at position i adds
            ``prefix_in[i]`` to a running (r,) sum; logit k adds its dot with ``prefix_out[k]``), or None.
        seen_chain: (C,) what "seen before" adds to each position's logit (0 outside the codes), or None;
            seen_first: (V,) what it adds to code k's first-step logit.
    """

    hist: torch.Tensor
    cols: torch.Tensor
    bias1: torch.Tensor
    out: torch.Tensor
    bias2: torch.Tensor
    order: torch.Tensor
    first: torch.Tensor
    first_bias: torch.Tensor
    direct: torch.Tensor | None
    prefix_in: torch.Tensor | None = None
    prefix_out: torch.Tensor | None = None
    seen_chain: torch.Tensor | None = None
    seen_first: torch.Tensor | None = None


class FineHead(nn.Module):
    """Code-level head over [h ; x], W = d + C inputs: a MADE over the columns plus a first-step softmax.

    The columns are decided in ``order``: the head gathers x into that order, runs the MADE on it and returns
    the logits in column order. Below, "position k" is position k of the order.

    Degrees (MADE, Germain et al. 2015): input i has degree i, so h takes 0..d-1 and position k takes d + k.
    The logit of position k has degree d + g(k) - 1, g(k) = ``group_first[k]`` (k itself outside a categorical
    group): it sees h and the positions before k's group, so a group's logits form one softmax. A hidden unit
    of degree m sees inputs <= m, and an output of degree o sees hidden units of degree <= o.

    * ``hidden=None`` (the reference): a square W x W masked first layer (hidden unit o has degree o, as the
      reference's lower-triangular mask) and a masked C x W output layer -- the reference's second square layer
      without its d unused outputs. Parameters: W^2 + W + C W + C.
    * ``hidden=H``: H hidden units with degrees spread evenly over d-1 .. d+C-2. Parameters: H W + H + C H + C.
    * ``direct=True`` (``fine_head="made_direct"``): a masked C x C linear map from the inputs straight to the
      logits (MADE's direct connections): every logit gets a linear term in every earlier column, which a
      MADE's hidden layer gives neighbouring columns through one hidden unit at most. C^2 parameters.
    * ``rank=r`` (``fine_head="made_lowrank"``): the direct connections with a rank-r weight, logit k +=
      u_k . (sum of v_j over the ones j before k's group): 2 C r parameters, linear in the vocabulary, and
      sampled with a running (r,) sum per record.
    * ``first``: Linear(d -> V + 2), the logits of a visit row's first step {end, code 0..V-1, no code}
      (:mod:`.encoding`): a function of the history only.
    * ``seen_codes=V`` (``HaloConfig.seen_codes``): two learned per-code terms, added to code k's chain logit
      and to its first-step logit when k already occurred in an earlier visit of the record. The history
      reaches the MADE only through the d-wide summary h, which does not hold "this code was recorded before"
      for every code; on one-code-per-visit data (GiBleed: 46 of 80 codes never recur in a patient) HALO
      without it repeats once-in-a-lifetime diagnoses in 12% of records. 2 V parameters, starting at 0 (the
      plain head); the terms are a function of the history, so sampling and the likelihood stay exact.
    """

    def __init__(self, n_embd: int, n_columns: int, hidden: int | None = None,
                 order: torch.Tensor | None = None, *, group_first: torch.Tensor | None = None,
                 n_first: int = 2, direct: bool = False, rank: int = 0, seen_codes: int = 0) -> None:
        super().__init__()
        self.n_embd, self.n_columns = n_embd, n_columns
        order = torch.arange(n_columns) if order is None else torch.as_tensor(order, dtype=torch.long)
        if not torch.equal(order.sort().values, torch.arange(n_columns)):
            raise ValueError("order must be a permutation of the columns")
        self.register_buffer("order", order, persistent=False)  # column at each position
        self.register_buffer("rank", order.argsort(), persistent=False)  # position of each column
        width = n_embd + n_columns
        inputs = torch.arange(width)
        first = torch.arange(n_columns) if group_first is None else torch.as_tensor(group_first, dtype=torch.long)
        out_degree = n_embd - 1 + first  # logit of position k: h and positions before k's group
        hidden_degree = inputs if hidden is None else n_embd - 1 + torch.arange(hidden) * n_columns // hidden
        self.layer1 = MaskedLinear(inputs[None, :] <= hidden_degree[:, None])  # (H, W)
        self.layer2 = MaskedLinear(hidden_degree[None, :] <= out_degree[:, None])  # (C, H)
        self.direct = None
        if direct:
            self.direct = MaskedLinear(torch.arange(n_columns)[None, :] < first[:, None], bias=False)  # (C, C)
            nn.init.zeros_(self.direct.weight)
        self.prefix_in = self.prefix_out = None
        if rank:
            self.prefix_in = nn.Parameter(torch.randn(n_columns, rank) * rank ** -0.5)  # v_j
            self.prefix_out = nn.Parameter(torch.zeros(n_columns, rank))  # u_k: starts as the plain MADE
        self.register_buffer("group_first", first, persistent=False)
        self.first = nn.Linear(n_embd, n_first)
        self.seen_chain = self.seen_first = None
        if seen_codes:
            self.seen_chain = nn.Parameter(torch.zeros(seen_codes))  # code k's chain logit when seen before
            self.seen_first = nn.Parameter(torch.zeros(seen_codes))  # its first-step logit when seen before

    def forward(self, h: torch.Tensor, x: torch.Tensor,
                seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (..., C) in column order, first-step logits (..., V + 2)) of row x (..., C) given the history
        h (..., d) of the rows before it and, with ``seen_codes``, ``seen`` (..., V) 0/1: the codes of the
        record's earlier rows (:func:`seen_codes`)."""
        xo = x[..., self.order]  # (..., C) in fine order
        z = torch.relu(self.layer1(torch.cat([h, xo], dim=-1)))  # (..., H)
        logits = self.layer2(z)
        if self.direct is not None:
            logits = logits + self.direct(xo)
        if self.prefix_in is not None:
            logits = logits + self._prefix(xo)
        logits, first = logits[..., self.rank], self.first(h)
        if self.seen_chain is not None:
            if seen is None:
                raise ValueError("this fine head needs the codes seen before (seen_codes)")
            V = self.seen_chain.shape[0]
            logits = torch.cat([logits[..., :V] + seen * self.seen_chain, logits[..., V:]], dim=-1)
            first = torch.cat([first[..., :1], first[..., 1:V + 1] + seen * self.seen_first, first[..., V + 1:]],
                              dim=-1)
        return logits, first

    def _prefix(self, xo: torch.Tensor) -> torch.Tensor:
        """The low-rank direct term of rows xo (..., C) in fine order: as one masked C x C weight (one matmul,
        measured faster on CPU) while C <= N r, i.e. while that weight is no larger than the (N, C, r) running
        sums; otherwise as running sums, in chunks of rows of at most 2^25 elements. (The C x C weight at a
        30,000-code vocabulary is 3.6 GB and made a small training step take 24 s instead of 0.4 s.)"""
        C, r = self.prefix_in.shape
        flat = xo.reshape(-1, C)  # (N, C)
        if C <= flat.shape[0] * r:
            mask = torch.arange(C, device=xo.device)[None, :] < self.group_first[:, None]  # [k, j]
            return F.linear(flat, (self.prefix_out @ self.prefix_in.T).masked_fill(~mask, 0.0)).view(xo.shape)
        rows = max(1, 2**25 // (C * r))
        out = []
        for chunk in flat.split(rows):
            terms = chunk[:, :, None] * self.prefix_in  # (n, C, r)
            before = torch.cumsum(terms, dim=1) - terms  # (n, C, r): sums over the positions before each
            out.append((before[:, self.group_first] * self.prefix_out).sum(-1))
        return torch.cat(out).view(xo.shape)


def seen_codes(rows: torch.Tensor, n_codes: int) -> torch.Tensor:
    """(B, T, V) for rows (B, T, C): entry [b, t, k] is 1 when code k is set in one of rows 0..t of record b,
    i.e. what the row after t sees as "recorded before" (the fine head's ``seen`` input)."""
    return torch.cummax(rows[..., :n_codes], dim=1).values


# HALO's clock: per row, from the rows up to it, the approximate age now / 50, log(1 + years since the first
# visit) and whether the age is known. The transformer would otherwise have to add up gap bins to know how old a
# patient is; age-driven codes then land at the wrong ages (GiBleed: the cohort's index condition, real ages
# 34-43 at the 10th-90th percentiles, was generated at 25-55).
CLOCK_FEATURES = 3


def clock_features(running: torch.Tensor) -> torch.Tensor:
    """(..., 3) clock inputs from (..., 3) running sums of ``rows @ clock`` (age bucket years, gap days,
    age known)."""
    years = running[..., 1] / 365.25
    return torch.stack([(running[..., 0] + years) / 50.0, torch.log1p(years), running[..., 2]], dim=-1)


def row_clock(rows: torch.Tensor, clock: torch.Tensor) -> torch.Tensor:
    """(B, T, 3) clock inputs of rows (B, T, C): row t's from rows 0..t (``clock``: (C, 3), what a 1 in each
    column adds; :func:`~.encoding.clock_matrix`)."""
    return clock_features(torch.cumsum(rows @ clock, dim=1))


def coarse_features(clock: torch.Tensor | None, history: torch.Tensor | None) -> torch.Tensor | None:
    """The coarse module's numeric inputs of a row: its clock inputs (..., 3) and/or the codes recorded up to and
    including it (..., V), concatenated in that order; None when the module takes neither."""
    parts = [part for part in (clock, history) if part is not None]
    return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class HaloNetwork:
    """The two modules the sampler and the likelihood run (they never need the model class), the clock matrix
    (C, 3) when the coarse module takes clock inputs (:func:`row_clock`), and the number of codes V when it takes
    the codes recorded so far (``HaloConfig.history_input``; 0: it does not)."""

    coarse: CoarseTransformer
    fine: FineHead
    clock: torch.Tensor | None = None
    history_codes: int = 0

    def coarse_inputs(self, rows: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor | None:
        """The coarse module's features for rows (B, T, C) of whole records: row t's from rows 0..t (None when
        it takes none). ``seen``: :func:`seen_codes` of the same rows when the caller has it already."""
        clock = None if self.clock is None else row_clock(rows, self.clock)
        history = None
        if self.history_codes:
            history = seen if seen is not None else seen_codes(rows, self.history_codes)
        return coarse_features(clock, history)

    def seen_codes(self, rows: torch.Tensor) -> torch.Tensor | None:
        """:func:`seen_codes` of rows (B, T, C) when the coarse module or the fine head takes it, else None:
        computed once for both."""
        n_codes = self.history_codes or (0 if self.fine.seen_chain is None else self.fine.seen_chain.shape[0])
        return seen_codes(rows, n_codes) if n_codes else None

    @property
    def n_ctx(self) -> int:
        return self.coarse.n_ctx

    @property
    def device(self) -> torch.device:
        return self.coarse.wpe.weight.device


def fine_weights(head: FineHead) -> FineWeights:
    """Masked weights of ``head`` split for sampling: layer 1 is W1 [h; x] + b1 = hist-part + sum of the
    ``cols`` rows of the columns set to 1, so fixing a 1 updates layer 1 (and the direct term) with one row
    instead of a matmul."""
    w1 = head.layer1.masked_weight().detach()  # (H, W)
    d = head.n_embd
    direct = None if head.direct is None else head.direct.masked_weight().detach().T.contiguous()
    return FineWeights(hist=w1[:, :d].T.contiguous(), cols=w1[:, d:].T.contiguous(),
                       bias1=head.layer1.bias.detach().clone(), out=head.layer2.masked_weight().detach().T.contiguous(),
                       bias2=head.layer2.bias.detach().clone(), order=head.order.clone(),
                       first=head.first.weight.detach().T.contiguous(), first_bias=head.first.bias.detach().clone(),
                       direct=direct,
                       prefix_in=None if head.prefix_in is None else head.prefix_in.detach().clone(),
                       prefix_out=None if head.prefix_out is None else head.prefix_out.detach().clone(),
                       **_seen_weights(head))


def _seen_weights(head: FineHead) -> dict[str, torch.Tensor | None]:
    if head.seen_chain is None:
        return {}
    chain = torch.zeros(head.n_columns, device=head.seen_chain.device)
    chain[:head.seen_chain.shape[0]] = head.seen_chain.detach()
    return {"seen_chain": chain[head.order].contiguous(), "seen_first": head.seen_first.detach().clone()}
