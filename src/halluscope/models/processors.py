"""Building each family's processor without torchvision.

Processors that accept a video processor cannot be built when torchvision is missing (not even with
`video_processor=None`), and `AutoProcessor` then fails or silently returns only the tokenizer. Since
`ProcessorMixin` reads its parts from the `__init__` signature, a subclass whose `__init__` has no
`video_processor` parameter loads and saves as an image-only processor under the original class name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import transformers
from transformers import ProcessorMixin

from halluscope.models.families import Family

__all__ = ["processor_class", "load_processor"]


@functools.cache
def _image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of `cls` that takes no video processor (same class name, so saved configs stay loadable)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(
            self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=chat_template, **kwargs,
        )

    # ProcessorMixin finds a processor's parts (and what it saves) from this signature.
    signature = inspect.signature(cls.__init__)
    __init__.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "video_processor"]
    )

    def from_args_and_dict(sub, args, processor_dict, **kwargs):
        # The stock version filters saved settings by the code object's argument names, which a
        # wrapper does not have; filter by the signature above instead.
        parts = set(sub.get_attributes())  # passed positionally in `args`
        settings = {k: v for k, v in {**processor_dict, **kwargs}.items()
                    if k in __init__.__signature__.parameters and k not in parts}
        return sub(*args, **settings)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "from_args_and_dict": classmethod(from_args_and_dict)})


def processor_class(family: Family) -> type[ProcessorMixin]:
    """The processor class to use for `family` (image-only where the stock class wants a video processor)."""
    cls = getattr(transformers, family.processor_class)
    return _image_only(cls) if family.processor_has_video else cls


def load_processor(family: Family, path: str, **kwargs: Any) -> ProcessorMixin:
    """Load the processor of a checkpoint (local directory or hub id) for `family`."""
    processor = processor_class(family).from_pretrained(path, **kwargs)
    processor.tokenizer.padding_side = "left"
    return processor
