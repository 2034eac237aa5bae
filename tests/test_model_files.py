"""Model files that are corrupt, tampered with or not model files at all: every one is refused
with one line naming the file (checkpoints.CheckpointError in the library, "Error: ..." from convert.py),
without tracebacks, without torch's advice to load unsafely, and without allocating what a file
merely claims. Also: convert.py --set keeps the weights, and model files get the usual mode."""
import gzip
import json
import os
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import checkpoints
import convert
import mae

ROOT = Path(__file__).resolve().parents[1]
# mae-tiny shrunk; a global decoder of width 64 with 8 heads, so 16 heads keep every shape.
TINY = dict(depth=1, decoder_depth=1, embed_dim=32, num_heads=2, decoder_dim=64, decoder_heads=8)


def tiny_model() -> mae.MAE:
    torch.manual_seed(0)
    return mae.build("mae-tiny", **TINY)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(tiny_model(), path)
    return path


def run_convert(*args):
    return CliRunner().invoke(convert.main, [str(a) for a in args])


def assert_one_line_error(result, named: str) -> None:
    """convert.py refused: exit 1, one 'Error:' line naming `named`, no exception escaped."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and named in lines[0], result.stderr
    assert "weights_only" not in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- 1. --set keeps weights

def equal_states(a: mae.MAE, b: mae.MAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("override, field, value", [
    ("mask_ratio=0.75", "mask_ratio", 0.75), ("decoder_heads=16", "decoder_heads", 16)])
def test_convert_set_keeps_the_weights(model_file, tmp_path, override, field, value):
    out = tmp_path / "out.safetensors"
    result = run_convert(model_file, "--out", out, "--set", override)
    assert result.exit_code == 0, result.output
    converted = checkpoints.load_pretrained(out)
    assert getattr(converted.cfg, field) == value
    assert equal_states(converted, checkpoints.load_pretrained(model_file))


@pytest.mark.parametrize("override, reason", [
    ("decoder_dim=32", "decoder_embed.weight is (64, 32) in the weights but (32, 32) in the config"),
    ("decoder_heads=48", "decoder_blocks.0.attn.qkv.weight is (192, 64) in the weights but (144, 64)"),
    ("depth=3", "the config says depth=3 but the weights have 1 blocks"),
])
def test_convert_refuses_a_set_that_changes_tensors(model_file, tmp_path, override, reason):
    out = tmp_path / "out.safetensors"
    result = run_convert(model_file, "--out", out, "--set", override)
    assert_one_line_error(result, f"--set {override}")
    assert f"--set {override} does not keep the weights: {reason}" in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- 2. corrupt files

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def edited_header(data: bytes, edit) -> bytes:
    header, body = split_safetensors(data)
    edit(header)
    return join_safetensors(header, body)


def edited_config(data: bytes, edit) -> bytes:
    def change(header):
        config = json.loads(header["__metadata__"]["config"])
        edit(config)
        header["__metadata__"]["config"] = json.dumps(config)
    return edited_header(data, change)


def edited_state(model: mae.MAE, path: Path, edit, config=None) -> None:
    """A safetensors file of the model's config (or `config`) with its state edited."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(state)
    metadata = {"format": "mwmae-torch", "config": json.dumps(config or model.cfg.to_dict())}
    save_file(state, str(path), metadata=metadata)


def set_item(mapping: dict, key, value) -> None:
    mapping[key] = value


