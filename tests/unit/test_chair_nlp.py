"""The NLP components behind CHAIR: the offline tokenizer and tagger (need only the nltk package), and the real
lemmatiser over WordNet (skipped where no WordNet is installed), NLTK's own data (skipped where absent)."""

from __future__ import annotations

import doctest
import os

import pytest

from halluscope.errors import InputError
from halluscope.metrics import nlp as nlp_module
from halluscope.metrics.chair import extract_objects, score_chair
from halluscope.metrics.nlp import (
    find_nltk_resources,
    load_nlp,
    offline_tag,
    offline_tokenize,
    prepare_wordnet,
    wordnet_available,
    wordnet_pos,
)

NO_WORDNET = (
    "no WordNet: install Debian's `apt-get install -y wordnet-base wordnet-sense-index` (CI's setup does) or "
    "NLTK's `python -m nltk.downloader wordnet`; runs once either is present"
)
NLTK_MISSING = [name for name, where in find_nltk_resources().items() if where is None]
NO_NLTK_DATA = (
    f"NLTK data missing ({', '.join(NLTK_MISSING)}); it cannot be downloaded here. Runs where "
    "`python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet` has been run"
)


@pytest.fixture(scope="module", autouse=True)
def _wordnet_copy_in_tmp(tmp_path_factory):
    """Keep `prepare_wordnet`'s copy out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLUSCOPE_NLTK_DATA", str(tmp_path_factory.mktemp("nltk_data")))
        yield


def test_offline_tokenizer_splits_sentences_before_the_treebank_tokenizer():
    assert offline_tokenize("a dog. a cat!") == ["a", "dog", ".", "a", "cat", "!"]
    assert offline_tokenize("the cat isn't on mr. smith's mat, e.g. here.") == [
        "the", "cat", "is", "n't", "on", "mr.", "smith", "'s", "mat", ",", "e.g.", "here", ".",
    ]  # fmt: skip
    assert offline_tokenize("3.5 cups. j. doe ran") == ["3.5", "cups", ".", "j.", "doe", "ran"]
    assert offline_tokenize("") == []


def test_offline_tagger_marks_only_verb_participles_as_verbs():
    verbs = {"skiing", "seated", "tied"}.__contains__
    tokens = ["a", "man", "skiing", ",", "the", "skiing", "dogs", "seated", "bed", "tied"]
    assert offline_tag(tokens, verbs) == ["NN", "NN", "VBG", ".", "NN", "NN", "NNS", "VBN", "NN", "VBN"]


def test_wordnet_pos_follows_the_opera_mapping():
    assert [wordnet_pos(t) for t in ("JJ", "VBG", "NNS", "RB", "IN", ".")] == ["a", "v", "n", "r", "n", "n"]


def test_unknown_source():
    with pytest.raises(InputError, match="unknown NLP source 'spacy'"):
        load_nlp("spacy")


@pytest.mark.skipif(not NLTK_MISSING, reason="NLTK's data is installed here, so source='nltk' succeeds")
def test_nltk_source_needs_nltk_data():
    with pytest.raises(InputError, match="python -m nltk.downloader punkt_tab"):
        load_nlp("nltk")


@pytest.mark.skipif(bool(NLTK_MISSING), reason=NO_NLTK_DATA)
def test_with_nltk_data_the_reference_components_are_used():
    nlp = load_nlp("auto")
    assert nlp.names["nlp"] == "nltk" and nlp.names["tagger"].startswith("nltk.pos_tag")
    assert extract_objects("A man seated next to two dogs.", nlp=nlp).objects == ["person", "chair", "dog"]


def test_no_wordnet_anywhere_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nlp_module, "_wordnet_source", lambda: None)
    with pytest.raises(InputError, match="WordNet not found .*apt-get install -y wordnet-base"):
        load_nlp("offline")


def test_prepare_wordnet_needs_the_database(tmp_path):
    with pytest.raises(InputError, match="no WordNet 3.0 database at .*apt-get install -y wordnet-base"):
        prepare_wordnet(tmp_path / "data", source=tmp_path)


@pytest.mark.skipif(not wordnet_available(), reason=NO_WORDNET)
class TestWithWordNet:
    def test_offline_components_are_named(self):
        names = load_nlp("offline").names
        assert names["nlp"] == "offline"
        assert names["tokenizer"].startswith("offline") and names["tagger"].startswith("offline")
        assert names["lemmatizer"] == "nltk.WordNetLemmatizer" and names["wordnet"].split(":")[0] in ("nltk", "debian")
        assert names["nltk_version"]

    def test_lemmas(self):
        nlp = load_nlp("offline")
        pairs = [("dogs", "n"), ("seated", "v"), ("seated", "n"), ("glasses", "n")]
        assert [nlp.lemmatize(word, pos) for word, pos in pairs] == ["dog", "seat", "seated", "glass"]
        assert nlp.singularize("buses") == "bus"  # not pattern.en's "bu"

    def test_captions_end_to_end_offline(self):
        nlp = load_nlp("offline")
        caption = "A man seated on a bench. Two dogs are skiing near wine glasses; the toilet seat is up."
        # "seated" -> seat, but "toilet" in the caption drops every "seat", so no chair
        assert extract_objects(caption, nlp=nlp).objects == ["person", "bench", "dog", "skis", "wine glass", "toilet"]
        assert extract_objects(caption.replace("toilet", "car"), nlp=nlp).objects[:2] == ["person", "chair"]
        summary = score_chair([{"image_id": 1, "caption": caption}], {1: {"person", "dog", "bench"}}, nlp=nlp).summary
        assert summary["chair_i"] == pytest.approx(3 / 6) and summary["nlp"] == "offline"

    @pytest.mark.skipif(find_nltk_resources()["wordnet"] is not None, reason="NLTK's own WordNet is installed")
    def test_prepared_copy_is_readable_by_nltk(self):
        root = prepare_wordnet()
        corpus = root / "corpora" / "wordnet"
        assert (corpus / "lexnames").read_text().splitlines()[18] == "18\tnoun.person\t1"
        assert root == prepare_wordnet()  # a second call reuses the copy
        assert str(root) == os.environ["HALLUSCOPE_NLTK_DATA"]


def test_docstring_examples():
    assert doctest.testmod(nlp_module, raise_on_error=False).failed == 0
