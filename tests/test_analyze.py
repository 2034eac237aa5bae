"""analyze.py and attention.attention_maps: probabilities, distances on the patch grid, PWCCA
against an independent float64 reference, and the command on generated clips."""
import json
import math

import numpy as np
import pytest
import scipy.linalg
import soundfile
import torch
from click.testing import CliRunner

import analyze
import checkpoints
import embed
import mae
from attention import Attention, MultiWindowAttention, attention_maps, window_sizes


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


LAYERS = {
    "windows + bias": lambda: MultiWindowAttention(48, window_sizes(250), 250),
    "windows, no bias": lambda: MultiWindowAttention(48, window_sizes(250), 250, rel_pos_bias=False),
    "windows + rope": lambda: MultiWindowAttention(48, window_sizes(250), 250, rope=True),
    "standard": lambda: Attention(48, 3),
}


# ----------------------------------------------------------------------------- attention_maps

@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("n", [250, 50])  # 50: the encoder's visible tokens clip the windows
def test_maps_reproduce_the_forward(float64, kind, n):
    """probs @ v per head, heads concatenated, W_O: the layer's own output."""
    attn = randomised(LAYERS[kind]())
    x = torch.randn(2, n, 48)
    with torch.no_grad():
        maps = attention_maps(attn, x)
        recomputed = attn.proj(maps.head_outputs.transpose(1, 2).flatten(2))
        assert (recomputed - attn(x)).abs().max() <= 1e-10


@pytest.mark.parametrize("kind", LAYERS)
def test_probabilities_sum_to_one_and_vanish_outside_each_window(float64, kind):
    attn = randomised(LAYERS[kind]())
    with torch.no_grad():
        probs = attention_maps(attn, torch.randn(2, 250, 48)).probs  # (B, H, n, n)
    assert (probs.sum(-1) - 1).abs().max() <= 1e-12
    i = torch.arange(250)
    windows = getattr(attn, "windows", [250] * attn.num_heads)
    for h, w in enumerate(windows):
        inside = i[:, None] // w == i[None, :] // w  # token i and j share a window of head h
        assert torch.all(probs[:, h][:, ~inside] == 0)
        assert torch.all(probs[:, h][:, inside] > 0)


# ----------------------------------------------------------------------------- statistics on the grid

def test_distances_are_measured_on_the_time_frequency_grid():
    """All 250 queries of a 50 x 5 grid attending to token 0 (t = 0, f = 0): mean time distance
    (0 + ... + 49) / 50 = 24.5 patches, frequency (0 + ... + 4) / 5 = 2 (a transposed grid would
    swap them), entropy 0; uniform attention has entropy log(250)."""
    one_key = torch.zeros(1, 1, 250, 250)
    one_key[..., 0] = 1
    stats = analyze.layer_statistics(one_key, prefix=0, grid=(50, 5))
    assert stats["time"][0, 0] == pytest.approx(24.5)
    assert stats["freq"][0, 0] == pytest.approx(2.0)
    assert stats["entropy"][0, 0] == pytest.approx(0.0)
    uniform = analyze.layer_statistics(torch.full((1, 1, 250, 250), 1 / 250), prefix=0, grid=(50, 5))
    assert uniform["entropy"][0, 0] == pytest.approx(math.log(250))


def test_windowed_decoder_heads_are_local_and_global_heads_are_not():
    """Random-init tiny MW-MAE on 3 crops: a decoder head of window w has mean time distance
    below w patches; the global heads reach further than a 10-token window could."""
    torch.manual_seed(0)
    model = mae.build("mwmae-tiny", depth=1, decoder_depth=2, embed_dim=16, num_heads=2, decoder_dim=32).eval()
    result = analyze.analyse_model("tiny", embed.Embedder(model), torch.randn(3, 200, 80),
                                   seed=0, batch_size=3, tokens_per_crop=10)
    decoder = result["stacks"]["decoder"]
    for windows, distances in zip(decoder["windows"], decoder["distance_time_patches"]):
        assert windows == window_sizes(250)
        for w, distance in zip(windows, distances):
            if w < 250:
                assert distance < w
            else:
                assert distance > 10


# ----------------------------------------------------------------------------- PWCCA

