"""Caption vocabulary and templates for the demo corpus.

Training captions use the canonical class words about 70% of the time, so a text encoder can tie
them to the eval class names, and synonyms otherwise, so it also sees varied language. Eval and
retrieval templates use wording that no training template uses: zero-shot prompts and retrieval
queries are then never training captions verbatim. Captions stay short because the demo model's
text context is 24 tokens.
"""

from __future__ import annotations

import random

from pipeline.demo.draw import Scene

COLOUR_SYNONYMS = {
    "red": ("scarlet", "crimson"),
    "orange": ("tangerine", "amber"),
    "yellow": ("lemon", "golden"),
    "green": ("emerald", "jade"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "bubblegum"),
    "brown": ("chocolate", "chestnut"),
}

SHAPE_SYNONYMS = {
    "circle": ("disc", "round dot"),
    "square": ("box", "block"),
    "triangle": ("three-sided figure", "wedge"),
    "star": ("five-pointed star", "starburst"),
    "hexagon": ("six-sided shape", "hex"),
    "diamond": ("rhombus", "lozenge"),
    "cross": ("plus sign", "cross mark"),
    "heart": ("love heart", "heart symbol"),
}

# Count words by object count; the first is canonical.
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a trio of")}

CANONICAL_P = 0.7  # share of captions that use the canonical colour and shape words

TRAIN_TEMPLATES = (
    "a photo of {obj}",
    "{obj} on a {bg} background",
    "a picture of {obj} on a {bg} background",
    "{obj} drawn on {bg} paper",
    "clip art of {obj}",
    "an image with {obj} in the middle",
    "this picture shows {obj}",
    "a simple graphic showing {obj}",
    "{obj} against a {bg} backdrop",
    "a flat illustration of {obj}",
    "stock image: {obj} on a {bg} background",
    "a computer-generated image of {obj}",
)

# Zero-shot prompts ("{}" is the class name, e.g. "red circle"). "the {}" never occurs in training.
EVAL_TEMPLATES = (
    "a drawing of the {}.",
    "a sketch of the {}.",
    "art showing the {}.",
    "a cartoon of the {}.",
    "a close-up of the {}.",
    "the {} in a diagram.",
    "an example of the {}.",
    "the {}, rendered as an icon.",
)

# Retrieval captions: canonical words, phrasing unlike any training template.
RETRIEVAL_TEMPLATES = (
    "a {bg} canvas with {obj} on it",
    "{obj} resting on a {bg} surface",
    "a scene that contains {obj} and a {bg} tone behind",
    "here we see {obj} over a {bg} field",
)


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def object_phrase(count: int, colour_word: str, shape_word: str, count_word: str) -> str:
    """'an orange circle', 'a pair of scarlet discs', 'three red plus signs'."""
    if count == 1 and count_word == "a" and colour_word[0] in "aeiou":
        count_word = "an"
    return f"{count_word} {colour_word} {shape_word if count == 1 else plural(shape_word)}"


def background_words(scene: Scene) -> tuple[str, ...]:
    if scene.background == "plain":
        return ("plain grey", "light grey" if scene.levels[0] >= 180 else "grey")
    if scene.background == "gradient":
        return ("grey gradient", "soft gradient", "shaded grey")
    return ("speckled grey", "noisy grey", "grainy grey")


def train_caption(rng: random.Random, scene: Scene) -> str:
    colour, shape = scene.colour, scene.shape
    if rng.random() >= CANONICAL_P:
        mode = rng.randrange(3)  # 0: colour synonym, 1: shape synonym, 2: both
        if mode != 1:
            colour = rng.choice(COLOUR_SYNONYMS[colour])
        if mode != 0:
            shape = rng.choice(SHAPE_SYNONYMS[shape])
    count_word = rng.choice(COUNT_WORDS[scene.count])
    obj = object_phrase(scene.count, colour, shape, count_word)
    return rng.choice(TRAIN_TEMPLATES).format(obj=obj, bg=rng.choice(background_words(scene)))


def retrieval_caption(rng: random.Random, scene: Scene) -> str:
    obj = object_phrase(scene.count, scene.colour, scene.shape, COUNT_WORDS[scene.count][0])
    bg = background_words(scene)[0]
    return rng.choice(RETRIEVAL_TEMPLATES).format(obj=obj, bg=bg)
