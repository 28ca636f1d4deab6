"""Synthetic scenes: a small grammar of shapes, rendered with PIL and described in English and German."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# (english, german singular, german plural, german gender) - gender drives adjective endings.
SHAPES = [
    ("circle", "Kreis", "Kreise", "m"),
    ("square", "Quadrat", "Quadrate", "n"),
    ("triangle", "Dreieck", "Dreiecke", "n"),
    ("star", "Stern", "Sterne", "m"),
    ("cross", "Kreuz", "Kreuze", "n"),
    ("diamond", "Raute", "Rauten", "f"),
    ("ring", "Ring", "Ringe", "m"),
    ("hexagon", "Sechseck", "Sechsecke", "n"),
]
# (english, german stem, RGB) - vivid colours, so that they stand out from the backgrounds.
COLOURS = [
    ("red", "rot", (220, 30, 30)),
    ("green", "grün", (30, 200, 60)),
    ("blue", "blau", (40, 70, 230)),
    ("yellow", "gelb", (250, 220, 20)),
    ("black", "schwarz", (10, 10, 10)),
    ("white", "weiß", (250, 250, 250)),
    ("brown", "braun", (130, 75, 30)),
    ("grey", "grau", (128, 128, 128)),
    ("purple", "violett", (150, 40, 190)),
    ("orange", "orangefarben", (255, 140, 0)),
]
SIZES = [("small", "klein", 0.28), ("large", "groß", 0.45)]  # radius as a fraction of a grid cell
# 3x3 grid, row-major: (english, german).
POSITIONS = [
    ("in the top left", "oben links"),
    ("at the top", "oben"),
    ("in the top right", "oben rechts"),
    ("on the left", "links"),
    ("in the centre", "in der Mitte"),
    ("on the right", "rechts"),
    ("in the bottom left", "unten links"),
    ("at the bottom", "unten"),
    ("in the bottom right", "unten rechts"),
]
BACKGROUNDS = [
    ("in a meadow", "auf einer Wiese", (120, 170, 100)),
    ("on a beach", "am Strand", (225, 205, 160)),
    ("in the snow", "im Schnee", (215, 225, 235)),
    ("at sea", "auf dem Meer", (60, 110, 170)),
    ("at night", "in der Nacht", (25, 25, 50)),
    ("in the fog", "im Nebel", (175, 180, 175)),
    ("in the desert", "in der Wüste", (205, 150, 90)),
    ("on a road", "auf einer Straße", (85, 85, 90)),
    ("in the sky", "am Himmel", (150, 200, 245)),
]
COUNTS = [("a", "ein"), ("two", "zwei")]
# A domain shift for the fine-tuning demo: colours and backgrounds that demo-tiny never saw (its training draws from
# the tables above only). A shifted scene indexes past the end of COLOURS and BACKGROUNDS into these.
SHIFTED_COLOURS = [
    ("pink", "rosafarben", (255, 110, 190)),
    ("cyan", "cyanfarben", (0, 210, 230)),
    ("olive", "olivgrün", (120, 130, 20)),
    ("lavender", "lavendelfarben", (190, 160, 240)),
]
SHIFTED_BACKGROUNDS = [
    ("in a forest", "im Wald", (35, 85, 45)),
    ("at sunset", "bei Sonnenuntergang", (235, 130, 90)),
    ("in a cave", "in einer Höhle", (70, 55, 45)),
    ("on a glacier", "auf einem Gletscher", (190, 235, 245)),
]
_COLOURS, _BACKGROUNDS = COLOURS + SHIFTED_COLOURS, BACKGROUNDS + SHIFTED_BACKGROUNDS

N_SCENES = len(COUNTS) * len(SHAPES) * len(COLOURS) * len(SIZES) * len(POSITIONS) * len(BACKGROUNDS)


@dataclass(frozen=True)
class Scene:
    """One scene: indices into the tables above."""

    count: int  # 0 -> one object, 1 -> two
    shape: int
    colour: int
    size: int
    position: int
    background: int

    @classmethod
    def from_index(cls, index: int) -> Scene:
        """The scene with this number in [0, N_SCENES), a mixed-radix decode."""
        fields = {}
        for name, n in (("background", len(BACKGROUNDS)), ("position", len(POSITIONS)), ("size", len(SIZES)),
                        ("colour", len(COLOURS)), ("shape", len(SHAPES)), ("count", len(COUNTS))):
            index, fields[name] = divmod(index, n)
        return cls(**fields)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Scene:
        return cls.from_index(int(rng.integers(N_SCENES)))

    @classmethod
    def sample_shifted(cls, rng: np.random.Generator) -> Scene:
        """A scene of the shifted domain: a colour and a background from SHIFTED_*, the rest as usual."""
        scene = cls.sample(rng)
        return cls(scene.count, scene.shape, len(COLOURS) + int(rng.integers(len(SHIFTED_COLOURS))), scene.size,
                   scene.position, len(BACKGROUNDS) + int(rng.integers(len(SHIFTED_BACKGROUNDS))))

    def caption(self, lang: str = "en") -> str:
        """The scene as one sentence in `lang` ("en" or "de")."""
        if lang == "en":
            noun = SHAPES[self.shape][0] + ("s" if self.count else "")
            adjectives = f"{SIZES[self.size][0]} {_COLOURS[self.colour][0]}"
            head = "Two" if self.count else ("An" if adjectives[0] in "aeiou" else "A")
            return f"{head} {adjectives} {noun} {POSITIONS[self.position][0]}, {_BACKGROUNDS[self.background][0]}."
        if lang == "de":
            _, singular, plural, gender = SHAPES[self.shape]
            size, colour = SIZES[self.size][1], _COLOURS[self.colour][1]
            if self.count:  # strong plural declension: -e
                where = f"{POSITIONS[self.position][1]}, {_BACKGROUNDS[self.background][1]}"
                return f"Zwei {size}e {colour}e {plural} {where}."
            article, ending = {"m": ("Ein", "er"), "f": ("Eine", "e"), "n": ("Ein", "es")}[gender]
            return (f"{article} {size}{ending} {colour}{ending} {singular} {POSITIONS[self.position][1]}, "
                    f"{_BACKGROUNDS[self.background][1]}.")
        raise ValueError(f"unknown language {lang!r}: scenes are described in 'en' or 'de'")


def _polygon(cx: float, cy: float, r: float, n: int, rotation: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rotation + 2 * math.pi * i / n), cy + r * math.sin(rotation + 2 * math.pi * i / n))
            for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, 1.1 * r, 3), fill=fill)
    elif shape == "star":
        outer, inner = _polygon(cx, cy, 1.1 * r, 5), _polygon(cx, cy, 0.45 * r, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, 1.1 * r, 4), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(0.35 * r)))
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image; `rng` jitters placement, size and background so no two renders match."""
    base = np.array(_BACKGROUNDS[scene.background][2], dtype=np.float32)
    # a gentle vertical gradient plus pixel noise, so backgrounds are not flat colour fields
    gradient = np.linspace(-12, 12, size, dtype=np.float32)[:, None, None] * rng.uniform(-1, 1)
    noise = rng.normal(0, 4, (size, size, 3)).astype(np.float32)
    pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)

    cell = size / 3
    row, col = divmod(scene.position, 3)
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    radius = SIZES[scene.size][2] * cell * rng.uniform(0.9, 1.1)
    fill = tuple(int(c) for c in np.clip(np.array(_COLOURS[scene.colour][2]) + rng.integers(-15, 16, 3), 0, 255))
    jitter = cell * 0.08
    shape = SHAPES[scene.shape][0]
    if scene.count:  # two identical objects side by side inside the cell
        radius *= 0.62
        for dx in (-1, 1):
            _draw_shape(draw, shape, cx + dx * 0.27 * cell + rng.uniform(-jitter, jitter) / 2,
                        cy + rng.uniform(-jitter, jitter), radius, fill)
    else:
        _draw_shape(draw, shape, cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter), radius, fill)
    return image
