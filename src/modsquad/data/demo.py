"""A small synthetic heterogeneous benchmark ("shapes scenes"): four tasks, each with its own images, in the column
schemas of the usual Hub datasets, so the whole training pipeline can be run in minutes on a CPU.

- `cls` (like imagenet-1k: `image`, `label`): which shape (circle, square, triangle, cross) is in a cluttered, noisy
  image.
- `det` (like cppe-5: `image`, `objects{id, area, bbox (COCO x, y, w, h pixels), category}`): 1-3 shapes of three
  classes, with their boxes.
- `seg` (like scene_parse_150: `image`, `annotation`): per-pixel shape class vs background; clutter is background.
- `depth` (like nyu_depth_v2: `image`, `depth_map` as a float image in metres, 0 = invalid): boxes and balls standing
  on a sloped ground plane before a back wall, seen through fog, with Lambertian shading and sensor holes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from .demo_drawing import (
    SHAPES,
    add_clutter,
    contrasting_colour,
    draw_shape,
    finish_image,
    gradient_background,
    random_colour,
    shape_mask,
)

CLS_LABELS = list(SHAPES)
DET_LABELS = ["circle", "square", "triangle"]
SEG_LABELS = ["background", "circle", "square", "triangle"]
# Distinct seed streams per task, so no two tasks ever share an image.
TASK_STREAMS = {"cls": 0, "det": 1, "seg": 2, "depth": 3}
SPLITS = ("train", "validation")
MAX_DEPTH = 10.0
# Colour change across a shapes-scene background: enough to vary, small enough that a shape contrasting with the
# background at its centre contrasts with it everywhere.
BACKGROUND_SPREAD = 70.0


def demo_task_configs() -> list[dict]:
    """The task entries of the demo benchmark, ready for `ModSquadConfig(tasks=...)`."""
    return [
        {"name": "cls", "type": "image-classification", "labels": list(CLS_LABELS)},
        {"name": "det", "type": "object-detection", "labels": list(DET_LABELS)},
        {"name": "seg", "type": "semantic-segmentation", "labels": list(SEG_LABELS), "ignore_index": 255},
        # Scenes end at a back wall no farther than 10 m: the depth head's output range.
        {"name": "depth", "type": "depth-estimation", "max_depth": MAX_DEPTH},
    ]


def demo_features() -> dict[str, Features]:
    """The `datasets.Features` of each demo task, the same as the Hub datasets they imitate."""
    objects = {
        "id": List(Value("int64")),
        "area": List(Value("float32")),
        "bbox": List(List(Value("float32"), length=4)),
        "category": List(ClassLabel(names=DET_LABELS)),
    }
    return {
        "cls": Features({"image": Image(), "label": ClassLabel(names=CLS_LABELS)}),
        "det": Features(
            {
                "image_id": Value("int64"),
                "image": Image(),
                "width": Value("int32"),
                "height": Value("int32"),
                "objects": objects,
            }
        ),
        "seg": Features({"image": Image(), "annotation": Image()}),
        "depth": Features({"image": Image(), "depth_map": Image()}),
    }


# ------------------------------------------------------------------------------------------------ per-task scenes
def _place_shape(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    """A centre that keeps the whole shape inside the image."""
    return tuple(rng.uniform(radius + 1, size - radius - 1, size=2))


def classification_scene(rng: np.random.Generator, size: int, index: int) -> dict:
    background = gradient_background(rng, size, spread=BACKGROUND_SPREAD)
    image = PILImage.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    add_clutter(draw, rng, size, int(rng.integers(1, 5)))
    label = int(rng.integers(len(CLS_LABELS)))
    # A large, roughly centred and roughly upright shape: recognisable after a random resized crop, and its
    # class is its outline, not its colour, size, place or the clutter around it.
    radius = rng.uniform(0.2, 0.34) * size
    low, high = max(radius + 1, 0.35 * size), min(size - radius - 1, 0.65 * size)
    cx, cy = rng.uniform(low, high, size=2)
    local = background[int(cy), int(cx)]
    angle = rng.uniform(-0.3, 0.3)
    draw_shape(draw, CLS_LABELS[label], cx, cy, radius, angle, contrasting_colour(rng, local))
    # Sometimes a small blob or line in front, so the outline is not always complete.
    add_clutter(draw, rng, size, int(rng.random() < 0.3))
    return {
        "image": finish_image(np.asarray(image, dtype=np.float64), rng, rng.uniform(3, 10)),
        "label": label,
    }


def detection_scene(rng: np.random.Generator, size: int, index: int) -> dict:
    background = gradient_background(rng, size, spread=BACKGROUND_SPREAD)
    image = PILImage.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    add_clutter(draw, rng, size, int(rng.integers(1, 5)))
    placed: list[tuple[float, float, float]] = []
    objects = {"id": [], "area": [], "bbox": [], "category": []}
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.1, 0.22) * size
        # Rejection sampling keeps shapes apart, so every box is fully visible.
        for _ in range(30):
            cx, cy = _place_shape(rng, size, radius)
            if all(math.hypot(cx - x, cy - y) > radius + r + 1 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        category = int(rng.integers(len(DET_LABELS)))
        angle = rng.uniform(0, 2 * math.pi)
        colour = contrasting_colour(rng, background[int(cy), int(cx)])
        draw_shape(draw, DET_LABELS[category], cx, cy, radius, angle, colour)
        # The box is the tight box of the pixels actually drawn.
        mask = shape_mask(size, DET_LABELS[category], cx, cy, radius, angle)
        ys, xs = np.nonzero(mask)
        box = [
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
        objects["id"].append(index * 10 + len(objects["id"]))
        objects["area"].append(float(mask.sum()))
        objects["bbox"].append(box)
        objects["category"].append(category)
    pixels = np.asarray(image, dtype=np.float64)
    return {
        "image_id": index,
        "image": finish_image(pixels, rng, rng.uniform(3, 12)),
        "width": size,
        "height": size,
        "objects": objects,
    }


def segmentation_scene(rng: np.random.Generator, size: int, index: int) -> dict:
    background = gradient_background(rng, size, spread=BACKGROUND_SPREAD)
    image = PILImage.fromarray(background.astype(np.uint8))
    annotation = PILImage.new("L", (size, size), 0)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(annotation)
    # Clutter is drawn first and labelled background: colour alone does not tell shapes from stuff.
    add_clutter(draw, rng, size, int(rng.integers(2, 8)))
    for _ in range(int(rng.integers(1, 5))):
        category = int(rng.integers(1, len(SEG_LABELS)))
        radius = rng.uniform(0.1, 0.25) * size
        cx, cy = _place_shape(rng, size, radius)
        angle = rng.uniform(0, 2 * math.pi)
        colour = contrasting_colour(rng, background[int(cy), int(cx)])
        draw_shape(draw, SEG_LABELS[category], cx, cy, radius, angle, colour)
        draw_shape(label_draw, SEG_LABELS[category], cx, cy, radius, angle, category)
    pixels = np.asarray(image, dtype=np.float64)
    return {"image": finish_image(pixels, rng, rng.uniform(3, 12)), "annotation": annotation}


def depth_scene(rng: np.random.Generator, size: int, index: int) -> dict:
    """A pinhole camera over a ground plane: depth (z, metres) follows the rows below the horizon up to a back
    wall; objects stand on the ground, so their image position and size depend on their depth. Colours fade to
    the fog colour with depth and balls are Lambert-shaded: both make depth readable from the image."""
    focal = size * rng.uniform(0.9, 1.2)
    horizon = size * rng.uniform(0.2, 0.45)
    camera_height = rng.uniform(1.2, 1.8)
    wall = rng.uniform(6.0, MAX_DEPTH)
    rows = np.arange(size) + 0.5
    cols = np.arange(size) + 0.5
    below = np.maximum(rows - horizon, 1e-6)
    ground = np.where(rows > horizon, focal * camera_height / below, np.inf)
    depth = np.broadcast_to(np.minimum(ground, wall)[:, None], (size, size)).copy()

    # Ground checkerboard in world coordinates: its perspective foreshortening is a depth cue.
    lateral = (cols[None, :] - size / 2) * depth / focal
    checker = (np.floor(lateral / 0.5) + np.floor(depth / 0.5)) % 2
    ground_colour, wall_colour = np.array(random_colour(rng)), np.array(random_colour(rng))
    is_ground = (ground < wall)[:, None] & np.ones((1, size), dtype=bool)
    albedo = np.where(is_ground[..., None], ground_colour * (0.8 + 0.2 * checker[..., None]), wall_colour)

    # Objects, composited with a z-buffer so the depth map respects occlusion.
    v, u = np.meshgrid(rows, cols, indexing="ij")
    for _ in range(int(rng.integers(1, 5))):
        z = rng.uniform(1.8, wall - 0.5)
        lateral_pos = rng.uniform(-0.45, 0.45) * size * z / focal
        centre_u = size / 2 + focal * lateral_pos / z
        base_v = horizon + focal * camera_height / z
        colour = np.array(random_colour(rng))
        if rng.random() < 0.5:  # a box: flat front face at depth z
            width, height = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.2)
            inside = (
                (np.abs(u - centre_u) <= focal * width / (2 * z))
                & (v <= base_v)
                & (v >= base_v - focal * height / z)
            )
            surface = np.full_like(depth, z)
            shade = np.full_like(depth, rng.uniform(0.6, 1.0))
        else:  # a ball of radius r resting on the ground: curved depth and Lambertian shading
            radius = rng.uniform(0.2, 0.6)
            r_px = focal * radius / z
            dx, dy = (u - centre_u) / r_px, (v - (base_v - r_px)) / r_px
            rho2 = dx**2 + dy**2
            inside = rho2 <= 1.0
            nz = np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
            surface = z + radius - radius * nz
            light = np.array([-0.5, -0.6, 0.62]) / np.linalg.norm([-0.5, -0.6, 0.62])
            shade = np.clip(dx * light[0] + dy * light[1] + nz * light[2], 0.0, 1.0) * 0.8 + 0.2
        visible = inside & (surface < depth)
        depth[visible] = surface[visible]
        albedo[visible] = colour * shade[visible][:, None]

    fog = np.exp(-depth / rng.uniform(6.0, 14.0))[..., None]
    fog_colour = rng.uniform(150, 230) + rng.uniform(-15, 15, size=3)
    pixels = albedo * fog + fog_colour * (1.0 - fog)
    depth = depth.astype(np.float32)
    # Sensor holes, as in Kinect captures: no measurement there, which losses and metrics must skip.
    for _ in range(int(rng.integers(0, 3))):
        y0, x0 = rng.integers(0, size - 4, size=2)
        h, w = rng.integers(2, 8, size=2)
        depth[y0 : y0 + h, x0 : x0 + w] = 0.0
    return {
        "image": finish_image(pixels, rng, rng.uniform(2, 8)),
        "depth_map": PILImage.fromarray(depth, mode="F"),
    }


SCENES: dict[str, Callable[[np.random.Generator, int, int], dict]] = {
    "cls": classification_scene,
    "det": detection_scene,
    "seg": segmentation_scene,
    "depth": depth_scene,
}


# ------------------------------------------------------------------------------------------------ datasets
def make_demo_datasets(
    num_train: int = 256,
    num_val: int = 64,
    image_size: int = 64,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> dict[str, DatasetDict]:
    """Generates the demo benchmark.

    Row `i` of a split depends only on `(seed, task, split, i)`: the same seed gives the same data, a larger
    `num_train` only appends rows, and the four tasks never share an image.

    Args:
        num_train (`int`, *optional*, defaults to 256): rows of each task's `train` split.
        num_val (`int`, *optional*, defaults to 64): rows of each task's `validation` split.
        image_size (`int`, *optional*, defaults to 64): side of the square images (at least 32).
        seed (`int`, *optional*, defaults to 0): seed of the whole benchmark.
        tasks (`Sequence[str]`, *optional*): generate only these tasks (their data does not depend on the others).

    Returns:
        `dict[str, datasets.DatasetDict]`: task name (`"cls"`, `"det"`, `"seg"`, `"depth"`) -> `train` and
        `validation` splits, with the features of [`demo_features`].
    """
    for name, value, low in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("image_size", image_size, 32),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if tasks is None:
        tasks = list(SCENES)
    unknown = sorted(set(tasks) - set(SCENES))
    if unknown or isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of demo task names from {list(SCENES)}, got {tasks!r}")
    features = demo_features()
    result = {}
    for task in tasks:
        scene = SCENES[task]
        splits = {}
        for split_id, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
            rows = [
                scene(np.random.default_rng([seed, TASK_STREAMS[task], split_id, i]), image_size, i)
                for i in range(count)
            ]
            columns = {key: [row[key] for row in rows] for key in features[task]}
            splits[split] = Dataset.from_dict(columns, features=features[task])
        result[task] = DatasetDict(splits)
    return result


def save_demo_datasets(root: str | Path, datasets: dict[str, DatasetDict] | None = None, **kwargs) -> dict:
    """Writes each task's splits as Parquet files `root/<task>/<split>.parquet`.

    The Hugging Face features travel in the Parquet metadata, so `load_task_dataset(root / task, split=split)`
    (or `load_dataset("parquet", ...)`) gives back the same rows and features.

    Args:
        root (`str` or `Path`): output folder (created if missing).
        datasets (`dict[str, DatasetDict]`, *optional*): what to write; generated with
            `make_demo_datasets(**kwargs)` when not given.

    Returns:
        `dict[str, dict[str, Path]]`: task -> split -> written file.
    """
    if datasets is None:
        datasets = make_demo_datasets(**kwargs)
    elif kwargs:
        raise ValueError(f"pass either datasets or generation arguments, not both (got {sorted(kwargs)})")
    written: dict[str, dict[str, Path]] = {}
    for task, splits in datasets.items():
        folder = Path(root) / task
        folder.mkdir(parents=True, exist_ok=True)
        written[task] = {}
        for split, dataset in splits.items():
            path = folder / f"{split}.parquet"
            dataset.to_parquet(str(path))
            written[task][split] = path
    return written


__all__ = [
    "CLS_LABELS",
    "DET_LABELS",
    "SEG_LABELS",
    "demo_features",
    "demo_task_configs",
    "make_demo_datasets",
    "save_demo_datasets",
]
