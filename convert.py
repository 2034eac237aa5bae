"""Convert the authors' released weights to our safetensors format.

The official releases ship their weights in two formats that this project does
not use itself:

* MW-MAE / MAE (``SarthakYadav/mwmae-jax-official``, JAX/Flax): legacy flax
  msgpack training checkpoints, one file ``<workdir>/checkpoint_<step>`` that
  serialises the whole ``TrainState`` (``params``, ``opt_state``, ``step``,
  ``buffers``, ...).
* AudioMAE++ (``SarthakYadav/audiomae-plusplus-official``, PyTorch):
  ``checkpoint-<epoch>.pth`` files written by ``torch.save`` holding a dict with
  ``model``, ``optimizer``, ``epoch``, ``scaler`` and ``args``, where ``args`` is
  a pickled ``argparse.Namespace`` containing an ``ml_collections`` ConfigDict.

This module turns those files into state dicts of our own models, saved with
safetensors. It is organised in sections:

1. Checkpoint readers (this section): read the official files into flat
   dictionaries of float32 arrays/tensors under the *official* parameter names,
   without jax, flax or ml_collections, and without executing pickled code.
2. Name mapping from the official parameter names to ours.
3. Config inference from the checkpoint contents (sizes, block kind, windows, CLS).
4. Command-line interface: ``python convert.py CHECKPOINT --out model.safetensors``
   (``--dtype float16`` stores the weights in half the bytes; they load as float32).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import ml_dtypes
import msgpack
import numpy as np
import torch

from attention import window_sizes
from files import shown
from checkpoints import CheckpointError, config_for_weights, load_pretrained, model_file_kind, save_pretrained
from mae import MAE, SIZES, MAEConfig, parse_overrides

STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # --dtype


# ============================================================================
# 1. Checkpoint readers
# ============================================================================

# ---------------------------------------------------------------------------
# 1a. Legacy flax msgpack checkpoints (MW-MAE, MAE)
# ---------------------------------------------------------------------------
#
# ``flax.serialization.msgpack_serialize`` writes the state dict as a msgpack
# map. Array leaves are msgpack extension objects whose payload is itself a
# msgpack list ``[shape, dtype_name, raw C-order bytes]``; arrays larger than
# 2**30 bytes are split into a map ``{"__msgpack_chunked_array__": True,
# "shape": {"0": ...}, "chunks": {"0": <1-D array>, ...}}``.

_GZIP_MAGIC = b"\x1f\x8b"

# flax.serialization._MsgpackExtType
_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3

_CHUNKED_ARRAY_MARKER = "__msgpack_chunked_array__"

# Upper bound for the streaming unpacker's buffer. It has to hold the largest
# single msgpack item (flax chunks arrays at 2**30 bytes), not the whole file.
_MSGPACK_MAX_BUFFER = 2**31 - 1

# A gzip'd checkpoint may inflate to at most this many times its size (and to 64 MiB whatever
# its size). Float weights barely compress (a trained model's about 1.1x; the release's step-0
# file, with zeroed optimizer moments, 3.3x), while a gzip bomb inflates a thousandfold: a
# 1 MB bomb stops at 64 MB instead of filling memory with gigabytes.
_MAX_INFLATION = 50
_MIN_INFLATED_LIMIT = 64 * 2**20


def _is_msgpack_map_start(first_byte: int) -> bool:
    """Whether ``first_byte`` starts a msgpack map (fixmap, map 16 or map 32)."""
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def _flax_dtype(name: bytes | str) -> np.dtype:
    """The numpy dtype for a dtype name stored in a flax array payload.

    Only plain numeric dtypes (and ``bfloat16`` through ml_dtypes) are accepted;
    object, string, structured or sub-array dtypes are refused.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError as err:
            raise ValueError(f"invalid array dtype name {name!r}") from err
    if not isinstance(name, str):
        raise ValueError(f"invalid array dtype name {name!r}")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise ValueError(f"unsupported array dtype {name!r}") from err
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"unsupported array dtype {name!r}")
    return dtype


