"""MAE / MW-MAE / AudioMAE++ against outputs of the authors' official code (tests/fixtures).

Tolerances: 1e-5 absolute for MW-MAE and MAE, 2e-5 for AudioMAE++ (fixtures/README.md): the
official outputs are float32; an independent float64 re-implementation lands within 2.5e-6
(4.9e-6 for AudioMAE++), and the tolerance still catches an LN eps of 1e-5 (3e-5), exact GELU
(5.7e-4) and mis-mapped biases, LayerNorms or bias tables (> 0.2), as the sensitivity tests show.
"""
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import checkpoints
import convert
import mae

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MWMAE_CHECKPOINT = FIXTURES / "mwmae_jax/mwmae/checkpoint/checkpoint_0.gz"
SMALL = dict(depth=2, decoder_dim=128, decoder_depth=2)  # the fixtures' small official configs


def load(path):
    return dict(np.load(FIXTURES / path))


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def init_params(model: str) -> dict:
    """The official init params of "mwmae" or "mae". Parameters that exist twice are stored
    once (fixtures/README.md): MW-MAE's are the checkpoint's except the perturbed ones, MAE's
    equal MW-MAE's where the shared seed made them equal. Each rebuilt tensor is checked
    against the SHA-256 of the original file's tensor, so the parity tests see exactly it."""
    if model == "mwmae":
        params = {**convert.read_flax_checkpoint(MWMAE_CHECKPOINT),
                  **load("mwmae_jax/mwmae/params_init_of_perturbed_keys.npz")}
    else:
        params = {**init_params("mwmae"), **load("mwmae_jax/mae/params_not_in_mwmae.npz")}
    expected = json.loads((FIXTURES / f"mwmae_jax/{model}/params_sha256.json").read_text())
    params = {key: params[key] for key in expected}
    for key, value in params.items():
        assert [list(value.shape), value.dtype.name, sha256(value)] == \
            [expected[key]["shape"], expected[key]["dtype"], expected[key]["sha256"]], key
    return params


def mwmae_jax_model(name: str, params: dict, **overrides) -> mae.MAE:
    model = mae.build(name, trainable_pos=True, **SMALL, **overrides).eval()
    model.load_state_dict(convert.flax_to_state_dict(params))
    return model


def audiomaepp_model(state: dict, **overrides) -> mae.MAE:
    model = mae.build("audiomaepp-tiny", **{**SMALL, "reuse_norm2": True, **overrides}).eval()
    model.load_state_dict(convert.audiomaepp_to_state_dict(state))
    return model


