"""MW-MHA against the plain per-head reference (float64), locality, and the all-global case."""
import math

import pytest
import torch
import torch.nn.functional as F

from attention import (TRUNCATED_NORMAL_STD, Attention, MultiWindowAttention, multiwindow_attention_reference,
                       set_backend, window_runs, window_sizes)


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_window_rule():
    assert window_sizes(250) == [2, 5, 10, 25, 50, 125, 250, 250]
    assert len(window_sizes(640)) == 16  # 5 x 5 patches: 40 x 16 grid


def test_window_runs_group_consecutive_heads():
    assert window_runs(window_sizes(250)) == [
        (2, range(0, 1)), (5, range(1, 2)), (10, range(2, 3)), (25, range(3, 4)),
        (50, range(4, 5)), (125, range(5, 6)), (250, range(6, 8))]
    assert window_runs([250, 2, 2, 250]) == [(250, range(0, 1)), (2, range(1, 3)), (250, range(3, 4))]


def test_truncated_normal_std():
    """The constant is the std of N(0, 1) truncated to [-2, 2], so dividing by it gives
    truncated samples the wanted std."""
    density, inside = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    assert TRUNCATED_NORMAL_STD == pytest.approx(math.sqrt(1 - 4 * density / inside), abs=1e-15)
    samples = torch.nn.init.trunc_normal_(torch.empty(1_000_000), std=0.1 / TRUNCATED_NORMAL_STD,
                                          a=-0.2 / TRUNCATED_NORMAL_STD, b=0.2 / TRUNCATED_NORMAL_STD)
    assert samples.std() == pytest.approx(0.1, rel=0.01)


def test_reference_with_rope_and_positions():
    attn = MultiWindowAttention(48, [2, 5, 10, 10, 50, 50], 50, rope=True)
    randomise(attn)
    x, positions = torch.randn(2, 50, 48), torch.randperm(50).expand(2, -1)
    assert (attn(x, positions) - multiwindow_attention_reference(attn, x, positions)).abs().max() <= 1e-10


@pytest.mark.parametrize("windows", [
    [2, 5, 10, 25, 50, 125, 250, 250],   # the paper's decoder
    [250, 2, 10, 2, 250, 5],             # heads of a size not adjacent: regrouped and restored
])
@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_equals_reference(windows, rel_pos_bias):
    attn = MultiWindowAttention(6 * len(windows), windows, 250, rel_pos_bias=rel_pos_bias)
    randomise(attn)
    x = torch.randn(2, 250, 6 * len(windows))
    assert (attn(x) - multiwindow_attention_reference(attn, x)).abs().max() <= 1e-10


def test_short_sequence_clips_windows():
    """The encoder's 50 visible tokens: windows above 50 act as global heads."""
    attn = MultiWindowAttention(48, window_sizes(250), 250)
    randomise(attn)
    x = torch.randn(2, 50, 48)
    assert (attn(x) - multiwindow_attention_reference(attn, x)).abs().max() <= 1e-10


@pytest.mark.parametrize("w", [2, 5, 25])
def test_windowed_head_is_local(w):
    """d out_i / d x_j = 0 whenever i and j fall in different windows."""
    attn = MultiWindowAttention(8, [w], 50)
    randomise(attn)
    x = torch.randn(1, 50, 8, requires_grad=True)
    out = attn(x)
    for i in (0, w - 1, w, 49):
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        touched = grad[0].abs().sum(-1) > 0  # (n,)
        window = torch.arange(50) // w == i // w
        assert torch.equal(touched, window)


def test_all_global_equals_standard_mha():
    mha, mw = Attention(64, 8), MultiWindowAttention(64, [100] * 8, 100)
    randomise(mha)
    mw.load_state_dict(mha.state_dict())  # global heads have no bias tables
    x = torch.randn(3, 100, 64)
    assert (mha(x) - mw(x)).abs().max() <= 1e-12
    q = torch.randn(3, 8, 100, 8)
    assert torch.allclose(F.scaled_dot_product_attention(q, q, q), (q @ q.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ q)


def test_rope_is_relative():
    """With RoPE, shifting all positions leaves attention unchanged."""
    attn = MultiWindowAttention(32, [10, 10, 50, 50], 50, rope=True)
    randomise(attn)
    x = torch.randn(2, 50, 32)
    pos = torch.arange(50).expand(2, -1)
    assert (attn(x, pos) - attn(x, pos + 7)).abs().max() <= 1e-10
    assert (attn(x, pos) - attn(x, pos.flip(1))).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("windows, n, rel_pos_bias", [
    ([2, 5, 10, 25, 50, 125, 250, 250], 250, True),   # the paper's decoder
    ([2, 5, 10, 25, 50, 125, 250, 250], 250, False),
    ([2, 5, 10, 25, 50, 125, 250, 250], 50, True),    # the encoder's visible tokens: windows clipped
    ([250, 2, 10, 2, 250, 5], 250, True),             # heads of a size not adjacent
])
def test_flex_backend_equals_reshape(windows, n, rel_pos_bias):
    """The FlexAttention backend (one call, block-diagonal mask, bias as score_mod) against
    the reshape backend. On CPU torch runs flex unfused and for inference only."""
    attn = MultiWindowAttention(4 * len(windows), windows, 250, rel_pos_bias=rel_pos_bias)
    randomise(attn)
    x = torch.randn(2, n, 4 * len(windows))
    with torch.no_grad():
        reshaped = attn(x)
        set_backend(attn, "flex")
        flexed = attn(x)
    assert attn.backend == "flex" and attn.block_masks  # the flex path really ran
    assert (flexed - reshaped).abs().max() <= 1e-10


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        MultiWindowAttention(16, [2, 8], 8, backend="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
def test_flex_backend_gradients_on_cuda():
    """Compiled FlexAttention: output and every parameter gradient (bias tables included)
    against the reshape backend, in float32 on the GPU."""
    torch.set_default_dtype(torch.float32)
    windows = [2, 5, 10, 25, 50, 125, 250, 250]
    reshape = MultiWindowAttention(8 * len(windows), windows, 250, backend="reshape").cuda()
    randomise(reshape)
    flex = MultiWindowAttention(8 * len(windows), windows, 250, backend="flex").cuda()
    flex.load_state_dict(reshape.state_dict())
    x = torch.randn(2, 250, 8 * len(windows), device="cuda")
    outputs = [module(x) for module in (reshape, flex)]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-4
    for out in outputs:
        out.square().sum().backward()
    for (name, p_reshape), p_flex in zip(reshape.named_parameters(), flex.parameters()):
        scale = p_reshape.grad.abs().max()
        assert (p_reshape.grad - p_flex.grad).abs().max() <= 1e-3 * scale, name
