"""Model files: the one checkpoint format (safetensors weights + config in metadata), saving,
loading, and the checks that make loading an untrusted file safe.

    save_pretrained(model, path, dtype=None)  weights and config in one safetensors file, written
                                     atomically; dtype=torch.float16 stores half-size weights
    load_pretrained(path)            a model (float32) from such a file, from train.py's
                                     checkpoint.pt, or from a bundled model's name
    bundled_models()                 name -> file of the models shipped in models/
    resolve_model(spec)              the file a MODEL argument names (a path or a bundled name)
    read_checkpoint(path)            a training checkpoint (torch file), read with weights_only=True
    config_for_weights(config, shapes)  a file's config, checked against its tensors' shapes

    python checkpoints.py FILE       what a model file holds (kind, stored dtype, config, parameters),
                                     after the checks (FILE may be a bundled model's name)

Bundled models: models/<name>.safetensors next to this file (float16 weights, half the size of
float32; the model is float32 in memory) load by name wherever a model file is taken, e.g.
load_pretrained("mwmae-tiny-debian") or `python embed.py mwmae-tiny-debian AUDIO_DIR --out OUT`.
DEFAULT_MODEL is what embed.py and evaluate.py use when no model is given.
"""
import dataclasses
import json
import math
import os
import pickle
import re
from pathlib import Path

import click
import torch

import files
from mae import MAE, MAEConfig

# A model file is save_pretrained's safetensors file (the weights, and the config in its
# metadata) or a torch checkpoint holding 'config' and 'model' (train.py's checkpoint.pt).
# Files can be corrupt or hostile, so loading checks them in an order that never allocates in
# proportion to what a file merely claims:
#   1. the kind of file, from its first bytes (never from its name);
#   2. the header: safetensors checks every tensor's dtype, shape and offsets against the
#      file's length without reading the data; torch.load(weights_only=True) runs no pickled
#      code and checks each storage against the bytes stored for it;
#   3. the config: known fields, each with a value of the right type;
#   4. the config against the file's own tensors: first the sizes (widths, token and block
#      counts, read off a few shapes), then every name and shape of the model built on the
#      meta device, which allocates no memory for weights;
# and only then reads the weights and builds the model. Every failure raises CheckpointError
# with one line, "PATH: what is wrong".

MAX_DEPTH = 1000  # blocks per stack: the largest preset has 32; building thousands takes seconds
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' names
_DEFAULTS = dataclasses.asdict(MAEConfig())
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what save_pretrained writes

MODELS_DIR = Path(__file__).resolve().parent / "models"  # the bundled models (tests point it elsewhere)
MODEL_SUFFIX = ".safetensors"
DEFAULT_MODEL = "mwmae-tiny-debian"  # the pretrained MW-MAE shipped with the code


class CheckpointError(ValueError):
    """A model file that cannot be loaded: the message names the file and what is wrong."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No model file at the path given (a FileNotFoundError too, for callers that test for it)."""


def _error(path: str | Path, problem: object) -> CheckpointError:
    """CheckpointError("PATH: problem") on one line, whatever the problem's text holds."""
    return CheckpointError(f"{files.shown(path)}: {' '.join(str(problem).split())}")


def model_file_kind(path: str | Path) -> str | None:
    """'safetensors', 'torch' (the zip torch.save writes), 'torch-legacy' (torch's format before
    1.6, a pickle stream) or None, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(len(TORCH_LEGACY_MAGIC))
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head == TORCH_LEGACY_MAGIC:
        return "torch-legacy"
    if head[8:9] == b"{":  # safetensors: the header's length (8 bytes), then the JSON header
        return "safetensors"
    return None


def _is_valid_value(default: object, value: object) -> bool:
    """Whether a config value read from a file has the type of the field's default
    (JSON has lists where the config has tuples)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return type(value) is int and value >= 0
    if isinstance(default, float):
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if default is None and value is None:
        return True
    sizes = isinstance(value, (list, tuple)) and len(value) > 0
    sizes = sizes and all(type(v) is int and v > 0 for v in value)
    return sizes and (default is None or len(value) == len(default))


