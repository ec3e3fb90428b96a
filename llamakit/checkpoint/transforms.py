"""Module swaps applied while loading: after the model is built on the meta device, before its weights are assigned.

A transform (quantization, a parallel layer, ...) replaces some of a model's modules with its own; the tensors
it owns keep the dtype and shape it gives them, not the model's. A model saved after a transform records it in
config.json (`"llamakit": {"transforms": [{"name": ..., settings}]}`), and load_model applies it again by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from llamakit.errors import CheckpointError
from llamakit.model.llama import Transformer

TRANSFORMS: dict[str, type[Transform]] = {}  # name -> class, for the transforms a checkpoint records


class Transform:
    """A module swap. __call__ swaps modules of a model (on the meta device, or with real weights) and returns it;
    owned() names the state entries it made, each with the dtype it keeps. Settings are dataclass fields."""

    name: ClassVar[str]

    def __call__(self, model: Transformer) -> Transformer:
        raise NotImplementedError

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {}

    def to_dict(self) -> dict:
        return {"name": self.name, **(dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {})}


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: a checkpoint that records this transform's name can be loaded."""
    TRANSFORMS[cls.name] = cls
    return cls


def apply_transforms(model: Transformer, transforms: Sequence[Transform]) -> Transformer:
    """Apply each transform in order; the model remembers them, so that save_model records them."""
    for transform in transforms:
        model = transform(model)
    model.applied_transforms = [*applied(model), *transforms]
    return model


def applied(model: Transformer) -> list[Transform]:
    return list(getattr(model, "applied_transforms", []))


def owned_dtypes(model: Transformer) -> dict[str, torch.dtype]:
    """The state entries the model's transforms own, with the dtype each keeps (never the model's dtype)."""
    return {name: dtype for transform in applied(model) for name, dtype in transform.owned(model).items()}


def from_records(records: object, where: Path) -> list[Transform]:
    """The transforms a config.json block records; CheckpointError for one unknown to this process."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and "name" in r for r in records):
        raise CheckpointError(f"{where}: 'transforms' must be a list of {{\"name\": ...}} objects; the file is damaged")
    transforms = []
    for record in records:
        settings = {k: v for k, v in record.items() if k != "name"}
        cls = TRANSFORMS.get(record["name"])
        if cls is None:
            raise CheckpointError(f"{where}: the weights were saved after transform {record['name']!r}, which is not "
                                  f"registered here (known: {', '.join(sorted(TRANSFORMS)) or 'none'}); import the "
                                  "module that defines it (@llamakit.checkpoint.transforms.register) before loading")
        try:
            transforms.append(cls(**settings))
        except TypeError as e:
            raise CheckpointError(f"{where}: transform {record['name']!r} does not take the settings {settings} "
                                  f"({e})") from None
    return transforms
