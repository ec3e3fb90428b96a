"""Transforms: module swaps (quantization, a parallel layer, ...) that a model remembers, so that a checkpoint saved
from it can record them and checkpoint/ can apply them again, by name, while loading.

The protocol lives with the model because transforms only touch modules; reading and writing their records is
checkpoint/transforms.py's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from llamakit.model.llama import Transformer

TRANSFORMS: dict[str, type[Transform]] = {}  # name -> class, for the transforms a checkpoint records


class Transform:
    """A module swap. __call__ swaps modules of a model (on the meta device, or with real weights) and returns it;
    owned() names the state entries it made, each with the dtype it keeps; convert() turns the state of the model
    before the swap into the state after it. Settings are dataclass fields."""

    name: ClassVar[str]

    def __call__(self, model: Transformer) -> Transformer:
        raise NotImplementedError

    def owned(self, model: Transformer) -> dict[str, torch.dtype]:
        return {}

    def convert(self, model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called on a swapped model when the transform is given at load but the checkpoint predates it; by default
        the entries are kept (load_model still casts those owned() names)."""
        return state

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