BYTE_EDITS = {
    "empty": lambda d: b"",
    "truncated": lambda d: d[: len(d) // 2],
    "truncated-header": lambda d: d[:40],
    "random-bytes": lambda d: np.random.default_rng(0).bytes(4096),
    "header-length-2^62": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "header-length-1e9": lambda d: struct.pack("<Q", 10**9) + d[8:],
    "bad-shape": lambda d: edited_header(d, lambda h: set_item(h["norm.weight"], "shape", [33])),
    "bad-offset": lambda d: edited_header(d, lambda h: set_item(h["norm.weight"], "data_offsets", [0, 10**12])),
    "unknown-dtype": lambda d: edited_header(d, lambda h: set_item(h["norm.weight"], "dtype", "Q99")),
    "integer-dtype": lambda d: edited_header(d, lambda h: set_item(h["norm.weight"], "dtype", "I32")),
    "no-config": lambda d: edited_header(d, lambda h: h["__metadata__"].pop("config")),
    "config-not-json": lambda d: edited_header(d, lambda h: set_item(h["__metadata__"], "config", "{depth: 1")),
    "config-a-list": lambda d: edited_header(d, lambda h: set_item(h["__metadata__"], "config", "[1, 2]")),
    "unknown-config-field": lambda d: edited_config(d, lambda c: set_item(c, "bogus", 1)),
    "config-field-wrong-type": lambda d: edited_config(d, lambda c: set_item(c, "depth", "1")),
    "config-zero-heads": lambda d: edited_config(d, lambda c: set_item(c, "num_heads", 0)),
}
STATE_EDITS = {
    "missing-tensor": lambda s: s.pop("norm.bias"),
    "extra-tensor": lambda s: set_item(s, "blocks.0.extra", torch.zeros(3)),
    "wrong-shape": lambda s: set_item(s, "norm.weight", torch.ones(31)),
}


def bad_file(kind: str, model_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    if kind in BYTE_EDITS:
        path.write_bytes(BYTE_EDITS[kind](model_file.read_bytes()))
    elif kind in STATE_EDITS:
        edited_state(tiny_model(), path, STATE_EDITS[kind])
    elif kind == "truncated-checkpoint":
        path = tmp_path / "checkpoint.pt"
        model = tiny_model()
        torch.save({"config": model.cfg.to_dict(), "model": model.state_dict()}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "checkpoint-config-misfit":
        path = tmp_path / "checkpoint.pt"
        model = tiny_model()
        torch.save({"config": {**model.cfg.to_dict(), "decoder_depth": 5}, "model": model.state_dict()}, path)
    elif kind == "pickled-code":
        path = tmp_path / "evil.pt"
        torch.save({"config": {}, "model": {}, "x": Exploit()}, path)
    return path


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


BAD_KINDS = [*BYTE_EDITS, *STATE_EDITS, "truncated-checkpoint", "checkpoint-config-misfit", "pickled-code"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_corrupt_model_files_give_one_line(model_file, tmp_path, kind):
    path = bad_file(kind, model_file, tmp_path)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_pretrained(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "weights_only" not in message
    assert_one_line_error(run_convert(path, "--out", tmp_path / "out.safetensors"), str(path))


def test_checkpoint_reader_checks_config_against_weights(model_file, tmp_path):
    path = bad_file("checkpoint-config-misfit", model_file, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="decoder_depth=5 but the weights have 1 decoder_blocks"):
        checkpoints.read_checkpoint(path)


def test_convert_cli_errors_are_one_line_in_a_real_process(model_file, tmp_path):
    """The same as above through `python convert.py` (stderr, exit status), a few files at once."""
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    paths = [wav] + [bad_file(kind, model_file, tmp_path)
                     for kind in ("header-length-2^62", "truncated", "pickled-code", "unknown-config-field")]
    runs = [subprocess.Popen([sys.executable, "convert.py", str(path), "--out", str(tmp_path / "o.safetensors")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for path in paths]
    for path, run in zip(paths, runs):
        stdout, stderr = run.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error:"), stderr
        assert str(path) in lines[0] and "Traceback" not in stderr + stdout
        assert "weights_only" not in stderr + stdout and "pwned" not in stdout


# ----------------------------------------------------------------------------- 3. bounded work

PROBE = """
import resource, sys, time
import checkpoints
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        checkpoints.load_pretrained(path)
        print("loaded", path)
    except checkpoints.CheckpointError as error:
        print("refused", round(time.perf_counter() - start, 2), error)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("grown_mb", grown // 1024)
"""


def limit_memory():
    limit = 3 * 2**30  # address space: enough for torch, not for what the files claim
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_config_that_claims_a_huge_model_is_refused_at_once(tmp_path):
    """A small file whose config asks for a million blocks or a width of millions is refused
    from the header, in well under a second, without memory growing (a child process with a
    capped address space, so that a regression fails instead of swapping the machine)."""
    model = tiny_model()
    deep, wide = tmp_path / "deep.safetensors", tmp_path / "wide.safetensors"
    edited_state(model, deep, lambda s: None, config={**model.cfg.to_dict(), "depth": 1_000_000})
    edited_state(model, wide, lambda s: None, config={**model.cfg.to_dict(), "embed_dim": 3_145_728})
    run = subprocess.run([sys.executable, "-c", PROBE, str(deep), str(wide)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, preexec_fn=limit_memory)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stdout + run.stderr
    for line, expected in zip(lines, ["depth=1000000 but the weights have 1 blocks",
                                      "patch_embed.weight is (32, 1, 4, 16) in the weights but (3145728, 1, 4, 16)"]):
        kind, seconds, _ = line.split(" ", 2)
        assert kind == "refused" and float(seconds) < 5 and expected in line, line
    assert int(lines[2].split()[1]) < 100  # MB


# ----------------------------------------------------------------------------- 4. convert.py inputs

def test_gzip_bomb_stops_at_a_bound(tmp_path):
    """200 MB of zeros gzip to 200 kB: reading stops at max(50x the file, 64 MB)."""
    path = tmp_path / "checkpoint_0"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b"\x82" + msgpack.packb("junk") + b"\xc6" + struct.pack(">I", 200 * 2**20))
        zeros = bytes(2**20)
        for _ in range(200):
            f.write(zeros)
        f.write(msgpack.packb("params") + msgpack.packb({}))
    assert path.stat().st_size < 2**20
    result = run_convert(path, "--out", tmp_path / "out.safetensors")
    assert_one_line_error(result, str(path))
    assert "inflates to more than 67,108,864 bytes" in result.stderr


def test_legacy_torch_file_is_read_as_torch(tmp_path):
    model = tiny_model()
    path = tmp_path / "legacy.pt"
    torch.save({"config": model.cfg.to_dict(), "model": model.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    result = run_convert(path, "--out", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    assert equal_states(checkpoints.load_pretrained(tmp_path / "out.safetensors"), model)


def test_msgpack_map_that_is_not_a_model(tmp_path):
    path = tmp_path / "checkpoint_0"
    array = np.ones(3, np.float32)
    payload = msgpack.packb([list(array.shape), array.dtype.name, array.tobytes()])
    path.write_bytes(msgpack.packb({"params": {"foo": msgpack.ExtType(1, payload)}}))
    result = run_convert(path, "--out", tmp_path / "out.safetensors")
    assert_one_line_error(result, str(path))
    assert "no tensor 'patch_embed.weight'" in result.stderr


# ----------------------------------------------------------------------------- 5. not a model file

def test_audio_file_as_model(tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_pretrained(wav)
    assert str(error.value) == f"{wav}: not a model file (neither safetensors nor a torch checkpoint)"


def test_refused_pickle_names_the_global_not_torch_advice(model_file, tmp_path):
    path = bad_file("pickled-code", model_file, tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"references (posix|os)\.system") as error:
        checkpoints.read_checkpoint(path)
    assert "weights_only" not in str(error.value)


def test_missing_model_file_is_a_checkpoint_error_and_file_not_found(tmp_path):
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_pretrained(tmp_path / "nothing.safetensors")
    assert isinstance(error.value, FileNotFoundError)


# ----------------------------------------------------------------------------- 6. file mode

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_file_has_the_usual_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoints.save_pretrained(tiny_model(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- 7. the module and its command

def test_the_model_module_does_not_import_checkpoints():
    """Imports flow one way: checkpoints.py builds on mae.py, never the reverse."""
    code = "import sys, mae; assert 'checkpoints' not in sys.modules and not hasattr(mae, 'load_pretrained')"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_checkpoints_command_describes_a_model_file(model_file, tmp_path):
    result = CliRunner().invoke(checkpoints.main, [str(model_file)])
    assert result.exit_code == 0, result.output
    assert f"safetensors model file, {sum(p.numel() for p in tiny_model().parameters()):,} parameters" in result.output
    assert re.search(r"^  depth +1$", result.output, re.MULTILINE)
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    result = CliRunner().invoke(checkpoints.main, [str(wav)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {wav}: not a model file"), result.output
