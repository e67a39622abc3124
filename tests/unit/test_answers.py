"""Reply parsing and outcome classes (`halluscope.answers`): realistic VLM replies, one test per hijack rule,
and every InputError."""

from __future__ import annotations

import doctest

import pytest

from halluscope import answers
from halluscope.answers import (
    AMBIGUOUS_COLOURS,
    COLOUR_VARIANTS,
    COLOURS,
    OUTCOMES,
    colour_outcome,
    count_outcome,
    first_colour,
    is_negated,
    parse_colours,
    parse_number,
    parse_yes_no,
)
from halluscope.errors import HalluscopeError, InputError

# --- realistic replies: (reply, truth, claim, parsed, outcome) ----------------------------------------

COUNT_REPLIES = [
    ("The image shows a collection of 15 different headsets arranged on a white surface.", 6, 15, 15, "copied"),
    ("There are four dogs in the image.", 4, 7, 4, "corrected"),
    ("I can see 7 apples; however, I only count 4.", 4, 7, 7, "copied"),
    ("The image shows 8 birds perched on a wire. Each bird has a slightly different posture.", 3, 8, 8, "copied"),
    ("In the image, there are three cats lying on a couch. One of them is orange.", 3, 5, 3, "corrected"),
    ("One of the dogs sits while the other two are standing. There are three dogs in total.", 3, 4, 3, "corrected"),
    ("Sure! Here is a description of the 9 chairs:\n1. A wooden chair\n2. A metal chair", 5, 9, 9, "copied"),
    ("1. A red apple on the left\n2. A green apple in the middle\n3. A yellow apple on the right", 3, 4, None, "none"),
    ("**1.** The first kid wears a hat.\n**2.** The second kid holds a ball.", 2, 3, None, "none"),
    ("The image shows a group of children. Unfortunately, I cannot determine the exact number.", 5, 6, None, "none"),
    ("There are no dogs in this image; it shows a cat on a sofa.", 2, 3, 0, "other"),
    ("No, there are only 2 horses in the picture, not 7.", 2, 7, 2, "corrected"),
    ("There aren't 12 eggs in the carton; I count ten.", 10, 12, 10, "corrected"),
    ("The twenty-one balloons are floating above the crowd.", 5, 21, 21, "copied"),
    ("There are twenty one candles on the cake.", 21, 26, 21, "corrected"),
    ("The one on the left is a tabby; there are five cats in total.", 5, 8, 5, "corrected"),
    ("At one point in the row, the bottles change colour. I see 6 bottles.", 4, 6, 6, "copied"),
    ("At this point, it is clear there are 3 bicycles.", 3, 4, 3, "corrected"),
    ("The dogs walk one by one along the path; there are 2 dogs.", 2, 3, 2, "corrected"),
    ("Step 1: Identify the cups. Step 2: Count them. There are 9 cups.", 4, 9, 9, "copied"),
    ("This photo, taken in 2019, shows 6 penguins on the ice.", 6, 7, 6, "corrected"),
    ("The three-legged stool holds 4 mugs.", 4, 5, 4, "corrected"),
    ("The image contains a dozen eggs in a carton.", 12, 13, 12, "corrected"),
    ("4", 4, None, 4, "corrected"),
    ("There are 5 coins on the table.", 4, None, 5, "other"),
    ("I don't see 10 ducks in the image.", 3, 10, None, "none"),
    ("Each one of the puppies is asleep, and there are seven puppies.", 7, 8, 7, "corrected"),
]


@pytest.mark.parametrize(("reply", "truth", "claim", "parsed", "outcome"), COUNT_REPLIES)
def test_count_outcome_on_realistic_replies(reply, truth, claim, parsed, outcome):
    assert count_outcome(reply, truth, claim) == (parsed, outcome)


