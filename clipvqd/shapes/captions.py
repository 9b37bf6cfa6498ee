"""Captions for the shapes world: templates with synonyms and left-out attributes.

`caption(attrs, generator)` writes a random English description of an image;
it may leave any attribute out and uses synonyms ("disk", "big", "violet",
"in the middle"), so a text encoder has to learn words, not template slots.

`parse_prompt(text)` reads back which attribute values a text names. It is
exact for everything `caption` and the evaluation prompt sets write, because
every word or phrase below names one value of one attribute only.
"""

from __future__ import annotations

import re

import torch

from clipvqd.shapes.world import ATTRIBUTE_NAMES, Attributes

# Words (or phrases) for each value. The first is the canonical word.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk", "round shape", "dot"),
    "square": ("square", "box", "square shape"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "star shape", "five-pointed star"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white",),
    "gray": ("gray", "grey"),
    "black": ("black",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "in the centre"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "on {}", "on a {} backdrop")
GENERIC_NOUNS = ("shape", "object", "figure")
PREFIXES = ("", "", "a picture of ", "a photo of ", "an image of ", "a drawing of ")

# Probability that caption() names each attribute (the shape and colour most often).
MENTION_PROBABILITY = {"shape": 0.85, "colour": 0.85, "background": 0.6, "size": 0.6, "position": 0.6}


def _pick(options, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def describe(named: dict[str, str], generator: torch.Generator | None = None) -> str:
    """Write a phrase that names exactly the attributes in `named` (others left out).

    Without a generator the canonical words and the plainest template are used,
    e.g. {"size": "small", "colour": "red", "shape": "circle"} -> "a small red circle".
    """

    def choose(options):
        return options[0] if generator is None else _pick(options, generator)

    words = []
    if "size" in named:
        words.append(choose(SIZE_WORDS[named["size"]]))
    if "colour" in named:
        words.append(choose(COLOUR_WORDS[named["colour"]]))
    if "shape" in named:
        words.append(choose(SHAPE_WORDS[named["shape"]]))
    else:
        words.append(choose(GENERIC_NOUNS))
    noun_phrase = " ".join(words)
    text = f"{_article(noun_phrase)} {noun_phrase}"
    tail = []
    if "position" in named:
        tail.append(choose(POSITION_PHRASES[named["position"]]))
    if "background" in named:
        tail.append(choose(BACKGROUND_PHRASES).format(choose(BACKGROUND_WORDS[named["background"]])))
    if generator is not None and len(tail) == 2 and bool(torch.randint(2, (1,), generator=generator)):
        tail.reverse()
    text = " ".join([text, *tail])
    prefix = choose(PREFIXES)
    return prefix + text


def caption(attrs: Attributes, generator: torch.Generator) -> str:
    """A random caption of `attrs`, naming a random subset of its attributes (at least one)."""
    values = attrs.as_dict()
    while True:
        named = {
            name: values[name]
            for name in ATTRIBUTE_NAMES
            if float(torch.rand((), generator=generator)) < MENTION_PROBABILITY[name]
        }
        if named:
            return describe(named, generator)


def _word_table() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value), longest phrases first so "star shape" beats "star"."""
    table = []
    for attribute, words in (
        ("shape", SHAPE_WORDS),
        ("colour", COLOUR_WORDS),
        ("background", BACKGROUND_WORDS),
        ("size", SIZE_WORDS),
    ):
        for value, phrases in words.items():
            table.extend((phrase, attribute, value) for phrase in phrases)
    for value, phrases in POSITION_PHRASES.items():
        table.extend((phrase, "position", value) for phrase in phrases)
    # bare position words ("left", "top", ...) also name the position
    table.extend((value, "position", value) for value in POSITION_PHRASES)
    table.extend((alias, "position", "center") for alias in ("middle", "centre"))
    return sorted(table, key=lambda row: -len(row[0]))


_TABLE = _word_table()


def parse_prompt(text: str) -> dict[str, str]:
    """Which attribute values does this text name? {attribute: canonical value}.

    Matches whole words, case-insensitively, longest phrase first; each matched
    span is consumed so "star shape" counts once. If a text names two values of
    one attribute, the first one in the text wins.
    """
    remaining = " " + re.sub(r"[^a-z\-]+", " ", text.lower()) + " "
    found: dict[str, tuple[int, str]] = {}
    for phrase, attribute, value in _TABLE:
        pattern = re.compile(r"(?<![a-z\-])" + re.escape(phrase) + r"(?![a-z\-])")
        for match in pattern.finditer(remaining):
            position = match.start()
            if attribute not in found or position < found[attribute][0]:
                found[attribute] = (position, value)
        remaining = pattern.sub(lambda m: " " * len(m.group(0)), remaining)
    return {name: found[name][1] for name in ATTRIBUTE_NAMES if name in found}
