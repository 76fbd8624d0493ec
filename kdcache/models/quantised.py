"""Quantisation-aware students (`distill --qat int8`): fake quantisation in training, an int8 model at the end.

The student is prepared with PyTorch's FX graph mode (`torch.ao.quantization.quantize_fx.prepare_qat_fx`, the
backend's default QAT qconfig: per-channel symmetric int8 weights, per-tensor uint8 activations, conv-BN(-ReLU)
fused, residual adds quantised), so every training step computes the loss on the fake-quantised student's outputs:
L = L_KD(quant(S(x)), T(x)) + L_CE. Its two halves are traced apart, `forward_features` and `forward_head`, so the
region logits of SDD keep working (the head, fake-quantised, applied to every pooled cell); the student's stages
(attention maps, hints) and its pre-logit embedding are not outputs of either graph, so losses reading them are
refused. Fake quantisation always computes in float32 (autocast is off inside), on the CPU or the GPU.

In eval mode the observers are off: the quantisation parameters stay what training left, which are the ones the
int8 model is converted with. `convert_int8` converts on the CPU (`convert_fx`: quantised kernels of x86/fbgemm
or qnnpack). `save_int8` writes the int8 state dict weights-only (INT8_FILE: data) and, for the user's own
deployment, a TorchScript program traced from it (TORCHSCRIPT_FILE), which kdcache never loads: data is never
code. `rebuild_int8` makes the int8 model again from data alone: the student's spec (as the user or the run's
record names it), the backend and input shape model_int8.json records, the same prepare and convert, then the
weights-only state.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import disable_observer, enable_observer

from kdcache.errors import KdcacheError
from kdcache.models.checkpoint import read_checkpoint, save_checkpoint
from kdcache.models.logit_map import model_name, speaks_timm

QAT_SCHEMES = ("int8",)
INT8_FILE = "model_int8.pt"  # a --qat run's int8 state dict, weights only (data), beside model.pt (the float weights)
TORCHSCRIPT_FILE = "model_int8.torchscript.pt"  # the same int8 model as a TorchScript program, for deployment only


def check_qat_scheme(scheme: str | None) -> None:
    """Refuse a --qat value other than the schemes kdcache converts to."""
    if scheme is not None and scheme not in QAT_SCHEMES:
        raise KdcacheError(f"--qat: unknown scheme {scheme!r}; known: {', '.join(QAT_SCHEMES)}")


def quantised_engine() -> str:
    """The CPU backend of quantised kernels: x86 (fbgemm's successor) where this build has it, else qnnpack (ARM)."""
    engines = torch.backends.quantized.supported_engines
    return next((engine for engine in ("x86", "fbgemm", "qnnpack") if engine in engines), engines[0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization's deprecation notes (it points to torchao, which kdcache does not use) kept off the
    user's screen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the int8 graph's qparams are constants, rightly
        warnings.filterwarnings("ignore", message=".*(reduce_range|quantized tensor creation|_empty_affine).*")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # torch.load's quantised tensors
        yield


class _Method(nn.Module):
    """One method of a network as a module's forward, so that FX traces that method alone."""

    def __init__(self, network: nn.Module, method: str) -> None:
        super().__init__()
        self.network, self.method = network, method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.network, self.method)(inputs)


def _prepared(network: nn.Module, method: str, example: torch.Tensor, backend: str) -> nn.Module:
    """The FX graph of `network.method` with fake quantisation (or one line naming why FX cannot trace it)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    try:
        with _quiet():
            return prepare_qat_fx(_Method(network, method), get_default_qat_qconfig_mapping(backend),
                                  (example,))
    except Exception as error:  # tracing fails in many ways: control flow on values, unsupported calls, ...
        reason = str(error).strip().split("\n", 1)[0][:300] or type(error).__name__
        raise KdcacheError(f"--qat int8: torch.fx cannot trace {model_name(network)}.{method}() ({reason}); "
                           f"quantisation-aware training needs a traceable student such as resnet8 or wrn_16_2")


class QuantisedStudent(nn.Module):
    """A student with fake quantisation: `forward_features` and `forward_head` are the network's own, each an FX
    graph with fake quantisers. Its state dict (last.pt) holds the observers and quantisation parameters too;
    `float_state` is the network's own state dict (model.pt), read from the graphs under the network's names.
    `backend`: whose default QAT qconfig prepares the graphs (the CPU's quantised kernels, quantised_engine())."""

    def __init__(self, network: nn.Module, images: torch.Tensor, backend: str | None = None) -> None:
        super().__init__()
        if not speaks_timm(network):
            raise KdcacheError(f"--qat int8: {model_name(network)} has no forward_features() and forward_head(), "
                               f"whose graphs are quantised; give it those two methods (README, 'Your own models')")
        self.arch = model_name(network)
        self.backend = backend or quantised_engine()
        self.input_shape = tuple(images.shape[1:])  # one image's: what the int8 model is traced on
        training = network.training
        with torch.no_grad():
            features = network.eval().forward_features(images[:2])
        network.train()  # prepared for training: fake quantisers and fused conv-BN that update the statistics
        self.features = _prepared(network, "forward_features", images[:2], self.backend)
        self.head = _prepared(network, "forward_head", features, self.backend)
        self.train(training)
        # prepare_qat_fx reuses the network's parameters and buffers: name each of the network's by its place here
        ours = {id(value): key for key, value in self.state_dict(keep_vars=True).items()}
        theirs = network.state_dict(keep_vars=True)
        unused = sorted(key for key, value in theirs.items() if id(value) not in ours)
        if unused:
            raise KdcacheError(f"--qat int8: {self.arch}'s {unused[0]} is not used by forward_features() or "
                               f"forward_head(), so the quantised graphs do not hold it; quantise a student whose "
                               f"weights all take part in its forward pass")
        self.float_names = {key: ours[id(value)] for key, value in theirs.items()}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The fake-quantised final feature map (computed in float32)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.features(images.float())

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The fake-quantised logits of a feature map (or of each pooled cell)."""
        if pre_logits:
            raise KdcacheError("--qat int8: the quantised head gives logits only, not the pre-logit embedding")
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The fake-quantised logits [B, C]."""
        return self.forward_head(self.forward_features(images))

    def train(self, mode: bool = True) -> QuantisedStudent:
        """Training mode observes activation ranges; eval mode freezes them, as the int8 model has them."""
        super().train(mode)
        self.apply(enable_observer if mode else disable_observer)
        return self

    def float_state(self) -> dict[str, torch.Tensor]:
        """The float network's state dict (its own names), as training left it: a checkpoint any command loads."""
        state = self.state_dict()
        return {key: state[place] for key, place in self.float_names.items()}


class Int8Network(nn.Module):
    """The converted halves as one network: int8 features, then the int8 head (FX graphs of quantised modules, run
    on the CPU)."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The int8 model's logits [B, C] (dequantised to float) of normalised images on the CPU."""
        return self.head(self.features(images))


def convert_int8(student: QuantisedStudent) -> Int8Network:
    """The student converted to int8 on the CPU (a copy: training may go on) with the backend's kernels."""
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.backends.quantized.engine = student.backend
    copied = copy.deepcopy(student).cpu().eval()
    with _quiet(), torch.no_grad():
        return Int8Network(convert_fx(copied.features), convert_fx(copied.head)).eval()


def int8_record(student: QuantisedStudent) -> dict[str, Any]:
    """What rebuilding the int8 model needs besides the student's spec (model_int8.json's "int8"): the scheme, the
    backend whose qconfig prepared it, and one image's shape [C, H, W], which the graphs are traced on."""
    return {"scheme": QAT_SCHEMES[0], "backend": student.backend, "input_shape": list(student.input_shape)}


def save_int8(network: Int8Network, record: dict[str, Any], folder: Path) -> None:
    """Write the int8 model twice: its state dict, weights only (INT8_FILE: data, what `kdcache eval` rebuilds the
    model from), and a TorchScript program traced from it (TORCHSCRIPT_FILE: for the user's own deployment; kdcache
    never loads it). Each is written atomically (a temporary file beside it, then renamed)."""
    save_checkpoint(folder / INT8_FILE, network)  # its state dict's _metadata too: quantised modules read versions
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{TORCHSCRIPT_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        with _quiet(), torch.no_grad():
            torch.jit.save(torch.jit.trace(network, torch.zeros(1, *record["input_shape"])), temporary)
        os.replace(temporary, folder / TORCHSCRIPT_FILE)
    except BaseException:
        os.unlink(temporary)
        raise


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether a file is a TorchScript archive (a zip holding code/), not a pickled state dict."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _checked_record(record: object, where: str) -> tuple[str, tuple[int, ...]]:
    """The backend and input shape of model_int8.json's "int8" record, or one line saying what is wrong with it."""
    record = record if isinstance(record, dict) else {}
    backend, shape = record.get("backend"), record.get("input_shape")
    if record.get("scheme") not in QAT_SCHEMES or not (
            isinstance(shape, list) and len(shape) == 3 and all(type(size) is int and size > 0 for size in shape)):
        raise KdcacheError(f"{where}: its \"int8\" record should name a scheme ({', '.join(QAT_SCHEMES)}), a backend "
                           f"and an input_shape [C, H, W], found {record!r}; train it again with "
                           f"`kdcache distill --qat int8`")
    if backend not in torch.backends.quantized.supported_engines:
        raise KdcacheError(f"{where}: the int8 model was converted for the {backend!r} quantised kernels, which this "
                           f"torch build lacks (it has {', '.join(torch.backends.quantized.supported_engines)}); "
                           f"evaluate it where torch has them")
    return backend, tuple(shape)


def rebuild_int8(network: nn.Module, record: object, path: Path, where: str) -> Int8Network:
    """The int8 model a --qat run saved, rebuilt from data: `network` (the float student its spec names, fresh)
    prepared and converted as training did, with the backend `record` names (`where`: the file holding it), then
    the weights-only int8 state at `path` loaded into it, strictly; on the CPU, in eval mode."""
    backend, shape = _checked_record(record, where)
    example = torch.zeros(2, *shape)
    student = QuantisedStudent(network, example, backend)
    with _quiet(), torch.no_grad():
        student.train()(example)  # every observer sees a value, so convert_fx has ranges: placeholders, replaced below
    converted = convert_int8(student)
    with _quiet():
        content = read_checkpoint(path)  # weights only: a tampered file is refused in one line, never run
    state = content.get("model") if isinstance(content, dict) else None
    expected = converted.state_dict()
    if not isinstance(state, dict):
        raise KdcacheError(f"{path} holds no int8 state dict (expected a dict under 'model'); train it again with "
                           f"`kdcache distill --qat int8`")
    if state.keys() != expected.keys():
        odd = sorted(state.keys() ^ expected.keys())[0]
        raise KdcacheError(f"{path} does not fit {model_name(network)}'s int8 graphs ({odd} is in one, not the "
                           f"other); pass --model with the student it was trained as, or train it again with "
                           f"`kdcache distill --qat int8`")
    try:
        converted.load_state_dict(state, strict=True)
    except Exception as error:  # a quantised module's loader fails in many ways on values of the wrong kind
        reason = str(error).strip().split("\n", 1)[0][:200] or type(error).__name__
        raise KdcacheError(f"{path} does not fit {model_name(network)}'s int8 graphs ({reason}); train it again "
                           f"with `kdcache distill --qat int8`") from None
    return converted.eval()
