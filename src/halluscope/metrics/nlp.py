"""The NLP steps CHAIR needs (tokenise, POS-tag, lemmatise, singularise), as injectable components.

The reference scorers call NLTK's `word_tokenize` (Punkt sentence splitting + the Treebank word tokenizer), its
averaged-perceptron tagger and its WordNet lemmatizer. NLTK's data cannot be downloaded on every machine, so
`load_nlp` uses NLTK's own data when all of it is installed (`nlp: nltk`, the reference exactly) and otherwise
the best offline substitutes (`nlp: offline`): rule-based sentence splitting before the same Treebank
tokenizer, a suffix-rule tagger that only separates verb participles from nouns, and NLTK's lemmatizer over
Debian's WordNet 3.0 (`apt-get install wordnet-base`). Every component's name goes into each CHAIR result.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from halluscope.errors import InputError

__all__ = [
    "NLPComponents",
    "NLTK_RESOURCES",
    "find_nltk_resources",
    "load_nlp",
    "offline_tag",
    "offline_tokenize",
    "prepare_wordnet",
    "wordnet_available",
    "wordnet_pos",
]

#: NLTK resource name -> the path `nltk.data.find` looks for. The downloader names are the keys.
NLTK_RESOURCES: Mapping[str, str] = MappingProxyType(
    {
        "punkt_tab": "tokenizers/punkt_tab/english/",
        "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
        "wordnet": "corpora/wordnet",
    }
)
_DOWNLOAD = "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet"
_APT = "apt-get install -y wordnet-base wordnet-sense-index"

#: WordNet database files NLTK's reader needs for lemmatisation (it opens the others lazily, if ever).
_WORDNET_REQUIRED = tuple(
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
_WORDNET_OPTIONAL = ("index.sense", "cntlist.rev")
#: Marks a WordNet directory built by `prepare_wordnet`, so results can say where the data came from.
_MARKER = "HALLUSCOPE_SOURCE"

Tokenizer = Callable[[str], Sequence[str]]
Tagger = Callable[[Sequence[str]], Sequence[str]]
Lemmatizer = Callable[[str, str], str]
Singularizer = Callable[[str], str]


@dataclass(frozen=True)
class NLPComponents:
    """The four word-level steps of CHAIR, each a plain callable, and the names recorded in results.

    Args:
        tokenize: text -> tokens (the caption is lower-cased before this).
        tag: tokens -> one Penn Treebank tag per token (only the first letter is used: J, V, N, R).
        lemmatize: (word, WordNet POS "n" / "v" / "a" / "r") -> lemma ("opera" method).
        singularize: word -> singular ("original" method).
        names: component -> what implements it; `names["nlp"]` is "nltk", "offline" or "custom".

    Example:
        >>> nlp = NLPComponents(str.split, lambda ts: ["NN"] * len(ts), lambda w, p: w, lambda w: w, {"nlp": "custom"})
        >>> nlp.replace(tokenize=lambda s: s.split(",")).names["tokenizer"]
        'custom'
    """

    tokenize: Tokenizer
    tag: Tagger
    lemmatize: Lemmatizer
    singularize: Singularizer
    names: Mapping[str, str]

    def replace(self, **components: Callable) -> NLPComponents:
        """A copy with some callables swapped for your own; the result is then labelled `nlp: custom`."""
        unknown = set(components) - {"tokenize", "tag", "lemmatize", "singularize"}
        if unknown:
            raise InputError(
                f"unknown NLP component(s) {sorted(unknown)}; expected tokenize, tag, lemmatize or singularize"
            )
        labels = {"tokenize": "tokenizer", "tag": "tagger", "lemmatize": "lemmatizer", "singularize": "singularizer"}
        names = {**self.names, **{labels[k]: "custom" for k in components}, "nlp": "custom"}
        return dataclasses.replace(self, **components, names=MappingProxyType(names))


def wordnet_pos(tag: str) -> str:
    """The WordNet POS the OPERA scorer lemmatises with: J -> "a", V -> "v", R -> "r", anything else -> "n"."""
    return {"J": "a", "V": "v", "R": "r"}.get(tag[:1], "n")


# ------------------------------------------------------------------------------------------ NLTK's data


def find_nltk_resources() -> dict[str, str | None]:
    """Where each NLTK resource the reference uses is installed, or None; a WordNet built by
    `prepare_wordnet` from Debian's files does not count as NLTK's own."""
    import nltk

    found: dict[str, str | None] = {}
    for name, path in NLTK_RESOURCES.items():
        try:
            location = str(nltk.data.find(path))
        except LookupError:
            location = None
        if name == "wordnet" and location is not None and (Path(location) / _MARKER).exists():
            location = None
        found[name] = location
    return found


def _debian_wordnet_dir() -> Path | None:
    """Debian's WordNet database directory (`WNSEARCHDIR` if set), if it holds every file lemmatisation needs."""
    candidate = Path(os.environ.get("WNSEARCHDIR", "/usr/share/wordnet"))
    return candidate if all((candidate / f).is_file() for f in _WORDNET_REQUIRED) else None


