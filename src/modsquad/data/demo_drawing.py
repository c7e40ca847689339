"""Drawing primitives of the synthetic "shapes scenes": backgrounds, clutter and class shapes (NumPy + PIL)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# ITU-R BT.601 luma weights of R, G, B.
LUMA = np.array([0.299, 0.587, 0.114])


def shape_polygon(
    kind: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred at `(cx, cy)` (None for a circle, which PIL draws as an ellipse).

    `radius` is the distance from the centre to the farthest point; `angle` rotates the shape (radians).
    """
    if kind == "circle":
        return None
    if kind == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        points = [(radius * math.cos(a), radius * math.sin(a)) for a in corners]
    elif kind == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        points = [(radius * math.cos(a), radius * math.sin(a)) for a in corners]
    elif kind == "cross":
        arm, half = radius / math.sqrt(1 + 0.35**2), 0.35 * radius / math.sqrt(1 + 0.35**2)
        points = [
            (-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
            (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half),
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {kind!r}; accepted: {list(SHAPES)}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, angle: float, fill
) -> None:
    """Draws one shape without antialiasing, so an RGB image and a label map drawn alike cover the same pixels."""
    polygon = shape_polygon(kind, cx, cy, radius, angle)
    if polygon is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def shape_mask(size: int, kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Boolean `(size, size)` mask of the pixels one shape covers."""
    canvas = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(canvas), kind, cx, cy, radius, angle, 1)
    return np.asarray(canvas, dtype=bool)


def random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_distance: float = 90.0):
    """A random RGB colour (uint8 triple), at least `min_distance` away from `avoid` so shapes stay visible."""
    for _ in range(50):
        colour = rng.integers(0, 256, size=3)
        if avoid is None or np.linalg.norm(colour - avoid) >= min_distance:
            break
    return tuple(int(c) for c in colour)


def contrasting_colour(rng: np.random.Generator, background: np.ndarray, min_contrast: float = 80.0):
    """A random RGB colour (uint8 triple) whose luminance differs from `background`'s by at least `min_contrast`.

    Contrast in luminance, not merely in RGB distance: a shape's outline is then a brightness edge, which a linear
    patch embedding can detect whatever the two hues are.
    """
    background_luma = float(LUMA @ np.asarray(background, dtype=np.float64))
    for _ in range(100):
        colour = rng.integers(0, 256, size=3)
        if abs(float(LUMA @ colour) - background_luma) >= min_contrast:
            return tuple(int(c) for c in colour)
    # Mid-grey backgrounds leave few candidates: fall back to the farther of black and white.
    return (0, 0, 0) if background_luma > 127.5 else (255, 255, 255)


def gradient_background(rng: np.random.Generator, size: int, spread: float = 255.0) -> np.ndarray:
    """`(size, size, 3)` float background: a linear blend, in a random direction, of a random colour and another one
    at most `spread` away in every channel."""
    start = rng.uniform(0, 255, size=3)
    end = np.clip(start + rng.uniform(-spread, spread, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    grid = np.linspace(-0.5, 0.5, size)
    ramp = math.cos(angle) * grid[None, :] + math.sin(angle) * grid[:, None] + 0.5
    # The ramp overshoots [0, 1] along diagonals; clip so that uint8 conversion cannot wrap around.
    return np.clip(start + (end - start) * ramp[..., None], 0, 255)


def add_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """Small dots, blobs and line segments that belong to no class: the model must look at shape, not 'stuff'."""
    for _ in range(count):
        colour = random_colour(rng)
        x, y = rng.uniform(0, size, size=2)
        if rng.random() < 0.5:
            r = rng.uniform(1.0, 3.5)
            draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=colour)
        else:
            length, angle = rng.uniform(4, size / 3), rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line((x, y, *end), fill=colour, width=int(rng.integers(1, 3)))


def finish_image(pixels: np.ndarray, rng: np.random.Generator, noise_std: float) -> Image.Image:
    """Adds Gaussian pixel noise and returns a uint8 RGB PIL image."""
    noisy = pixels + rng.normal(0.0, noise_std, size=pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


__all__ = [
    "SHAPES",
    "add_clutter",
    "contrasting_colour",
    "draw_shape",
    "finish_image",
    "gradient_background",
    "random_colour",
    "shape_mask",
    "shape_polygon",
]