def reference_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """PWCCA from the generalised eigenproblem Sxy Syy^-1 Syx a = rho^2 Sxx a (scipy), with
    a^T Sxx a = 1; weights |<h_i, x_j>| summed over x's neurons, h_i = x a_i of unit length."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    values, vectors = scipy.linalg.eigh(sxy @ np.linalg.solve(syy, sxy.T), sxx)
    k = min(x.shape[1], y.shape[1])
    rho = np.sqrt(np.clip(values[::-1][:k], 0, 1))
    h = x @ vectors[:, ::-1][:, :k]
    h /= np.linalg.norm(h, axis=0)
    weights = np.abs(h.T @ x).sum(1)
    return float(weights @ rho / weights.sum())


@pytest.mark.parametrize("a, b", [(6, 6), (4, 7), (7, 4)])
def test_pwcca_matches_an_independent_reference(a, b):
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(500, 3))
    x = shared @ rng.normal(size=(3, a)) + rng.normal(size=(500, a))
    y = shared @ rng.normal(size=(3, b)) + 0.5 * rng.normal(size=(500, b))
    assert analyze.pwcca(x, y) == pytest.approx(reference_pwcca(x, y), abs=1e-10)
    assert 0.2 < analyze.pwcca(x, y) < 0.9  # a case that tells weights and correlations apart


def test_pwcca_matrix_is_pwcca_of_every_pair():
    rng = np.random.default_rng(2)
    heads = [rng.normal(size=(300, 3)) @ rng.normal(size=(3, 5)) + rng.normal(size=(300, 5)) for _ in range(3)]
    heads.append(heads[0] @ rng.normal(size=(5, 5)))
    expected = [[analyze.pwcca(a, b) for b in heads] for a in heads]
    assert np.abs(analyze.pwcca_matrix(heads) - np.array(expected)).max() <= 1e-10


def test_pwcca_matrix_survives_an_svd_that_does_not_converge(monkeypatch):
    """LAPACK's SVD failed to converge on a real model's heads (float32, a head against itself);
    the eigenproblem fallback must give the same matrix."""
    rng = np.random.default_rng(3)
    heads = [rng.normal(size=(200, 4)).astype(np.float32) for _ in range(3)]
    heads.append(heads[1] @ rng.normal(size=(4, 4)).astype(np.float32))
    expected = analyze.pwcca_matrix(heads)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    assert np.abs(analyze.pwcca_matrix(heads) - expected).max() <= 1e-8
    assert np.allclose(np.diag(expected), 1.0)


def test_pwcca_invariants():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    a = rng.normal(size=(8, 8))  # invertible with probability 1
    assert analyze.pwcca(x, x) == pytest.approx(1.0, abs=1e-10)
    assert analyze.pwcca(x, x @ a) == pytest.approx(1.0, abs=1e-9)
    noise = rng.normal(size=(20000, 5)), rng.normal(size=(20000, 5))
    assert analyze.pwcca(*noise) < 0.03


# ----------------------------------------------------------------------------- the command

@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((0.5, 1.0, 2.5)):  # 1, 1 and 2 crops of 2 s
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t) + 0.01 * rng.normal(size=t.shape)
        soundfile.write(folder / f"clip{i}.wav", wave, 16000)
    (folder / "notes.txt").write_text("not audio")
    return folder


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    model = mae.build("mwmae-tiny", depth=2, decoder_depth=2, embed_dim=16, num_heads=2, decoder_dim=32)
    path = tmp_path / "tiny.safetensors"
    checkpoints.save_pretrained(model, path)
    return path


def test_command_writes_analysis_and_figures(tmp_path, clips, tiny_model):
    out = tmp_path / "out"
    result = CliRunner().invoke(analyze.main, [str(tiny_model), str(tiny_model), str(clips), "--out", str(out),
                                               "--tokens-per-crop", "20"])
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["files"] == 3 and analysis["crops"] == 4  # the 2.5-s clip gives two crops
    assert list(analysis["bad_files"]) == [str(clips / "notes.txt")]
    models = analysis["models"]
    assert list(models) == [str(tiny_model), f"{tiny_model}#2"]
    decoder = models[str(tiny_model)]["stacks"]["decoder"]
    assert np.array(decoder["pwcca"]).shape == (16, 16) and decoder["pwcca_samples"] == 80
    assert np.array(models[str(tiny_model)]["stacks"]["encoder"]["distance_time_ms"]).shape == (2, 2)
    for name in ("entropy.png", "distance.png", "pwcca.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_refuses_bad_input_in_one_line(tmp_path, clips, tiny_model):
    runner = CliRunner()
    not_a_folder = runner.invoke(analyze.main, [str(tiny_model), str(tiny_model), "--out", str(tmp_path / "o")])
    unknown = runner.invoke(analyze.main, ["no-such-model", str(clips), "--out", str(tmp_path / "o")])
    for result in (not_a_folder, unknown):
        assert result.exit_code != 0
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
