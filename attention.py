"""Multi-head attention and Multi-Window Multi-Head Attention (MW-MHA).

MW-MAE (Yadav et al., ICLR 2024), Eq. (1)-(2). Each head h attends only inside
non-overlapping windows of w_h consecutive tokens; a head with w_h = n is global:

    head_h(X)   = concat over windows u of softmax(Q_h^u K_h^u^T / sqrt(d) + B_h) V_h^u   (1)
    MW-MHA(X)   = concat(head_1(X), ..., head_H(X)) W_O                                  (2)

where Q_h^u is the u-th block of w_h rows of X W_h^Q (likewise K, V) and B_h is an
optional learned relative position bias, B_h[i, j] = table_h[i - j + w_h - 1].

Two interchangeable backends compute MW-MHA (`MultiWindowAttention(backend=...)`):

- "reshape" (the default on CPU): windows are cut by reshaping and folded into the batch,
  (B, G, n, d) -> (B * n/w, G, w, d), so a windowed head does n*w work instead of n*n.
  Heads that share a window size go through one attention call: no loop over heads,
  no n x n mask. It reads like Eq. (1)-(2) and runs everywhere.
- "flex": all heads in one FlexAttention kernel with a per-head block-diagonal mask
  (q // w_h == kv // w_h) and the relative bias as a score_mod. Compiled on CUDA; on CPU
  torch runs it unfused and for inference only (a check that both backends agree).
"auto" picks "flex" on CUDA and "reshape" elsewhere. This module is a leaf: it knows
nothing about audio or MAE.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("reshape", "flex", "auto")


def window_sizes(n: int) -> list[int]:
    """The paper's window rule: every factor of n except 1 and n, plus two global heads.

    >>> window_sizes(250)
    [2, 5, 10, 25, 50, 125, 250, 250]
    """
    return [w for w in range(2, n) if n % w == 0] + [n, n]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer) on the last dim of x: (B, H, n, d), positions (B, n)."""
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)  # angles never in half precision
    freqs = base ** (-torch.arange(0, d // 2, device=x.device, dtype=dtype) / (d // 2))
    angles = positions[:, None, :, None].to(dtype) * freqs  # (B, 1, n, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 : 2 * (d // 2)]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * (d // 2) :]], dim=-1)


class Attention(nn.Module):
    """Standard multi-head self-attention: softmax(Q K^T / sqrt(d)) V, all heads global."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rope: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        inner = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.rope = rope

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor | None):
        B, n, _ = x.shape
        qkv = self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, n, d)
        if self.rope:
            if positions is None:
                positions = torch.arange(n, device=x.device).expand(B, n)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        B, H, n, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, n, H * d))  # concat heads, W_O

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x, positions)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v: (N, G, w, d), bias (G, w, w) or None.

    Without a bias this is SDPA's fused kernel. A bias that needs a gradient would send SDPA
    on CPU to its slow generic path (the fused CPU kernel cannot differentiate the mask), so
    there it is written out: a batched matmul, a softmax and another batched matmul.
    """
    if bias is None or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias  # (N, G, w, w)
    return scores.softmax(-1) @ v


class MultiWindowAttention(Attention):
    """MW-MHA: head h attends within windows of `windows[h]` tokens; a window of
    `num_tokens` (the full sequence) makes a global head.

    Args:
        dim: model width.
        windows: one window size per head (the head count is len(windows)).
        num_tokens: sequence length the windows were chosen for; heads with a window
            of this size are global and carry no relative bias (as in the release).
        rel_pos_bias: learn a 1-D relative position bias per windowed head.
        rope: rotary embedding on q and k.
        backend: "reshape", "flex" or "auto" (see the module docstring); an attribute
            that may be changed at any time, e.g. with `set_backend(model, "flex")`.

    A sequence shorter than a window (e.g. the encoder's visible tokens) clips that
    window to the sequence length; every window must then divide the length.
    """

    def __init__(self, dim: int, windows: list[int], num_tokens: int, qkv_bias: bool = True,
                 rel_pos_bias: bool = True, rope: bool = False, backend: str = "auto"):
        super().__init__(dim, len(windows), qkv_bias=qkv_bias, rope=rope)
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: use one of {BACKENDS}")
        self.windows, self.backend = list(windows), backend
        # Heads grouped by window size; each group is one fused attention call.
        self.groups = {w: [h for h, wh in enumerate(windows) if wh == w] for w in dict.fromkeys(windows)}
        order = [h for heads in self.groups.values() for h in heads]
        self.register_buffer("head_order", torch.tensor(order), persistent=False)
        self.register_buffer("head_unorder", torch.argsort(torch.tensor(order)), persistent=False)
        self.grouped_in_order = order == sorted(order)
        # table_h[k], k = i - j + w - 1 in [0, 2w - 2]; global heads have none.
        self.rel_pos = nn.ParameterDict({
            str(h): nn.Parameter(torch.zeros(2 * w - 1))
            for h, w in enumerate(windows) if rel_pos_bias and w < num_tokens
        })
        for h, table in self.rel_pos.items():  # the release: variance 0.02 / fan_in, truncated at 2 std
            std = math.sqrt(0.02 / table.numel()) / 0.87962566103423978
            nn.init.trunc_normal_(table, std=std, a=-2 * std, b=2 * std)
        self.block_masks = {}  # (n, device) -> FlexAttention BlockMask, built on first use

    def relative_bias(self, heads: list[int], w: int, span: int, like: torch.Tensor):
        """B_h[i, j] = table_h[i - j + w - 1] for i, j < span: (G, span, span), or None."""
        if str(heads[0]) not in self.rel_pos:
            return None
        i = torch.arange(span, device=like.device)
        index = i[:, None] - i[None, :] + w - 1  # (span, span)
        tables = torch.stack([self.rel_pos[str(h)] for h in heads])  # (G, 2w - 1)
        return tables[:, index].to(like.dtype)

    # --- "reshape" backend: Eq. (1) by reshaping, one call per window size ---------------
    def token_qkv(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """(B, n, dim) -> q, k, v of every head side by side per token: (B, n, 3, H, d), a view
        of the qkv projection (with RoPE, a rotated copy)."""
        if self.rope:
            q, k, v = self.project_qkv(x, positions)  # (B, H, n, d)
            return torch.stack((q, k, v), dim=2).transpose(1, 3)  # (B, H, 3, n, d) -> (B, n, 3, H, d)
        B, n, _ = x.shape
        return self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim)

    def windowed_attention(self, qkv: torch.Tensor, w: int, heads: list[int]) -> torch.Tensor:
        """Eq. (1) for a group of G heads sharing window w. qkv: (B, n, 3, G, d) -> (B, n, G, d)."""
        B, n, _, G, d = qkv.shape
        span = min(w, n)
        if n % span:
            raise ValueError(f"window {w} does not divide the sequence length {n}")
        # Cut the sequence into n/w windows and fold them into the batch: (B * n/w, w, 3, G, d),
        # a view; then q, k, v each (B * n/w, G, w, d).
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(-1, span, 3, G, d).unbind(2))
        out = attend(q, k, v, self.relative_bias(heads, w, span, q))  # (B * n/w, G, w, d)
        return out.transpose(1, 2).reshape(B, n, G, d)

    def reshape_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """All heads, one windowed_attention per window size. (B, n, 3, H, d) -> (B, n, H, d).
        Everything up to the attention kernels is a view of `qkv`, so the backward pass
        writes the gradient of all heads back with one concatenation."""
        if not self.grouped_in_order:
            qkv = qkv[:, :, :, self.head_order]
        sizes = [len(heads) for heads in self.groups.values()]
        outs = [self.windowed_attention(part, w, heads)
                for (w, heads), part in zip(self.groups.items(), qkv.split(sizes, dim=3))]
        out = torch.cat(outs, dim=2)  # (B, n, H, d), heads grouped by window
        return out if self.grouped_in_order else out[:, :, self.head_unorder]

    # --- "flex" backend: every head in one FlexAttention call ----------------------------
    def block_mask(self, n: int, device: torch.device):
        """Head h sees key j from query i iff both lie in the same window of span_h tokens."""
        if (n, device) not in self.block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            spans = torch.tensor([min(w, n) for w in self.windows], device=device)

            def same_window(b, h, q_idx, kv_idx):
                return q_idx // spans[h] == kv_idx // spans[h]

            self.block_masks[(n, device)] = create_block_mask(
                same_window, None, self.num_heads, n, n, device=device)
        return self.block_masks[(n, device)]

    def padded_bias_tables(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(H, 2n - 1): row h holds B_h[i, j] at column i - j + n - 1 (zeros for global heads).
        Padding table_h by n - w on both sides moves its centre from w - 1 to n - 1; when
        w > n the negative padding crops the offsets a sequence of n tokens cannot reach."""
        zeros = like.new_zeros(2 * n - 1)
        return torch.stack([
            F.pad(self.rel_pos[str(h)], (n - w, n - w)).to(like.dtype) if str(h) in self.rel_pos else zeros
            for h, w in enumerate(self.windows)
        ])

    def flex_attention(self, q, k, v) -> torch.Tensor:
        """All heads in one FlexAttention call. (B, H, n, d) -> (B, n, H, d)."""
        n = q.shape[2]
        tables = self.padded_bias_tables(n, q) if len(self.rel_pos) else None

        def relative_position(score, b, h, q_idx, kv_idx):
            return score + tables[h, q_idx - kv_idx + n - 1]

        out = flex_attention_kernel(q.device)(
            q, k, v, score_mod=relative_position if tables is not None else None,
            block_mask=self.block_mask(n, q.device))
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.token_qkv(x, positions)  # (B, n, 3, H, d)
        backend = self.backend
        if backend == "auto":
            backend = "flex" if qkv.is_cuda else "reshape"
        if backend == "flex":
            out = self.flex_attention(*qkv.permute(2, 0, 3, 1, 4))  # q, k, v: (B, H, n, d)
        else:
            out = self.reshape_attention(qkv)  # (B, n, H, d)
        return self.proj(out.flatten(2))  # Eq. (2): concat heads, W_O


_compiled_flex = None


def flex_attention_kernel(device: torch.device):
    """torch's flex_attention: compiled into a fused kernel on CUDA (compiled once, then
    reused), unfused elsewhere (materialises the scores; CPU supports inference only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def set_backend(model: nn.Module, backend: str) -> None:
    """Set the backend of every MultiWindowAttention inside `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: use one of {BACKENDS}")
    for module in model.modules():
        if isinstance(module, MultiWindowAttention):
            module.backend = backend
