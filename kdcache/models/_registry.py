"""Model registry, timm style: a constructor is registered under its function name."""

from torch import nn

from kdcache.registry import Registry

MODELS: Registry[nn.Module] = Registry("create_model()")
register_model = MODELS.register
list_models = MODELS.names


def create_model(name: str, num_classes: int = 100, **kwargs: object) -> nn.Module:
    """A freshly initialised model of the registered architecture `name`."""
    model = MODELS.get(name, num_classes=num_classes, **kwargs)
    # Error messages (a checkpoint that does not fit) and cache metadata name the architecture.
    model.arch = name
    return model
