"""Reading a VLM's reply (the assistant text only): the count it states, the colours it names, a leading
yes/no, whether it denies a colour, and the outcome class shared by every PIH rate.

The reference study parsed replies with prefix matching ("tank" -> brown), a first-token number rule
("one of the dogs" -> 1, "point" -> 0, list markers "1.") and "any negation anywhere". Each rule below
is written against one of those hijacks; `tests/unit/test_answers.py` has a test for every rule.

Number rules (`parse_number`): the first *stated count*, in digits ("12", "1,000") or words ("three",
"twenty-one", "twenty one", "a hundred", "a dozen"), where these are NOT counts:
- "one" as a pronoun or idiom: after a determiner within two words ("no one", "each one", "the one on
  the left", "a red one"), after "by" ("one by one"), or before of/by/another/after/is/point/time/side/
  end/... ("one of the dogs", "one another", "at one point", "one is black");
- list markers: "1." / "1)" opening a line, or "(1)" opening a line or an item ("..., (2) a cat"), with
  text after it on the line ("3." alone on a line and "the dogs (3) are" are counts);
- a number after a label word ("Step 1", "Image 2", "No. 3", "#4");
- part of the group: after other/another/remaining/first/last ("the other two are standing");
- ordinals ("first", "2nd"), decimals ("2.5"), times ("10:30", "5 pm"), measures ("3 cm", "2 years"),
  percentages and prices ("50%", "$5"), years after in/since/from/during/until ("in 2020");
- hyphen compounds with a word ("three-legged", "COVID-19"); a range "3-4" gives its first number;
- denied numbers ("I don't see 7 dogs", "there aren't 7"): skipped, the next number is read.
Zero: "zero", "none" (not "none of") and the determiner "no" ("there are no dogs", "no dogs are
visible") give 0; an interjection "No, ..." and idioms ("no one", "no more than", "no doubt") do not.
Vague quantities ("a few", "a couple", "both", "a single", "several") are not numbers.

Colour rules (`parse_colours`): whole words only; a canonical name, a variant ("navy" -> blue) or a
suffixed form ("reddish", "bluish", "orangey", "silvery"); hyphens split ("reddish-brown" -> red, brown;
"off-white" -> white); shade words are ignored ("dark blue" -> blue). Words that are mostly things in
images ("sky", "rose", "olive", "cream", "lemon", "lime", "peach", "plum", "chocolate", ...;
`AMBIGUOUS_COLOURS`) count only before colour/coloured/hued/toned/tinted ("cream-coloured" -> white);
before a colour word they are a modifier ("sky blue" -> blue, "olive green" -> green). "orange" and
"gold" always count (the fruit and the metal cannot be told apart). With `obj`, the object's own name is
not read as a colour ("red panda", an object called "orange").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from numbers import Integral
from types import MappingProxyType
from typing import Any, NamedTuple

from halluscope.errors import InputError

__all__ = [
    "classify_reply",
    "AMBIGUOUS_COLOURS",
    "COLOURS",
    "COLOUR_VARIANTS",
    "OUTCOMES",
    "colour_outcome",
    "count_outcome",
    "first_colour",
    "is_negated",
    "parse_colours",
    "parse_number",
    "parse_yes_no",
]

#: Canonical colour names; every parser returns one of these.
COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink",
    "brown", "black", "white", "gray", "gold", "silver",
)  # fmt: skip

#: Outcome classes shared by the count and colour tasks, so rates are computed the same way for both.
#: copied: the reply states the prompted (false) value; corrected: it states a true value (for the base
#: question: it is right); other: another value (base question: wrong); none: no value stated;
#: negated: the reply explicitly denies the prompted colour (colour task only).
OUTCOMES: tuple[str, ...] = ("copied", "corrected", "other", "none", "negated")


def _invert(groups: Mapping[str, tuple[str, ...]]) -> Mapping[str, str]:
    return MappingProxyType({word: colour for colour, words in groups.items() for word in words})


#: Words that always name a colour -> canonical colour (whole words; suffixed forms included).
COLOUR_VARIANTS: Mapping[str, str] = _invert({
    "red": ("crimson", "scarlet", "maroon", "burgundy", "vermilion", "vermillion", "auburn", "reddish"),
    "orange": ("amber", "orangish", "orangeish", "orangey", "orangy"),
    "yellow": ("golden", "yellowish", "yellowy"),
    "green": ("emerald", "jade", "chartreuse", "greenish"),
    "blue": ("navy", "azure", "teal", "turquoise", "cobalt", "cerulean", "cyan", "aqua", "bluish", "blueish"),
    "purple": ("violet", "lavender", "magenta", "lilac", "mauve", "purplish", "purply"),
    "pink": ("fuchsia", "pinkish"),
    "brown": ("beige", "tan", "taupe", "khaki", "brownish"),
    "black": ("ebony", "onyx", "blackish"),
    "white": ("ivory", "whitish"),
    "gray": ("grey", "grayish", "greyish"),
    "silver": ("platinum", "silvery"),
})  # fmt: skip

#: Words that are usually a thing (fruit, sky, drink, gem) and a colour only before "coloured"/"color"/
#: "hued"/"toned"/"tinted". Before a colour word they are a modifier: "sky blue" reads as blue.
AMBIGUOUS_COLOURS: Mapping[str, str] = _invert({
    "red": ("cherry", "wine", "rust", "ruby"),
    "orange": ("tangerine", "coral", "peach", "apricot"),
    "yellow": ("lemon", "mustard", "canary"),
    "green": ("olive", "lime", "mint", "sage"),
    "blue": ("sky",),
    "purple": ("plum",),
    "pink": ("rose", "salmon"),
    "brown": ("chocolate", "coffee", "caramel"),
    "black": ("charcoal",),
    "white": ("cream", "snow", "pearl"),
    "gray": ("slate", "ash"),
})  # fmt: skip

_PLAIN_COLOURS: dict[str, str] = {**{c: c for c in COLOURS}, **COLOUR_VARIANTS}
_COLOUR_CUES = frozenset({"colored", "coloured", "color", "colour", "hued", "toned", "tinted"})

# ---------------------------------------------------------------------------------------------------
# Tokens: one tokenizer for numbers, colours and negation.

_TOKEN_RE = re.compile(
    r"(?P<time>\d{1,2}:\d{2})"
    r"|(?P<glued>\d+[a-z]+[a-z\d]*|[a-z]+\d+[a-z\d]*)"  # 1st, 4k, 3d, mp3, qwen2: not counts
    r"|(?P<dec>\d+\.\d+)"
    r"|(?P<num>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"|(?P<word>[a-z]+(?:'[a-z]+)*)"
    r"|(?P<nl>\n)"
    r"|(?P<punct>[^\sa-z\d])"
)


class _Tok(NamedTuple):
    kind: str  # time, glued, dec, num, word, nl, punct
    text: str
    start: int
    end: int


def _tokenize(text: str) -> list[_Tok]:
    norm = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return [_Tok(m.lastgroup or "punct", m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(norm)]


def _joined(a: _Tok, b: _Tok) -> bool:
    return a.end == b.start


def _hyphen_partner(toks: list[_Tok], i: int, step: int) -> _Tok | None:
    """The token joined to toks[i] by a hyphen without spaces ("three-legged"), looking right (+1) or left (-1)."""
    h, p = i + step, i + 2 * step
    if not (0 <= h < len(toks) and 0 <= p < len(toks)) or toks[h].text != "-":
        return None
    pair = (toks[i], toks[h], toks[p]) if step > 0 else (toks[p], toks[h], toks[i])
    return toks[p] if _joined(pair[0], pair[1]) and _joined(pair[1], pair[2]) else None


_CLAUSE_PUNCT = frozenset(",.;:!?()[]")
_CLAUSE_WORDS = frozenset({"but", "however", "although", "though", "while", "whereas", "yet"})
_SENTENCE_PUNCT = frozenset(".;!?")
_TRANSPARENT = frozenset({"-", '"', "'", "*", "`", "_"})
_PRONOUNS = frozenset({"there", "it", "its", "it's", "they", "i", "the", "this", "that", "he", "she", "we", "you"})
_NEGATIONS = frozenset({"not", "no", "never", "neither", "nor", "without", "cannot", "none"})
_BARE_NEGATIONS = frozenset({"dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "wont", "hasnt"})


def _is_boundary(tok: _Tok) -> bool:
    return tok.kind == "nl" or tok.text in _CLAUSE_PUNCT or tok.text in _CLAUSE_WORDS


def _is_interjection_no(toks: list[_Tok], i: int) -> bool:
    """A leading "No" answering a question ("No, ...", "No.", "No there is..."), not the determiner "no dogs"."""
    if toks[i].text not in ("no", "nope", "nah"):
        return False
    j = i - 1
    while j >= 0 and toks[j].text in _TRANSPARENT:
        j -= 1
    if j >= 0 and not _is_boundary(toks[j]):
        return False
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    return nxt is None or nxt.kind in ("punct", "nl") or nxt.text in _PRONOUNS


def _is_negation_cue(toks: list[_Tok], i: int) -> bool:
    word = toks[i].text
    if not (word in _NEGATIONS or word in _BARE_NEGATIONS or word.endswith("n't")):
        return False
    nxt = toks[i + 1].text if i + 1 < len(toks) else ""
    if word == "not" and nxt in ("only", "just", "merely"):
        return False
    return not _is_interjection_no(toks, i)


def _denied(toks: list[_Tok], i: int, fillers: frozenset[str], max_fillers: int, skip: frozenset[int]) -> bool:
    """True if a negation cue governs toks[i]: scanning left inside its clause, over filler words only."""
    seen = 0
    for j in range(i - 1, -1, -1):
        tok = toks[j]
        if tok.text in _TRANSPARENT:
            continue
        if _is_boundary(tok) or tok.kind != "word":
            return False
        if (tok.text == "than" and j > 0 and toks[j - 1].text == "rather") or (
            tok.text == "of" and j > 0 and toks[j - 1].text == "instead"
        ):
            return True
        if _is_negation_cue(toks, j):
            return True
        if tok.text not in fillers and j not in skip:
            return False
        seen += 1
        if seen > max_fillers:
            return False
    return False


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(
            f"{name} must be the reply string, got {type(text).__name__} {text!r}; "
            "fill missing replies first, e.g. df['response'].fillna('')"
        )
    return text


# ---------------------------------------------------------------------------------------------------
# Numbers.

_LABELS = frozenset({
    "step", "item", "image", "picture", "photo", "figure", "fig", "number", "page", "chapter", "section",
    "part", "option", "row", "column", "line", "version", "level", "model", "type", "room", "frame", "slide",
    "panel", "example", "question", "stage", "phase", "round",
})  # fmt: skip
_UNITS = frozenset({
    "mm", "cm", "m", "km", "inch", "inches", "ft", "foot", "feet", "meter", "meters", "metre", "metres",
    "mile", "miles", "kg", "g", "mg", "lb", "lbs", "oz", "ml", "l", "liter", "liters", "litre", "litres",
    "percent", "degree", "degrees", "mph", "px", "pixel", "pixels", "mp", "kb", "mb", "gb",
    "year", "years", "month", "months", "week", "weeks", "day", "days", "hour", "hours",
    "minute", "minutes", "second", "seconds", "am", "pm", "o'clock", "dollars", "cents", "euros",
})  # fmt: skip
_SUBSET_WORDS = frozenset({"other", "another", "remaining", "first", "last"})  # "the other two": part of the group
_YEAR_PREPOSITIONS = frozenset({"in", "since", "from", "during", "until", "till", "circa", "year"})
_ONE_DETERMINERS = frozenset({
    "a", "an", "the", "this", "that", "each", "every", "any", "no", "which", "another", "some", "either",
    "neither", "whichever",
})  # fmt: skip
_ONE_FOLLOWERS = frozenset({
    "of", "by", "another", "after", "is", "was", "has", "had", "appears", "seems", "looks", "can", "could",
    "would", "will", "might", "may", "must", "should", "point", "time", "moment", "side", "end", "hand",
    "way", "thing",
})  # fmt: skip
_NO_IDIOMS = frozenset({
    "one", "longer", "more", "less", "fewer", "matter", "doubt", "other", "way", "need", "problem", "idea",
    "such", "further", "clear", "exact", "specific", "definite", "certain", "particular",
})  # fmt: skip
_NUMBER_FILLERS = frozenset({
    "see", "seen", "find", "found", "count", "counted", "spot", "notice", "observe", "detect", "there",
    "is", "are", "be", "been", "have", "has", "exactly", "precisely", "actually", "really",
})  # fmt: skip
_LIST_LEAD = frozenset({"*", "#", "-", "\u2022", ">", "("})


@lru_cache(maxsize=1)
def _number_phrases() -> tuple[dict[tuple[str, ...], int], int]:
    """Word sequence -> value for 0..1000, inverted from num2words (so "twenty-one", "twenty one",
    "one hundred and five", "one hundred five", "a hundred" all parse), plus "dozen"."""
    from num2words import num2words

    table: dict[tuple[str, ...], int] = {}
    for n in range(1001):
        words = tuple(re.findall(r"[a-z]+", num2words(n, lang="en")))
        variants = {words, tuple(w for w in words if w != "and")}
        if words[0] == "one" and len(words) > 1 and words[1] in ("hundred", "thousand"):
            variants |= {("a",) + v[1:] for v in variants}
        for v in variants:
            table.setdefault(v, n)
    table.update({("dozen",): 12, ("a", "dozen"): 12, ("half", "a", "dozen"): 6})
    return table, max(len(k) for k in table)


def _match_number_words(toks: list[_Tok], i: int) -> tuple[int, int] | None:
    """The longest number phrase starting at toks[i] as (value, index of its last token), else None."""
    table, max_len = _number_phrases()
    words: list[str] = []
    best = None
    j = i
    while toks[j].kind == "word" and len(words) < max_len:
        words.append(toks[j].text)
        if tuple(words) in table:
            best = (table[tuple(words)], j)
        if j + 1 < len(toks) and toks[j + 1].kind == "word":
            j += 1
        elif (partner := _hyphen_partner(toks, j, +1)) is not None and partner.kind == "word":
            j += 2
        else:
            break
    return best


def _prev_word(toks: list[_Tok], i: int) -> str:
    return toks[i - 1].text if i > 0 and toks[i - 1].kind == "word" else ""


def _is_list_marker(toks: list[_Tok], i: int) -> bool:
    """ "1." / "1)" opening a line, or "(1)" opening a line or item (after punctuation or and/or), followed by
    more text on that line. "the dogs (3) are" stays a count."""
    k = i + 1
    if 0 < i and k + 1 < len(toks) and toks[i - 1].text == "(" and toks[k].text == ")" and toks[k + 1].kind != "nl":
        before = toks[i - 2] if i > 1 else None
        opens_item = before is None or before.kind in ("punct", "nl") or before.text in ("and", "or")
        return opens_item and _joined(toks[i - 1], toks[i]) and _joined(toks[i], toks[k])
    j = i - 1
    while j >= 0 and toks[j].kind == "punct" and toks[j].text in _LIST_LEAD:
        j -= 1
    if j >= 0 and toks[j].kind != "nl":
        return False
    if k >= len(toks) or toks[k].text not in (".", ")") or not _joined(toks[i], toks[k]):
        return False
    return k + 1 < len(toks) and toks[k + 1].kind != "nl"


def _is_count(toks: list[_Tok], start: int, end: int) -> bool:
    """Whether the number spanning toks[start..end] is a stated count rather than a label, measure or idiom."""
    first, nxt = toks[start], toks[end + 1] if end + 1 < len(toks) else None
    for side, idx in ((-1, start), (+1, end)):
        partner = _hyphen_partner(toks, idx, side)
        if partner is not None and partner.kind != "num":  # "three-legged", "COVID-19"; "3-4" is a range
            return False
    if nxt is not None and (nxt.text in _UNITS or (nxt.text == "%" and _joined(toks[end], nxt))):
        return False
    prev = toks[start - 1] if start > 0 else None
    if prev is not None and prev.text in ("$", "\u00a3", "\u20ac", "#") and _joined(prev, first):
        return False
    if _prev_word(toks, start) in _LABELS or _prev_word(toks, start) in _SUBSET_WORDS:
        return False
    if prev is not None and prev.text == "." and start > 1 and toks[start - 2].text == "no":  # "No. 3"
        return False
    if _denied(toks, start, _NUMBER_FILLERS, 3, frozenset()):
        return False
    if first.kind == "num":
        if _is_list_marker(toks, start):
            return False
        if len(first.text) == 4 and 1800 <= int(first.text) <= 2100 and _prev_word(toks, start) in _YEAR_PREPOSITIONS:
            return False
    if start == end and first.text == "one":
        before = [toks[j].text for j in range(max(0, start - 2), start) if toks[j].kind == "word"]
        if any(w in _ONE_DETERMINERS for w in before) or _prev_word(toks, start) == "by":
            return False
        if nxt is not None and nxt.text in _ONE_FOLLOWERS:
            return False
    return True


def _is_zero(toks: list[_Tok], i: int) -> bool:
    """Whether toks[i] states zero: the determiner "no" ("no dogs") or a bare "none" ("zero" is in the table)."""
    word, nxt = toks[i].text, toks[i + 1] if i + 1 < len(toks) else None
    if word == "none":
        return nxt is None or nxt.text != "of"
    if word != "no" or _is_interjection_no(toks, i):
        return False
    return nxt is not None and nxt.kind == "word" and nxt.text not in _NO_IDIOMS


def parse_number(text: str) -> int | None:
    """The first count the reply states (digits or words), skipping list markers, labels and idioms.

    The module docstring lists every rule; they exist because the reference study's first-token rule
    read "one of the dogs" as 1, "point" as 0 and "1." list markers as counts.

    Args:
        text: the assistant reply.

    Returns:
        The count as an int (0 for "no dogs" / "none" / "zero"), or None if the reply states none.

    Raises:
        InputError: `text` is not a string.

    Example:
        >>> parse_number("One of the dogs is brown; there are twenty-one dogs.")
        21
    """
    toks = _tokenize(_check_text(text))
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok.kind == "num":
            if _is_count(toks, i, i):
                return int(tok.text.replace(",", ""))
        elif tok.kind == "word":
            match = _match_number_words(toks, i)
            if match is not None:
                value, end = match
                if _is_count(toks, i, end):
                    return value
                i = end + 1
                continue
            if _is_zero(toks, i):
                return 0
        i += 1
    return None


# ---------------------------------------------------------------------------------------------------
# Colours.

_NEGATION_FILLERS = frozenset({
    "a", "an", "the", "any", "see", "seen", "find", "found", "notice", "observe", "spot", "detect", "there",
    "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do", "does", "did", "contain",
    "contains", "show", "shows", "depict", "depicts", "appear", "appears", "seem", "seems", "look", "looks",
    "to", "actually", "really", "exactly", "quite", "entirely", "completely", "fully", "totally", "purely",
    "mostly", "very", "particularly", "necessarily", "of", "in", "this", "that", "these", "those", "which",
    "image", "picture", "photo", "photograph", "it", "its", "it's", "dark", "light", "bright", "pale", "deep",
    "vivid", "solid", "plain", "or", "colored", "coloured", "color", "colour", "visible", "single", "other",
    "shade", "large", "small", "big", "little", "shiny",
})  # fmt: skip
_CORRECTION_MARKERS = frozenset({"actually", "really"})


def _check_obj(obj: object) -> str | None:
    if obj is not None and (not isinstance(obj, str) or not obj.strip()):
        raise InputError(f"obj = {obj!r}; expected the object's name as a non-empty string, e.g. 'car', or None")
    return obj


def _object_mask(toks: list[_Tok], obj: str | None) -> frozenset[int]:
    """Indices of tokens that spell the object's name (last word also plural/possessive): not colours."""
    if obj is None:
        return frozenset()
    parts = re.findall(r"[a-z]+", obj.lower())
    if not parts:
        return frozenset()
    head = parts[-1]
    last_forms = {head, head + "s", head + "es", head + "'s", head + "s'"}
    if head.endswith("y"):
        last_forms.add(head[:-1] + "ies")
    words = [i for i, t in enumerate(toks) if t.kind == "word"]
    masked: set[int] = set()
    for s in range(len(words) - len(parts) + 1):
        window = words[s : s + len(parts)]
        texts = [toks[i].text for i in window]
        if texts[:-1] == parts[:-1] and texts[-1] in last_forms:
            masked.update(window)
    return frozenset(masked)


