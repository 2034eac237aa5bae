"""The README's Python examples run verbatim, from a folder outside the repository (with the
repository on PYTHONPATH, as the README says), on a clip shorter than 2 s, and every shape
written in a comment (`name = ...  # (1, 50, 960)`) is the shape the line produces."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import checkpoints
import mae

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHAPE = re.compile(r"\((\d+(?:, \d+)*)\)")
SHAPED_LINE = re.compile(r"^(\w+(?:, \w+)*) = .*?#\s*(\(\d+(?:, \d+)*\)(?:, \(\d+(?:, \d+)*\))*)")


def python_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def with_shape_checks(code: str) -> str:
    """The block with an assert after each top-level line whose comment starts with shapes:
    one shape per name on the left of `=`."""
    out = []
    for line in code.splitlines():
        out.append(line)
        match = SHAPED_LINE.match(line)
        if match:
            names = match.group(1).split(", ")
            shapes = [tuple(int(n) for n in s.split(", ")) for s in SHAPE.findall(match.group(2))]
            assert len(names) == len(shapes), f"README: {len(names)} names but {len(shapes)} shapes in: {line}"
            for name, shape in zip(names, shapes):
                message = f"README line {line.strip()!r}: {name}.shape is "
                out.append(f"assert tuple({name}.shape) == {shape}, {message!r} + str(tuple({name}.shape))")
    return "\n".join(out) + "\n"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the repository with the files the examples name: a 1.3-s clip and
    a model where train.py's demo run writes it (same config as that run)."""
    rng = np.random.default_rng(0)
    t = np.arange(20800) / 16000
    clip = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(tmp_path / "clip.flac", clip.astype(np.float32), 16000)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    demo = mae.build("mwmae-tiny", depth=2, decoder_depth=1, decoder_dim=128)
    checkpoints.save_pretrained(demo, tmp_path / "runs" / "demo" / "model.safetensors")
    assert ROOT not in tmp_path.parents
    return tmp_path


def test_readme_has_python_examples_with_shapes():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert sum(bool(SHAPED_LINE.match(line)) for b in blocks for line in b.splitlines()) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_example_runs(outside, index):
    code = with_shape_checks(python_blocks()[index])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_shape_checks_catch_a_wrong_comment(outside):
    """The checks above can fail: a wrong shape in a comment is reported."""
    code = with_shape_checks("import numpy\nx = numpy.zeros((1, 50, 960))   # (1, 50, 3840)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=outside, capture_output=True, text=True)
    assert result.returncode != 0 and "x.shape is (1, 50, 960)" in result.stderr
