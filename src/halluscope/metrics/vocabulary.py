"""Object vocabularies for CHAIR: which caption words name which object category.

A vocabulary maps every surface word (synonym) to its category's *node word*, lists the two-word phrases that
are merged into one token before lookup, and lists exclusion rules ("seat" is dropped when "toilet" is in the
same caption). `coco_vocabulary()` is the reference's 80-category COCO list, read from package data with its
quirks kept; synthetic scenes bring their own vocabulary (`ObjectVocabulary.from_synonyms`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from halluscope.errors import InputError

__all__ = [
    "CHAIR_METHODS",
    "ObjectVocabulary",
    "check_method",
    "coco_vocabulary",
    "load_vocabulary",
    "parse_synonym_lines",
]

#: The CHAIR word-extraction methods: "opera" (POS tag + WordNet lemma, OPERA / Maxlinn, the default) and
#: "original" (singularise every token, LisaAnne/Hallucination).
CHAIR_METHODS: tuple[str, ...] = ("opera", "original")


def parse_synonym_lines(lines: Iterable[str]) -> list[list[str]]:
    """Split synonym lines the way the reference does: strip the whole line, then split on ", ".

    Only the line is stripped, so an entry written after a double space keeps a leading space and can never
    match a token (the COCO list has two: " motor bike" and " cheesecake"). Blank lines are skipped.

    Example:
        >>> parse_synonym_lines(["cake,  cheesecake, cupcake\\n"])
        [['cake', ' cheesecake', 'cupcake']]
    """
    rows = []
    for line in lines:
        stripped = line.strip()
        if stripped:
            rows.append(stripped.split(", "))
    return rows


@dataclass(frozen=True)
class ObjectVocabulary:
    """Surface word -> node word, plus the double-word and exclusion rules applied before lookup.

    Args:
        name: recorded in every CHAIR result ("coco80", "shapes8", ...).
        synonyms: surface word -> node word (the category's first listed word). Node words map to themselves.
        double_words: "w1 w2" -> the single token that replaces the pair, per method name in `CHAIR_METHODS`.
        exclusions: (word, trigger) pairs: every `word` is dropped from a caption that also contains `trigger`.

    Example:
        >>> v = ObjectVocabulary.from_synonyms("toy", {"ball": ["ball", "sphere"]})
        >>> v.node_of("sphere")
        'ball'
    """

    name: str
    synonyms: Mapping[str, str]
    double_words: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    exclusions: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_synonyms(
        cls,
        name: str,
        categories: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
        *,
        double_words: Mapping[str, str] | None = None,
        exclusions: Sequence[tuple[str, str]] = (),
    ) -> ObjectVocabulary:
        """Build a vocabulary from {node word: synonyms} or from rows whose first word is the node word.

        A word listed under two categories maps to the later one (the reference's last-write-wins dict).
        `double_words` apply to every method.
        """
        rows = [[node, *words] for node, words in categories.items()] if isinstance(categories, Mapping) else categories
        synonyms: dict[str, str] = {}
        for row in rows:
            if not row or not row[0]:
                raise InputError(
                    f"vocabulary {name!r}: empty category row {list(row)!r}; each row starts with its node word"
                )
            for word in row:
                synonyms[word] = row[0]
        pairs = dict(double_words or {})
        for pair in pairs:
            if len(pair.split(" ")) != 2:
                raise InputError(f"vocabulary {name!r}: double word {pair!r} is not two words separated by one space")
        return cls(
            name=name,
            synonyms=MappingProxyType(synonyms),
            double_words=MappingProxyType({method: MappingProxyType(pairs) for method in CHAIR_METHODS}),
            exclusions=tuple((str(w), str(t)) for w, t in exclusions),
        )

    @property
    def node_words(self) -> tuple[str, ...]:
        """The distinct node words, in first-listed order."""
        return tuple(dict.fromkeys(self.synonyms.values()))

    def node_of(self, word: str) -> str:
        """The node word of a surface word or category name; InputError if the vocabulary lacks it."""
        try:
            return self.synonyms[word]
        except KeyError:
            raise InputError(
                f"{word!r} is not in the CHAIR vocabulary {self.name!r}; pass the vocabulary that names this "
                "dataset's categories (e.g. the one written next to a synthetic scene set)"
            ) from None

    def double_words_for(self, method: str) -> Mapping[str, str]:
        """The double-word table that `method` uses."""
        check_method(method)
        return self.double_words.get(method, MappingProxyType({}))


def check_method(method: str) -> None:
    """InputError unless `method` is one of `CHAIR_METHODS`."""
    if method not in CHAIR_METHODS:
        raise InputError(f"unknown CHAIR method {method!r}; expected one of {list(CHAIR_METHODS)}")


@lru_cache(maxsize=1)
def coco_vocabulary() -> ObjectVocabulary:
    """The reference's 80 COCO categories with their synonyms and double words, read from package data.

    Quirks kept: " motor bike" and " cheesecake" never match (leading space), "iPhone" never matches a
    lower-cased token, "stove top oven" has three words so the pair merge never produces it, "bow tie" merges
    to "tie", "toilet seat" to "toilet", "train track" is merged (and so dropped) by the "opera" method only,
    and "seat" is dropped from any caption that mentions "toilet". See `metrics/data/README.md`.

    Example:
        >>> v = coco_vocabulary()
        >>> len(v.node_words), v.node_of("puppy"), v.node_of("notebook")
        (80, 'dog', 'laptop')
    """
    data = resources.files("halluscope.metrics") / "data"
    rows = parse_synonym_lines((data / "coco_synonyms.txt").read_text(encoding="utf-8").splitlines())
    synonyms = {word: row[0] for row in rows for word in row}
    tables: dict[str, dict[str, str]] = {method: {} for method in CHAIR_METHODS}
    for line in (data / "coco_double_words.tsv").read_text(encoding="utf-8").splitlines():
        pair, merged, methods = line.split("\t")
        for method in methods.split(","):
            tables[method][pair] = merged
    return ObjectVocabulary(
        name="coco80",
        synonyms=MappingProxyType(synonyms),
        double_words=MappingProxyType({m: MappingProxyType(t) for m, t in tables.items()}),
        exclusions=(("seat", "toilet"),),
    )


def load_vocabulary(
    path: str | Path, *, name: str | None = None, double_words: Mapping[str, str] | None = None
) -> ObjectVocabulary:
    """A vocabulary from a synonyms file in the reference's format: one category per line, node word first,
    words separated by ", " (a synthetic scene set writes one as `annotations/vocabulary_<name>.txt`).

    Args:
        path: the synonyms file.
        name: recorded in results; default the file name without extension.
        double_words: "w1 w2" -> merged token, applied by every method.

    Raises:
        InputError: missing or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"vocabulary file not found: {path}; pass a synonyms file (one category per line)")
    rows = parse_synonym_lines(path.read_text(encoding="utf-8").splitlines())
    if not rows:
        raise InputError(f"vocabulary file {path} lists no categories; write one category per line, node word first")
    return ObjectVocabulary.from_synonyms(name or path.stem, rows, double_words=double_words)