def _colour_mentions(toks: list[_Tok], masked: frozenset[int]) -> list[tuple[int, str]]:
    """(token index, canonical colour) for every colour word, in reading order."""
    found = []
    for i, tok in enumerate(toks):
        if tok.kind != "word" or i in masked:
            continue
        word = tok.text[:-2] if tok.text.endswith("'s") else tok.text
        colour = _PLAIN_COLOURS.get(word)
        if colour is None and word in AMBIGUOUS_COLOURS:
            k = i + 2 if _hyphen_partner(toks, i, +1) is not None else i + 1
            if k < len(toks) and toks[k].text in _COLOUR_CUES:
                colour = AMBIGUOUS_COLOURS[word]
        if colour is not None:
            found.append((i, colour))
    return found


def _canonical_colour(name: object, role: str) -> str:
    if isinstance(name, str):
        key = name.strip().lower()
        colour = _PLAIN_COLOURS.get(key) or AMBIGUOUS_COLOURS.get(key)
        if colour is not None:
            return colour
    hint = " (parse a list-string with ast.literal_eval first)" if isinstance(name, str) and "[" in name else ""
    raise InputError(
        f"{role} = {name!r} is not a known colour; pass one of {', '.join(COLOURS)} or a variant such as 'grey'{hint}"
    )


