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

Presets by name: `build("mwmae-base")`, with keyword overrides. Checkpoints are
safetensors files holding the weights and the config (`save_pretrained`,
`load_pretrained`); nothing is unpickled when loading.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import files
from attention import Attention, MultiWindowAttention, window_sizes

LN_EPS = 1e-6  # both releases use LayerNorm eps 1e-6


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


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A model file that cannot be loaded: the message names the file and what is wrong."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint (a torch file of tensors and plain containers), read with
    weights_only=True: nothing pickled is executed. Any problem raises CheckpointError."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (needs 'config' and 'model')")
    return checkpoint


def save_pretrained(model: MAE, path: str | Path) -> None:
    """Weights and config in one safetensors file (the config in its metadata)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "mwmae-torch", "config": json.dumps(model.cfg.to_dict())}
    files.atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> MAE:
    """A model from save_pretrained's safetensors file, or from a training checkpoint
    (a torch file with 'config' and 'model'; read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path}: safetensors file without a model config (not written by save_pretrained)")
        config, state = json.loads(metadata["config"]), load_file(str(path), device=str(map_location))
    else:
        checkpoint = read_checkpoint(path, map_location)
        config, state = checkpoint["config"], checkpoint["model"]
    model = MAE(MAEConfig(**config))
    model.load_state_dict(state)
    return model.to(map_location)
