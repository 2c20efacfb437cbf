"""Shape scenes for the demo counting task: sampling, deterministic rendering, PNG encoding.

A scene is 64×64 RGB: a light background and 1–6 non-overlapping circles, squares and (upright) triangles
in red, green, blue and yellow. Shapes are kept at least `_MIN_DX` pixels apart in x so that "left to right"
(the order solutions list them in) is unambiguous, and are stored sorted that way.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
MAX_SHAPES = 6
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")

_MIN_HALF, _MAX_HALF = 4, 8  # half the side of a shape's bounding box, in pixels
_GAP = 2  # empty pixels between bounding boxes
_MIN_DX = 3  # minimum distance between x centres
_JITTER = 15  # per-channel colour noise, so colours are learned as ranges, not single values


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour name, centre, half-size (bounding box is 2*half+1 pixels) and exact RGB."""

    kind: str
    colour: str
    cx: int
    cy: int
    half: int
    rgb: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "colour": self.colour,
            "cx": self.cx,
            "cy": self.cy,
            "half": self.half,
            "rgb": list(self.rgb),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        return cls(d["kind"], d["colour"], d["cx"], d["cy"], d["half"], tuple(d["rgb"]))


@dataclass(frozen=True)
class Scene:
    """Everything needed to redraw an image exactly: shapes (sorted left to right) and the background."""

    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    size: int = IMAGE_SIZE

    def objects(self) -> list[tuple[str, str]]:
        """(colour, kind) of every shape, left to right."""
        return [(s.colour, s.kind) for s in self.shapes]

    def key(self) -> str:
        """A canonical string identifying the scene (used to keep train and test apart)."""
        parts = [f"{s.kind}:{s.colour}:{s.cx}:{s.cy}:{s.half}:{s.rgb}" for s in self.shapes]
        return f"{self.size}|{self.background}|" + "|".join(parts)

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "background": list(self.background),
            "shapes": [s.to_dict() for s in self.shapes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        shapes = tuple(Shape.from_dict(s) for s in d["shapes"])
        return cls(shapes=shapes, background=tuple(d["background"]), size=d.get("size", IMAGE_SIZE))


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_JITTER, _JITTER))) for c in rgb)


def _fits(placed: list[tuple[int, int, int]], cx: int, cy: int, half: int) -> bool:
    for px, py, ph in placed:
        if abs(px - cx) < _MIN_DX:
            return False
        # Axis-aligned bounding boxes with a gap: every kind of shape lies inside its box.
        if abs(px - cx) <= ph + half + _GAP and abs(py - cy) <= ph + half + _GAP:
            return False
    return True


def sample_scene(rng: random.Random, objects: list[tuple[str, str]], size: int = IMAGE_SIZE) -> Scene:
    """Place `objects` ((colour, kind) pairs) at random non-overlapping positions with random sizes.

    Raises:
        ValueError: for more than `MAX_SHAPES` objects or an unknown colour or kind.
        RuntimeError: if no placement is found (does not happen for ≤ 6 objects at 64×64).
    """
    if len(objects) > MAX_SHAPES:
        raise ValueError(f"at most {MAX_SHAPES} shapes fit a demo scene, got {len(objects)}")
    for colour, kind in objects:
        if colour not in COLOURS or kind not in KINDS:
            raise ValueError(f"unknown shape {colour!r} {kind!r}; colours {list(COLOURS)}, kinds {KINDS}")
    background = tuple(rng.randint(232, 255) for _ in range(3))
    for _ in range(50):
        placed: list[tuple[int, int, int]] = []
        shapes: list[Shape] = []
        for colour, kind in objects:
            for attempt in range(200):
                # Shrink the largest allowed size as attempts fail, so crowded scenes still fit.
                max_half = max(_MIN_HALF, _MAX_HALF - attempt // 40)
                half = rng.randint(_MIN_HALF, max_half)
                cx = rng.randint(half + 1, size - 2 - half)
                cy = rng.randint(half + 1, size - 2 - half)
                if _fits(placed, cx, cy, half):
                    break
            else:
                break
            placed.append((cx, cy, half))
            shapes.append(Shape(kind, colour, cx, cy, half, _jitter(rng, COLOURS[colour])))
        else:
            shapes.sort(key=lambda s: (s.cx, s.cy))
            return Scene(shapes=tuple(shapes), background=background, size=size)
    raise RuntimeError(f"could not place {len(objects)} shapes on a {size}x{size} image")


def render_scene(scene: Scene) -> Image.Image:
    """Draw `scene` (deterministic: the same scene gives the same pixels)."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        box = (s.cx - s.half, s.cy - s.half, s.cx + s.half, s.cy + s.half)
        if s.kind == "circle":
            draw.ellipse(box, fill=s.rgb)
        elif s.kind == "square":
            draw.rectangle(box, fill=s.rgb)
        else:
            points = [(s.cx, s.cy - s.half), (s.cx + s.half, s.cy + s.half), (s.cx - s.half, s.cy + s.half)]
            draw.polygon(points, fill=s.rgb)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG. PIL writes no timestamp or other varying chunk, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
