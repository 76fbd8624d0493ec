"""Weights-only checkpoints: load other people's state dicts safely, write ours atomically.

A checkpoint is a `.pt`/`.pth` file, read with `torch.load(weights_only=True)`, which refuses any pickle
that would build arbitrary Python objects, so a checkpoint from the internet cannot run code; a
`.safetensors` file (the format timm and Hugging Face publish), which holds tensors only; or a kdcache
run folder, meaning its `model.pt`. We write only tensors and plain values, so our own files pass that check.
"""

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models.logit_map import model_name
from kdcache.models.lm import hf_weight_files
from kdcache.models.specs import (
    NO_DOWNLOADS,
    SPEC_FORMS,
    check_model_spec,
    create_model,
    require_spec_from_file,
    spec_body,
    weights_in_spec,
)

# how a refusal says to choose the model a checkpoint fits, in the words of the caller's flags
CHOOSE_MODEL = "load it into the model and class count it was trained with"
CHOOSE_TEACHER = "pass the --teacher it was trained with, on data of the class count it predicts"
CHOOSE_STUDENT = "pass the --student it was trained with"
RUN_CHECKPOINT = "model.pt"  # what a kdcache run folder holds its final weights in


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """The hex SHA-256 of several files as one: of a line `name sha256` per file, in the order given."""
    return hashlib.sha256("".join(f"{path.name} {file_sha256(path)}\n" for path in paths).encode()).hexdigest()


def _first_sentence(text: str) -> str:
    """The first line of an error message up to its first full stop: torch's messages run long."""
    return text.strip().split("\n", 1)[0].split(". ", 1)[0].rstrip(".")


def _corrupt(path: Path, reason: str) -> KdcacheError:
    return KdcacheError(f"checkpoint {path} is truncated or corrupt ({reason}): copy or download it again")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The weights file a --checkpoint names: the file itself, or a kdcache run folder's model.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_CHECKPOINT).is_file():
            raise KdcacheError(f"checkpoint {path} is a folder without {RUN_CHECKPOINT}: pass a weights file (.pt, "
                               f".pth or .safetensors) or a run folder written by kdcache train-teacher or distill")
        return path / RUN_CHECKPOINT
    if not path.is_file():
        raise KdcacheError(f"checkpoint {path} does not exist: pass a weights file (.pt, .pth or .safetensors) or a "
                           f"kdcache run folder")
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt(path, f"not a readable safetensors file: {_first_sentence(str(error))}") from None


