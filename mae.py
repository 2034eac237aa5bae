"""Masked autoencoders for audio: MAE, MW-MAE and AudioMAE++.

A log-mel spectrogram (B, T=200, F=80) is cut into patches (4 x 16 -> a 50 x 5 grid of
250 tokens, time-major: token n = t * 5 + f). A random 80% of the patches is masked;
the encoder (a ViT) sees only the visible ones; a light decoder gets the encoded
patches plus a learned mask token in every masked place and predicts the masked
patches. The loss is the mean squared error on the masked patches only.

The three models differ only in their blocks:
- MAE: pre-LN ViT blocks everywhere, a CLS token.
- MW-MAE: the decoder uses Multi-Window MHA (attention.py); no CLS token.
- AudioMAE++: macaron "transformer++" blocks (half-step MLP, attention, SwiGLU).

Presets by name: `build("mwmae-base")`, with keyword overrides. Saving and loading
model files is checkpoints.py's concern. `device("auto")` resolves every command's
--device option. `python mae.py PRESET` prints the model's summary.
"""
import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attention import Attention, MultiWindowAttention, window_sizes

LN_EPS = 1e-6  # both releases use LayerNorm eps 1e-6
NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")  # besides 1-D tensors


@dataclass
class MAEConfig:
    input_size: tuple[int, int] = (200, 80)  # (time frames, mel bins)
    patch_size: tuple[int, int] = (4, 16)    # (time, mel)
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 8          # for a global decoder; a multi-window one has len(windows) heads
    mlp_ratio: float = 4.0
    block: str = "vit"              # "vit" (pre-LN, GELU-tanh MLP) or "plusplus" (AudioMAE++)
    cls_token: bool = True
    encoder_multiwindow: bool = False
    decoder_multiwindow: bool = False
    windows: tuple[int, ...] | None = None  # one per head; default window_sizes(num_patches)
    rel_pos_bias: bool = True       # learned relative bias in windowed heads (MW-MAE release)
    rope: bool = False              # rotary embedding on q, k (AudioMAE++ option, off in the paper)
    trainable_pos: bool = False     # the MW-MAE release trains its sin-cos position tables
    reuse_norm2: bool = False       # AudioMAE++ release: norm2 before the SwiGLU, norm3 unused
    mask_ratio: float = 0.8
    norm_pix_loss: bool = False

    def __post_init__(self):
        self.input_size, self.patch_size = tuple(self.input_size), tuple(self.patch_size)
        if self.windows is not None:
            self.windows = tuple(self.windows)
        if any(i % p for i, p in zip(self.input_size, self.patch_size)):
            raise ValueError(f"patch size {self.patch_size} does not divide the input {self.input_size}")
        if self.block not in ("vit", "plusplus"):
            raise ValueError(f"unknown block kind {self.block!r}: use 'vit' or 'plusplus'")
        if self.encoder_multiwindow and self.cls_token:
            raise ValueError("a multi-window encoder needs cls_token=False (windows tile the patches)")
        bad = [w for w in self.head_windows if self.num_patches % w]
        if (self.encoder_multiwindow or self.decoder_multiwindow) and bad:
            raise ValueError(f"windows {bad} do not divide the {self.num_patches} patches")

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_windows(self) -> list[int]:
        return list(self.windows or window_sizes(self.num_patches))

    @property
    def embedding_size(self) -> int:
        return self.grid[1] * self.embed_dim  # one frame = the F' frequency patches of a time step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SIZES = {  # name: (dim, depth, heads)
    "tiny": (192, 12, 3), "small": (384, 12, 6), "medium": (512, 12, 8),
    "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
}
FAMILIES = {
    "mae": dict(block="vit", cls_token=True),
    "mwmae": dict(block="vit", cls_token=False, decoder_multiwindow=True),
    "audiomaepp": dict(block="plusplus", cls_token=True),
}
PRESETS = [f"{family}-{size}" for family in FAMILIES for size in SIZES
           if family != "audiomaepp" or size in ("tiny", "base", "large")]


