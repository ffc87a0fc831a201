"""Procedural scenes: 1-3 coloured shapes of one class on a neutral grey background.

A scene is sampled from a ``random.Random`` and then rendered, so the same stream always gives
the same pixels. Backgrounds are pure grey (no chroma) so they can never pass for an object colour,
and objects stay inside the central square, which is what survives the pipeline's center crop.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")

# Saturated, well separated hues plus a dark brown: distinct from each other after JPEG's chroma
# subsampling and from any grey level.
COLOURS = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 20),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (125, 50, 175),
    "pink": (250, 120, 185),
    "brown": (125, 75, 35),
}

BACKGROUNDS = ("plain", "gradient", "noise")

# Radius range of one object as a fraction of the central square's side, by object count. The
# smallest diameter (0.24) keeps an object ~15 px wide after the 64 px resize.
_RADIUS = {1: (0.18, 0.32), 2: (0.14, 0.21), 3: (0.12, 0.16)}
_MARGIN = 0.03  # fraction of the square kept free at its border
_MAX_TILT = 12.0  # degrees: enough variety, too little to turn a square into a diamond
_SUPERSAMPLE = 2  # shapes are drawn at 2x and reduced: anti-aliased edges at little cost


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    width: int
    height: int
    rgb: tuple[int, int, int]  # the class colour with a little jitter
    background: str  # one of BACKGROUNDS
    levels: tuple[int, int]  # grey levels: flat/mean level, and the gradient's end level
    noise: tuple[float, int]  # (sigma, numpy seed) for the "noise" background
    gradient_axis: int  # 0 horizontal, 1 vertical, 2 diagonal
    objects: tuple[tuple[float, float, float, float], ...]  # (cx, cy, radius, tilt degrees)

    @property
    def count(self) -> int:
        return len(self.objects)


@functools.cache
def _unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """Vertices of a shape inscribed in the unit circle, y pointing down; empty for the circle."""

    def ring(n: int, start_deg: float, radii=(1.0,)) -> tuple[tuple[float, float], ...]:
        pts = []
        for k in range(n * len(radii)):
            a = math.radians(start_deg + 360.0 * k / (n * len(radii)))
            r = radii[k % len(radii)]
            pts.append((r * math.cos(a), r * math.sin(a)))
        return tuple(pts)

    if shape == "circle":
        return ()
    if shape == "square":
        a = 0.75
        return ((-a, -a), (a, -a), (a, a), (-a, a))
    if shape == "triangle":
        return tuple((x, y + 0.15) for x, y in ring(3, -90))  # centred by area, not by circle
    if shape == "star":
        return ring(5, -90, radii=(1.0, 0.45))  # fatter than a pentagram: more coloured pixels
    if shape == "hexagon":
        return ring(6, 0)
    if shape == "diamond":
        # Taller than wide, so a tilted square never looks like it.
        return ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0))
    if shape == "cross":
        w, e = 0.3, 0.9
        return (
            (-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w),
            (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w),
        )  # fmt: skip
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 17.0))
        return tuple(pts)
    raise ValueError(f"unknown shape {shape!r}")


def sample_scene(rng: random.Random, shape: str, colour: str, width: int, height: int) -> Scene:
    """Sample count, sizes, positions, tilt, colour jitter and background of one image."""
    count = rng.choice((1, 1, 2, 3))  # single objects are the most legible: give them half
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2
    lo, hi = _RADIUS[count]
    base = rng.uniform(lo, hi) * side
    objects: list[tuple[float, float, float, float]] = []
    while len(objects) < count:
        r = base * rng.uniform(0.9, 1.1)
        span = side * (1 - 2 * _MARGIN) - 2 * r
        for _ in range(50):
            cx = ox + side * _MARGIN + r + rng.random() * span
            cy = oy + side * _MARGIN + r + rng.random() * span
            if all(math.hypot(cx - x, cy - y) > r + q + 0.02 * side for x, y, q, _ in objects):
                objects.append((cx, cy, r, rng.uniform(-_MAX_TILT, _MAX_TILT)))
                break
        else:  # crowded: start again a little smaller
            objects.clear()
            base *= 0.9
    rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[colour])
    background = rng.choice(BACKGROUNDS)
    # Mid to light greys: every object colour keeps contrast in chroma and most in brightness.
    level = rng.randint(135, 225)
    end = min(235, max(120, level + rng.choice((-1, 1)) * rng.randint(30, 70)))
    return Scene(
        shape=shape,
        colour=colour,
        width=width,
        height=height,
        rgb=rgb,
        background=background,
        levels=(level, end),
        noise=(rng.uniform(5.0, 12.0), rng.getrandbits(32)),
        gradient_axis=rng.randrange(3),
        objects=tuple(objects),
    )


def _background(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    level, end = scene.levels
    if scene.background == "plain":
        return Image.new("L", (w, h), level)
    if scene.background == "gradient":
        xs, ys = np.linspace(0, 1, w)[None, :], np.linspace(0, 1, h)[:, None]
        t = (xs + 0 * ys, ys + 0 * xs, (xs + ys) / 2)[scene.gradient_axis]
        return Image.fromarray(np.rint(level + (end - level) * t).astype(np.uint8), "L")
    sigma, seed = scene.noise
    noise = np.random.default_rng(seed).normal(level, sigma, (h, w))
    return Image.fromarray(np.clip(np.rint(noise), 0, 255).astype(np.uint8), "L")


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of its size."""
    s = _SUPERSAMPLE
    mask = Image.new("L", (scene.width * s, scene.height * s), 0)
    draw = ImageDraw.Draw(mask)
    poly = _unit_polygon(scene.shape)
    for cx, cy, r, tilt in scene.objects:
        if not poly:
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
            continue
        c, n = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
        pts = [((cx + r * (x * c - y * n)) * s, (cy + r * (x * n + y * c)) * s) for x, y in poly]
        draw.polygon(pts, fill=255)
    image = _background(scene).convert("RGB")
    image.paste(scene.rgb, mask=mask.reduce(s))
    return image