def official_audiomaepp_layout(features: torch.Tensor) -> torch.Tensor:
    """The release's forward_features reads time-major tokens as if frequency-major
    ('b (f t) d -> b t (f d)'): row t' = concat_f' tokens[f' * 50 + t']. Test-only, to
    prove the weight mapping against its scrambled fixture."""
    B, T, FD = features.shape
    tokens = features.reshape(B, T * 5, FD // 5)
    return tokens.reshape(B, 5, T, FD // 5).permute(0, 2, 1, 3).reshape(B, T, FD)


def run(model: mae.MAE, x: np.ndarray, noise: np.ndarray) -> dict:
    x, noise = torch.from_numpy(x), torch.from_numpy(noise)
    with torch.no_grad():
        loss, pred, mask = model(x, noise)
        latent, _, _ = model.forward_encoder(x, model.cfg.mask_ratio, noise)
        features = model.forward_features(x)
    return dict(loss=loss, pred=pred, mask=mask, latent=latent, features=features)


def compare(ours: dict, ref, tol: float) -> float:
    """Largest deviation over every output the reference holds; asserts each within tol."""
    worst = 0.0
    for key in ("pred", "latent", "mask", "loss", "features"):
        if key in ref:
            diff = np.abs(ours[key].numpy() - ref[key]).max()
            assert diff <= tol + tol * np.abs(ref[key]).max(), f"{key}: max |diff| {diff:.3g} > {tol}"
            worst = max(worst, diff)
    if "features_b0" in ref:  # perturbed sets store the first row and the scene embedding
        for ours_f, key in ((ours["features"][:1], "features_b0"), (ours["features"].mean(1), "features_time_mean")):
            diff = np.abs(ours_f.numpy() - ref[key]).max()
            assert diff <= tol, f"{key}: max |diff| {diff:.3g} > {tol}"
            worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------- the cases

def mwmae_io(perturbed: bool):
    io = load("mwmae_jax/mwmae/io.npz")
    if perturbed:  # the perturbed weights are the ones inside the official checkpoint file
        params = convert.read_flax_checkpoint(MWMAE_CHECKPOINT)
        return params, load("mwmae_jax/mwmae/io_perturbed.npz"), io
    return init_params("mwmae"), io, io


def mae_io(perturbed: bool):
    io, params = load("mwmae_jax/mae/io.npz"), init_params("mae")
    if perturbed:
        return {**params, **load("mwmae_jax/mae/params_perturbed_override.npz")}, load("mwmae_jax/mae/io_perturbed.npz"), io
    return params, io, io


def audiomaepp_io(perturbed: bool):
    io = load("audiomaepp/io.npz")
    state = torch.load(FIXTURES / "audiomaepp/state_dict.pt", weights_only=True)
    if perturbed:
        override = {k: torch.from_numpy(v) for k, v in load("audiomaepp/params_perturbed_override.npz").items()}
        return {**state, **override}, load("audiomaepp/io_perturbed.npz"), io
    return state, io, io


@pytest.mark.parametrize("perturbed", [False, True])
def test_mwmae_matches_official(perturbed):
    params, ref, io = mwmae_io(perturbed)
    ours = run(mwmae_jax_model("mwmae-tiny", params), io["x"][..., 0], io["noise"])
    compare(ours, ref, 1e-5)


@pytest.mark.parametrize("perturbed", [False, True])
def test_mae_matches_official(perturbed):
    params, ref, io = mae_io(perturbed)
    ours = run(mwmae_jax_model("mae-tiny", params), io["x"][..., 0], io["noise"])
    compare(ours, ref, 1e-5)


@pytest.mark.parametrize("perturbed", [False, True])
def test_audiomaepp_matches_official(perturbed):
    state, ref, io = audiomaepp_io(perturbed)
    ours = run(audiomaepp_model(state), io["x"][:, 0], io["noise"])
    ours["features"] = official_audiomaepp_layout(ours["features"])
    compare(ours, ref, 2e-5)


def test_mwmae_block_intermediates():
    """Every block output of the official forward (first batch element)."""
    params, io, _ = mwmae_io(False)
    model = mwmae_jax_model("mwmae-tiny", params)
    captured = {}

    def keep_first(key):
        def hook(module, args, out):
            captured.setdefault(key, out)
        return hook

    for name, blocks in (("encoder_block", model.blocks), ("decoder_block", model.decoder_blocks)):
        for i, block in enumerate(blocks):
            block.register_forward_hook(keep_first(f"inter/{name}_{i:02d}"))
    run(model, io["x"][..., 0], io["noise"])  # the first call of each block is the masked forward
    for key, value in captured.items():
        assert np.abs(value[:1].numpy() - io[key]).max() <= 1e-5, key


# ----------------------------------------------------------------------------- the tests can fail

def perturbed_pred_error(case, build) -> float:
    state, ref, io = case(True)
    model = build(state)
    x = io["x"][..., 0] if io["x"].ndim == 4 and io["x"].shape[-1] == 1 else io["x"][:, 0]
    return np.abs(run(model, x, io["noise"])["pred"].numpy() - ref["pred"]).max()


def test_parity_detects_wrong_numerics(monkeypatch):
    """Each classic porting mistake pushes pred far beyond the tolerance."""
    def flip_bias(model):
        for block in model.decoder_blocks:
            for table in block.attn.rel_pos.values():
                table.data = table.data.flip(0)  # bias[i, j] = table[j - i + w - 1]
        return model

    def exact_gelu(model):
        for block in model.blocks:
            block.mlp.act.approximate = "none"
        return model

    assert perturbed_pred_error(mwmae_io, lambda p: flip_bias(mwmae_jax_model("mwmae-tiny", p))) > 1e-2
    assert perturbed_pred_error(mwmae_io, lambda p: exact_gelu(mwmae_jax_model("mwmae-tiny", p))) > 1e-4
    assert perturbed_pred_error(audiomaepp_io, lambda s: audiomaepp_model(s, reuse_norm2=False)) > 1e-1
    monkeypatch.setattr(mae, "LN_EPS", 1e-5)
    assert perturbed_pred_error(mae_io, lambda p: mwmae_jax_model("mae-tiny", p)) > 1e-5
    monkeypatch.setattr(mae, "LN_EPS", 1e-6)
    params, ref, io = mwmae_io(True)
    fixed_pos = mae.build("mwmae-tiny", **SMALL).eval()  # sin-cos tables, not the trained ones
    state = {k: v for k, v in convert.flax_to_state_dict(params).items() if "pos_embed" not in k}
    fixed_pos.load_state_dict(state, strict=False)
    assert np.abs(run(fixed_pos, io["x"][..., 0], io["noise"])["pred"].numpy() - ref["pred"]).max() > 1e-2


# ----------------------------------------------------------------------------- our own behaviour

def test_position_tables_match_official_formula():
    """Fixed sin-cos tables equal the official init tables. Those were computed by XLA in
    float32, which loses ~1e-5 at the 1-D table's arguments up to 249 rad; ours are float64-exact."""
    params = init_params("mwmae")
    model = mae.build("mwmae-tiny", **SMALL)
    assert np.abs(model.pos_embed.numpy() - params["pos_embed"]).max() < 1e-5
    assert np.abs(model.decoder_pos_embed.numpy() - params["decoder_pos_embed"]).max() < 2e-5


@pytest.mark.parametrize("patch, input_size, heads", [
    ((4, 16), (200, 80), 8), ((5, 5), (200, 80), 16), ((8, 8), (200, 80), 8), ((16, 4), (192, 80), 20),
])
def test_patch_sizes(patch, input_size, heads):
    model = mae.build("mwmae-tiny", depth=1, decoder_depth=1, decoder_dim=120 if heads == 20 else 96,
                      patch_size=patch, input_size=input_size)
    assert model.decoder_blocks[0].attn.num_heads == heads
    x = torch.randn(2, *input_size)
    loss, pred, mask = model(x)
    L = model.cfg.num_patches
    assert pred.shape == (2, L, patch[0] * patch[1]) and mask.shape == (2, L)
    assert int(mask[0].sum()) == L - int(L * 0.2 + 1e-6)
    loss.backward()
    T_, F_ = model.cfg.grid
    assert model.forward_features(x).shape == (2, T_, F_ * 192)
    # patchify is the inverse of the patch layout: patch n = t * F' + f holds rows/cols of that cell
    target = model.patchify(x)
    t, f = 1, F_ - 1
    cell = x[0, t * patch[0]:(t + 1) * patch[0], f * patch[1]:(f + 1) * patch[1]]
    assert torch.equal(target[0, t * F_ + f], cell.reshape(-1))


def test_bad_patch_size_is_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        mae.build("mae-tiny", patch_size=(16, 4))  # 200 frames are not a multiple of 16


def test_masking_is_driven_by_noise():
    model = mae.build("mae-tiny", depth=1, decoder_depth=1)
    noise = torch.rand(3, 250)
    x = torch.randn(3, 200, 80)
    _, _, mask = model(x, noise)
    keep = torch.argsort(noise, 1)[:, :50]
    expected = torch.ones(3, 250).scatter(1, keep, 0.0)
    assert torch.equal(mask, expected)


def test_loss_ignores_visible_patches():
    model = mae.build("mae-tiny", depth=1, decoder_depth=1)
    x, noise = torch.randn(2, 200, 80), torch.rand(2, 250)
    loss, pred, mask = model(x, noise)
    pred2 = pred.detach().clone()
    pred2[mask == 0] = 100.0
    manual = (((pred.detach() - model.patchify(x)) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(model.forward_loss(x, pred2, mask), manual)
    norm_model = mae.build("mae-tiny", depth=1, decoder_depth=1, norm_pix_loss=True)
    assert not torch.allclose(norm_model.forward_loss(x, pred.detach(), mask), manual)


def test_presets():
    for name in mae.PRESETS:
        cfg = mae.preset_config(name)
        family, size = name.split("-")
        assert cfg.embed_dim == mae.SIZES[size][0] and cfg.embedding_size == 5 * cfg.embed_dim
        assert cfg.cls_token == (family != "mwmae")
        assert cfg.decoder_multiwindow == (family == "mwmae")
    assert mae.preset_config("audiomaepp-large").decoder_dim == 512
    with pytest.raises(ValueError, match="unknown model"):
        mae.build("mwmae-gigantic")


@pytest.mark.parametrize("overrides", [
    dict(block="plusplus", decoder_multiwindow=True),        # transformer++ with an MW-MHA decoder
    dict(encoder_multiwindow=True, cls_token=False),          # MW-MHA in the encoder too
    dict(rope=True),
])
def test_combinations(overrides):
    model = mae.build("mae-tiny", depth=1, decoder_depth=1, **overrides)
    x = torch.randn(2, 200, 80)
    loss, _, _ = model(x)
    loss.backward()
    assert torch.isfinite(loss) and model.forward_features(x).shape == (2, 50, 960)


def test_checkpoint_roundtrip(tmp_path):
    model = mae.build("audiomaepp-tiny", depth=1, decoder_depth=1, trainable_pos=True).eval()
    checkpoints.save_pretrained(model, tmp_path / "m.safetensors")
    loaded = checkpoints.load_pretrained(tmp_path / "m.safetensors").eval()
    assert loaded.cfg == model.cfg
    x = torch.randn(1, 200, 80)
    assert torch.equal(model.forward_features(x), loaded.forward_features(x))
    assert not list(tmp_path.glob("*.tmp"))
    torch.save({"config": model.cfg.to_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    assert torch.equal(checkpoints.load_pretrained(tmp_path / "ckpt.pt").eval().forward_features(x), model.forward_features(x))
    with pytest.raises(FileNotFoundError):
        checkpoints.load_pretrained(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- --device

def test_device_names(monkeypatch):
    assert mae.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mae, "has_torch_xla", lambda: False)
    assert mae.device("auto") == torch.device("cpu")
    for name, problem in [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                          ("xla", "torch_xla, which is not installed"), ("gpu", "unknown device 'gpu'")]:
        with pytest.raises(ValueError, match=problem):
            mae.device(name)


@pytest.mark.parametrize("module", ["train", "embed", "bench", "evaluate"])
def test_every_command_refuses_an_unavailable_device_in_one_line(module, monkeypatch):
    """The same --device option in every command, resolved before any work is done."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command = importlib.import_module(module).main
    args = {"embed": ["mwmae-tiny", ".", "--out", "unused"],
            "evaluate": ["run", "mwmae-tiny", "."]}.get(module, [])
    result = CliRunner().invoke(command, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == "Error: Invalid value for '--device': CUDA is not available on this machine"