def preset_config(name: str, **overrides) -> MAEConfig:
    """The config of a preset such as 'mwmae-base', with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    family, size = name.split("-")
    dim, depth, heads = SIZES[size]
    kwargs = dict(embed_dim=dim, depth=depth, num_heads=heads, **FAMILIES[family])
    if name == "audiomaepp-large":
        kwargs["decoder_dim"] = 512
    return MAEConfig(**{**kwargs, **overrides})


def parse_overrides(items) -> dict:
    """Config fields from command-line text: ('depth=4', 'windows=[2,5,250]', 'block=plusplus')
    -> {'depth': 4, 'windows': [2, 5, 250], 'block': 'plusplus'}. Values are JSON; a bare word
    is a string. An unknown field or a missing '=' raises ValueError."""
    known = {field.name for field in dataclasses.fields(MAEConfig)}
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{item!r}: expected FIELD=VALUE; unknown config field {key!r}? "
                             f"fields: {', '.join(sorted(known))}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def build(name: str, **overrides) -> "MAE":
    """A randomly initialised model from a preset name, e.g. build('mwmae-tiny', decoder_depth=2)."""
    return MAE(preset_config(name, **overrides))


# ----------------------------------------------------------------------------- positions

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim/2)), k < dim/2: (len(positions), dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """MAE 2-D table for time-major tokens: first half of the channels encodes the
    frequency index f, second half the time index t. (T' * F', dim)."""
    t, f = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")  # (T', F')
    return np.concatenate([sincos_1d(dim // 2, f.ravel()), sincos_1d(dim // 2, t.ravel())], axis=1)


def position_table(table: np.ndarray, num_prefix: int, trainable: bool) -> torch.Tensor:
    """(1, num_prefix + L, dim) with zero rows for the prefix (CLS) tokens."""
    table = np.concatenate([np.zeros((num_prefix, table.shape[1])), table])
    tensor = torch.from_numpy(table).float()[None]
    return nn.Parameter(tensor) if trainable else tensor


# ----------------------------------------------------------------------------- blocks

class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_value) -> LayerNorm -> W_out (AudioMAE++'s final FFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.value, self.gate = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj(self.norm(F.silu(self.gate(x)) * self.value(x)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=LN_EPS), attn
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), nn.GELU(approximate="tanh"))  # as the release

    def forward(self, x, positions=None):
        x = x + self.attn(self.norm1(x), positions)
        return x + self.mlp(self.norm2(x))


class PlusPlusBlock(nn.Module):
    """Macaron transformer++ block (AudioMAE++):
    x + 0.5 * FFN(LN1(x)), then x + Attn(LN2(x)), then x + SwiGLU(LN3(x)).
    `reuse_norm2` reproduces the release, which applies LN2 again before the SwiGLU."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, reuse_norm2: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn1 = Mlp(dim, int(dim * mlp_ratio), nn.SiLU())
        self.norm2, self.attn = nn.LayerNorm(dim, eps=LN_EPS), attn
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn2 = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3))
        self.reuse_norm2 = reuse_norm2

    def forward(self, x, positions=None):
        x = x + 0.5 * self.ffn1(self.norm1(x))
        x = x + self.attn(self.norm2(x), positions)
        norm = self.norm2 if self.reuse_norm2 else self.norm3
        return x + self.ffn2(norm(x))


def make_blocks(cfg: MAEConfig, dim: int, depth: int, heads: int, multiwindow: bool) -> nn.ModuleList:
    def attention():
        if multiwindow:
            return MultiWindowAttention(dim, cfg.head_windows, cfg.num_patches,
                                        rel_pos_bias=cfg.rel_pos_bias, rope=cfg.rope)
        return Attention(dim, heads, rope=cfg.rope)

    if cfg.block == "vit":
        return nn.ModuleList(ViTBlock(dim, attention(), cfg.mlp_ratio) for _ in range(depth))
    return nn.ModuleList(PlusPlusBlock(dim, attention(), cfg.mlp_ratio, cfg.reuse_norm2)
                         for _ in range(depth))


# ----------------------------------------------------------------------------- model

