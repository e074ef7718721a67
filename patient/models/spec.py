"""The zoo's leaf module: the static `ModelSpec` every model carries, and the tables a model family fills in when it is
defined (its `Family` record and its named `Variant`s). It imports nothing from patient, so every other module of the
zoo (families, registry, weights, folding, Keras interop) can import it without circles.

A family registers itself in its own file, the way timm does:

    register_family(Family("resnet", ResNet, mean=IMAGENET_MEAN, std=IMAGENET_STD, head="fc", timm_name=timm_name))
    register_variant("resnet18", "resnet", 224, "ResNet-18 v1.5", depths=(2, 2, 2, 2), ...)

The registry, weight import and export read these tables and hold no family knowledge of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model without the caller: registry name, family, constructor arguments,
    class count, preprocessing and the default input resolution. Hashable, so it can be a static field.

    It is the one source of truth for the input normalisation: a model's `Normalize` reads `mean` and `std` from here."""

    name: str
    family: str
    kwargs: tuple  # sorted (key, value) pairs, JSON-friendly values (tuples for lists)
    num_classes: int
    mean: tuple
    std: tuple
    resolution: int

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["kwargs"] = {k: v for k, v in self.kwargs}
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModelSpec:
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(
            name=d["name"], family=d["family"], kwargs=tuple(sorted((k, tup(v)) for k, v in d["kwargs"].items())),
            num_classes=int(d["num_classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            resolution=int(d["resolution"]),
        )


def _same_name(name: str) -> str:
    return name


@dataclasses.dataclass(frozen=True)
class Family:
    """What the zoo needs to know about a model family.

    - `cls`: the `eqx.Module` class, built as `cls(**kwargs, num_classes=..., spec=..., key=...)`; its instances return
      `(logits, features, state)` for one (C, H, W) image, and `fold(state)` returns the folded ops for export
      (`patient.models.fold`).
    - `mean`, `std`: the input normalisation of its variants (copied into each `ModelSpec`; a variant may override).
    - `head`: the classifier's parameter prefix under timm's names (`"fc"`, `"head.fc"`), or a tuple of them for a
      model with several heads (distilled DeiT: `("head", "head_dist")`), for re-initialising the heads of another
      class count on weight import.
    - `timm_name`: patient parameter name -> timm state-dict key.
    - `adapt`: `(timm key, pretrained array, shape the model needs) -> array or None`, for tensors a family can carry
      over to another shape (ViT's position embeddings, resampled to another grid of patches); None means it cannot.
    """

    name: str
    cls: type
    mean: tuple
    std: tuple
    head: str | tuple[str, ...]
    timm_name: Callable[[str], str] = _same_name
    adapt: Callable[[str, Any, tuple], Any] | None = None

    @property
    def heads(self) -> tuple[str, ...]:
        return (self.head,) if isinstance(self.head, str) else tuple(self.head)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its family, constructor arguments, default resolution, a one-line description, and its input
    normalisation when it differs from the family's (timm's `vit_*` use 0.5 / 0.5, its `deit_*` ImageNet's)."""

    name: str
    family: str
    kwargs: dict
    resolution: int
    description: str
    mean: tuple | None = None
    std: tuple | None = None


FAMILIES: dict[str, Family] = {}
VARIANTS: dict[str, Variant] = {}


def register_family(family: Family) -> Family:
    """Add a family (a second registration under the same name replaces the first, so a module can be reloaded)."""
    FAMILIES[family.name] = family
    return family


def register_variant(name: str, family: str, resolution: int, description: str, *, mean: tuple | None = None,
                     std: tuple | None = None, **kwargs: Any) -> Variant:
    """Add a named model of a registered family (`mean`/`std`: this variant's normalisation, default the family's)."""
    if family not in FAMILIES:
        raise ValueError(f"variant {name!r}: family {family!r} is not registered; call register_family first")
    if (mean is None) != (std is None):
        raise ValueError(f"variant {name!r}: give both mean and std, or neither")
    variant = Variant(name, family, kwargs, int(resolution), description, mean, std)
    VARIANTS[name] = variant
    return variant


def family_of(spec: ModelSpec) -> Family:
    if spec.family not in FAMILIES:
        raise ValueError(f"model family {spec.family!r} is not registered (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[spec.family]


def spec_of(model: object) -> ModelSpec:
    """The `ModelSpec` a model carries; TypeError for objects built outside patient."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"{type(model).__name__} carries no patient ModelSpec; build models with patient.models.create")
    return spec
