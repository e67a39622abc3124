"""Model handles: the family table, `load_vlm`, the `VLM` adapter and tiny offline checkpoints."""

from halluscope.models.families import FAMILIES, Family, get_family
from halluscope.models.load import load_vlm
from halluscope.models.vlm import VLM, Batch

__all__ = ["FAMILIES", "Batch", "Family", "VLM", "get_family", "load_vlm"]
