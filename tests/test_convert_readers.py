"""Tests for the checkpoint readers of convert.py (flax msgpack and safe torch.load)."""
import argparse
import base64
import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch

import convert
from convert import UnsafeCheckpointError, read_flax_checkpoint, read_torch_checkpoint
from test_mae import FIXTURES, MWMAE_CHECKPOINT, sha256

MWMAE = FIXTURES / "mwmae_jax"
AUDIOMAEPP = FIXTURES / "audiomaepp"


# ---------------------------------------------------------------------------
# Flax msgpack checkpoints
# ---------------------------------------------------------------------------


def ext_array(array: np.ndarray) -> msgpack.ExtType:
    """Encode an array the way flax.serialization does (ext code 1)."""
    payload = msgpack.packb([list(array.shape), array.dtype.name, array.tobytes("C")])
    return msgpack.ExtType(1, payload)


def write_msgpack(path: Path, tree) -> Path:
    path.write_bytes(msgpack.packb(tree))
    return path


@pytest.fixture(scope="module")
def mwmae_checkpoint():
    return read_flax_checkpoint(MWMAE_CHECKPOINT)


def test_flax_checkpoint_holds_the_perturbed_params(mwmae_checkpoint):
    """Against the official init params, known by each tensor's shape and SHA-256."""
    ref = json.loads((MWMAE / "mwmae" / "params_sha256.json").read_text())
    perturbed = set(json.loads((MWMAE / "summary.json").read_text())["models"]["mwmae"]["perturbed_keys"])
    assert perturbed, "summary.json lists no perturbed keys"
    assert sorted(mwmae_checkpoint) == sorted(ref)
    assert perturbed <= set(ref)
    for key, value in mwmae_checkpoint.items():
        assert value.dtype == np.float32 and list(value.shape) == ref[key]["shape"], key
        if key in perturbed:
            assert sha256(value) != ref[key]["sha256"], f"{key} should be perturbed"
        else:
            assert sha256(value) == ref[key]["sha256"], f"{key} differs from the init params"
    # Position embeddings are trainable params in the release and sit in the checkpoint.
    assert {"pos_embed", "decoder_pos_embed"} <= set(mwmae_checkpoint)


def test_flax_reader_plain_file_equals_gzip(tmp_path, mwmae_checkpoint):
    manifest = json.loads((MWMAE / "mwmae" / "checkpoint_manifest.json").read_text())
    raw = gzip.decompress(MWMAE_CHECKPOINT.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest["sha256"]
    plain = tmp_path / "checkpoint_0"
    plain.write_bytes(raw)
    params = read_flax_checkpoint(plain)
    assert list(params) == list(mwmae_checkpoint)
    assert all(np.array_equal(params[k], mwmae_checkpoint[k]) for k in params)


@pytest.mark.parametrize("model", ["mwmae", "mae"])
def test_flax_reader_decodes_bf16_release_payloads(tmp_path, model):
    manifest = json.loads((MWMAE / model / "checkpoint_manifest_bf16_release_precision.json").read_text())
    payloads = manifest["bfloat16_leaf_ext_payload_b64"]
    expected = manifest["bfloat16_leaf_values_as_float32"]
    shapes = {leaf["path"]: leaf["shape"] for leaf in manifest["leaves"] if "shape" in leaf}
    assert any(k.startswith("params/") for k in payloads)

    # Decoding each raw ext payload gives the stated values.
    for key, b64 in payloads.items():
        decoded = convert._flax_ext_hook(1, base64.b64decode(b64))
        assert decoded.dtype == ml_dtypes.bfloat16
        assert list(decoded.shape) == shapes[key]
        np.testing.assert_array_equal(decoded.astype(np.float32).ravel(), np.float32(expected[key]))

    # Through the public reader: a checkpoint holding these leaves, opt_state ignored.
    tree = {"params": {}, "opt_state": {"0": {"mu": {}, "nu": {}}}, "step": ext_array(np.int32(7).reshape(()))}
    for key, b64 in payloads.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = msgpack.ExtType(1, base64.b64decode(b64))
    tree["params"]["other/kernel"] = ext_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    params = read_flax_checkpoint(write_msgpack(tmp_path / "checkpoint_5", tree))
    param_keys = sorted(k.removeprefix("params/") for k in payloads if k.startswith("params/"))
    assert sorted(params) == sorted(param_keys + ["other/kernel"])
    for key in param_keys:
        assert params[key].dtype == np.float32
        np.testing.assert_array_equal(params[key].ravel(), np.float32(expected["params/" + key]))


def test_flax_reader_chunked_arrays_and_scalars(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((4, 5, 3)).astype(np.float32)
    flat = big.reshape(-1)
    bf16 = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
    tree = {
        "params": {
            "block": {
                "big": {
                    "__msgpack_chunked_array__": True,
                    "shape": {"0": 4, "1": 5, "2": 3},
                    "chunks": {str(i): ext_array(flat[j:j + 16]) for i, j in enumerate(range(0, 60, 16))},
                },
                "half": {
                    "__msgpack_chunked_array__": True,
                    "shape": {"0": 7},
                    "chunks": {"0": ext_array(bf16[:4]), "1": ext_array(bf16[4:])},
                },
            },
            "scale": msgpack.ExtType(3, msgpack.packb([[], "float64", np.float64(0.5).tobytes()])),
            "empty": {},
        },
        "dynamic_scale": None,
    }
    params = read_flax_checkpoint(write_msgpack(tmp_path / "checkpoint_1", tree))
    assert sorted(params) == ["block/big", "block/half", "scale"]
    np.testing.assert_array_equal(params["block/big"], big)
    np.testing.assert_array_equal(params["block/half"], bf16.astype(np.float32))
    assert params["scale"].dtype == np.float32 and params["scale"].shape == () and params["scale"] == 0.5
    assert all(p.flags.writeable for p in params.values())


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, this is not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"step": 3, "opt_state": {}}),  # no params
        msgpack.packb({"params": {"w": ext_array(np.ones(3, np.float32))}})[:-5],  # truncated
        msgpack.packb({"params": {"w": msgpack.ExtType(1, msgpack.packb([[2], "object", b"\0" * 16]))}}),
        msgpack.packb({"params": {"w": msgpack.ExtType(1, msgpack.packb([[3], "float32", b"\0" * 4]))}}),
        msgpack.packb({"params": {"w": msgpack.ExtType(9, b"??")}}),
        gzip.compress(b"\x93\x01\x02\x03"),
        b"\x1f\x8b not really gzip",
    ],
    ids=["empty", "text", "list", "no-params", "truncated", "object-dtype", "size-mismatch",
         "unknown-ext", "gzip-list", "bad-gzip"],
)
def test_flax_reader_refuses_other_files(tmp_path, content):
    path = tmp_path / "checkpoint_0"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="checkpoint_0"):
        read_flax_checkpoint(path)