def parse_colours(text: str, obj: str | None = None) -> list[str]:
    """Canonical colours the reply names, each once, in order of first appearance (whole words only).

    Args:
        text: the assistant reply.
        obj: the object's name; its words are not read as colours ("red panda", an "orange").

    Returns:
        A list of names from `COLOURS`, possibly empty.

    Raises:
        InputError: `text` is not a string, or `obj` is not a non-empty string or None.

    Example:
        >>> parse_colours("A reddish-brown dog under a sky blue tank.")
        ['red', 'brown', 'blue']
    """
    toks = _tokenize(_check_text(text))
    seen: dict[str, None] = {}
    for _, colour in _colour_mentions(toks, _object_mask(toks, _check_obj(obj))):
        seen.setdefault(colour, None)
    return list(seen)


def first_colour(text: str, obj: str | None = None) -> str | None:
    """The first canonical colour the reply names, or None; see `parse_colours`.

    Example:
        >>> first_colour("The car is navy blue.")
        'blue'
    """
    colours = parse_colours(text, obj)
    return colours[0] if colours else None


def is_negated(text: str, colour: str, obj: str | None = None) -> bool:
    """Whether the reply denies `colour`: a negation close before it in the same clause, or a correction after it.

    Denied: "The car is not blue", "there is no blue car", "I don't see a blue car", "isn't blue",
    "neither blue nor green", "red rather than blue", "The blue car is actually red". The cue must be in
    the colour's clause (commas, semicolons, "but"/"however" end it) with only filler words between
    ("see", "a", "any", "is", "appear to be", shade words, other colours, the object's name). So "No, it
    is blue", "a car with no people, blue" and "the blue car is not moving" are not denials, unlike the
    reference's any-negation-anywhere rule.

    Args:
        text: the assistant reply.
        colour: a canonical colour or variant ("grey" is gray); mentions of any of its variants count.
        obj: the object's name; lets "there is no car that is blue" count and keeps its words from being colours.

    Raises:
        InputError: `text` is not a string, `colour` is not a known colour, or `obj` is not a string/None.

    Example:
        >>> is_negated("There is no blue car in the image; the car is red.", "blue")
        True
    """
    toks = _tokenize(_check_text(text))
    target = _canonical_colour(colour, "colour")
    masked = _object_mask(toks, _check_obj(obj))
    mentions = _colour_mentions(toks, masked)
    skip = masked | {i for i, _ in mentions}
    for pos, (i, name) in enumerate(mentions):
        if name != target:
            continue
        if _denied(toks, i, _NEGATION_FILLERS, 8, skip):
            return True
        # "The blue car is actually red": a correction marker then a different colour, same sentence.
        for k in range(i + 1, len(toks)):
            if toks[k].kind == "nl" or toks[k].text in _SENTENCE_PUNCT:
                break
            is_marker = toks[k].text in _CORRECTION_MARKERS or (
                toks[k].text == "in" and k + 1 < len(toks) and toks[k + 1].text == "fact"
            )
            if is_marker:
                later = [(j, c) for j, c in mentions[pos + 1 :] if k < j <= k + 5]
                if later and later[0][1] != target and not any(
                    t.kind == "nl" or t.text in _SENTENCE_PUNCT for t in toks[k : later[0][0]]
                ):
                    return True
                break
    return False