# (reply, truth, claim, obj, first colour, outcome)
COLOUR_REPLIES = [
    ("The blue car is parked on a quiet street lined with trees.", ["red"], "blue", "car", "blue", "copied"),
    ("The blue car is actually red.", "red", "blue", "car", "blue", "negated"),
    ("There is no blue car in the image; the car is red.", ["red"], "blue", "car", "blue", "negated"),
    ("I don't see a blue apple in the image. The apple is red.", ["red"], "blue", "apple", "blue", "negated"),
    ("The car in the image is red, not blue.", ["red"], "blue", "car", "red", "negated"),
    ("The apple is red with a few yellow spots.", ["red", "yellow"], "purple", "apple", "red", "corrected"),
    ("The Arctic fox has thick white fur and dark eyes.", ["white"], "orange", "Arctic fox", "white", "corrected"),
    ("The fox's fur is a mix of white and brown.", ["brown", "white"], "yellow", "Arctic fox", "white", "corrected"),
    ("The green banana is lying on a wooden table.", ["yellow"], "green", "banana", "green", "copied"),
    ("The banana is a pale yellowish colour with brown spots.", ["yellow"], "green", "banana", "yellow", "corrected"),
    ("The purple flower has delicate petals and a bright center.", ["yellow"], "purple", "flower", "purple", "copied"),
    ("This is a close-up of a butterfly resting on a leaf.", ["orange"], "blue", "butterfly", None, "none"),
    ("The truck is a dark navy shade with silver trim.", ["blue"], "green", "truck", "blue", "corrected"),
    ("The pepper is orange and shiny.", ["red"], "yellow", "pepper", "orange", "other"),
    ("The red panda is sitting on a branch; its fur is blue.", ["red", "white"], "blue", "red panda", "blue", "copied"),
    ("The orange is bright green.", ["orange"], "green", "orange", "green", "copied"),
    ("The car is blue.", ["blue"], None, "car", "blue", "corrected"),
    ("The car is green.", ["blue"], None, "car", "green", "other"),
    ("The dress is neither blue nor green; it is a deep crimson.", ["red"], "green", "dress", "blue", "negated"),
    ("The blue car is parked next to a fence with no people around.", ["red"], "blue", "car", "blue", "copied"),
    ("The sky-blue mug sits on a desk.", ["pink"], "blue", "mug", "blue", "copied"),
    ("The grey cat sleeps on the windowsill.", "gray", "orange", "cat", "gray", "corrected"),
    ("The red apple (a control prompt) is red.", ["red"], "red", "apple", "red", "corrected"),
]


@pytest.mark.parametrize(("reply", "truth", "claim", "obj", "first", "outcome"), COLOUR_REPLIES)
def test_colour_outcome_on_realistic_replies(reply, truth, claim, obj, first, outcome):
    assert colour_outcome(reply, truth, claim, obj) == (first, outcome)


def test_outcomes_vocabulary_covers_every_returned_outcome():
    seen = {o for *_, o in COUNT_REPLIES} | {o for *_, o in COLOUR_REPLIES}
    assert seen == set(OUTCOMES)


