"""`halluscope.scale` without Ray: option checks, and shards run in this process write each part as it is yielded."""

from __future__ import annotations

import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.scale import LOCAL, Scale, map_shards


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "give at least 1 worker"),
    ({"gpus_per_worker": -1.0}, "give 0 (CPU workers) or more"),
    ({"workers": 2}, "need --ray"),
    ({"gpus_per_worker": 1.0}, "need --ray"),
])
def test_scale_options_are_checked(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Scale(None, **options)


class _Loaded:
    """Stands in for a loaded model: `map_shards` hands it to the work function as it is."""

    name = "loaded"


def test_local_shards_write_each_part_as_it_is_yielded():
    from halluscope.scale import ModelSource

    model = _Loaded()
    events = []

    def work(vlm, shard):
        assert vlm is model
        for layer in (0, 1):
            events.append(("computed", f"{shard}-L{layer}"))
            yield f"{shard}-L{layer}", pd.DataFrame({"shard": [shard], "layer": [layer]})

    map_shards(["a", "b"], work, lambda key, frame: events.append(("written", key)), model=ModelSource(model),
               scale=LOCAL, on_part=lambda key, frame: events.append(("progress", len(frame))))
    assert events == [item for key in ("a-L0", "a-L1", "b-L0", "b-L1")
                      for item in (("computed", key), ("written", key), ("progress", 1))]