def _flax_array_from_payload(payload: bytes) -> np.ndarray:
    """Decode the payload of a flax array extension object.

    The payload is a msgpack list ``[shape, dtype_name, raw C-order bytes]``,
    mirroring ``flax.serialization._ndarray_from_bytes``.
    """
    try:
        decoded = msgpack.unpackb(payload, raw=True)
    except Exception as err:  # msgpack raises several unrelated exception types
        raise ValueError(f"malformed array payload: {err}") from err
    if not (isinstance(decoded, (list, tuple)) and len(decoded) == 3):
        raise ValueError("malformed array payload: expected [shape, dtype, bytes]")
    shape, dtype_name, buffer = decoded
    if not (
        isinstance(shape, (list, tuple))
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(buffer, bytes)
    ):
        raise ValueError("malformed array payload: bad shape or data")
    dtype = _flax_dtype(dtype_name)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(buffer):
        raise ValueError(
            f"malformed array payload: shape {tuple(shape)} of {dtype.name} needs "
            f"{count * dtype.itemsize} bytes, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape, order="C")


def _flax_ext_hook(code: int, payload: bytes) -> Any:
    """msgpack ``ext_hook`` that decodes flax's array, scalar and complex leaves.

    Unknown extension codes are returned as :class:`msgpack.ExtType` and are
    rejected later if they occur inside ``params``.
    """
    if code == _EXT_NDARRAY:
        return _flax_array_from_payload(payload)
    if code == _EXT_NPSCALAR:
        return _flax_array_from_payload(payload)[()]
    if code == _EXT_NATIVE_COMPLEX:
        try:
            real, imag = msgpack.unpackb(payload)
            return complex(real, imag)
        except Exception as err:
            raise ValueError(f"malformed complex payload: {err}") from err
    return msgpack.ExtType(code, payload)


def _unchunk_flax_array(node: Mapping, path: str) -> np.ndarray:
    """Reassemble a chunked array map (``flax.serialization._unchunk``)."""
    shape_map, chunk_map = node.get("shape"), node.get("chunks")
    if not isinstance(shape_map, Mapping) or not isinstance(chunk_map, Mapping):
        raise ValueError(f"{path}: malformed chunked array")
    try:
        shape = tuple(int(shape_map[str(i)]) for i in range(len(shape_map)))
        chunks = [chunk_map[str(i)] for i in range(len(chunk_map))]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed chunked array") from err
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
        raise ValueError(f"{path}: chunked array chunks must be 1-D arrays")
    if not chunks:
        raise ValueError(f"{path}: chunked array without chunks")
    flat = np.concatenate(chunks)
    if flat.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{path}: chunks do not match shape {shape}")
    return flat.reshape(shape)


def _to_float32_array(value: Any, path: str) -> np.ndarray:
    """Turn a decoded leaf into an owned numpy array, upcasting floats to float32.

    bfloat16/float16/float64 leaves become float32; integer and bool leaves are
    kept as they are (``params`` holds none in the official models).
    """
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
    elif isinstance(value, (bool, int, float)):
        array = np.asarray(value)
    else:
        raise ValueError(f"{path}: unsupported leaf of type {type(value).__name__}")
    if array.dtype == np.dtype(ml_dtypes.bfloat16) or array.dtype.kind == "f":
        return array.astype(np.float32)  # astype copies: writable, owns its data
    if array.dtype.kind in "biu":
        return array.copy()
    raise ValueError(f"{path}: unsupported dtype {array.dtype} for a parameter")


def _flatten_flax_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a nested flax state dict to ``'/'``-joined keys (empty maps vanish)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ValueError(f"{prefix!r}: non-string key {key!r}")
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            if _CHUNKED_ARRAY_MARKER in value:
                flat[path] = _to_float32_array(_unchunk_flax_array(value, path), path)
            else:
                flat.update(_flatten_flax_tree(value, path))
        else:
            flat[path] = _to_float32_array(value, path)
    return flat


class _BoundedReader:
    """A binary stream that refuses to yield more than ``limit`` bytes: reading a gzip bomb
    stops with a ValueError once that much has been inflated."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.count = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.count + 1  # one byte more than allowed tells a bomb
        data = self.stream.read(room if size < 0 else min(size, room))
        self.count += len(data)
        if self.count > self.limit:
            raise ValueError(f"it inflates to more than {self.limit:,} bytes ({_MAX_INFLATION}x "
                             "its size): not a gzip'd checkpoint")
        return data

    def __enter__(self) -> "_BoundedReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stream.close()


def _open_maybe_gzip(path: Path):
    """Open ``path`` for binary reading, transparently un-gzipping it (with a bound on the
    inflated size, see ``_MAX_INFLATION``)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        limit = max(_MAX_INFLATION * path.stat().st_size, _MIN_INFLATED_LIMIT)
        return _BoundedReader(gzip.open(path, "rb"), limit)
    return open(path, "rb")


def read_flax_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the ``params`` of a legacy flax msgpack checkpoint, without flax.

    This reads the files written by the official MW-MAE/MAE trainer
    (``flax.training.checkpoints.save_checkpoint_multiprocess`` with orbax
    disabled), i.e. ``<workdir>/checkpoint_<step>``. A gzip-compressed copy of
    such a file is accepted too (detected from its magic bytes).

    The file is decoded as a stream: only the top-level ``params`` entry is
    materialised; ``opt_state``, ``buffers``, ``aux_rng_keys`` etc. are skipped.

    Args:
        path: The checkpoint file (not the workdir).

    Returns:
        The ``params`` collection flattened to ``'/'``-joined keys such as
        ``"encoder_block_00/Attention_0/Dense_0/kernel"``, in file order. Floating
        leaves (including bfloat16 ones) are returned as float32 numpy arrays.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory or not a flax msgpack checkpoint
            with a ``params`` entry, or holds an unsupported leaf.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; pass the checkpoint file itself "
            "(e.g. <workdir>/checkpoint_<step>)"
        )
    not_a_checkpoint = f"{path} is not a flax msgpack checkpoint"
    try:
        if not _is_flax_checkpoint(path):
            raise ValueError(f"{not_a_checkpoint}: it does not start with a msgpack map")
        with _open_maybe_gzip(path) as stream:
            unpacker = msgpack.Unpacker(
                stream,
                ext_hook=_flax_ext_hook,
                raw=False,
                strict_map_key=False,
                max_buffer_size=_MSGPACK_MAX_BUFFER,
            )
            params = None
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if key == "params":
                    params = unpacker.unpack()
                else:
                    unpacker.skip()
    except ValueError as err:
        if str(err).startswith(not_a_checkpoint):
            raise
        raise ValueError(f"{not_a_checkpoint}: {err}") from err
    except (OSError, EOFError, UnicodeDecodeError, msgpack.UnpackException) as err:
        # OSError covers gzip.BadGzipFile; msgpack's OutOfData, FormatError and
        # StackError derive from UnpackException (ExtraData from ValueError).
        raise ValueError(f"{not_a_checkpoint}: {type(err).__name__}: {err}") from err
    if params is None:
        raise ValueError(f"{not_a_checkpoint}: it has no top-level 'params' entry")
    if not isinstance(params, Mapping):
        raise ValueError(f"{not_a_checkpoint}: 'params' is not a map")
    try:
        flat = _flatten_flax_tree(params)
    except ValueError as err:
        raise ValueError(f"{path}: params/{err}") from err
    if not flat:
        raise ValueError(f"{not_a_checkpoint}: 'params' is empty")
    return flat