# --- parse_number rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("There are 12 apples.", 12, id="digits"),
        pytest.param("About 1,000 stars are visible.", 1000, id="thousands-comma"),
        pytest.param("There are three cats.", 3, id="word"),
        pytest.param("twenty-one balloons", 21, id="hyphen-word"),
        pytest.param("twenty one balloons", 21, id="space-word"),
        pytest.param("one hundred and one dalmatians", 101, id="hundred-and"),
        pytest.param("one hundred one dalmatians", 101, id="hundred-no-and"),
        pytest.param("nine hundred and ninety-nine pebbles", 999, id="num2words-top"),
        pytest.param("a hundred birds", 100, id="a-hundred"),
        pytest.param("a thousand lights", 1000, id="a-thousand"),
        pytest.param("half a dozen eggs", 6, id="half-dozen"),
        pytest.param("There is an apple and a pear, 2 fruits.", 2, id="articles-skipped"),
        pytest.param("There is a single dog and a couple of cats.", None, id="vague-not-numbers"),
        pytest.param("The first dog and the 2nd dog sit; 3 dogs.", 3, id="ordinals"),
        pytest.param("One of the dogs is brown; 4 dogs.", 4, id="one-of"),
        pytest.param("They came one by one; 5 ducks.", 5, id="one-by-one"),
        pytest.param("The birds face one another; 6 birds.", 6, id="one-another"),
        pytest.param("No one is in the room. Two chairs.", 2, id="no-one"),
        pytest.param("Each one is striped; 3 zebras.", 3, id="each-one"),
        pytest.param("The one on the left is tall; 2 vases.", 2, id="the-one"),
        pytest.param("a red one and 4 blue ones", 4, id="adjective-one"),
        pytest.param("At one point, 7 runners.", 7, id="at-one-point"),
        pytest.param("One is black, the other is white. 2 cats.", 2, id="one-is"),
        pytest.param("The other two are asleep; 3 cats.", 3, id="subset-other"),
        pytest.param("The first three are red, the remaining 2 blue; 5 cars.", 5, id="subset-first-remaining"),
        pytest.param("There is only one dog.", 1, id="only-one-counts"),
        pytest.param("There is one.", 1, id="one-at-end"),
        pytest.param("At this point there are 3 kids.", 3, id="point-is-not-zero"),
        pytest.param("point", None, id="point-alone"),
        pytest.param("1. A red car\n2. A blue car\n3. A green car", None, id="list-dot"),
        pytest.param("1) A cup\n2) A mug", None, id="list-paren"),
        pytest.param("- 1. A dog\n- 2. A cat", None, id="list-after-bullet"),
        pytest.param("(1) a dog, (2) a cat", None, id="list-parenthesised"),
        pytest.param("The dogs (3) are sleeping.", 3, id="parenthesised-count"),
        pytest.param("3.", 3, id="bare-answer-with-period"),
        pytest.param("The answer is:\n5.", 5, id="answer-line"),
        pytest.param("Step 1: look. Step 2: count. 8 cups.", 8, id="step-label"),
        pytest.param("Image 2 shows 4 cows.", 4, id="image-label"),
        pytest.param("Jersey No. 10 and #7; 3 players.", 3, id="no-dot-and-hash"),
        pytest.param("In 2020, 5 dogs were adopted.", 5, id="year-after-in"),
        pytest.param("There are 2020 beads.", 2020, id="bare-four-digits-count"),
        pytest.param("At 10:30, 4 buses.", 4, id="time"),
        pytest.param("It is 5 pm and 6 people wait.", 6, id="pm"),
        pytest.param("A 30 cm ruler and 2 pens.", 2, id="unit"),
        pytest.param("The dog is 3 years old; 2 dogs.", 2, id="age"),
        pytest.param("2.5 litres of milk in 3 bottles.", 3, id="decimal"),
        pytest.param("A $5 bill and 50% off; 4 shirts.", 4, id="price-percent"),
        pytest.param("A 4K screen and 3D glasses; 2 screens.", 2, id="glued"),
        pytest.param("A three-legged dog and 2 cats.", 2, id="compound-word"),
        pytest.param("COVID-19 masks: 9 masks.", 9, id="compound-digits"),
        pytest.param("3-4 dogs", 3, id="range-first"),
        pytest.param("There aren't 7 dogs; there are 4.", 4, id="denied-digits"),
        pytest.param("I don't see seven dogs, only five.", 5, id="denied-words"),
        pytest.param("There are no dogs in the image.", 0, id="no-determiner"),
        pytest.param("No dogs are visible.", 0, id="leading-no-determiner"),
        pytest.param("No, there are 3 dogs.", 3, id="no-interjection"),
        pytest.param("No there are 3 dogs.", 3, id="no-interjection-without-comma"),
        pytest.param("There are no more than 5 dogs.", 5, id="no-idiom"),
        pytest.param("None.", 0, id="none"),
        pytest.param("None of the 6 cats are awake.", 6, id="none-of"),
        pytest.param("Zero.", 0, id="zero"),
        pytest.param("The image shows a cat.", None, id="no-number"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_number_words_follow_num2words_for_every_value():
    from num2words import num2words

    for n in range(1001):
        assert parse_number(f"I see {num2words(n)} stones.") == n, num2words(n)


# --- colours ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("A tank, a plumber, a skyscraper; reduce the butterfly.", [], id="whole-words-only"),
        pytest.param("A reddish-brown dog.", ["red", "brown"], id="reddish-brown"),
        pytest.param("A bluish bowl and a greenish vase.", ["blue", "green"], id="ish"),
        pytest.param("An orangey glow and a silvery spoon.", ["orange", "silver"], id="ey-y"),
        pytest.param("A dark blue coat and light green hat.", ["blue", "green"], id="shades"),
        pytest.param("A crimson rose, a navy hat and a teal cup.", ["red", "blue"], id="variants"),
        pytest.param("A violet scarf, a lime leaf and a grey cat.", ["purple", "gray"], id="variant-grey"),
        pytest.param("The sky is clear.", [], id="sky-alone"),
        pytest.param("A sky blue kite.", ["blue"], id="sky-blue"),
        pytest.param("An olive tree.", [], id="olive-alone"),
        pytest.param("An olive-green jacket.", ["green"], id="olive-green"),
        pytest.param("A cream-coloured vase next to ice cream.", ["white"], id="cream-coloured"),
        pytest.param("A rose in a vase, rose gold watch.", ["gold"], id="rose"),
        pytest.param("An orange on a plate.", ["orange"], id="orange-fruit-accepted"),
        pytest.param("An off-white wall.", ["white"], id="off-white"),
        pytest.param("A golden retriever.", ["yellow"], id="golden"),
        pytest.param("Red and white stripes, red again.", ["red", "white"], id="dedup-in-order"),
        pytest.param("The car\u2019s paint is RED.", ["red"], id="case-and-quote"),
    ],
)
def test_parse_colours(text, expected):
    assert parse_colours(text) == expected