def wordnet_available() -> bool:
    """Whether `load_nlp` can find a WordNet: NLTK's own, or Debian's database to prepare."""
    return find_nltk_resources()["wordnet"] is not None or _debian_wordnet_dir() is not None or _prepared_wordnet()


def _prepared_wordnet() -> bool:
    import nltk

    try:
        return (Path(str(nltk.data.find(NLTK_RESOURCES["wordnet"]))) / _MARKER).exists()
    except LookupError:
        return False


def _default_nltk_data_dir() -> Path:
    override = os.environ.get("HALLUSCOPE_NLTK_DATA")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "halluscope" / "nltk_data"


def prepare_wordnet(target: str | Path | None = None, *, source: str | Path | None = None) -> Path:
    """Make Debian's WordNet 3.0 readable by NLTK: copy it into `target/corpora/wordnet/` and add `target` to
    `nltk.data.path`.

    NLTK's reader also wants a `lexnames` file, which Debian does not ship; it is written from the table in
    WordNet's `lexnames(5WN)` manual page (package data). Files are copied, not linked, because NLTK refuses
    links that resolve outside its data roots. Run once in a setup step, or let `load_nlp` call it.

    Args:
        target: an NLTK data root; default `$HALLUSCOPE_NLTK_DATA`, else `~/.cache/halluscope/nltk_data`.
        source: the WordNet database directory; default `$WNSEARCHDIR`, else `/usr/share/wordnet`.

    Returns:
        The NLTK data root now on `nltk.data.path`.

    Raises:
        InputError: the source lacks WordNet's database files.
    """
    import nltk

    src = Path(source) if source is not None else _debian_wordnet_dir()
    if src is None or not all((src / f).is_file() for f in _WORDNET_REQUIRED):
        where = src or os.environ.get("WNSEARCHDIR", "/usr/share/wordnet")
        raise InputError(
            f"no WordNet 3.0 database at {where}; install it with `{_APT}` (Debian), or NLTK's own with `{_DOWNLOAD}`"
        )
    root = Path(target) if target is not None else _default_nltk_data_dir()
    corpus = root / "corpora" / "wordnet"
    if not (corpus / _MARKER).exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=corpus.parent))
        for name in _WORDNET_REQUIRED + _WORDNET_OPTIONAL:
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        lexnames = resources.files("halluscope.metrics") / "data" / "wordnet_lexnames.tsv"
        (staging / "lexnames").write_text(lexnames.read_text(encoding="utf-8"), encoding="utf-8")
        (staging / _MARKER).write_text(f"{src}\n", encoding="utf-8")  # where the copy came from
        try:
            staging.rename(corpus)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def _wordnet_source() -> str | None:
    """Where the WordNet in use lives: "nltk:<path>" (NLTK's own), "debian:<path>" (via `prepare_wordnet`) or None."""
    import nltk

    try:
        location = Path(str(nltk.data.find(NLTK_RESOURCES["wordnet"])))
    except LookupError:
        if _debian_wordnet_dir() is None:
            return None
        location = prepare_wordnet() / "corpora" / "wordnet"
    marker = location / _MARKER
    if marker.exists():
        return f"debian:{marker.read_text(encoding='utf-8').strip()}"
    return f"nltk:{location}"


# ------------------------------------------------------------------------------------------ offline parts

# A period ends a sentence unless the word before it is one of these (or a single letter, an initial).
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "inc", "ltd", "mt", "ft", "ave", "approx"}
)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*$")
_DETERMINERS = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "our", "my", "your"}
)


def _split_sentences(text: str) -> list[str]:
    """Split at whitespace after a word ending in . ! or ? (not an abbreviation or an initial)."""
    sentences, start = [], 0
    for match in re.finditer(r"\S+", text):
        word = match.group()
        if match.end() == len(text) or not _SENTENCE_END.search(word):
            continue
        stem = word.rstrip("\"')]").rstrip(".!?").lower()
        if word.rstrip("\"')]").endswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        sentences.append(text[start : match.end()])
        start = match.end()
    sentences.append(text[start:])
    return [s for s in sentences if s.strip()]


