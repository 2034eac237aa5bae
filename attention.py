"""Multi-head attention and Multi-Window Multi-Head Attention (MW-MHA).

MW-MAE (Yadav et al., ICLR 2024), Eq. (1)-(2). Each head h attends only inside
non-overlapping windows of w_h consecutive tokens; a head with w_h = n is global:

    head_h(X)   = concat over windows u of softmax(Q_h^u K_h^u^T / sqrt(d) + B_h) V_h^u   (1)
    MW-MHA(X)   = concat(head_1(X), ..., head_H(X)) W_O                                  (2)

where Q_h^u is the u-th block of w_h rows of X W_h^Q (likewise K, V) and B_h is an
optional learned relative position bias, B_h[i, j] = table_h[i - j + w_h - 1].

The equations appear twice below: `multiwindow_attention_reference` computes them plainly,
one head at a time, and `MultiWindowAttention` computes the same numbers fast. It has two
interchangeable backends (`MultiWindowAttention(backend=...)`):

- "reshape" (the default on CPU): heads are taken in runs of equal window size,
  e.g. [(2, heads 0-0), (5, 1-1), ..., (250, 6-7)] for the paper's decoder, and each run is
  one attention call: its windows are cut by a reshape and folded into the batch,
  (B, G, n, d) -> (B * n/w, G, w, d), so a windowed head does n*w work instead of n*n.
  No loop over heads, no n x n mask; runs everywhere.
- "flex": all heads in one FlexAttention kernel with a per-head block-diagonal mask
  (q // w_h == kv // w_h) and the relative bias as a score_mod. Compiled on CUDA; on CPU
  torch runs it unfused and for inference only (a check that both backends agree).
"auto" picks "flex" on CUDA and "reshape" elsewhere. This module is a leaf: it knows
nothing about audio or MAE.

For analysis (analyze.py), `attention_maps(layer, x)` recomputes from a layer's weights what
the fast path never materialises: each head's (n x n) probabilities (zeros outside its
windows) and its output before W_O. The layers' forward is untouched by it.

    python attention.py               # each head's windows and cost, and a check of the
                                      # fast layer against the reference
"""
import itertools
import math
from typing import NamedTuple

import click
import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("reshape", "flex", "auto")

# The standard deviation of a standard normal truncated to [-2, 2]. Dividing the wanted std
# by it gives a truncated normal with the wanted std (JAX's variance_scaling does the same).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def window_sizes(n: int) -> list[int]:
    """The paper's window rule: every factor of n except 1 and n, plus two global heads.

    >>> window_sizes(250)
    [2, 5, 10, 25, 50, 125, 250, 250]
    """
    return [w for w in range(2, n) if n % w == 0] + [n, n]


def window_runs(windows: list[int]) -> list[tuple[int, range]]:
    """Consecutive heads that share a window size: each run is one attention call.

    >>> window_runs([2, 5, 250, 250])
    [(2, range(0, 1)), (5, range(1, 2)), (250, range(2, 4))]
    """
    runs, start = [], 0
    for w, heads in itertools.groupby(windows):
        count = len(list(heads))
        runs.append((w, range(start, start + count)))
        start += count
    return runs


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
        """(B, n, dim) -> q, k, v, each (B, H, n, d): views of one qkv projection (with
        RoPE, rotated copies of q and k)."""
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