# ---------------------------------------------------------------------------
# 1b. PyTorch checkpoints (AudioMAE++), read without executing pickled code
# ---------------------------------------------------------------------------
#
# Why this design: ``torch.load(..., weights_only=True)`` uses torch's own
# restricted unpickler (torch/_weights_only_unpickler.py). It never imports
# anything by name: every GLOBAL opcode is looked up in a fixed table (tensor
# rebuild functions, storages, dtypes, OrderedDict, ...) plus the user
# allowlist of ``torch.serialization.safe_globals``; modules such as os/sys are
# blocked outright; REDUCE/NEWOBJ may only call allowlisted objects and BUILD
# only sets state on allowlisted types. The official ``.pth`` files also
# reference ``argparse.Namespace`` and ml_collections' ConfigDict, so we
# allowlist, *under those names*, inert stand-in classes defined here (the
# ``(object, "module.qualname")`` tuple form of ``safe_globals``, available
# since torch 2.6). The stand-ins only record their constructor arguments and
# pickled state. Everything else is still refused by torch. We do not write
# our own pickle.Unpickler subclass: torch's unpickler is maintained and
# reviewed for exactly this purpose, and also restricts the storage
# persistent-load path.


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The restricted unpickler refused the file (e.g. a non-allowlisted global).

    It is a :class:`ValueError` too, so callers can treat every unusable input
    file alike.
    """


class PickledStandIn:
    """Inert stand-in for a pickled object of a class we do not import.

    Unpickling calls ``__new__``/``__init__`` with the pickled arguments and
    ``__setstate__`` with the pickled state; all three only record what they
    receive. ``pickled_name`` is the ``module.qualname`` the file refers to.
    Attribute access falls back to :meth:`fields` so that e.g. ``args.config``
    works on a Namespace stand-in.
    """

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledStandIn:
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: ``__new__`` already recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def fields(self) -> dict[str, Any]:
        """The recorded attributes (the pickled ``__dict__``), if any."""
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0]
        return dict(state) if isinstance(state, Mapping) else {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        fields = self.fields()
        if name in fields:
            return fields[name]
        raise AttributeError(f"{self.pickled_name} stand-in has no field {name!r}")

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}: {self.fields()!r}>"


class ConfigDictStandIn(PickledStandIn):
    """Stand-in for ml_collections' ConfigDict/FrozenConfigDict.

    Their pickled state is ``{"_fields": {...}, "_locked": ..., ...}``; the
    configuration entries are exposed through :meth:`fields`.
    """

    def fields(self) -> dict[str, Any]:
        raw = super().fields()
        inner = raw.get("_fields")
        return dict(inner) if isinstance(inner, Mapping) else raw


def _make_stand_in(full_name: str, base: type[PickledStandIn]) -> type[PickledStandIn]:
    """A distinct stand-in class recording that it replaces ``full_name``."""
    qualname = full_name.rsplit(".", 1)[1]
    return type(f"StandIn_{qualname}", (base,), {"pickled_name": full_name})


_ML_COLLECTIONS_MODULES = (
    "ml_collections.config_dict.config_dict",
    "ml_collections.config_dict",
    "ml_collections",
)

#: Globals that official checkpoints reference besides tensors, mapped to the
#: inert stand-ins they are replaced with.
STAND_INS: dict[str, type[PickledStandIn]] = {
    "argparse.Namespace": _make_stand_in("argparse.Namespace", PickledStandIn),
}
for _module in _ML_COLLECTIONS_MODULES:
    for _name, _base in (
        ("ConfigDict", ConfigDictStandIn),
        ("FrozenConfigDict", ConfigDictStandIn),
        ("FieldReference", PickledStandIn),
    ):
        STAND_INS[f"{_module}.{_name}"] = _make_stand_in(f"{_module}.{_name}", _base)
del _module, _name, _base

# Builtin types that can appear as *values* in a pickled config (e.g. the
# ``_field_type`` of a FieldReference). Calling any of them on the objects the
# restricted unpickler can build has no side effects.
_SAFE_BUILTIN_TYPES = (bool, int, float, str, bytes, list, tuple, dict, frozenset)


def _safe_globals_list() -> list[Any]:
    """The extra allowlist entries passed to ``torch.serialization.safe_globals``."""
    entries: list[Any] = [(cls, name) for name, cls in STAND_INS.items()]
    entries.extend(_SAFE_BUILTIN_TYPES)
    return entries


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` a checkpoint on CPU without executing any pickled code.

    The file is loaded with ``weights_only=True`` (torch's restricted
    unpickler) while the stand-ins of :data:`STAND_INS` are allowlisted under
    the official class names, so official AudioMAE++ training checkpoints load
    as well as plain state dicts. Objects of those classes come back as
    :class:`PickledStandIn` instances that only record their pickled state.

    Raises:
        UnsafeCheckpointError: the file references any other global (its name
            is in the message) or uses an operation the restricted unpickler
            refuses.
        ValueError: the file is truncated or not a torch checkpoint at all.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals_list()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        match = _REFUSED_GLOBAL.search(message)
        # torch's text goes on with advice to load the file unsafely: keep its first sentence.
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0].splitlines()[0]
        if match:
            reason = (
                f"it references the global {match.group(1)!r}, which is not on the "
                "allowlist (tensors, plain containers, argparse.Namespace and "
                "ml_collections configs)"
            )
        else:
            reason = "the restricted unpickler rejected it"
        raise UnsafeCheckpointError(
            f"refusing to load {os.fspath(path)}: {reason}; nothing in it was executed. "
            f"Unpickler said: {detail}"
        ) from None
    except Exception as err:  # truncated or foreign files fail in many ways (a bad zip, EOF, ...)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{os.fspath(path)} is not a readable torch checkpoint: {type(err).__name__}: {first_line}"
        ) from err


def _as_float32_tensor(value: Any, key: str) -> torch.Tensor:
    """A plain (non-Parameter) tensor, with floating dtypes cast to float32."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    tensor = value.detach()  # also turns an nn.Parameter into a plain tensor
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the model weights of an official AudioMAE++ ``.pth`` checkpoint safely.

    Accepts both the official training checkpoint (a dict with ``model``,
    ``optimizer``, ``epoch``, ``scaler`` and ``args``; only ``model`` is
    returned) and a plain state dict. Loading goes through
    :func:`safe_torch_load`, so no pickled code is ever executed.

    Args:
        path: The ``.pth``/``.pt`` file.

    Returns:
        The state dict under the official parameter names, in file order.
        Floating tensors are float32; integer tensors keep their dtype.

    Raises:
        UnsafeCheckpointError: the pickle references a non-allowlisted global.
        ValueError: the file holds neither a state dict nor a dict with one
            under ``'model'``.
    """
    return _official_torch_state(safe_torch_load(path), path)


def _official_torch_state(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in a loaded official checkpoint: see :func:`read_torch_checkpoint`."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a dict")
    if isinstance(obj.get("model"), Mapping):
        state = obj["model"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise ValueError(
            f"{os.fspath(path)} is neither a state dict nor a training checkpoint with a "
            f"'model' state dict (top-level keys: {sorted(map(str, obj))})"
        )
    return {str(key): _as_float32_tensor(value, str(key)) for key, value in state.items()}


# ============================================================================
# 2. Name mapping: official parameter names -> ours
# ============================================================================

def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


FLAX_RULES = [  # official MW-MAE / MAE (flax) path -> our state-dict key
    (r"^encoder_block_0*(\d+)/", r"blocks.\1."),
    (r"^decoder_block_0*(\d+)/", r"decoder_blocks.\1."),
    (r"LayerNorm_0/", "norm1/"), (r"LayerNorm_1/", "norm2/"),
    (r"(Attention_0/Dense_0|wmha_block/qkv)/", "attn.qkv/"),
    (r"(Attention_0/Dense_1|wmha_block/proj)/", "attn.proj/"),
    (r"wmha_block/attn_heads_(\d+)/relative_position_bias_table", r"attn.rel_pos.\1"),
    (r"Mlp_0/Dense_0/", "mlp.fc1/"), (r"Mlp_0/Dense_1/", "mlp.fc2/"),
    (r"^encoder_norm/", "norm/"), (r"^patch_embed/proj/", "patch_embed/"),
    (r"/(kernel|scale)$", ".weight"), (r"/bias$", ".bias"),
]

AUDIOMAEPP_RULES = [  # official AudioMAE++ (torch) key -> our state-dict key
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^encoder\.encoder_norm\.", "norm."), (r"^encoder\.", ""), (r"^decoder\.", ""),
    (r"\.ffn1\.layer1\.", ".ffn1.fc1."), (r"\.ffn1\.layer2\.", ".ffn1.fc2."),
    (r"\.attn\.qkv_layer\.", ".attn.qkv."), (r"\.attn\.proj_layer\.", ".attn.proj."),
    (r"\.ffn2\.linear1\.", ".ffn2.value."), (r"\.ffn2\.linear2\.", ".ffn2.gate."),
    (r"\.ffn2\.ln\.", ".ffn2.norm."), (r"\.ffn2\.project\.", ".ffn2.proj."),
]


def flax_to_state_dict(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Official flax params ('/'-joined paths) -> our state dict. Dense kernels are
    (in, out) -> transposed; the conv kernel is HWIO -> OIHW; bias tables (2w-1, 1) -> (2w-1,)."""
    state = {}
    for path, value in params.items():
        key, value = _rename(path, FLAX_RULES), np.array(value, dtype=np.float32)
        if key == "patch_embed.weight":
            value = value.transpose(3, 2, 0, 1)
        elif key.endswith(".weight") and value.ndim == 2:
            value = value.T
        elif ".rel_pos." in key:
            value = value.reshape(-1)
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def audiomaepp_to_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official AudioMAE++ state dict -> ours (same layouts, other names)."""
    return {_rename(k, AUDIOMAEPP_RULES): v.float() for k, v in official.items()}


# ============================================================================
# 3. Preset inference
# ============================================================================

def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})


def _has_windows(state: Mapping[str, torch.Tensor], prefix: str, rule: list[int]) -> bool:
    """Whether the blocks are multi-window, from their relative-bias tables (2w - 1 entries
    each). Global heads carry no table; the windows must follow `rule`."""
    tables = {int(k.rsplit(".", 1)[1]): v.numel() for k, v in state.items()
              if k.startswith(prefix + ".0.attn.rel_pos.")}
    if any(h >= len(rule) or rule[h] != (n + 1) // 2 for h, n in tables.items()):
        found = {h: (n + 1) // 2 for h, n in sorted(tables.items())}
        raise ValueError(f"windowed heads {found} do not follow the window rule {rule}: "
                         "pass --set windows=[...]")
    return bool(tables)


def infer_config(state: Mapping[str, torch.Tensor], **overrides) -> MAEConfig:
    """Our model config from a state dict in our names: sizes from tensor shapes, block kind
    from the layer names, windows from the bias tables. Head counts of global attention
    cannot be seen in the weights: the encoder's follow the size table (dim 192 -> 3 heads,
    ...), the decoder's default to 8, as in both releases; override them if yours differ."""
    patch = tuple(state["patch_embed.weight"].shape[2:])
    dim = state["patch_embed.weight"].shape[0]
    cls = "cls_token" in state
    num_patches = state["pos_embed"].shape[1] - int(cls)
    mel_patches = 80 // patch[1]
    grid = (num_patches // mel_patches, mel_patches)
    heads = {d: h for d, _, h in SIZES.values()}.get(dim, max(1, dim // 64))
    rule = list(overrides.get("windows") or window_sizes(num_patches))
    config = dict(
        input_size=(grid[0] * patch[0], grid[1] * patch[1]), patch_size=patch,
        embed_dim=dim, depth=_count(state, "blocks"), num_heads=heads,
        decoder_dim=state["decoder_embed.weight"].shape[0], decoder_depth=_count(state, "decoder_blocks"),
        block="plusplus" if "blocks.0.ffn2.value.weight" in state else "vit", cls_token=cls,
        encoder_multiwindow=_has_windows(state, "blocks", rule),
        decoder_multiwindow=_has_windows(state, "decoder_blocks", rule),
    )
    return MAEConfig(**{**config, **overrides})


def convert(path: str | os.PathLike, **overrides) -> MAE:
    """Any supported checkpoint -> our model: an official MW-MAE / MAE flax file, an official
    AudioMAE++ .pth (or state dict), or one of ours (.safetensors, or train.py's checkpoint).
    The kind of file is told by its first bytes. Raises ValueError (CheckpointError for a file
    that cannot be used) with a one-line message."""
    path = Path(path)
    kind = model_file_kind(path)
    if kind == "safetensors":
        return keep_weights(load_pretrained(path), overrides)
    if kind in ("torch", "torch-legacy"):
        checkpoint = safe_torch_load(path)
        if isinstance(checkpoint, Mapping) and {"config", "model"} <= checkpoint.keys():
            return keep_weights(load_pretrained(path), overrides)  # ours: checked by checkpoints
        # The AudioMAE++ release applies norm2 again before its SwiGLU (norm3 unused).
        state = audiomaepp_to_state_dict(_official_torch_state(checkpoint, path))
        release = dict(reuse_norm2=True)
    elif _may_be_flax(path):
        # The MW-MAE release trains its position tables (they are parameters there).
        state, release = flax_to_state_dict(read_flax_checkpoint(path)), dict(trainable_pos=True)
    else:
        raise CheckpointError(f"{shown(path)}: not a checkpoint convert.py reads (neither safetensors, "
                              "a torch checkpoint nor a flax msgpack checkpoint)")
    return _official_model(path, state, {**release, **overrides})


_FIXED_BUFFERS = ("pos_embed", "decoder_pos_embed")  # absent from some files: the sin-cos init stands


def _official_model(path: Path, state: dict[str, torch.Tensor], overrides: dict) -> MAE:
    """Our model holding an official file's weights (in our names), its config inferred from
    them and checked against them before the model is built."""
    try:
        cfg = infer_config(state, **overrides)
    except KeyError as error:
        raise CheckpointError(f"{shown(path)}: no tensor {error} in it: not an MW-MAE, MAE or "
                              "AudioMAE++ model") from None
    except (IndexError, TypeError, ZeroDivisionError):
        raise CheckpointError(f"{shown(path)}: its tensors have shapes of no MW-MAE, MAE or "
                              "AudioMAE++ model") from None
    except ValueError as error:
        raise CheckpointError(f"{shown(path)}: {error}") from None
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    try:
        config_for_weights(cfg.to_dict(), shapes, optional=_FIXED_BUFFERS)
    except ValueError as error:
        raise CheckpointError(f"{shown(path)}: the weights do not fit the inferred model ({error}); "
                              "override the config with --set") from None
    model = MAE(cfg)
    model.load_state_dict(state, strict=False)  # strict but for _FIXED_BUFFERS, checked above
    return model


def _shown_overrides(overrides: dict) -> str:
    return " ".join(f"--set {key}={value if isinstance(value, str) else json.dumps(value)}"
                    for key, value in overrides.items())


def keep_weights(model: MAE, overrides: dict) -> MAE:
    """`model` under its config changed by `overrides`, with the same weights. Only changes
    that keep every tensor's name and shape are accepted (e.g. mask_ratio, or decoder_heads
    where the width divides evenly); any other raises ValueError naming a tensor that would
    change."""
    if not overrides:
        return model
    state = model.state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    try:
        cfg = config_for_weights({**model.cfg.to_dict(), **overrides}, shapes)
    except ValueError as error:
        raise ValueError(f"{_shown_overrides(overrides)} does not keep the weights: {error}") from None
    changed = MAE(cfg)
    changed.load_state_dict(state)
    return changed


def _is_flax_checkpoint(path: Path) -> bool:
    with _open_maybe_gzip(path) as f:
        first = f.read(1)
    return bool(first) and _is_msgpack_map_start(first[0])


def _may_be_flax(path: Path) -> bool:
    """Whether the file is gzip'd or starts with a msgpack map (read_flax_checkpoint tells more)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == _GZIP_MAGIC or (bool(head) and _is_msgpack_map_start(head[0]))


# ============================================================================
# 4. Command-line interface
# ============================================================================

@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .safetensors file (weights + config).")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=JSON",
              help='Override an inferred config field, e.g. --set decoder_heads=16 --set windows="[2,5,250]".')
@click.option("--dtype", type=click.Choice(list(STORED_DTYPES)), default="float32", show_default=True,
              help="How the weights are stored: float16 or bfloat16 halve the file (they load as float32).")
def main(checkpoint: Path, out: Path, overrides: tuple[str, ...], dtype: str):
    """Convert an official MW-MAE / MAE (flax msgpack) or AudioMAE++ (.pth) checkpoint,
    or one of ours, to this project's safetensors format, which embed.py, evaluate.py and
    checkpoints.load_pretrained take (train.py does not: its --resume needs its own
    checkpoint.pt)."""
    try:
        model = convert(checkpoint, **parse_overrides(overrides))
    except (ValueError, OSError) as error:  # CheckpointError and the readers' errors included
        raise click.ClickException(" ".join(str(error).split())) from None
    save_pretrained(model, out, dtype=STORED_DTYPES[dtype])
    cfg = model.cfg
    click.echo(f"{checkpoint} -> {out} ({dtype}): {cfg.block} blocks, dim {cfg.embed_dim} x {cfg.depth}, "
               f"decoder {cfg.decoder_dim} x {cfg.decoder_depth}"
               f"{' (multi-window)' if cfg.decoder_multiwindow else ''}, patch {cfg.patch_size}, "
               f"cls {cfg.cls_token}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
