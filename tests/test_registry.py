"""One Registry for models, datasets, policies, losses and store backends: register by name, get, list, refuse."""

import pytest

from kdcache.cache.backends import BACKENDS
from kdcache.data.augment import POLICIES
from kdcache.data.sources import DATASETS
from kdcache.errors import KdcacheError
from kdcache.losses.spec import TERMS, _losses
from kdcache.models._registry import MODELS
from kdcache.registry import Registry


def test_register_by_function_name_get_with_keywords_and_list_by_pattern():
    shapes = Registry("make_shape()")

    @shapes.register
    def square(side: int = 1) -> tuple[int, int]:
        return side, side

    shapes.register(lambda side=1: (side, 2 * side), "domino")
    assert shapes.get("square", side=3) == (3, 3) and shapes.get("domino", side=2) == (2, 4)
    assert shapes.names() == ["domino", "square"] and shapes.names("sq*") == ["square"]
    assert "square" in shapes and "circle" not in shapes and list(shapes) == ["domino", "square"]
    assert shapes.entry("square") is square


def test_names_keep_registration_order_when_asked():
    ordered = Registry("x()", sort=False)
    for name in ("b", "a", "c"):
        ordered.register(dict, name)
    assert ordered.names() == ["b", "a", "c"]


def test_a_taken_name_is_refused_and_an_unknown_one_lists_the_known_in_one_line():
    shapes = Registry("make_shape()")
    shapes.register(dict, "square")
    with pytest.raises(ValueError, match=r"make_shape\(\): 'square' is already registered"):
        shapes.register(list, "square")
    with pytest.raises(KdcacheError) as refused:
        shapes.get("circle")
    assert str(refused.value) == "make_shape(): unknown name 'circle'; known: square"


@pytest.mark.parametrize("registry, call, known", [
    (MODELS, "kdcache's model registry", "resnet8"), (DATASETS, "load_dataset()", "digits"),
    (POLICIES, "get_policy()", "cifar"), (_losses(), "get_loss()", "sdd-lskd"), (BACKENDS, "--format", "zarr"),
    (TERMS, "LossSpec(): function", "dkd"),
])
def test_every_kind_of_name_is_served_by_the_one_registry(registry, call, known):
    assert isinstance(registry, Registry) and known in registry.names()
    with pytest.raises(KdcacheError, match=rf"^{call.replace('(', '[(]').replace(')', '[)]')}: unknown name 'nope'; "
                                           rf"known: .*{known}"):
        registry.entry("nope")