def test_flax_reader_refuses_torch_files_and_directories(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="not a flax msgpack checkpoint"):
        read_flax_checkpoint(tmp_path / "model.pth")
    with pytest.raises(ValueError, match="directory"):
        read_flax_checkpoint(tmp_path)


# ---------------------------------------------------------------------------
# Torch checkpoints
# ---------------------------------------------------------------------------

ML_COLLECTIONS = "ml_collections.config_dict.config_dict"


class _FakeConfigDict:
    """Pickles like ml_collections' ConfigDict: NEWOBJ + BUILD with its __dict__."""

    def __init__(self, fields):
        self.__dict__.update(_fields=dict(fields), _locked=False, _type_safe=True, _convert_dict=True)


class _FakeFieldReference:
    """Pickles like ml_collections' FieldReference (its field type is a builtin class)."""

    def __init__(self, value):
        self.__dict__.update(_field_type=type(value), _value=value, _required=False, _ops=[])


@pytest.fixture
def fake_ml_collections(monkeypatch):
    """Classes picklable under ml_collections' real names; the fake modules live only in this test."""
    parts = ML_COLLECTIONS.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = sys.modules[ML_COLLECTIONS]
    fakes = {}
    for base, name in ((_FakeConfigDict, "ConfigDict"), (_FakeFieldReference, "FieldReference")):
        fakes[name] = type(name, (base,), {"__module__": ML_COLLECTIONS, "__qualname__": name})
        setattr(module, name, fakes[name])
    return types.SimpleNamespace(**fakes)  # monkeypatch removes the fake modules afterwards


def official_layout_checkpoint(state_dict, ml):
    config = ml.ConfigDict({
        "model": ml.ConfigDict({"arch": "mae_tiny", "patch_size": [4, 16], "depth": ml.FieldReference(2)}),
        "opt": ml.ConfigDict({"lr": 6e-4, "betas": (0.9, 0.95)}),
        "precision": "float32",
    })
    args = argparse.Namespace(config=config, lr=6e-4, epochs=100, output_dir="/tmp/run", resume="")
    some = next(iter(state_dict.values()))
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(some), "exp_avg_sq": torch.zeros_like(some)}},
        "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "params": [0]}],
    }
    return {"model": state_dict, "optimizer": optimizer, "epoch": 99, "scaler": {}, "args": args}


