"""One Registry for models, datasets, policies, losses and store backends: register by name, get, list, refuse."""

import dataclasses

import pytest

from kdcache.cache.backends import BACKENDS, create_store, open_store, store_class
from kdcache.cache.hdf5_store import HDF5Store
from kdcache.cache.zarr_store import ZarrStore
from kdcache.data.augment import POLICIES
from kdcache.data.sources import DATASETS
from kdcache.errors import KdcacheError
from kdcache.losses.spec import LOSSES, TERMS, LossSpec, get_loss, list_losses, register_loss
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


def test_a_registry_read_from_a_file_fills_itself_once_on_first_use():
    reads = []

    def fill(registry):
        reads.append("read")
        registry.register(dict, "from_file")

    lazy = Registry("x()", sort=False, fill=fill)
    lazy.register(list, "early")  # registering reads nothing
    assert reads == []
    assert lazy.names() == ["early", "from_file"] and "from_file" in lazy and lazy.get("from_file") == {}
    assert reads == ["read"]


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
    (POLICIES, "get_policy()", "cifar"), (LOSSES, "get_loss()", "sdd-lskd"), (BACKENDS, "--format", "zarr"),
    (TERMS, "LossSpec(): function", "dkd"),
])
def test_every_kind_of_name_is_served_by_the_one_registry(registry, call, known):
    assert isinstance(registry, Registry) and known in registry.names()
    with pytest.raises(KdcacheError, match=rf"^{call.replace('(', '[(]').replace(')', '[)]')}: unknown name 'nope'; "
                                           rf"known: .*{known}"):
        registry.entry("nope")


class FakeStore(HDF5Store):
    """A backend a plugin could add: one local file whose name ends in .fake."""

    format_name, suffixes = "fake", (".fake",)
    made: list[str] = []

    @classmethod
    def holds(cls, location):
        return location.path.is_file() and location.suffix in cls.suffixes

    @classmethod
    def create(cls, place):
        cls.made.append(f"create {place}")
        return super().create(place)

    @classmethod
    def open(cls, place, read_only=True):
        cls.made.append(f"open {place}")
        return super().open(place, read_only)


def test_create_store_and_open_store_choose_the_backend_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(BACKENDS, "_entries", dict(BACKENDS._entries))  # registered for this test only
    BACKENDS.register(FakeStore, FakeStore.format_name)
    FakeStore.made = []
    with create_store(tmp_path / "c.fake") as store:  # its suffix claims it, though registered last
        assert type(store) is FakeStore
        store.set_metadata({"x": 1})
    with open_store(tmp_path / "c.fake") as store:  # a file: HDF5 holds it too, but the suffix names the fake
        assert type(store) is FakeStore and store.metadata() == {"x": 1}
    assert FakeStore.made == [f"create {tmp_path / 'c.fake'}", f"open {tmp_path / 'c.fake'}"]
    assert store_class(tmp_path / "c.h5") is HDF5Store and store_class(tmp_path / "c.other") is ZarrStore
    with pytest.raises(KdcacheError, match="HDF5 caches must be local"):  # not remote: refused at a URL
        store_class("memory://bucket/c.fake")
    with pytest.raises(KdcacheError, match=r"^--format: unknown name 'parquet'; known: fake, hdf5, zarr$"):
        create_store(tmp_path / "c.zarr", "parquet")


def test_a_loss_is_registered_and_refused_as_a_model_is(monkeypatch):
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))  # registered for this test only
    assert list_losses()[:3] == ["ce", "kd", "dkd"]  # configs/losses.yaml's order
    register_loss(LossSpec(name="kd-warm", function="kd", paper="-", code="-", ce_weight=0.5, distill_weight=0.5,
                           temperature=3.0, warmup_epochs=5))
    assert list_losses()[-1] == "kd-warm" and get_loss("kd-warm", temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError, match="'kd' is already registered"):
        register_loss(dataclasses.replace(get_loss("dkd"), name="kd"))
    with pytest.raises(KdcacheError) as loss:
        get_loss("nope")
    with pytest.raises(KdcacheError) as model:
        MODELS.get("nope")
    assert str(loss.value) == f"get_loss(): unknown name 'nope'; known: {', '.join(sorted(list_losses()))}"
    assert str(model.value).startswith("kdcache's model registry: unknown name 'nope'; known: ")
