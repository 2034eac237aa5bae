"""The reader's summaries: `python mae.py PRESET` and `python attention.py`."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import attention
import mae

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def parameters_printed(output: str) -> dict[str, int]:
    """{'patch embed': ..., 'encoder': ..., 'decoder': ..., 'total': ...} from the summary."""
    rows = re.findall(r"^  (patch embed|encoder|decoder|total) +([\d,]+)$", output, re.MULTILINE)
    return {part: int(count.replace(",", "")) for part, count in rows}


@pytest.mark.parametrize("preset", ["mae-tiny", "mwmae-tiny", "audiomaepp-tiny"])
def test_printed_parameter_count_is_the_models(preset):
    result = CliRunner().invoke(mae.main, [preset, "--set", "depth=2"])
    assert result.exit_code == 0, result.output
    printed = parameters_printed(result.output)
    assert printed["total"] == sum(p.numel() for p in mae.build(preset, depth=2).parameters())
    assert printed["patch embed"] + printed["encoder"] + printed["decoder"] == printed["total"]


def test_mwmae_summary_shows_grid_masking_and_windows():
    result = CliRunner().invoke(mae.main, ["mwmae-tiny", "--set", "depth=1", "--check"])
    assert result.exit_code == 0, result.output
    for line in ("4 x 16 -> 50 x 5 = 250 tokens", "50 tokens kept, 200 masked",
                 "windows per head [2, 5, 10, 25, 50, 125, 250, 250] tokens -> [125, 50, 25, 10, 5, 2, 1, 1]",
                 "pred     (2, 250, 64)", "mask     (2, 250) with 200 masked", "features (2, 50, 960)"):
        assert line in result.output
    assert float(re.search(r"embeddings \(unmasked encoder\) +([\d.]+) GFLOP", result.output)[1]) > 0


def test_flops_count_the_attention_kernels():
    """The embedding FLOPs of a 1-block encoder: 2 per multiply-add of the patch embedding,
    the block's matrix products and attention (q k^T and p v over 250 tokens)."""
    model = mae.build("mae-tiny", depth=1)
    n, D = 251, 192  # 250 patches + CLS
    patches = 2 * 250 * 64 * D
    linears = 2 * n * D * (3 * D + D + 4 * D + 4 * D)
    attention_products = 2 * 2 * n * n * D
    assert mae.clip_flops(model)["embeddings (unmasked encoder)"] == patches + linears + attention_products


def one_line_error(result) -> bool:
    """A click command that stopped with one 'Error: ...' line and no traceback."""
    return (result.exit_code == 1 and isinstance(result.exception, SystemExit)
            and result.output.splitlines()[-1].startswith("Error: ") and "Traceback" not in result.output)


def test_misspelt_preset_is_one_line():
    result = run_script("mae.py", "mwmae-bse")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: unknown model 'mwmae-bse'") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["mwmae-tiny", "--set", "depth=four"], ["mwmae-tiny", "--set", "nonsense=1"],
                                  ["mwmae-tiny", "--set", "patch_size=[3,3]"]])
def test_bad_override_is_one_line(args):
    assert one_line_error(CliRunner().invoke(mae.main, args))


def test_attention_command_checks_the_layer():
    result = run_script("attention.py")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ +6 +250 +1 +62500 +62500 +1\.000$", result.stdout, re.MULTILINE)  # a global head
    assert re.search(r"^ +0 +2 +125 +500 +62500 +0\.008$", result.stdout, re.MULTILINE)
    difference = float(re.search(r"max \|fast - reference\| .*: (\S+)", result.stdout)[1])
    assert difference < 1e-5


def test_attention_command_fails_on_a_wrong_layer(monkeypatch):
    reference = attention.multiwindow_attention_reference

    def off_by_a_little(attn, x, positions=None):
        return reference(attn, x, positions) + 1e-3

    monkeypatch.setattr(attention, "multiwindow_attention_reference", off_by_a_little)
    result = CliRunner().invoke(attention.main, ["--tokens", "20", "--dim", "24"])
    assert one_line_error(result) and "differs from the reference" in result.output


@pytest.mark.parametrize("args", [["--tokens", "100"], ["--windows", "2,3"], ["--windows", "2,x"],
                                  ["--dim", "100"]])
def test_attention_command_rejects_bad_options_in_one_line(args):
    assert one_line_error(CliRunner().invoke(attention.main, args))