def _checked_fields(config: object) -> dict:
    """All MAEConfig fields from a file's config: known fields with values of the right type,
    the defaults for fields it leaves out (files written before a field existed)."""
    if not isinstance(config, dict):
        raise ValueError(f"the config is a {type(config).__name__}, not a mapping of fields")
    unknown = sorted(str(name) for name in config if name not in _DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config field {unknown[0][:50]!r}")
    for name, value in config.items():
        if not _is_valid_value(_DEFAULTS[name], value):
            raise ValueError(f"config field {name} has an invalid value {repr(value)[:50]}")
    return {**_DEFAULTS, **config}


def _shape_problem(name: str, weights: tuple, config: tuple) -> str:
    return f"{name} is {tuple(weights)} in the weights but {tuple(config)} in the config"


def _size_problem(fields: dict, shapes: dict[str, tuple], optional: tuple[str, ...]) -> str | None:
    """What is wrong with the config's sizes, from a few of the file's tensors: checked before
    anything is built from the config, which could ask for a million blocks or millions of
    channels. The weights' own shapes are bounded by the file's size."""
    dim, decoder_dim = fields["embed_dim"], fields["decoder_dim"]
    (time, mel), (patch_time, patch_mel) = fields["input_size"], fields["patch_size"]
    patches = (time // patch_time) * (mel // patch_mel)
    prefix = int(fields["cls_token"])
    decoder_prefix = 0 if fields["decoder_multiwindow"] else prefix
    needed = {
        "patch_embed.weight": (dim, 1, patch_time, patch_mel),
        "decoder_embed.weight": (decoder_dim, dim),
        "pos_embed": (1, prefix + patches, dim),
        "decoder_pos_embed": (1, decoder_prefix + patches, decoder_dim),
    }
    for name, shape in needed.items():
        if name not in shapes and name not in optional:
            return f"tensor {name} is missing"
        if name in shapes and tuple(shapes[name]) != shape:
            return _shape_problem(name, shapes[name], shape)
    for stack, field in (("blocks", "depth"), ("decoder_blocks", "decoder_depth")):
        count = len({name.split(".")[1] for name in shapes if name.startswith(stack + ".")})
        if fields[field] != count:
            return f"the config says {field}={fields[field]} but the weights have {count} {stack}"
        if count > MAX_DEPTH:
            return f"{count} {stack}: more than {MAX_DEPTH} is not a model of this project"
    heads = max(fields["num_heads"], fields["decoder_heads"], len(fields["windows"] or ()))
    if heads > max(dim, decoder_dim):
        return f"{heads} attention heads for at most {max(dim, decoder_dim)} channels"
    return None


def state_shapes(cfg: MAEConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of MAE(cfg).state_dict(), from a model built on the meta device
    (no memory for its weights)."""
    with torch.device("meta"):
        model = MAE(cfg)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _state_problem(expected: dict, shapes: dict, optional: tuple[str, ...]) -> str | None:
    """What differs between the tensors a config needs and those a file holds, if anything."""
    missing = [name for name in expected if name not in shapes and name not in optional]
    unexpected = [name for name in shapes if name not in expected]
    if missing or unexpected:
        parts = ([f"missing tensors {_listed(missing)}"] if missing else []) + (
            [f"unexpected tensors {_listed(unexpected)}"] if unexpected else [])
        return "; ".join(parts)
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != shape:
            return _shape_problem(name, shapes[name], shape)
    return None


def config_for_weights(config: object, shapes: dict[str, tuple], optional: tuple[str, ...] = ()) -> MAEConfig:
    """The MAEConfig of a file's config, checked against the shapes of the file's tensors:
    it must need exactly these tensors with exactly these shapes (names in `optional` may be
    absent). Raises ValueError saying what does not fit; nothing large is built or allocated."""
    fields = _checked_fields(config)
    problem = _size_problem(fields, shapes, optional)
    if problem is None:
        try:
            cfg = MAEConfig(**fields)
            expected = state_shapes(cfg)
        except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as error:
            raise ValueError(f"invalid config: {error}") from None
        problem = _state_problem(expected, shapes, optional)
    if problem:
        raise ValueError(problem)
    return cfg


def _unpickling_problem(error: pickle.UnpicklingError) -> str:
    """Our words for torch's refusal (its own message advises the unsafe weights_only=False)."""
    refused = re.search(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", str(error))
    if refused:
        return (f"refused: it references {refused.group(1)}, which is neither a tensor nor "
                "plain data (nothing in the file was run)")
    return "not a readable checkpoint (corrupt pickle data)"


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu"):
    """The contents of a torch file, read with weights_only=True, so nothing pickled is
    executed. Any problem (not a torch file, damaged, refused globals) raises CheckpointError."""
    try:
        kind = model_file_kind(path)
    except OSError as error:
        raise _error(path, f"cannot read it ({error.strerror})") from None
    if kind not in ("torch", "torch-legacy"):
        raise _error(path, "not a torch checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _error(path, _unpickling_problem(error)) from None
    except Exception as error:  # torch.load fails in many ways on damaged files
        raise _error(path, f"not a readable checkpoint ({type(error).__name__})") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint of this project (a torch file with 'config' and 'model', e.g. train.py's),
    read by read_torch_file and checked: 'model' holds floating-point tensors that are exactly
    those its config needs. Other entries are the caller's to check. Any problem raises
    CheckpointError."""
    checkpoint = read_torch_file(path, map_location)
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= checkpoint.keys():
        raise _error(path, "not a checkpoint of this project (needs 'config' and 'model')")
    state = checkpoint["model"]
    if not (isinstance(state, dict) and all(isinstance(name, str) and isinstance(tensor, torch.Tensor)
                                            for name, tensor in state.items())):
        raise _error(path, "its 'model' is not a mapping of names to tensors")
    not_float = [name for name, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        raise _error(path, f"tensor {not_float[0]} is {state[not_float[0]].dtype}, not floating point")
    try:
        config_for_weights(checkpoint["config"], {name: tuple(t.shape) for name, t in state.items()})
    except ValueError as error:
        raise _error(path, error) from None
    return checkpoint


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: MAE, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Weights and config in one safetensors file (the config in its metadata, and the dtype
    the weights are stored in). dtype: torch.float16 or torch.bfloat16 store the weights in
    half the bytes (load_pretrained upcasts them to float32); None keeps the model's own."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in STORED_DTYPES:
        raise ValueError(f"cannot store weights as {dtype}: use one of "
                         f"{', '.join(map(_dtype_name, STORED_DTYPES))}")
    state = {k: v.detach().cpu().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    stored = sorted({_dtype_name(tensor.dtype) for tensor in state.values()})
    metadata = {"format": "mwmae-torch", "config": json.dumps(model.cfg.to_dict()), "dtype": ",".join(stored)}
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: str) -> None:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)  # save_file replaces the file with an owner-only one

    files.atomic_write(path, write)


def _read_safetensors(path: Path, map_location: str | torch.device) -> tuple[MAEConfig, dict]:
    """The checked config and the weights of save_pretrained's file. The header and the config
    are checked against each other before the weights are read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            slices = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: tuple(part.get_shape()) for name, part in slices.items()}
            dtypes = {name: part.get_dtype() for name, part in slices.items()}
    except (SafetensorError, OSError) as error:
        raise _error(path, f"not a readable safetensors file ({error})") from None
    if "config" not in metadata:
        raise _error(path, "safetensors file without a model config (not written by save_pretrained)")
    not_float = [name for name, dtype in dtypes.items() if dtype not in FLOAT_DTYPES]
    if not_float:
        raise _error(path, f"tensor {not_float[0]} is {dtypes[not_float[0]]}, not floating point")
    try:
        config = json.loads(metadata["config"])
    except (ValueError, RecursionError):
        raise _error(path, "its config (safetensors metadata) is not JSON") from None
    try:
        cfg = config_for_weights(config, shapes)
    except ValueError as error:
        raise _error(path, error) from None
    try:
        return cfg, load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise _error(path, f"cannot read its tensors ({error})") from None


def bundled_models() -> dict[str, Path]:
    """name -> file of every model shipped in MODELS_DIR (models/<name>.safetensors), by name."""
    if not MODELS_DIR.is_dir():
        return {}
    found = (path for path in MODELS_DIR.glob("*" + MODEL_SUFFIX) if path.is_file())
    return {path.name.removesuffix(MODEL_SUFFIX): path for path in sorted(found)}


def resolve_model(spec: str | Path) -> Path | None:
    """The model file that a MODEL argument names: the file at that path, else the bundled
    model of that name; None when it names neither (a preset name is the caller's business)."""
    path = Path(spec)
    if path.is_file():
        return path
    return bundled_models().get(str(spec))


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> MAE:
    """A float32 model from save_pretrained's safetensors file (float16 and bfloat16 weights are
    upcast), from a training checkpoint (a torch file with 'config' and 'model'; read with
    weights_only=True), or from a bundled model's name. The file's config is checked against
    its tensors before anything is built (see above). Raises CheckpointError, and
    MissingCheckpointError (also a FileNotFoundError) when there is no file."""
    path = resolve_model(path) or Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"{files.shown(path)}: no such model file")
    try:
        kind = model_file_kind(path)
    except OSError as error:
        raise _error(path, f"cannot read it ({error.strerror})") from None
    if kind is None:
        raise _error(path, "not a model file (neither safetensors nor a torch checkpoint)")
    if kind == "safetensors":
        cfg, state = _read_safetensors(path, map_location)
    else:
        checkpoint = read_checkpoint(path, map_location)
        cfg, state = MAEConfig(**checkpoint["config"]), checkpoint["model"]
    state = {name: tensor.float() for name, tensor in state.items()}  # float32 whatever is stored
    model = MAE(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # not expected after the checks above, but still one line
        raise _error(path, f"the weights do not fit the model ({error})") from None
    return model.to(map_location)


# ----------------------------------------------------------------------------- command

def stored_dtypes(path: str | Path) -> list[str]:
    """The dtypes a checked model file stores its weights in ('float16', ...), sorted."""
    if model_file_kind(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return sorted({FLOAT_DTYPES[f.get_slice(name).get_dtype()] for name in f.keys()})
    return sorted({_dtype_name(t.dtype) for t in read_checkpoint(path)["model"].values()})


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
def main(path: str):
    """What model file PATH (or the bundled model named PATH) holds, after every check
    load_pretrained makes: its kind, stored dtype, config and parameter count."""
    try:
        model = load_pretrained(path)
        path = resolve_model(path)
        kind, dtypes = model_file_kind(path), stored_dtypes(path)
    except (CheckpointError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{files.shown(path)}: {kind} model file, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters, stored as {'/'.join(dtypes)}")
    for name, value in model.cfg.to_dict().items():
        click.echo(f"  {name:<20} {value}")


if __name__ == "__main__":
    main()