class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        D, Dd, L = cfg.embed_dim, cfg.decoder_dim, cfg.num_patches
        self.num_prefix = int(cfg.cls_token)
        # The CLS token skips a windowed decoder: its windows tile the patches exactly.
        self.decoder_prefix = 0 if cfg.decoder_multiwindow else self.num_prefix

        # Encoder
        self.patch_embed = nn.Conv2d(1, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        self.register_pos("pos_embed", sincos_2d(D, cfg.grid), self.num_prefix)
        self.blocks = make_blocks(cfg, D, cfg.depth, cfg.num_heads, cfg.encoder_multiwindow)
        self.norm = nn.LayerNorm(D, eps=LN_EPS)

        # Decoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_pos("decoder_pos_embed", sincos_1d(Dd, np.arange(L)), self.decoder_prefix)
        self.decoder_blocks = make_blocks(cfg, Dd, cfg.decoder_depth, cfg.decoder_heads,
                                          cfg.decoder_multiwindow)
        self.decoder_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size[0] * cfg.patch_size[1])
        self.init_weights()

    def register_pos(self, name: str, table: np.ndarray, num_prefix: int):
        pos = position_table(table, num_prefix, self.cfg.trainable_pos)
        if isinstance(pos, nn.Parameter):
            self.register_parameter(name, pos)
        else:
            self.register_buffer(name, pos)

    def init_weights(self):
        def init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        for token in (self.cls_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    # --- patches ------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, L, pt * pf), time-major patches, time-major values inside a patch."""
        (T_, F_), (pt, pf) = self.cfg.grid, self.cfg.patch_size
        x = x.reshape(x.shape[0], T_, pt, F_, pf)
        return x.permute(0, 1, 3, 2, 4).reshape(x.shape[0], T_ * F_, pt * pf)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, pt * pf) -> (B, T, F): the inverse of patchify."""
        (T_, F_), (pt, pf) = self.cfg.grid, self.cfg.patch_size
        x = patches.reshape(patches.shape[0], T_, F_, pt, pf).permute(0, 1, 3, 2, 4)
        return x.reshape(patches.shape[0], T_ * pt, F_ * pf)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, L, D): conv with kernel = stride = patch, then time-major tokens."""
        return self.patch_embed(x[:, None]).flatten(2).transpose(1, 2)

    # --- masking ------------------------------------------------------------------------
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep a random (1 - mask_ratio) of the tokens per sample: argsort uniform noise
        and keep the first ones. Returns kept tokens (B, keep, D), mask (B, L) with
        1 = masked, ids_restore (B, L) and ids_keep (B, keep)."""
        B, L, D = x.shape
        num_keep = int(L * (1 - mask_ratio) + 1e-6)  # 250 * 0.2 = 50, despite float rounding
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return kept, mask, ids_restore, ids_keep

    # --- encoder ------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """(B, T, F) -> latent (B, prefix + visible, D), mask (B, L), ids_restore (B, L)."""
        B = x.shape[0]
        tokens = self.embed_patches(x) + self.pos_embed[:, self.num_prefix:]
        ids = torch.arange(tokens.shape[1], device=x.device).expand(B, -1)
        mask = ids_restore = None
        if mask_ratio > 0:
            tokens, mask, ids_restore, ids = self.random_masking(tokens, mask_ratio, noise)
        positions = ids + self.num_prefix  # token positions for RoPE, CLS at 0
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
            positions = torch.cat([torch.zeros_like(positions[:, :1]), positions], dim=1)
        for block in self.blocks:
            tokens = block(tokens, positions)
        return self.norm(tokens), mask, ids_restore

    # --- decoder ------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded visible tokens + mask tokens in the masked places -> (B, L, pt * pf)."""
        x = self.decoder_embed(latent)
        B, L, Dd = x.shape[0], ids_restore.shape[1], x.shape[2]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        masked = self.mask_token.expand(B, L - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, Dd))  # patch order
        if self.decoder_prefix:
            x = torch.cat([prefix, x], dim=1)
        x = x + self.decoder_pos_embed
        positions = torch.arange(x.shape[1], device=x.device).expand(B, -1)
        for block in self.decoder_blocks:
            x = block(x, positions)
        return self.decoder_pred(self.decoder_norm(x))[:, self.decoder_prefix:]

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        target = self.patchify(x)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)  # (B, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """x: (B, T, F) normalised log-mel. Returns (loss, pred (B, L, pt * pf), mask (B, L))."""
        latent, mask, ids_restore = self.forward_encoder(x, self.cfg.mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask), pred, mask

    # --- embeddings ---------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder -> (B, T', F' * D): row t concatenates the F' frequency
        patches of time step t (one frame per patch height, 40 ms for 4 x 16)."""
        tokens, _, _ = self.forward_encoder(x, mask_ratio=0.0)
        tokens = tokens[:, self.num_prefix:]  # (B, T' * F', D), time-major
        T_, F_ = self.cfg.grid
        return tokens.reshape(x.shape[0], T_, F_ * self.cfg.embed_dim)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on weight matrices only, not on biases, norms (1-D),
        tokens or position tables."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            skip = param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY
            (no_decay if skip else decay).append(param)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


# ----------------------------------------------------------------------------- devices

DEVICES = ("auto", "cpu", "cuda", "xla")


def device(name: str) -> torch.device:
    """The torch.device of a --device value: 'auto' (CUDA if available, else XLA (a TPU) if
    torch_xla is installed, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'xla'. Raises ValueError
    with one line when it is not available here. torch_xla is imported only when asked for."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "xla" if has_torch_xla() else "cpu"
    if name == "xla":
        if not has_torch_xla():
            raise ValueError("xla needs torch_xla, which is not installed")
        import torch_xla
        return torch_xla.device()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"unknown device {name!r}: use {', '.join(DEVICES)} or cuda:N")
    chosen = torch.device(name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return chosen


def has_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


class DeviceChoice(click.Choice):
    """The --device option of every command: one of `choices` (or cuda:N), converted by
    device(); a device that is not available is a one-line usage error."""

    def __init__(self, choices: tuple[str, ...] = DEVICES):
        super().__init__(choices)

    def convert(self, value, param, ctx) -> torch.device:
        if isinstance(value, torch.device):
            return value
        if not re.fullmatch(r"cuda:\d+", str(value)) or "cuda" not in self.choices:
            value = super().convert(value, param, ctx)
        try:
            return device(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def check_compile_device(compiled: bool, device: torch.device) -> None:
    """--compile (train, embed, evaluate) uses inductor, which generates code for CPUs and CUDA
    GPUs only: another device is a one-line error."""
    if compiled and device.type not in ("cpu", "cuda"):
        raise click.ClickException(f"--compile works on cpu and cuda, not on {device.type}")


# ----------------------------------------------------------------------------- summary


def parameter_counts(model: MAE) -> dict[str, int]:
    """Parameters per part of the model; the parts add up to the total."""
    parts = {"patch embed": 0, "encoder": 0, "decoder": 0}
    for name, p in model.named_parameters():
        if name.startswith("patch_embed."):
            parts["patch embed"] += p.numel()
        elif name.startswith(("decoder_", "mask_token")):
            parts["decoder"] += p.numel()
        else:  # blocks, final norm, CLS token, trainable positions
            parts["encoder"] += p.numel()
    return {**parts, "total": sum(parts.values())}


def count_flops(run) -> int:
    """FLOPs of run() (2 per multiply-add) by torch's FlopCounterMode, which does not know
    SDPA's fused CPU kernel: it is counted here like the fused GPU kernels (q k^T and p v)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, **kwargs):
        return sdpa_flop_count(query, key, value)

    cpu_kernel = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_kernel) as counter:
        run()
    return counter.get_total_flops()


def describe_blocks(blocks: nn.ModuleList, dim: int, num_tokens: int) -> list[str]:
    """Width, depth, heads, MLP sizes and windows of one stack of blocks, read off the modules
    (windows counted over the num_tokens patches of a clip)."""
    if not blocks:
        return [f"dim {dim}, depth 0"]
    block, attn = blocks[0], blocks[0].attn
    if isinstance(block, ViTBlock):
        kind, mlp = "ViT blocks", f"mlp hidden {block.mlp.fc1.out_features}"
    else:
        kind = "transformer++ blocks"
        mlp = f"ffn hidden {block.ffn1.fc1.out_features}, swiglu hidden {block.ffn2.value.out_features}"
    lines = [f"dim {dim}, depth {len(blocks)}, {attn.num_heads} heads of {attn.head_dim}, {mlp} ({kind})"]
    if isinstance(attn, MultiWindowAttention):
        counts = [num_tokens // min(w, num_tokens) for w in attn.windows]
        bias = "relative position bias" if len(attn.rel_pos) else "no relative position bias"
        lines.append(f"windows per head {attn.windows} tokens -> {counts} windows over "
                     f"{num_tokens} tokens, {bias}")
    return lines


def describe_part(part: str, lines: list[str]) -> list[str]:
    return [f"{part if i == 0 else '':<12} {line}" for i, line in enumerate(lines)]


def summary_lines(name: str, model: MAE) -> list[str]:
    """What a reader wants to know about a model before training it."""
    cfg = model.cfg
    (T, F_), (pt, pf), (gt, gf) = cfg.input_size, cfg.patch_size, cfg.grid
    kept = int(cfg.num_patches * (1 - cfg.mask_ratio) + 1e-6)  # as random_masking
    return [
        f"{name}",
        f"input        {T} x {F_} log-mel (time frames x mel bins), {T / 100:g} s",
        f"patches      {pt} x {pf} -> {gt} x {gf} = {cfg.num_patches} tokens of {pt * pf} values, "
        f"CLS token: {'yes' if cfg.cls_token else 'no'}",
        f"masking      ratio {cfg.mask_ratio:g}: {kept} tokens kept, {cfg.num_patches - kept} masked",
        *describe_part("encoder", describe_blocks(model.blocks, cfg.embed_dim, cfg.num_patches)),
        *describe_part("decoder", describe_blocks(model.decoder_blocks, cfg.decoder_dim, cfg.num_patches)),
        f"embedding    {cfg.embedding_size} per frame of {pt * 10} ms ({gf} x {cfg.embed_dim})",
        "parameters",
        *[f"  {part:<30} {count:>13,}" for part, count in parameter_counts(model).items()],
        f"FLOPs per {T / 100:g}-s clip, forward",
        *[f"  {what:<30} {count / 1e9:>9.2f} GFLOP" for what, count in clip_flops(model).items()],
    ]


def clip_flops(model: MAE) -> dict[str, int]:
    """Forward FLOPs of one clip: as an embedding model and as in pretraining."""
    x = torch.randn(1, *model.cfg.input_size)
    return {"embeddings (unmasked encoder)": count_flops(lambda: model.forward_features(x)),
            "training forward (masked)": count_flops(lambda: model(x))}


def check_lines(model: MAE, batch: int = 2) -> list[str]:
    """One forward pass on random input: the shape of every output."""
    x = torch.randn(batch, *model.cfg.input_size)
    with torch.no_grad():
        loss, pred, mask = model(x)
        features = model.forward_features(x)
    return [f"check: forward pass on random input {tuple(x.shape)}",
            f"  loss     {tuple(loss.shape)} = {loss.item():.4f}",
            f"  pred     {tuple(pred.shape)} (batch, tokens, values per patch)",
            f"  mask     {tuple(mask.shape)} with {int(mask[0].sum())} masked per clip",
            f"  features {tuple(features.shape)} (batch, frames, embedding)"]


@click.command(context_settings=dict(show_default=True))
@click.argument("preset", default="mwmae-base")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a config field, e.g. --set decoder_depth=2 (repeatable).")
@click.option("--check", is_flag=True, help="Also run one forward pass and print the output shapes.")
def main(preset: str, overrides: tuple[str, ...], check: bool):
    """The summary of model PRESET: patch grid, masking, block widths, windows, parameters per
    part and FLOPs per clip. Presets: mae-*, mwmae-*, audiomaepp-* (e.g. mwmae-tiny)."""
    try:
        model = build(preset, **parse_overrides(overrides)).eval()
    except ValueError as error:  # an unknown preset or field, a config that does not fit
        raise click.ClickException(str(error)) from None
    except TypeError as error:  # e.g. --set depth=four
        raise click.ClickException(f"a --set value of the wrong type ({error})") from None
    name = " ".join((preset, *(f"--set {item}" for item in overrides)))
    for line in summary_lines(name, model) + (check_lines(model) if check else []):
        click.echo(line)


if __name__ == "__main__":
    main()