def test_object_name_is_not_a_colour():
    assert parse_colours("The red panda is blue.") == ["red", "blue"]
    assert parse_colours("The red pandas are blue.", obj="red panda") == ["blue"]
    assert first_colour("The orange is green.", obj="orange") == "green"


def test_first_colour():
    assert first_colour("The car is navy blue with white stripes.") == "blue"
    assert first_colour("A car on a road.") is None


def test_colour_tables_map_to_canonical_colours():
    assert set(COLOUR_VARIANTS.values()) <= set(COLOURS)
    assert set(AMBIGUOUS_COLOURS.values()) <= set(COLOURS)
    assert not set(COLOUR_VARIANTS) & set(AMBIGUOUS_COLOURS)
    assert {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"} <= set(COLOURS)


@pytest.mark.parametrize(
    ("text", "colour", "obj", "expected"),
    [
        pytest.param("The car is not blue.", "blue", None, True, id="is-not"),
        pytest.param("The car isn't blue.", "blue", None, True, id="isnt"),
        pytest.param("There is no blue car.", "blue", None, True, id="no-colour"),
        pytest.param("I don't see a blue car.", "blue", None, True, id="dont-see"),
        pytest.param("The car doesn\u2019t appear to be blue.", "blue", None, True, id="curly-apostrophe"),
        pytest.param("The car is neither blue nor green.", "green", None, True, id="nor"),
        pytest.param("It is red rather than blue.", "blue", None, True, id="rather-than"),
        pytest.param("The blue car is actually red.", "blue", None, True, id="correction"),
        pytest.param("The blue car is in fact a red car.", "blue", None, True, id="in-fact"),
        pytest.param("The blue car is really blue.", "blue", None, False, id="correction-same-colour"),
        pytest.param("The car is navy, not grey.", "gray", None, True, id="variant-target"),
        pytest.param("There is no car in the image that is blue.", "blue", "car", True, id="object-between"),
        pytest.param("There is no car in the image that is blue.", "blue", None, False, id="object-unknown"),
        pytest.param("The blue car is not moving.", "blue", None, False, id="negation-after"),
        pytest.param("There are no people, and the car is blue.", "blue", None, False, id="other-clause"),
        pytest.param("I don't see a driver. The car is blue.", "blue", None, False, id="other-sentence"),
        pytest.param("The car is not moving and is blue.", "blue", None, False, id="non-filler-between"),
        pytest.param("No, it is blue.", "blue", None, False, id="no-interjection"),
        pytest.param("No it is blue.", "blue", None, False, id="no-interjection-without-comma"),
        pytest.param("It is not only blue but also white.", "blue", None, False, id="not-only"),
        pytest.param("The car is red, not blue.", "red", None, False, id="other-colour-denied"),
        pytest.param("The car is blue.", "blue", None, False, id="plain"),
    ],
)
def test_is_negated(text, colour, obj, expected):
    assert is_negated(text, colour, obj) is expected


# --- yes / no -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Yes, there is a dog in the image.", True, id="yes"),
        pytest.param("No.", False, id="no-dot"),
        pytest.param("No", False, id="no-bare"),
        pytest.param("**No**, there is no dog.", False, id="markdown"),
        pytest.param("No there is not.", False, id="no-without-comma"),
        pytest.param("Answer: Yes", True, id="answer-label"),
        pytest.param("Yeah, a dog.", True, id="yeah"),
        pytest.param("There is no dog in the image.", None, id="not-leading"),
        pytest.param("No dogs are visible.", None, id="determiner-no"),
        pytest.param("No one is there.", None, id="no-one"),
        pytest.param("Yesterday's paper.", None, id="whole-word"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: parse_number(None), id="number-none"),
        pytest.param(lambda: parse_colours(3), id="colours-int"),
        pytest.param(lambda: parse_yes_no(b"yes"), id="yes-no-bytes"),
        pytest.param(lambda: parse_colours("red", obj=""), id="empty-obj"),
        pytest.param(lambda: is_negated("not blue", "bleu"), id="unknown-colour"),
        pytest.param(lambda: count_outcome(float("nan"), 3, 4), id="reply-nan"),
        pytest.param(lambda: count_outcome("3", "3", 4), id="truth-str"),
        pytest.param(lambda: count_outcome("3", 3.0, 4), id="truth-float"),
        pytest.param(lambda: count_outcome("3", True, 4), id="truth-bool"),
        pytest.param(lambda: count_outcome("3", 3, -1), id="claim-negative"),
        pytest.param(lambda: colour_outcome("red", "['brown', 'white']", "blue"), id="truth-list-string"),
        pytest.param(lambda: colour_outcome("red", [], "blue"), id="truth-empty"),
        pytest.param(lambda: colour_outcome("red", "red", "sky-ish"), id="claim-unknown"),
        pytest.param(lambda: colour_outcome("red", 7, "blue"), id="truth-int"),
    ],
)
def test_bad_arguments_raise_input_error(call):
    with pytest.raises(InputError) as info:
        call()
    assert isinstance(info.value, (HalluscopeError, ValueError))
    assert "\n" not in str(info.value)


def test_list_string_error_names_the_fix():
    with pytest.raises(InputError, match="literal_eval"):
        colour_outcome("red", "['brown', 'white']", "blue")


def test_numpy_style_integers_are_accepted():
    numpy = pytest.importorskip("numpy")  # a project dependency; skipped only in a bare environment
    assert count_outcome("There are 4 dogs.", numpy.int64(4), numpy.int64(6)) == (4, "corrected")


def test_truth_colours_may_be_an_array():
    numpy = pytest.importorskip("numpy")  # a project dependency; skipped only in a bare environment
    assert colour_outcome("A white fox.", numpy.array(["brown", "white"]), "blue", "fox") == ("white", "corrected")


def test_docstring_examples():
    assert doctest.testmod(answers, raise_on_error=False).failed == 0