def read_checkpoint(path: str | os.PathLike) -> object:
    """What a checkpoint holds, loaded weights-only on the CPU; every way that fails is one KdcacheError line."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A refusal names the global that weights-only loading would not import; other failures are bad bytes.
        unsafe_global = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe_global is None:
            raise _corrupt(path, "not a pickle stream that weights-only loading can parse") from None
        raise KdcacheError(
            f"checkpoint {path} holds the Python object {unsafe_global.group(1)}, which weights-only loading "
            "refuses because unpickling it can run code; if you trust the file, load it once with "
            "torch.load(weights_only=False) and torch.save only its state dict"
        ) from None
    except PermissionError:
        raise KdcacheError(f"checkpoint {path} cannot be read: permission denied") from None
    except Exception as error:  # a damaged file fails in many ways: zip reader, EOF, OS, pickle opcodes
        detail = _first_sentence(str(error))
        raise _corrupt(path, f"{type(error).__name__}: {detail}" if detail else type(error).__name__) from None


def _state_dict_in(content: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: bare, or under "model" (mdistiller) or "state_dict", `module.` stripped."""
    if isinstance(content, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not any(isinstance(value, torch.Tensor) for value in content.values()):
        raise KdcacheError(
            f"checkpoint {path} holds no state dict: expected a dict of tensors, bare or under 'model' or 'state_dict'"
        )
    # DataParallel and DistributedDataParallel save every name under `module.`.
    return {str(name).removeprefix("module."): value for name, value in content.items()}


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


# the float dtypes a checkpoint's tensor may have for a float parameter: torch converts between them without loss of
# meaning (fp8 and fp4 need scales kdcache does not know; integer and bool tensors are no float weights)
CASTABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dtypes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse, naming the tensor, one whose dtype load_state_dict would cast silently into another kind of value: an
    integer, bool, fp8 or fp4 tensor for a float parameter, or a float for an integer or bool buffer."""
    for name, tensor in state.items():
        wanted = expected.get(name)
        if wanted is None or tensor.dtype == wanted.dtype:
            continue
        if wanted.is_floating_point():
            fits = tensor.dtype in CASTABLE_FLOATS
        else:  # integer buffers (BatchNorm's num_batches_tracked) take integers, bool ones bools
            fits = (wanted.dtype == torch.bool) == (tensor.dtype == torch.bool) and not tensor.is_floating_point() \
                and not tensor.is_complex()
        if not fits:
            raise KdcacheError(f"checkpoint {path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')} but the "
                               f"model's {name} is {str(wanted.dtype).removeprefix('torch.')}; kdcache casts float "
                               f"weights between float16, bfloat16, float32 and float64 only: save the weights in one "
                               f"of those")


def _check_fits(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path, choose: str) -> None:
    """Raise one line naming the first parameter where `state` and `model` disagree, if any, ending with `choose`."""
    arch = model_name(model)
    expected = model.state_dict()
    _check_dtypes(state, expected, path)
    for name, tensor in expected.items():
        if name in state and state[name].shape != tensor.shape:
            raise KdcacheError(
                f"checkpoint {path} does not fit {arch}: {name} has shape {_shape(state[name])} in the file "
                f"but {_shape(tensor)} in the model; {choose}"
            )
    # load_state_dict fills BatchNorm counters that files from before PyTorch 0.4.1 lack.
    missing = [name for name in expected if name not in state and not name.endswith("num_batches_tracked")]
    if missing:
        raise KdcacheError(
            f"checkpoint {path} does not fit {arch}: the file lacks {missing[0]} and {len(missing) - 1} more of the "
            f"model's parameters; {choose}"
        )
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise KdcacheError(
            f"checkpoint {path} does not fit {arch}: the file has {unexpected[0]} and {len(unexpected) - 1} more "
            f"parameters the model lacks; {choose}"
        )


def load_checkpoint(path: str | os.PathLike, model: nn.Module, choose: str = CHOOSE_MODEL) -> nn.Module:
    """Load a weights-only checkpoint (a file or a run folder) into `model` (strictly) and return the model; a
    refusal ends with `choose`, the advice in the caller's words."""
    path = resolve_checkpoint(path)
    _load_state(_state_dict_in(read_checkpoint(path), path), model, path, choose)
    return model


def load_student_weights(path: str | os.PathLike, model: nn.Module, num_classes: int) -> list[str]:
    """Start a student from a weights file or run folder, strictly but for its head: where the file's head is for
    another class count (ImageNet's 1000), the model's fresh head is kept. Returns the head parameters kept fresh."""
    path = resolve_checkpoint(path)
    state = _state_dict_in(read_checkpoint(path), path)
    fresh = model.state_dict()
    replaced = [name for name in head_parameters(model, num_classes)
                if name in state and state[name].shape != fresh[name].shape]
    _load_state({**state, **{name: fresh[name] for name in replaced}}, model, path, CHOOSE_STUDENT)
    return replaced


def head_parameters(model: nn.Module, num_classes: int) -> list[str]:
    """The parameter names of the layer that gives the logits: the last linear layer (or 1x1 convolution) with
    `num_classes` outputs, as timm's, torchvision's and kdcache's models register their head last."""
    heads = [(name, module) for name, module in model.named_modules()
             if (isinstance(module, nn.Linear) and module.out_features == num_classes)
             or (isinstance(module, nn.Conv2d) and module.out_channels == num_classes and module.kernel_size == (1, 1))]
    if not heads:
        return []
    name, head = heads[-1]
    return [f"{name}.{parameter}" if name else parameter for parameter, _ in head.named_parameters(recurse=False)]


def _with_tied(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with each of the model's tied parameters (one tensor under two names: an LM's output layer and its
    embedding) filled from its partner where the file stores it once, as safetensors files do."""
    names_of: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel():  # empty tensors may all sit at address 0 without being tied
            names_of.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    filled = dict(state)
    for names in names_of.values():
        stored = next((name for name in names if name in state), None)
        if stored is not None:
            filled.update({name: state[stored] for name in names if name not in state})
    return filled


def _load_state(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path, choose: str) -> None:
    """Load `state` into `model` strictly (a tied parameter may be stored once), after refusing in one line a tensor
    that does not fit."""
    state = _with_tied(state, model)
    _check_fits(state, model, path, choose)
    model.load_state_dict(state, strict=True)


def _check_plain(value: object, where: str) -> None:
    """Raise TypeError unless `value` is made of tensors and plain values, which weights-only loading accepts."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    # torch.dtype: a quantised module's state (an int8 model's packed parameters) names its dtype, which
    # weights-only loading reads back
    elif not isinstance(value, (torch.Tensor, torch.dtype, str, int, float, bool, type(None))):
        raise TypeError(
            f"save_checkpoint(): {where} is a {type(value).__name__}; store tensors and plain values only "
            "(for a dataclass, dataclasses.asdict) so the file loads weights-only"
        )


def save_checkpoint(path: str | os.PathLike, model_or_state: nn.Module | Mapping, **extra: object) -> None:
    """Write {"model": state_dict, **extra} to `path` atomically (temporary file, then rename)."""
    if "model" in extra:
        raise TypeError("save_checkpoint(): 'model' is the state dict's key; name the extra value otherwise")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    content = {"model": state, **extra}
    _check_plain(content, "checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file in the same directory, so the rename stays on one filesystem and is atomic:
    # a reader sees the old file or the new one, never half of one.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(content, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise KdcacheError(f"could not write {path} ({_first_sentence(str(error))}); {kept}: free space on "
                               f"{path.parent} (or fix the cause), then rerun") from error
        raise


def checkpoint_sidecar(checkpoint: str | Path) -> dict[str, Any]:
    """The JSON written beside a kdcache checkpoint (arch, classes, dataset), or {} for a foreign checkpoint."""
    sidecar = resolve_checkpoint(checkpoint).with_suffix(".json")
    try:
        return json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except json.JSONDecodeError as error:
        raise KdcacheError(f"{sidecar} is not valid JSON ({error}); fix or delete it and pass --teacher") from error


def load_teacher(checkpoint: str | Path | None, arch: str | None, num_classes: int,
                 class_names: Sequence[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher in eval mode and the metadata that names it (arch: its spec, classes, checkpoint and its sha256).
    An hf:PATH teacher needs no checkpoint: its folder's weights (config.json and safetensors, hashed together) are
    used; a checkpoint given as well is loaded over them, strictly. A zero-shot teacher (a model with `zero_shot`:
    CLIP) embeds its prompts for `class_names`, the data's, once its weights are loaded: `zero_shot` in the metadata
    says what they were."""
    if arch:
        check_model_spec(arch)  # a misspelt spec is named before the weights are looked for
    if not checkpoint and arch and weights_in_spec(arch):  # hf:PATH: the folder's weights, named by their digest
        folder_files = hf_weight_files(spec_body(arch))
        info = {"arch": arch, "num_classes": num_classes, "checkpoint": str(folder_files[0].parent),
                "checkpoint_sha256": files_sha256(folder_files)}
        return create_model(arch, num_classes=num_classes).eval(), info
    if not checkpoint:
        where = f" for {arch}" if arch else ""
        raise KdcacheError(f"--checkpoint: the teacher's weights are required{where} (a .pt, .pth or .safetensors "
                           f"file, or a kdcache run folder); {NO_DOWNLOADS}")
    checkpoint = resolve_checkpoint(checkpoint)
    if not arch and checkpoint_sidecar(checkpoint).get("arch"):  # a run folder's spec is data: no code it names
        arch = require_spec_from_file(checkpoint_sidecar(checkpoint)["arch"], str(checkpoint.with_suffix(".json")))
    if not arch:
        raise KdcacheError(f"--teacher: which model is {checkpoint}? it has no kdcache sidecar "
                           f"({checkpoint.with_suffix('.json').name}); pass --teacher SPEC ({SPEC_FORMS})")
    model = create_model(arch, num_classes=num_classes)
    load_checkpoint(checkpoint, model, CHOOSE_TEACHER)
    info = {"arch": arch, "num_classes": num_classes, "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint)}
    if callable(getattr(model, "zero_shot", None)):  # its logits are scores against its classes' prompts
        info["zero_shot"] = model.zero_shot(class_names)
    return model.eval(), info