def test_torch_reader_official_training_checkpoint(tmp_path, fake_ml_collections):
    state_dict = torch.load(AUDIOMAEPP / "state_dict.pt", map_location="cpu", weights_only=True)
    path = tmp_path / "checkpoint-99.pth"
    torch.save(official_layout_checkpoint(state_dict, fake_ml_collections), path)
    for name in list(sys.modules):  # the reader must not need the fake modules
        if name.startswith("ml_collections"):
            sys.modules.pop(name)

    # The premise: plain weights_only loading refuses this file.
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)

    weights = read_torch_checkpoint(path)
    assert list(weights) == list(state_dict)
    for key, value in state_dict.items():
        assert type(weights[key]) is torch.Tensor and weights[key].dtype == torch.float32
        assert torch.equal(weights[key], value), key

    # The rest comes back as inert stand-ins that only recorded their state.
    full = convert.safe_torch_load(path)
    args = full["args"]
    assert isinstance(args, convert.PickledStandIn) and args.pickled_name == "argparse.Namespace"
    assert args.lr == 6e-4 and full["epoch"] == 99
    assert args.config.pickled_name == f"{ML_COLLECTIONS}.ConfigDict"
    assert args.config.model.arch == "mae_tiny"
    assert args.config.model.depth.fields()["_value"] == 2
    assert args.config.model.depth.fields()["_field_type"] is int


def test_torch_reader_plain_state_dict():
    path = AUDIOMAEPP / "state_dict.pt"
    weights = read_torch_checkpoint(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert list(weights) == list(ref) and all(torch.equal(weights[k], ref[k]) for k in ref)


def test_torch_reader_casts_to_float32_and_unwraps_parameters(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"model": {"w": torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
                          "idx": torch.arange(3)}}, path)
    weights = read_torch_checkpoint(path)
    assert type(weights["w"]) is torch.Tensor and weights["w"].dtype == torch.float32
    assert weights["idx"].dtype == torch.int64


def test_torch_reader_refuses_non_state_dicts(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    torch.save({"epoch": 3, "args": {"lr": 1.0}}, tmp_path / "nomodel.pt")
    with pytest.raises(ValueError, match="not a dict"):
        read_torch_checkpoint(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="'model'"):
        read_torch_checkpoint(tmp_path / "nomodel.pt")


# --- security ---------------------------------------------------------------


class _Payload:
    """An object whose unpickling would create `target` (the classic pickle exploit)."""

    def __init__(self, kind: str, target: Path):
        self.kind, self.target = kind, str(target)

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch {self.target}",)
        if self.kind == "subprocess":
            return subprocess.call, (["touch", self.target],)
        if self.kind == "exec":
            return exec, (f"open({self.target!r}, 'w').write('pwned')",)
        if self.kind == "open":
            return open, (self.target, "w")
        raise ValueError(self.kind)


KINDS = ["os.system", "subprocess", "exec", "open"]


def write_malicious(path: Path, kind: str, target: Path, fmt: str) -> None:
    if fmt == "zip":  # a torch.save checkpoint whose 'args' is the payload
        torch.save({"model": {"w": torch.ones(2)}, "args": _Payload(kind, target)}, path)
    else:  # a raw pickle stream
        path.write_bytes(pickle.dumps({"model": {"w": 1.0}, "args": _Payload(kind, target)}, protocol=2))


@pytest.mark.parametrize("fmt", ["zip", "raw"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_reader_never_executes_pickled_code(tmp_path, kind, fmt):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_malicious(path, kind, target, fmt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        read_torch_checkpoint(path)
    assert not target.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_payloads_do_execute_when_loaded_unsafely(tmp_path, kind):
    """Control: the payloads above are real, so the test above can fail."""
    target = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pth", kind, target, "zip")
    torch.load(tmp_path / "evil.pth", map_location="cpu", weights_only=False)
    assert target.exists()
    target.unlink()
    write_malicious(tmp_path / "evil.pkl", kind, target, "raw")
    pickle.loads((tmp_path / "evil.pkl").read_bytes())
    assert target.exists()


def test_refusal_names_the_global(tmp_path):
    target = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.pth", "subprocess", target, "zip")
    # Protocol 2 pickles store subprocess under its Python 2 name, commands.
    with pytest.raises(UnsafeCheckpointError, match=r"global '(subprocess|commands)\.call'"):
        read_torch_checkpoint(tmp_path / "evil.pth")
    assert not target.exists()
    assert issubclass(UnsafeCheckpointError, ValueError)


def test_stand_ins_are_not_left_allowlisted(tmp_path):
    before = set(map(repr, torch.serialization.get_safe_globals()))
    read_torch_checkpoint(AUDIOMAEPP / "state_dict.pt")
    assert set(map(repr, torch.serialization.get_safe_globals())) == before


@pytest.mark.parametrize("kind", ["empty", "msgpack", "npz", "truncated-zip", "truncated-pickle"])
def test_torch_reader_refuses_foreign_and_broken_files(tmp_path, kind):
    path = tmp_path / "file.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "msgpack":
        path.write_bytes(msgpack.packb({"params": {"w": ext_array(np.ones(3, np.float32))}}))
    elif kind == "npz":
        np.savez(path.with_suffix(".npz"), w=np.ones(3))
        path = path.with_suffix(".npz")
    elif kind == "truncated-zip":
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(pickle.dumps({"w": [1.0] * 10}, protocol=2)[:20])
    with pytest.raises(ValueError):
        read_torch_checkpoint(path)