# ---------------------------------------------------------------------------------------------------
# Yes / no.

_YES = frozenset({"yes", "yeah", "yep", "yup"})


def parse_yes_no(text: str) -> bool | None:
    """True/False for a reply that *opens* with yes/no, else None.

    Only a leading answer word counts ("Yes, there is..." -> True; "No." / "No, ..." / "No there is" ->
    False). "There is no dog" and "No dogs are visible" give None: "no" there is a determiner, and reading
    yes/no from the body would mix answers with descriptions. Leading markdown, quotes and an
    "Answer:" label are skipped.

    Raises:
        InputError: `text` is not a string.

    Example:
        >>> parse_yes_no("**No**, there is no dog.")
        False
    """
    toks = _tokenize(_check_text(text))
    i = 0
    while i < len(toks) and toks[i].kind in ("punct", "nl"):
        i += 1
    if i + 1 < len(toks) and toks[i].text == "answer" and toks[i + 1].text == ":":
        i += 2
        while i < len(toks) and toks[i].kind in ("punct", "nl"):
            i += 1
    if i >= len(toks):
        return None
    if toks[i].text in _YES:
        return True
    if toks[i].text in ("no", "nope", "nah"):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if nxt is None or nxt.kind in ("punct", "nl") or nxt.text in _PRONOUNS:
            return False
    return None


