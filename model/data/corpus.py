"""Text-only samples and captions for the demo dataset.

The text corpus is short templated English about shapes, colours, counting and small-number arithmetic: enough
variety to train a byte-level BPE tokenizer and to give pre-training some language to model. Captions describe
shape scenes ("A red circle and two blue squares.") or answer simple questions about them, plus a few
scikit-image sample photographs cropped to varied aspect ratios so that dynamic tiling yields several tiles.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import numpy as np
from PIL import Image

from vlpipe.model.data.reasoning import join_words
from vlpipe.model.data.scenes import COLOURS, KINDS, Scene

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

# Photographs bundled with scikit-image (no download needed) and a caption for each.
PHOTOS: dict[str, str] = {
    "astronaut": "An astronaut in a white space suit in front of a flag.",
    "coffee": "A cup of coffee on a saucer.",
    "chelsea": "An orange tabby cat looking to the side.",
    "rocket": "A rocket standing on its launch pad.",
    "camera": "A black and white photo of a man with a camera on a tripod.",
    "coins": "A grey photo of old coins in rows.",
    "moon": "A grey photo of the surface of the moon.",
    "page": "A scanned page of printed text.",
    "hubble_deep_field": "A deep space image full of small distant galaxies.",
    "immunohistochemistry": "A microscope image of stained tissue.",
    "colorwheel": "A colour wheel with every colour of the rainbow.",
    "clock": "A grey photo of a clock on a wall.",
    "brick": "A grey close-up of a brick wall.",
    "grass": "A grey close-up of grass.",
    "gravel": "A grey close-up of gravel.",
}
_ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 1))

_COLOUR_THINGS = {
    "red": ["a tomato", "a strawberry", "a fire truck", "a ripe cherry"],
    "green": ["a leaf", "the grass", "a frog", "a lime"],
    "blue": ["the sky", "the sea", "a blueberry", "a sapphire"],
    "yellow": ["a lemon", "a banana", "the sun", "a sunflower"],
}
_SHAPE_FACTS = {
    "circle": [
        "A circle is round and has no corners.",
        "A circle looks the same from every side.",
        "A coin and a wheel are shaped like circles.",
    ],
    "square": [
        "A square has four equal sides and four corners.",
        "Every corner of a square is a right angle.",
        "A chess board is made of small squares.",
    ],
    "triangle": [
        "A triangle has three sides and three corners.",
        "A slice of pizza looks like a triangle.",
        "The corners of a triangle add up to half a turn.",
    ],
}
_PROMPTS = {
    "shapes": [
        "Tell me about shapes.",
        "Write a few sentences about shapes.",
        "What do you know about {kind}s?",
    ],
    "colours": [
        "Tell me about colours.",
        "Write a few sentences about colours.",
        "What things are {colour}?",
    ],
    "counting": ["How do you count shapes?", "Write a few sentences about counting.", "Explain counting."],
    "arithmetic": ["Write some sums.", "Tell me about adding and taking away.", "Practise some arithmetic."],
}


def number_word(n: int, capital: bool = False) -> str:
    word = NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)
    return word.capitalize() if capital else word


def plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _shape_sentence(rng: random.Random) -> str:
    return rng.choice(_SHAPE_FACTS[rng.choice(KINDS)])


def _colour_sentence(rng: random.Random) -> str:
    colour = rng.choice(list(COLOURS))
    thing = rng.choice(_COLOUR_THINGS[colour])
    if rng.random() < 0.5:
        return f"{thing[0].upper()}{thing[1:]} is {colour}."
    other = rng.choice([c for c in COLOURS if c != colour])
    return f"{thing[0].upper()}{thing[1:]} is {colour}, not {other}."


def _counting_sentence(rng: random.Random) -> str:
    colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
    a, b = rng.randint(0, 5), rng.randint(1, 5)
    colour2 = rng.choice([c for c in COLOURS if c != colour])
    templates = [
        f"To count the {colour} shapes, look at each shape from left to right and keep only the {colour} ones.",
        f"There are {number_word(a)} {colour} {plural(kind, a)} and {number_word(b)} {colour2} "
        f"{plural(kind, b)}, so there are {number_word(a + b)} {kind}s in all.",
        f"If there are no {kind}s, the answer is zero.",
        f"Counting up from {number_word(a)}: " + ", ".join(number_word(i) for i in range(a, a + b + 1)) + ".",
        f"{number_word(a + b, capital=True)} is more than {number_word(a)}.",
        f"{number_word(a, capital=True)} is less than {number_word(a + b)}.",
        f"When you see {number_word(b)} {plural(kind, b)}, point at each one and say the next number.",
    ]
    return rng.choice(templates)


def _arithmetic_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        return f"{number_word(a, capital=True)} plus {number_word(b)} is {number_word(a + b)}."
    a, b = max(a, b), min(a, b)
    return f"{number_word(a, capital=True)} minus {number_word(b)} is {number_word(a - b)}."


_SENTENCES: dict[str, Callable[[random.Random], str]] = {
    "shapes": _shape_sentence,
    "colours": _colour_sentence,
    "counting": _counting_sentence,
    "arithmetic": _arithmetic_sentence,
}


def text_conversation(rng: random.Random) -> list[dict[str, str]]:
    """One pure-text conversation (no image): a short question and a short paragraph, a sum, or a continuation."""
    style = rng.random()
    if style < 0.25:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        op = rng.choice(["plus", "minus"])
        if op == "minus":
            a, b = max(a, b), min(a, b)
        result = a + b if op == "plus" else a - b
        if rng.random() < 0.5:
            human = f"What is {number_word(a)} {op} {number_word(b)}?"
        else:
            human = f"What is {a} {'+' if op == 'plus' else '-'} {b}?"
        gpt = f"{number_word(a, capital=True)} {op} {number_word(b)} is {number_word(result)}. So the answer is {result}."
        return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    topic = rng.choice(list(_SENTENCES))
    sentences = [_SENTENCES[topic](rng) for _ in range(rng.randint(2, 4))]
    if style < 0.5:
        return [
            {"from": "human", "value": f"Continue the text: {sentences[0]}"},
            {"from": "gpt", "value": " ".join(sentences[1:])},
        ]
    prompt = rng.choice(_PROMPTS[topic]).format(kind=rng.choice(KINDS), colour=rng.choice(list(COLOURS)))
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": " ".join(sentences)}]


def scene_caption(scene: Scene) -> str:
    """'A red circle and two blue squares.': groups of equal shapes in order of first appearance, left to right."""
    counts: dict[tuple[str, str], int] = {}
    for obj in scene.objects():
        counts[obj] = counts.get(obj, 0) + 1
    parts = [
        f"{'a' if n == 1 else number_word(n)} {colour} {plural(kind, n)}"
        for (colour, kind), n in counts.items()
    ]
    text = join_words(parts)
    return text[0].upper() + text[1:] + "."


def caption_conversation(rng: random.Random, scene: Scene) -> list[dict[str, str]]:
    """A caption or a simple question about a shape scene."""
    objects = scene.objects()
    style = rng.random()
    if style < 0.6:
        human = rng.choice(
            ["Describe the image.", "What shapes are in the picture?", "Write a short caption."]
        )
        gpt = scene_caption(scene)
    elif style < 0.8:
        human = "How many shapes are there?"
        n = len(objects)
        gpt = "There is 1 shape." if n == 1 else f"There are {n} shapes."
    else:
        human = "What colours are the shapes?"
        colours = list(dict.fromkeys(colour for colour, _ in objects))
        text = join_words(colours)
        gpt = text[0].upper() + text[1:] + "."
    return [{"from": "human", "value": f"<image>\n{human}"}, {"from": "gpt", "value": gpt}]


def load_photos(limit: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Sample photographs that load offline, as RGB arrays, and those skipped with the reason.

    Args:
        limit: stop after this many loaded (in name order); default all.
    """
    import skimage.data

    photos: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for name in sorted(PHOTOS):
        if limit is not None and len(photos) >= limit:
            break
        try:
            array = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - any failure (missing pooch, no network) means skip it
            skipped[name] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) * (255.0 / max(1.0, float(array.max())))).astype(np.uint8)
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos[name] = array[..., :3]
    return photos, skipped


def photo_crop(rng: random.Random, array: np.ndarray) -> bytes:
    """A random crop with a random aspect ratio, resized to a long side of 128–256 pixels, as JPEG bytes."""
    height, width = array.shape[:2]
    aw, ah = rng.choice(_ASPECTS)
    scale = min(width / aw, height / ah) * rng.uniform(0.6, 1.0)
    cw, ch = max(8, int(aw * scale)), max(8, int(ah * scale))
    x0, y0 = rng.randint(0, width - cw), rng.randint(0, height - ch)
    long_side = rng.randint(128, 256)
    factor = long_side / max(cw, ch)
    image = Image.fromarray(array[y0 : y0 + ch, x0 : x0 + cw]).resize(
        (max(8, round(cw * factor)), max(8, round(ch * factor))), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_conversation(rng: random.Random, name: str) -> list[dict[str, str]]:
    human = rng.choice(["Describe the image briefly.", "What is in this picture?", "Write a short caption."])
    return [{"from": "human", "value": f"<image>\n{human}"}, {"from": "gpt", "value": PHOTOS[name]}]