def multiwindow_attention_reference(attn: "MultiWindowAttention", x: torch.Tensor,
                                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (1)-(2) written plainly with the weights of `attn`: one head at a time, that
    head's sequence cut into its windows. (B, n, dim) -> (B, n, dim).

    The definition that MultiWindowAttention.forward computes fast (tests compare the two),
    and the official release's way of computing MW-MHA (bench.py times it as the baseline).
    """
    q, k, v = attn.project_qkv(x, positions)  # each (B, H, n, d)
    B, H, n, d = q.shape
    heads = []
    for h, w in enumerate(attn.windows):
        table = attn.rel_pos[str(h)] if str(h) in attn.rel_pos else None
        w = min(w, n)  # a sequence shorter than the window is one window
        # Row u of (B, n/w, w, d) is window u: Q_h^u, K_h^u, V_h^u of Eq. (1).
        qh, kh, vh = (t[:, h].reshape(B, n // w, w, d) for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)  # (B, n/w, w, w)
        if table is not None:
            i = torch.arange(w, device=x.device)
            centre = len(table) // 2  # offset i - j = 0: entry w_h - 1 of the 2 w_h - 1
            scores = scores + table[i[:, None] - i[None, :] + centre]  # B_h[i, j]
        heads.append((scores.softmax(-1) @ vh).reshape(B, n, d))  # windows back in order
    return attn.proj(torch.cat(heads, dim=-1))  # Eq. (2): concat heads, W_O


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
        self.runs = window_runs(self.windows)  # [(w, heads)]: one attention call each
        # table_h[i - j + w - 1] for offsets i - j in [-(w - 1), w - 1]; global heads have none.
        self.rel_pos = nn.ParameterDict({
            str(h): nn.Parameter(torch.zeros(2 * w - 1))
            for h, w in enumerate(windows) if rel_pos_bias and w < num_tokens
        })
        for table in self.rel_pos.values():  # the release: variance 0.02 / fan_in, truncated at 2 std
            std = math.sqrt(0.02 / table.numel()) / TRUNCATED_NORMAL_STD
            nn.init.trunc_normal_(table, std=std, a=-2 * std, b=2 * std)
        self.block_masks = {}  # (n, device) -> FlexAttention BlockMask, built on first use

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.backend == "flex" or (self.backend == "auto" and x.is_cuda):
            out = self.flex_attention(*self.project_qkv(x, positions))  # (B, n, H, d)
        else:
            qkv = self.packed_qkv(x, positions)  # (B, n, 3, H, d)
            sizes = [len(heads) for _, heads in self.runs]
            out = torch.cat([self.window_attention(part, w, heads)  # part: (B, n, 3, G, d)
                             for (w, heads), part in zip(self.runs, qkv.split(sizes, dim=3))], dim=2)
        return self.proj(out.flatten(2))  # Eq. (2): concat heads (B, n, H * d), W_O

    # --- "reshape" backend: Eq. (1) for one run of heads in one call --------------------
    def packed_qkv(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """q, k, v of every head side by side per token: (B, n, 3, H, d). Without RoPE a view
        of the qkv projection, so everything up to the attention kernels is a view of one
        tensor and the backward pass writes all heads' gradients back with one concatenation
        (separate q, k, v tensors would cost an extra copy)."""
        if self.rope:  # rotated copies of q and k: (B, H, 3, n, d) -> (B, n, 3, H, d)
            return torch.stack(self.project_qkv(x, positions), dim=2).transpose(1, 3)
        B, n, _ = x.shape
        return self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim)

    def window_attention(self, qkv: torch.Tensor, w: int, heads: range) -> torch.Tensor:
        """Eq. (1) for the G heads of a run that share window size w.
        qkv: (B, n, 3, G, d) -> (B, n, G, d)."""
        B, n, _, G, d = qkv.shape
        w = min(w, n)  # a sequence shorter than the window is one window
        if n % w:
            raise ValueError(f"window {w} does not divide the sequence length {n}")
        # Cut the sequence into its n/w windows of w tokens and fold them into the batch,
        # (B * n/w, w, 3, G, d), a view: to the kernel each window is a sequence of its own.
        # Then q, k, v each (B * n/w, G, w, d), heads before tokens as attention wants them.
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(-1, w, 3, G, d).unbind(2))
        out = attend(q, k, v, self.relative_bias(heads, w, q))  # (B * n/w, G, w, d)
        # Unfold: tokens before heads again, windows back in sequence order.
        return out.transpose(1, 2).reshape(B, n, G, d)

    def relative_bias(self, heads: range, w: int, like: torch.Tensor) -> torch.Tensor | None:
        """B_h[i, j] = table_h[i - j + centre] for i, j < w: (G, w, w), or None for global heads.
        The centre (offset 0) is entry W - 1 of a table learned for windows of W tokens; a
        sequence shorter than W (w < W) uses the middle of the table."""
        if str(heads[0]) not in self.rel_pos:
            return None
        tables = torch.stack([self.rel_pos[str(h)] for h in heads])  # (G, 2W - 1)
        i = torch.arange(w, device=like.device)
        return tables[:, i[:, None] - i[None, :] + tables.shape[1] // 2].to(like.dtype)

    # --- "flex" backend: every head in one FlexAttention call ----------------------------
    def block_mask(self, n: int, device: torch.device):
        """Head h sees key j from query i iff both lie in the same window of head h."""
        if (n, device) not in self.block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            windows = torch.tensor([min(w, n) for w in self.windows], device=device)

            def same_window(b, h, q_idx, kv_idx):
                return q_idx // windows[h] == kv_idx // windows[h]

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


# ----------------------------------------------------------------------------- analysis

class AttentionMaps(NamedTuple):
    """What one attention layer did, for analysis (entropy, distances, PWCCA).

    probs: (B, H, n, n), row i of head h is the distribution of query i over the keys; a
        windowed head's probabilities sit at their token positions, zeros outside its window.
    head_outputs: (B, H, n, d), probs @ v per head, before the heads are concatenated and
        projected by W_O.
    """
    probs: torch.Tensor
    head_outputs: torch.Tensor


def head_windows(attn: Attention, n: int) -> list[int]:
    """The window each head of `attn` uses on a sequence of n tokens (n for a global head)."""
    windows = attn.windows if isinstance(attn, MultiWindowAttention) else [n] * attn.num_heads
    return [min(w, n) for w in windows]


def score_bias(attn: Attention, n: int, like: torch.Tensor) -> torch.Tensor:
    """(H, n, n) additive scores: -inf between tokens of different windows of a head, the
    head's relative bias B_h[i, j] inside them (offsets inside a window are offsets i - j of
    the whole sequence), zeros for a global head."""
    bias = like.new_zeros(attn.num_heads, n, n)
    i = torch.arange(n, device=like.device)
    rel_pos = getattr(attn, "rel_pos", {})
    for h, w in enumerate(head_windows(attn, n)):
        if str(h) in rel_pos:
            table = rel_pos[str(h)]
            bias[h] = table[(i[:, None] - i[None, :]).clamp(-(w - 1), w - 1) + len(table) // 2]
        bias[h].masked_fill_(i[:, None] // w != i[None, :] // w, float("-inf"))
    return bias


def attention_maps(attn: Attention, x: torch.Tensor, positions: torch.Tensor | None = None) -> AttentionMaps:
    """Recompute the attention probabilities and per-head outputs of `attn` (an Attention or
    MultiWindowAttention) on its input x (B, n, dim), from the layer's own weights.

    The layers' forward never materialises the probabilities (fused kernels, windows folded
    into the batch); this function writes Eq. (1) with full n x n matrices instead, masking
    each head to its windows, so it costs n^2 per head and is meant for analysis only.
    `attn.proj(head_outputs.transpose(1, 2).flatten(2))` is the layer's output.
    """
    q, k, v = attn.project_qkv(x, positions)  # each (B, H, n, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, n, n)
    probs = (scores + score_bias(attn, q.shape[2], scores)).softmax(-1)
    return AttentionMaps(probs, probs @ v)


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


# ----------------------------------------------------------------------------- command line

def parse_windows(text: str | None, tokens: int, heads: int | None) -> list[int]:
    """--windows '2,5,250' (or the window rule for `tokens`), checked against --heads and n."""
    try:
        windows = [int(w) for w in text.split(",")] if text else window_sizes(tokens)
    except ValueError:
        raise click.ClickException(f"--windows {text!r}: expected window sizes like 2,5,250") from None
    bad = [w for w in windows if w < 1 or tokens % w]
    if bad:
        raise click.ClickException(f"windows {bad} do not divide the {tokens} tokens")
    if heads is not None and heads != len(windows):
        raise click.ClickException(f"{len(windows)} windows {windows} need --heads {len(windows)}, "
                                   f"not {heads} (one window per head)")
    return windows


@click.command(context_settings=dict(show_default=True))
@click.option("--tokens", default=250, help="Sequence length n (250: 4x16 patches of 2 s).")
@click.option("--heads", type=int, help="Head count. [default: one per window: 8 for 250 tokens]")
@click.option("--dim", default=384, help="Model width (the MW-MAE decoder's).")
@click.option("--windows", help="Window size per head, e.g. 2,5,250. [default: the MW-MAE rule, "
                                "factors of n but 1 and n, plus two global heads]")
@click.option("--seed", default=0, help="Seed of the random weights and input of the check.")
def main(tokens: int, heads: int | None, dim: int, windows: str | None, seed: int):
    """Each head's windows and attention cost, then the fast MW-MHA layer against the plain
    reference on random input (exit status 1 if they differ by more than 1e-5)."""
    windows = parse_windows(windows, tokens, heads)
    if dim % len(windows):
        raise click.ClickException(f"--dim {dim} is not a multiple of the {len(windows)} heads")
    click.echo(f"MW-MHA on n = {tokens} tokens: {len(windows)} heads of {dim // len(windows)} dims")
    click.echo("score entries per head: n*w for a head with windows of w tokens, n^2 if global\n")
    click.echo(f"{'head':>4} {'window':>6} {'windows':>7} {'n*w':>8} {'n^2':>8} {'ratio':>6}")
    for h, w in enumerate(windows):
        click.echo(f"{h:>4} {w:>6} {tokens // w:>7} {tokens * w:>8} {tokens ** 2:>8} {w / tokens:>6.3f}")
    windowed, dense = tokens * sum(windows), len(windows) * tokens ** 2
    click.echo(f"{'all':>4} {'':>6} {'':>7} {windowed:>8} {dense:>8} {windowed / dense:>6.3f}")
    runs = " ".join(f"[{w}: {r.start}-{r.stop - 1}]" for w, r in window_runs(windows))
    click.echo(f"one attention call per run of heads with one window [window: heads]: {runs}\n")

    torch.manual_seed(seed)
    layer = MultiWindowAttention(dim, windows, tokens)
    x = torch.randn(2, tokens, dim)
    with torch.no_grad():
        difference = float((layer(x) - multiwindow_attention_reference(layer, x)).abs().max())
    click.echo(f"max |fast - reference| on random input (2 x {tokens} x {dim}, float32, "
               f"reshape backend): {difference:.2e}")
    if difference > 1e-5:
        raise click.ClickException(f"the layer differs from the reference by {difference:.2e} > 1e-5")


if __name__ == "__main__":
    main()
