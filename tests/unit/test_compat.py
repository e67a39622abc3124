"""The cache argument is passed under the name each forward declares, on every family, and the engine's calls
raise no deprecation notice from transformers."""

from __future__ import annotations

import inspect
import logging

import pytest
from transformers.utils import logging as hf_logging

from halluscope.errors import ModelLoadError
from halluscope.models.compat import CACHE_NAMES, cache_argument, output_cache, with_cache
from halluscope.sweep.engine import SweepItem, generate_prompt, prepare_score, score_prompt
from halluscope.tasks.scenes import count_scene


def test_cache_argument_is_declared_by_every_forward_the_engine_calls(vlm):
    for module in (vlm.layers[0], vlm.text_model):
        name = cache_argument(module)
        assert name in CACHE_NAMES
        assert name in inspect.signature(type(module).forward).parameters


def test_with_cache_replaces_every_cache_name(vlm):
    layer = vlm.layers[0]
    name = cache_argument(layer)
    kwargs = with_cache(layer, {"cache": "clean", "past_key_values": "clean", "use_cache": True}, "own")
    assert kwargs == {"use_cache": True, name: "own"}


def test_output_cache_reads_the_declared_field(vlm):
    out = vlm.forward(vlm.encode([(count_scene(2, "circle", size=112, seed=0), "Count.")]), use_cache=True)
    cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() > 0
    assert output_cache(vlm.forward(vlm.encode([(count_scene(2, "circle", size=112, seed=0), "Count.")]),
                                    use_cache=False)) is None


def test_a_forward_without_a_cache_argument_is_refused():
    class NoCache:
        def forward(self, hidden_states):
            return hidden_states

    with pytest.raises(ModelLoadError, match="no key/value cache argument"):
        cache_argument(NoCache())  # type: ignore[arg-type]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_engine_calls_raise_no_deprecation_notice(vlm, recwarn):
    """transformers announces renamed arguments through its logger (once per message) and FutureWarning."""
    logger, level = hf_logging.get_logger("transformers"), hf_logging.get_verbosity()
    records = _Records()
    hf_logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    logger.addHandler(records)
    try:
        item = SweepItem("s0", count_scene(4, "circle", size=112, seed=1), "Describe the 6 circles.", 4, 6)
        heads = [(0, 0), (vlm.n_layers - 1, 1)]
        score_prompt(vlm, prepare_score(vlm, item, max_new_tokens=8), heads, batch_size=1)
        generate_prompt(vlm, item, heads, mode="scale", alpha=0.5, batch_size=2, max_new_tokens=8)
    finally:
        logger.removeHandler(records)
        hf_logging.set_verbosity(level)
    notices = [m for m in records.messages if "deprecat" in m.lower()]
    notices += [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert notices == []