def offline_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize` without Punkt: rule-based sentence splitting, then NLTK's Treebank word tokenizer.

    Splitting first matters: the Treebank tokenizer only detaches the period that ends its input, so without it
    "a dog. a cat" keeps "dog." as one token. Punkt's learned abbreviation list is replaced by a short fixed one.

    Example:
        >>> offline_tokenize("a dog. the cat isn't here.")
        ['a', 'dog', '.', 'the', 'cat', 'is', "n't", 'here', '.']
    """
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in _split_sentences(text) for token in tokenizer.tokenize(sentence)]


def offline_tag(tokens: Sequence[str], has_verb_form: Callable[[str], bool]) -> list[str]:
    """A stand-in for NLTK's perceptron tagger that decides only what changes a CHAIR lemma: verb or not.

    A word ending in "ing" or "ed" that WordNet knows as a verb form is tagged VBG / VBN ("skiing" -> ski,
    "seated" -> seat), except an -ing word right after a determiner ("the skiing"), which stays a noun.
    Everything else is NN / NNS, and punctuation is ".", so it is lemmatised as a noun, as the reference does for
    nouns and for tags outside J/V/N/R.

    Args:
        tokens: lower-cased tokens.
        has_verb_form: word -> whether WordNet can read it as an inflected verb.

    Example:
        >>> offline_tag(["a", "man", "skiing"], lambda w: w == "skiing")
        ['NN', 'NN', 'VBG']
    """
    tags = []
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else ""
        if not any(ch.isalnum() for ch in token):
            tags.append(".")
        elif token.endswith("ing") and previous not in _DETERMINERS and has_verb_form(token):
            tags.append("VBG")
        elif token.endswith("ed") and has_verb_form(token):
            tags.append("VBN")
        else:
            tags.append("NNS" if token.endswith("s") else "NN")
    return tags


# ------------------------------------------------------------------------------------------ assembly


def load_nlp(source: str = "auto") -> NLPComponents:
    """The NLP components CHAIR runs with: NLTK's own where its data is installed, offline substitutes elsewhere.

    Args:
        source: "auto" (NLTK's components for each resource that is installed, a substitute for each that is
            not; labelled "nltk" only when all three are NLTK's), "nltk" (all three required), or "offline"
            (the substitutes even where NLTK's data exists, for results comparable across machines).

    Returns:
        `NLPComponents` whose `names` say what each step is, the NLTK version and the WordNet used.

    Raises:
        InputError: no WordNet at all, NLTK's data missing with source="nltk", or an unknown source.

    Example:
        >>> load_nlp("offline").names["nlp"]  # doctest: +SKIP
        'offline'
    """
    if source not in ("auto", "nltk", "offline"):
        raise InputError(f"unknown NLP source {source!r}; expected 'auto', 'nltk' or 'offline'")
    import nltk
    from nltk.stem import WordNetLemmatizer

    found = find_nltk_resources()
    if source == "nltk":
        missing = [name for name, where in found.items() if where is None]
        if missing:
            raise InputError(f"NLTK data missing: {', '.join(missing)}; install it with `{_DOWNLOAD}` (needs network)")
    wordnet = _wordnet_source()
    if wordnet is None:
        raise InputError(
            f"WordNet not found (NLTK's data path and {os.environ.get('WNSEARCHDIR', '/usr/share/wordnet')}); "
            f"install it with `{_APT}` or `{_DOWNLOAD}`, or pass nlp= with your own lemmatizer"
        )
    use_nltk = source != "offline"
    lemmatizer = WordNetLemmatizer()
    from nltk.corpus import wordnet as wn

    names = {
        "nltk_version": nltk.__version__,
        "wordnet": wordnet,
        "lemmatizer": "nltk.WordNetLemmatizer",
        "singularizer": "wordnet-noun-lemma (not pattern.en.singularize)",
    }
    if use_nltk and found["punkt_tab"]:
        tokenize: Tokenizer = nltk.word_tokenize
        names["tokenizer"] = "nltk.word_tokenize (punkt_tab)"
    else:
        tokenize = offline_tokenize
        names["tokenizer"] = "offline: rule sentence split + nltk.NLTKWordTokenizer"
    if use_nltk and found["averaged_perceptron_tagger_eng"]:

        def tag(tokens: Sequence[str]) -> list[str]:
            return [t for _, t in nltk.pos_tag(list(tokens))]

        names["tagger"] = "nltk.pos_tag (averaged_perceptron_tagger_eng)"
    else:

        def tag(tokens: Sequence[str]) -> list[str]:
            return offline_tag(tokens, lambda word: wn.morphy(word, "v") not in (None, word))

        names["tagger"] = "offline: suffix rules + WordNet verb forms"
    all_nltk = use_nltk and all(found.values())
    names["nlp"] = "nltk" if all_nltk else "offline"
    return NLPComponents(
        tokenize=tokenize,
        tag=tag,
        lemmatize=lemmatizer.lemmatize,
        singularize=lambda word: lemmatizer.lemmatize(word, "n"),
        names=MappingProxyType(dict(sorted(names.items()))),
    )
