"""Model specs: one string names a model wherever a model is named (CLI, recipes, the Python API, metadata).

- `NAME`: kdcache's registry (`kdcache models`);
- `timm:NAME`: any timm model (`pip install "kdcache[timm]"`), pretrained tags such as `resnet50.a1_in1k` too;
  `timm:NAME,key=value,...` passes numbers and true/false to timm's constructor (a ViT at 32 px:
  `timm:deit_tiny_distilled_patch16_224,img_size=32,patch_size=8,depth=4`);
- `torchvision:NAME`: `torchvision.models.get_model(NAME)`, given timm's interface by an adapter; a segmentation
  NAME (deeplabv3_resnet50, ...) is built without its backbone's weights and returns per-pixel logits
  (kdcache.models.dense_specs);
- `smp:ARCH[,key=value,...]`: a segmentation-models-pytorch model (`pip install "kdcache[seg]"`), the keys its
  constructor's (numbers, true/false, names: `smp:Unet,encoder_name=resnet18`), never its weights (dense_specs);
- `gpt:layers=L,width=D,heads=H[,context=T][,dropout=P]`: a small GPT for students trained from scratch, its
  vocabulary the class count (kdcache.models.lm; keys left out take layers=6, width=384, heads=6, context=1024);
- `hf:PATH`: a Hugging Face causal LM in a local folder (config.json, model.safetensors), with the folder's weights;
  transformers runs no code from the folder (kdcache.models.lm);
- `clip:NAME[,key=value,...]`: open_clip's CLIP architecture NAME as a zero-shot teacher (`pip install
  "kdcache[clip]"`; kdcache.models.clip), its weights from a local file like every other's;
- `python:module.path:callable`: your own importable factory returning an nn.Module (`num_classes=` passed
  when it accepts it), imported only when the user typed the spec: a spec read from a file kdcache finds (a run
  folder's model.json) names models built by name or read from a folder as data only, never a python: one
  (`require_spec_from_file`).

Every model but an hf: one is built with fresh weights: kdcache never downloads any. Weights come from a local file
(`load_checkpoint`), so a cache names exactly what its teacher was.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from kdcache.errors import KdcacheError
from kdcache.models._registry import MODELS
from kdcache.models.dense_specs import (
    build_smp,
    build_torchvision_segmentation,
    smp_architecture,
    smp_names,
    torchvision_segmentation_names,
)
from kdcache.models.lm import build_gpt, build_hf, gpt_examples, hf_exists, parse_gpt_spec
from kdcache.models.torchvision_adapter import adapt_torchvision
from kdcache.registry import Registry

SPEC_FORMS = ("NAME (kdcache's registry), timm:NAME, torchvision:NAME, smp:ARCH,key=value,..., "
              "gpt:layers=L,width=D,heads=H, hf:PATH, clip:NAME or python:module.path:callable")
NO_DOWNLOADS = ("kdcache never downloads weights: download the file once where there is internet (timm's and Hugging "
                "Face's model.safetensors, or torchvision's .pth) and pass it with --checkpoint")


@dataclass(frozen=True)
class Source:
    """Where models of one spec scheme come from: how to build one by name, and which names exist."""

    build: Callable[[str, int | None], nn.Module]
    names: Callable[[str], list[str]]
    exists: Callable[[str], bool]
    describe: str
    own_classes: bool = False  # whether a model knows its class count itself (an hf: config's vocab_size)


SOURCES: Registry[Source] = Registry("model spec")


def _split(spec: str) -> tuple[str, str]:
    """(scheme, name) of a spec; the scheme of a bare registry name is 'kdcache'."""
    scheme, separator, name = str(spec).partition(":")
    if not separator:
        return "kdcache", scheme
    if scheme not in SOURCES or scheme == "kdcache":
        raise KdcacheError(f"model spec {spec!r}: unknown source {scheme!r}; a model is named as {SPEC_FORMS}")
    return scheme, name


def _unknown(spec: str, where: str, name: str, known: list[str]) -> KdcacheError:
    """One line: what was looked up where, and what exists (all of a short list, else the closest names)."""
    scheme = _split(spec)[0]
    if scheme == "kdcache":
        return KdcacheError(f"model spec {spec!r}: kdcache's registry has no model {name!r}; known: "
                            f"{', '.join(sorted(known))}; other models are named as {SPEC_FORMS}")
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
    return KdcacheError(f"model spec {spec!r}: {where} has no model {name!r}; "
                        f"{'close names: ' + ', '.join(close) if close else 'no name is close'} "
                        f"(`kdcache models --source {scheme} PATTERN` lists them)")


def check_model_spec(spec: str) -> None:
    """Refuse a spec that names no model, in one line, without building the model."""
    scheme, name = _split(spec)
    source = SOURCES.entry(scheme)
    if not source.exists(name):
        raise _unknown(spec, source.describe, name, source.names("*"))


def create_model(spec: str, num_classes: int | None = 100, pretrained: bool = False) -> nn.Module:
    """A freshly initialised model for a spec (an hf: one with its folder's weights; see the module docstring);
    `model.arch` is the spec. num_classes=None: the model's own, for a source that knows it (hf:)."""
    if pretrained:
        raise KdcacheError(f"create_model({spec!r}, pretrained=True): {NO_DOWNLOADS}")
    check_model_spec(spec)
    scheme, name = _split(spec)
    source = SOURCES.entry(scheme)
    if num_classes is None and not source.own_classes:
        raise KdcacheError(f"create_model({spec!r}, num_classes=None): a {source.describe} model is built for a "
                           f"class count (a vocabulary, for a GPT); only an hf: model has its own")
    model = source.build(name, num_classes)
    if not isinstance(model, nn.Module):
        raise KdcacheError(f"model spec {spec!r} made a {type(model).__name__}; expected a torch.nn.Module")
    # error messages (a checkpoint that does not fit), checkpoints and cache metadata name the model by its spec
    model.arch = str(spec)
    return model


# the sources a spec read from a file kdcache finds may name: models built by name or from a folder's tensors and
# JSON (hf: runs no code from the folder), never code to import
FILE_SOURCES = ("kdcache", "timm", "torchvision", "gpt", "hf", "smp", "clip")


def require_spec_from_file(spec: str, where: str, flag: str = "--teacher") -> str:
    """A spec kdcache read from a file it found rather than one the user named (a run folder's model.json, a cache's
    metadata, a run's record): refused if it names code to import (python:), which kdcache imports only when the
    user types it."""
    scheme = _split(spec)[0]
    if scheme not in FILE_SOURCES:
        raise KdcacheError(f"{where} names the model {spec!r}: a {scheme}: spec imports and runs the code it names, "
                           f"so kdcache takes one only from you, never from a file it finds; if you trust that code, "
                           f"pass {flag} {spec} yourself (on the command line, or in a --config file you name)")
    return spec


def count_parameters(model: nn.Module) -> int:
    """How many numbers a model learns: each parameter once, tied ones (a GPT's embedding and head) included."""
    return sum(parameter.numel() for parameter in model.parameters())


def spec_body(spec: str) -> str:
    """What a spec names within its source: `resnet8`, `resnet50` of timm:resnet50, `PATH` of hf:PATH."""
    return _split(spec)[1]


def weights_in_spec(spec: str) -> bool:
    """Whether a spec's model comes with its weights (hf:PATH, from its folder), so no checkpoint is needed."""
    return _split(spec)[0] == "hf"


def pretrained_tag(spec: str) -> bool:
    """Whether a spec names pretrained weights (timm:resnet50.a1_in1k), which kdcache never fetches."""
    scheme, name = _split(spec)
    return scheme == "timm" and "." in _timm_arguments(name)[0]


def list_models(pattern: str = "*", source: str = "kdcache", pretrained: bool = False) -> list[str]:
    """The names one source offers that match a shell-style pattern, as specs (prefixed, except kdcache's); with
    `pretrained`, timm's pretrained tags (resnet50.a1_in1k), as `timm.list_pretrained` lists them."""
    if pretrained and source != "timm":
        raise KdcacheError(f"models --pretrained: only timm names its pretrained weights by tag (--source timm); "
                           f"{source}'s models are listed without --pretrained, and their weights come from a local "
                           f"file (--checkpoint)")
    names = _timm().list_pretrained(pattern) if pretrained else SOURCES.entry(source).names(pattern)
    return names if source == "kdcache" else [f"{source}:{name}" for name in names]


# -- kdcache's registry --------------------------------------------------------------------------------------------
SOURCES.register(Source(lambda name, num_classes: MODELS.get(name, num_classes=num_classes), MODELS.names,
                        lambda name: name in MODELS, "kdcache's registry"), "kdcache")


# -- timm ----------------------------------------------------------------------------------------------------------
def _timm():
    try:
        import timm
    except ImportError:
        raise KdcacheError('timm: models named timm:NAME need timm; install it with pip install "kdcache[timm]" '
                           '(or pip install timm)') from None
    return timm


TIMM_FORM = ("timm:NAME or timm:NAME,key=value,... (numbers, true or false), such as "
             "timm:vit_tiny_patch16_224,img_size=32")


def spec_arguments(scheme: str, body: str, form: str, reserved: tuple[str, ...] = (),
                    names: bool = False) -> tuple[str, dict[str, int | float | bool | str]]:
    """The model name and the constructor's keyword arguments of a spec's body (`vit_tiny_patch16_224,img_size=32`):
    numbers, booleans and, where `names`, words (smp's encoder_name=resnet18), which the constructor looks up in
    its own tables, so a spec read from a file passes data, never a name of code. `reserved`: the keys kdcache
    sets."""
    name, *items = body.split(",")
    arguments: dict[str, int | float | bool | str] = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.isidentifier() or key in arguments or key in reserved:
            kept = f" ({', '.join(reserved[:-1])} and {reserved[-1]} are kdcache's to set)" if reserved else ""
            raise KdcacheError(f"model spec '{scheme}:{body}': {item!r} is not a new key=value{kept}; a {scheme} "
                               f"model is named as {form}")
        arguments[key] = _spec_value(text, scheme, body, form, names)
    return name, arguments


def _spec_value(text: str, scheme: str, body: str, form: str, names: bool) -> int | float | bool | str:
    """One argument's value: an integer, a float, true or false; else, where `names`, the text itself."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if names and text:
        return text
    raise KdcacheError(f"model spec '{scheme}:{body}': value {text!r} is not a number, true or false"
                       f"{' or a name' if names else ''}; a {scheme} model is named as {form}")


def _timm_arguments(body: str) -> tuple[str, dict[str, int | float | bool]]:
    """The model name and the constructor's keyword arguments of a timm spec's body: numbers and booleans only."""
    return spec_arguments("timm", body, TIMM_FORM, ("num_classes", "pretrained"))


def _timm_exists(body: str) -> bool:
    """Whether timm has the architecture, and the pretrained tag if the name carries one (resnet50.a1_in1k)."""
    timm = _timm()
    name = _timm_arguments(body)[0]
    architecture, tagged, _ = name.partition(".")
    return timm.is_model(architecture) and (not tagged or name in timm.list_models(name, pretrained=True))


def _timm_build(body: str, num_classes: int) -> nn.Module:
    name, arguments = _timm_arguments(body)
    try:
        return _timm().create_model(name, pretrained=False, num_classes=num_classes, **arguments)
    except (TypeError, ValueError, AssertionError) as error:  # an argument the constructor refuses
        raise KdcacheError(f"model spec 'timm:{body}': timm's {name} refused {', '.join(arguments)}: {error}; "
                           f"give arguments and values its constructor takes") from None


SOURCES.register(Source(_timm_build, lambda pattern: _timm().list_models(pattern), _timm_exists, "timm"), "timm")


# -- torchvision ---------------------------------------------------------------------------------------------------
def _torchvision_names(pattern: str) -> list[str]:
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models) + torchvision_segmentation_names()
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def _torchvision_build(name: str, num_classes: int) -> nn.Module:
    import torchvision.models

    if name in torchvision_segmentation_names():
        return build_torchvision_segmentation(name, num_classes)
    return adapt_torchvision(torchvision.models.get_model(name, weights=None, num_classes=num_classes))


SOURCES.register(Source(_torchvision_build, _torchvision_names, lambda name: name in _torchvision_names("*"),
                        "torchvision"), "torchvision")


# -- segmentation-models-pytorch -----------------------------------------------------------------------------------
SMP_FORM = "smp:ARCH or smp:ARCH,key=value,... (numbers, true, false or names), such as smp:Unet,encoder_name=resnet18"


def _smp_arguments(body: str) -> tuple[str, dict[str, int | float | bool | str]]:
    """The architecture and the constructor's keyword arguments of an smp spec's body; weights are refused."""
    architecture, arguments = spec_arguments("smp", body, SMP_FORM, ("classes", "in_channels", "activation"),
                                              names=True)
    if "encoder_weights" in arguments:
        raise KdcacheError(f"model spec 'smp:{body}': kdcache builds smp's models with encoder_weights=None and "
                           f"downloads no weights; drop encoder_weights and pass the weights as a local file with "
                           f"--checkpoint")
    return architecture, arguments


def _smp_build(body: str, num_classes: int) -> nn.Module:
    architecture, arguments = _smp_arguments(body)
    return build_smp(f"smp:{body}", architecture, arguments, num_classes)


def _smp_exists(body: str) -> bool:
    """Whether smp has the architecture; a spec naming none is one line listing the known ones."""
    return smp_architecture(f"smp:{body}", _smp_arguments(body)[0]) is not None


SOURCES.register(Source(_smp_build, smp_names, _smp_exists, "segmentation-models-pytorch"), "smp")


# -- language models -----------------------------------------------------------------------------------------------
SOURCES.register(Source(build_gpt, gpt_examples, lambda name: parse_gpt_spec(name) is not None, "GPT"), "gpt")


def _hf_names(pattern: str) -> list[str]:
    raise KdcacheError("models --source hf: an hf:PATH spec names a local model folder; there is no list of them to "
                       "show")


SOURCES.register(Source(build_hf, _hf_names, hf_exists, "Hugging Face folder", own_classes=True), "hf")


# -- your own factory ----------------------------------------------------------------------------------------------
def _factory(name: str) -> Callable[..., nn.Module]:
    """The callable a `module.path:callable` names; every way that fails is one line."""
    module_path, separator, attribute = name.partition(":")
    spec = f"python:{name}"
    if not (separator and module_path and attribute):
        raise KdcacheError(f"model spec {spec!r}: expected python:module.path:callable, such as "
                           f"python:my_models:make_net (a function in my_models.py on the Python path)")
    try:
        module = importlib.import_module(module_path)
    except ImportError as error:
        raise KdcacheError(f"model spec {spec!r}: cannot import module {module_path!r} ({error}); it must be "
                           f"importable from where kdcache runs (installed, or on PYTHONPATH)") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        offered = sorted(key for key, value in vars(module).items() if callable(value) and not key.startswith("_"))
        raise KdcacheError(f"model spec {spec!r}: module {module_path!r} has no callable {attribute!r}; "
                           f"it has: {', '.join(offered) or 'no public callables'}")
    return factory


def _python_build(name: str, num_classes: int) -> nn.Module:
    factory = _factory(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: call it as it is
        return factory()
    parameters = signature.parameters
    accepts = "num_classes" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    arguments = {"num_classes": num_classes} if accepts else {}
    try:  # a factory that needs more than kdcache passes is one line, not the TypeError of calling it
        signature.bind(**arguments)
    except TypeError as error:
        raise KdcacheError(f"model spec 'python:{name}': kdcache calls it as {name.rpartition(':')[2]}("
                           f"{'num_classes=N' if accepts else ''}), which it refuses ({error}); name a factory that builds the "
                           f"model from num_classes alone (a function of your own around it)") from None
    return factory(**arguments)


def _python_names(pattern: str) -> list[str]:
    raise KdcacheError("models --source python: a python:module.path:callable spec names your own factory; "
                       "there is no list of them to show")


SOURCES.register(Source(_python_build, _python_names, lambda name: _factory(name) is not None,
                        "your own factory"), "python")
