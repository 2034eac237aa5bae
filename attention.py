"""Multi-head attention and Multi-Window Multi-Head Attention (MW-MHA).

MW-MAE (Yadav et al., ICLR 2024), Eq. (1)-(2). Each head h attends only inside
non-overlapping windows of w_h consecutive tokens; a head with w_h = n is global:

    head_h(X)   = concat over windows u of softmax(Q_h^u K_h^u^T / sqrt(d) + B_h) V_h^u   (1)
    MW-MHA(X)   = concat(head_1(X), ..., head_H(X)) W_O                                  (2)

where Q_h^u is the u-th block of w_h rows of X W_h^Q (likewise K, V) and B_h is an
optional learned relative position bias, B_h[i, j] = table_h[i - j + w_h - 1].

Windows are cut by reshaping, (B, H, n, d) -> (B, H, n/w, w, d), so a windowed head
does n*w work instead of n*n. Heads that share a window size are computed together
in one fused `scaled_dot_product_attention` call: there is no loop over heads and no
n x n mask. This module is a leaf: it knows nothing about audio or MAE.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


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

    A sequence shorter than a window (e.g. the encoder's visible tokens) clips that
    window to the sequence length; every window must then divide the length.
    """

    def __init__(self, dim: int, windows: list[int], num_tokens: int, qkv_bias: bool = True,
                 rel_pos_bias: bool = True, rope: bool = False):
        super().__init__(dim, len(windows), qkv_bias=qkv_bias, rope=rope)
        self.windows = list(windows)
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

    def relative_bias(self, heads: list[int], w: int, span: int, like: torch.Tensor):
        """B_h[i, j] = table_h[i - j + w - 1] for i, j < span: (G, span, span), or None."""
        if str(heads[0]) not in self.rel_pos:
            return None
        i = torch.arange(span, device=like.device)
        index = i[:, None] - i[None, :] + w - 1  # (span, span)
        tables = torch.stack([self.rel_pos[str(h)] for h in heads])  # (G, 2w - 1)
        return tables[:, index].to(like.dtype)

    def windowed_attention(self, q, k, v, w: int, heads: list[int]) -> torch.Tensor:
        """Eq. (1) for a group of G heads sharing window w. q, k, v: (B, G, n, d)."""
        B, G, n, d = q.shape
        span = min(w, n)
        if n % span:
            raise ValueError(f"window {w} does not divide the sequence length {n}")
        q, k, v = (t.reshape(B, G, n // span, span, d) for t in (q, k, v))  # (B, G, n/w, w, d)
        bias = self.relative_bias(heads, w, span, q)
        if bias is not None:
            bias = bias[:, None]  # (G, 1, w, w): same bias in every window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, G, n/w, w, d)
        return out.reshape(B, G, n, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x, positions)  # (B, H, n, d)
        if not self.grouped_in_order:
            q, k, v = (t[:, self.head_order] for t in (q, k, v))
        sizes = [len(heads) for heads in self.groups.values()]
        outs = [
            self.windowed_attention(qg, kg, vg, w, heads)
            for (w, heads), qg, kg, vg in zip(self.groups.items(), q.split(sizes, 1),
                                              k.split(sizes, 1), v.split(sizes, 1))
        ]
        out = torch.cat(outs, dim=1)  # (B, H, n, d), heads grouped by window
        if not self.grouped_in_order:
            out = out[:, self.head_unorder]
        return self.merge_heads(out)  # Eq. (2)