# ---------------------------------------------------------------------------------------------------
# Outcomes.


def _check_count(value: object, role: str, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 0:
        expected = "a non-negative int or None" if allow_none else "a non-negative int"
        raise InputError(f"{role} = {value!r} ({type(value).__name__}); expected {expected}, e.g. int(row['{role}'])")
    return int(value)


def count_outcome(reply: str, truth: int, claim: int | None) -> tuple[int | None, str]:
    """Parse the count a reply states and classify it against the truth and the prompted number.

    Order: no number -> "none"; == truth -> "corrected" (so a control prompt with claim == truth is
    "corrected"); == claim -> "copied"; else "other". For the base question (claim None), "corrected"
    means right and "other" wrong.

    Args:
        reply: the assistant reply.
        truth: the true count.
        claim: the count the prompt asserted, or None for the base question.

    Returns:
        (parsed count or None, outcome from `OUTCOMES`).

    Raises:
        InputError: `reply` is not a string, or `truth`/`claim` is not a non-negative int.

    Example:
        >>> count_outcome("I can see 7 apples; however, I only count 4.", truth=4, claim=7)
        (7, 'copied')
    """
    _check_text(reply, "reply")
    true = _check_count(truth, "truth", allow_none=False)
    prompted = _check_count(claim, "claim", allow_none=True)
    answer = parse_number(reply)
    if answer is None:
        return None, "none"
    if answer == true:
        return answer, "corrected"
    if answer == prompted:
        return answer, "copied"
    return answer, "other"


def colour_outcome(
    reply: str, truth: str | Iterable[str], claim: str | None, obj: str | None = None
) -> tuple[str | None, str]:
    """Classify a colour reply by its first colour, after checking whether it denies the prompted colour.

    Order: the reply denies the prompted colour anywhere (`is_negated`) -> "negated" (also when the
    first colour is the true one: "The car is red, not blue"); no colour -> "none"; first colour is a
    true colour -> "corrected" (checked before "copied", so a control prompt counts as corrected); first
    colour is the prompted one -> "copied"; else "other". Base question (claim None): "corrected" means
    right, "other" wrong.

    Args:
        reply: the assistant reply.
        truth: the true colour, or all true colours of a multi-coloured object (any of them counts); a list,
            tuple or array (as read back from parquet) all work.
        claim: the colour the prompt asserted, or None for the base question.
        obj: the object's name (see `parse_colours` and `is_negated`).

    Returns:
        (first canonical colour or None, outcome from `OUTCOMES`).

    Raises:
        InputError: `reply` is not a string, a truth/claim colour is unknown, truth is empty, or obj is bad.

    Example:
        >>> colour_outcome("The blue car is parked on the street.", truth=["red"], claim="blue", obj="car")
        ('blue', 'copied')
    """
    _check_text(reply, "reply")
    if isinstance(truth, str):
        names = [truth]
    elif isinstance(truth, Iterable) and not isinstance(truth, (bytes, Mapping)):
        names = list(truth)
    else:
        names = []
    if not names:
        raise InputError(
            f"truth = {truth!r}; expected a colour name or a non-empty list of them, e.g. ['brown', 'white']"
        )
    true = {_canonical_colour(name, "truth") for name in names}
    prompted = None if claim is None else _canonical_colour(claim, "claim")
    first = first_colour(reply, obj)
    if prompted is not None and is_negated(reply, prompted, obj):
        return first, "negated"
    if first is None:
        return None, "none"
    if first in true:
        return first, "corrected"
    if first == prompted:
        return first, "copied"
    return first, "other"


def classify_reply(task: str, reply: str, truth: Any, claim: Any, obj: str | None = None) -> tuple[Any, str]:
    """The parsed answer and outcome of a reply to a "count" or "color" prompt (truth may list several colours)."""
    if task == "count":
        return count_outcome(reply, truth, claim)
    return colour_outcome(reply, truth, claim, obj)
