"""kdcache's model registry, timm style: a constructor is registered under its function name."""

from torch import nn

from kdcache.registry import Registry

MODELS: Registry[nn.Module] = Registry("kdcache's model registry")
register_model = MODELS.register
