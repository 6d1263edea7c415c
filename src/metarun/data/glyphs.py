"""Glyphs: an Omniglot-shaped dataset that metarun draws itself, offline and deterministic.

Made-up alphabets of made-up characters, each character drawn 20 times "by different people".
It is metarun's default dataset: ``make run`` and the test suite need no download.

One thing: the glyphs dataset, from the stroke generator to its cached class splits (the
generator is most of it, and nothing else uses it).

How a character is made, top to bottom:

* An **alphabet** has a style: a small vocabulary of reusable strokes, favourite stroke kinds
  (lines, corners, arcs, hooks, waves, loops) and writing directions, a curviness (0 draws a
  stroke as a polyline through its 4 control points, 1 as a smooth cubic Bezier curve), a pen
  width, a slant, a width/height ratio, a range of stroke counts, and sometimes a stroke that sits
  in the same place in most of its characters (like a head line). Characters of one alphabet are
  built from the same strokes in the same manner, so they look alike and are easier to confuse
  than characters of different alphabets, as in a real alphabet.
* A **character** is 1 to 4 strokes (plus the shared one), each 4 control points in the box
  ``[-1, 1]^2``: mostly strokes of the vocabulary, scaled, slightly turned or mirrored, sometimes
  new ones; each stroke after the first usually starts on (or crosses) a stroke already drawn, so
  the strokes connect. The character is then scaled to fill the box.
* A **rendering** (one person's drawing) moves every control point and every stroke a little,
  changes the pen width, applies a small affine map (rotation, scale, shear, translation) and
  occasionally shortens or drops a stroke. It is drawn with PIL at 4x the resolution and reduced
  with a box filter, which anti-aliases the strokes.

Every random number comes from a ``numpy.random.default_rng`` seeded with ``(seed, purpose,
alphabet, character)``, so the same arguments give bit-identical images, and character ``c`` of
alphabet ``a`` does not change when more alphabets or characters are asked for.

The generated classes are cached as a torch file named by a hash of the generation parameters
(see :func:`load_glyphs`); generating conf/dataset/glyphs.yaml's 1200 classes x 20 drawings takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from metarun.data.base import (
    ClassSplits,
    DatasetError,
    ImageClasses,
    cached_classes,
    check_split_sizes,
    split_by_seed,
)
from metarun.data.base import cache_dir as base_cache_dir
from metarun.errors import one_line

log = logging.getLogger(__name__)

# Bump when the drawing code changes, so that old cache files are not mistaken for new output.
FORMAT_VERSION = 1

_SUPERSAMPLE = 4  # draw at 4x the image size, then box-filter down: smooth, anti-aliased strokes
_POINTS_PER_STROKE = 16  # points traced along each stroke's curve
_CONTROL_POINTS = 4  # control points per stroke (a cubic Bezier curve, or a 3-segment polyline)
_BOX_FILL = 0.66  # the character box [-1, 1]^2 spans this fraction of the image side

# How much one person's drawing differs from another's (box units: the box is [-1, 1]^2).
_POINT_JITTER = 0.12  # every control point moves independently
_STROKE_SHIFT = 0.11  # every stroke moves as a whole
_ROTATION_DEG = 10.0  # the whole drawing turns by up to this much
_SCALE_RANGE = (0.86, 1.08)  # ... is scaled by a factor in this range
_ASPECT_JITTER = 0.08  # ... stretched horizontally vs vertically by up to this fraction
_SHEAR = 0.18  # ... sheared (slant) by up to this much
_SHIFT = 0.13  # ... and moved by up to this much
_PEN_WIDTH_RANGE = (0.8, 1.25)  # the pen width varies by this factor around the alphabet's width
_DROP_STROKE_PROB = 0.06  # a drawing leaves out one of its strokes (characters of 2 or more strokes)
_SHORTEN_STROKE_PROB = 0.12  # a stroke is drawn short at one end ...
_SHORTEN_MAX = 0.3  # ... by up to this fraction of its length


@dataclass(frozen=True)
class _AlphabetStyle:
    """What the characters of one alphabet have in common (lengths in box units, the box is [-1, 1]^2)."""

    kind_probs: np.ndarray  # float64 [K]: how often each of _STROKE_KINDS is used for a new stroke
    directions: np.ndarray  # float64 [D]: preferred writing directions of new strokes, radians
    vocabulary: np.ndarray  # float64 [V, 4, 2]: control points of strokes reused across characters
    shared_strokes: list[np.ndarray]  # [4, 2] each: strokes at a fixed place in many characters
    shared_prob: float  # chance that a character has a given shared stroke
    curve_weights: np.ndarray  # float64 [P, 4]: turns 4 control points into P traced points
    min_strokes: int  # strokes per character, not counting shared strokes
    max_strokes: int
    pen_width: float  # in output pixels at image_size 28 (scaled with the image size)
    slant: float  # shear of every character (italic-like)
    aspect: float  # typical width / height of a character
    reuse_prob: float  # chance that a stroke comes from the vocabulary rather than being new
    connect_prob: float  # chance that a stroke starts on (or crosses) a stroke already drawn


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def generate_glyphs(
    num_alphabets: int,
    characters_per_alphabet: int,
    samples_per_class: int,
    image_size: int,
    seed: int,
) -> ImageClasses:
    """Draw every character of every alphabet ``samples_per_class`` times.

    The values of metarun's glyphs dataset are in conf/dataset/glyphs.yaml (once; no Python defaults).

    Args:
        num_alphabets: number of alphabets (the class groups).
        characters_per_alphabet: characters (classes) per alphabet.
        samples_per_class: drawings of each character.
        image_size: side of the square images, in pixels (at least 8).
        seed: seed of everything random (a non-negative int).

    Returns:
        ImageClasses with ``num_alphabets * characters_per_alphabet`` classes named
        ``"alphabetAA/characterCC"`` (groups: ``"alphabetAA"``); images uint8
        ``[N, 1, image_size, image_size]`` with ink 255 on background 0, labels int64 ``[N]``,
        ``N = num_classes * samples_per_class``, sorted by label.

    Raises:
        DatasetError: an argument is out of range.
    """
    _check_generation_args(num_alphabets, characters_per_alphabet, samples_per_class, image_size, seed)
    num_classes = num_alphabets * characters_per_alphabet
    images = np.zeros((num_classes * samples_per_class, 1, image_size, image_size), dtype=np.uint8)
    class_names, groups = [], []
    for a in range(num_alphabets):
        style = _make_alphabet_style(np.random.default_rng((seed, 0, a)))
        for c in range(characters_per_alphabet):
            strokes = _make_character(np.random.default_rng((seed, 1, a, c)), style)
            label = len(class_names)
            rows = slice(label * samples_per_class, (label + 1) * samples_per_class)
            images[rows, 0] = _render_samples(
                np.random.default_rng((seed, 2, a, c)), strokes, style, samples_per_class, image_size
            )
            class_names.append(f"alphabet{a:02d}/character{c:02d}")
            groups.append(f"alphabet{a:02d}")
    labels = torch.arange(num_classes, dtype=torch.int64).repeat_interleave(samples_per_class)
    return ImageClasses(
        images=torch.from_numpy(images), labels=labels, class_names=class_names, groups=groups
    )


def load_glyphs(
    cache_dir: str | None,
    num_alphabets: int,
    characters_per_alphabet: int,
    samples_per_class: int,
    image_size: int,
    seed: int,
    split_sizes: tuple[int, int, int] | list[int],
    split_seed: int,
    rotations: bool | str | list[str],
    within_group: bool | str | list[str],
    channels: int,
) -> ClassSplits:
    """Glyph classes, cut into train/val/test classes (the ``_target_`` of ``conf/dataset/glyphs.yaml``,
    which holds every argument's value, once: there are no Python defaults).

    The classes come from the cache file ``glyphs-v<FORMAT_VERSION>-<hash>.pt`` in ``cache_dir``
    when it is there and loads, otherwise from :func:`generate_glyphs` (and are then written to
    the cache). A cache file that does not load is regenerated with a warning.

    Args:
        cache_dir: folder of the cache file; ``None`` means ``$METARUN_CACHE`` or ``~/.cache/metarun``.
        num_alphabets: see :func:`generate_glyphs`.
        characters_per_alphabet: see :func:`generate_glyphs`.
        samples_per_class: see :func:`generate_glyphs`.
        image_size: see :func:`generate_glyphs`.
        seed: see :func:`generate_glyphs`.
        split_sizes: number of train, val and test classes; ``-1`` for test means "all the rest".
        split_seed: seed of the class shuffle before the cut (:func:`split_by_seed`).
        rotations: add copies rotated by 90, 180 and 270 degrees to every split as new classes
            (MAML's Omniglot protocol), which multiplies each split's class count by 4; or only to
            the splits named (``"train"``, ``["train", "val"]``; :func:`metarun.data.base.split_set`).
        within_group: draw every task's classes from one alphabet (Koch et al. 2015's protocol), in
            every split (``True``) or in the splits named (``"test"``).
        channels: must be 1 (glyphs are greyscale); the backbones read it from the config.

    Returns:
        ClassSplits whose images are uint8 ``[N, 1, image_size, image_size]``.

    Raises:
        DatasetError: an argument is out of range, or the split does not fit the classes.
    """
    _check_generation_args(num_alphabets, characters_per_alphabet, samples_per_class, image_size, seed)
    if channels != 1:
        raise DatasetError(f"glyphs have 1 channel, got dataset.channels={channels}; set dataset.channels=1")
    split_sizes = check_split_sizes(split_sizes)
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise DatasetError(f"dataset.split_seed must be an int, got {split_seed!r}")
    params = {
        "num_alphabets": num_alphabets,
        "characters_per_alphabet": characters_per_alphabet,
        "samples_per_class": samples_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    classes = cached_classes(_cache_path(cache_dir, params), lambda: generate_glyphs(**params), "glyph")
    splits = split_by_seed(classes, split_sizes, split_seed, rotations)
    return dataclasses.replace(splits, within_group=within_group)


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """A drawing as the dataset holds it: greyscale, ``image_size`` square, box-filtered.

    The generator draws every rendering at ``_SUPERSAMPLE`` times the size and passes it through
    here; an image file of the right size passes unchanged (:func:`load_image`).

    Returns:
        uint8 ``[S, S]``, bright ink (255) on a dark background (0).
    """
    image = image.convert("L")
    factor = image.size[0] // image_size
    if image.size == (image_size * factor, image_size * factor) and factor >= 1:
        image = image.reduce(factor)  # exact box filter over factor x factor pixels
    else:
        image = image.resize((image_size, image_size), Image.BOX)
    return np.array(image, dtype=np.uint8)


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """One glyph image file (bright ink on a dark background, as :func:`generate_glyphs` draws them)
    as the dataset holds its images: uint8 ``[1, S, S]`` through :func:`preprocess`. A PNG of a
    generated drawing loads back bit-identical. ``metarun-eval --episodes`` reads episode images with it.

    Raises:
        DatasetError: the file cannot be read or decoded; the message names it.
    """
    try:
        with Image.open(path) as image:
            return preprocess(image, image_size)[None]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot decode {path} ({one_line(err)}); it must be an image file") from None


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_generation_args(
    num_alphabets: int, characters_per_alphabet: int, samples_per_class: int, image_size: int, seed: int
) -> None:
    for name, value in [
        ("num_alphabets", num_alphabets),
        ("characters_per_alphabet", characters_per_alphabet),
        ("samples_per_class", samples_per_class),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DatasetError(f"dataset.{name} must be a positive int, got {value!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise DatasetError(f"dataset.image_size must be an int of at least 8 pixels, got {image_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"dataset.seed must be a non-negative int, got {seed!r}")


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _cache_path(cache_dir: str | None, params: dict) -> Path:
    # The hash covers every generation parameter and the format version: change any of them and
    # the file name changes, so a stale file is never read.
    key = json.dumps({"format_version": FORMAT_VERSION, **params}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return base_cache_dir(cache_dir) / f"glyphs-v{FORMAT_VERSION}-{digest}.pt"


# --------------------------------------------------------------------------------------------
# Alphabets and characters
# --------------------------------------------------------------------------------------------

# The kinds of stroke a pen makes; an alphabet favours a few of them (see _make_alphabet_style).
_STROKE_KINDS = ("line", "corner", "arc", "hook", "wave", "loop")


def _curve_weights(curviness: float) -> np.ndarray:
    """float64 ``[P, 4]``: traced points = weights @ control points.

    A blend of the cubic Bezier curve (smooth, ``curviness`` 1) and the polyline through the four
    control points (sharp corners, ``curviness`` 0). Both are linear in the control points, so one
    matrix traces any stroke, jittered or not.
    """
    t = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)[:, None]
    bezier = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
    # Polyline: 3 segments, each covered by a third of the parameter range.
    segment = np.minimum((t[:, 0] * 3).astype(int), 2)
    frac = t[:, 0] * 3 - segment
    polyline = np.zeros((_POINTS_PER_STROKE, _CONTROL_POINTS))
    polyline[np.arange(_POINTS_PER_STROKE), segment] = 1 - frac
    polyline[np.arange(_POINTS_PER_STROKE), segment + 1] = frac
    return curviness * bezier + (1 - curviness) * polyline


def _stroke_of_kind(rng: np.random.Generator, kind: str) -> np.ndarray:
    """float64 ``[4, 2]``: control points of a stroke of length about 1 that starts at the origin heading +x."""
    bend = rng.choice([-1.0, 1.0])  # turn left or right
    if kind == "line":
        return np.array([[0, 0], [1 / 3, 0], [2 / 3, 0], [1, 0]], dtype=float)
    if kind == "corner":  # two straight legs; the two middle points coincide at the corner
        turn, at = rng.uniform(np.deg2rad(60), np.deg2rad(130)), rng.uniform(0.35, 0.7)
        corner = np.array([at, 0.0])
        end = corner + (1 - at) * np.array([np.cos(turn), bend * np.sin(turn)])
        return np.array([[0, 0], corner, corner, end])
    if kind == "arc":  # a circular arc of unit length, as the usual cubic Bezier approximation
        sweep = rng.uniform(np.deg2rad(90), np.deg2rad(240))
        radius = 1 / sweep
        end = radius * np.array([np.sin(sweep), bend * (1 - np.cos(sweep))])
        handle = 4 / 3 * np.tan(sweep / 4) * radius
        return np.array(
            [[0, 0], [handle, 0], end - handle * np.array([np.cos(sweep), bend * np.sin(sweep)]), end]
        )
    if kind == "hook":  # a line whose end curls back
        curl = rng.uniform(0.2, 0.4)
        return np.array([[0, 0], [0.55, 0], [0.95, 0], [0.95 - curl, bend * curl]])
    if kind == "wave":  # an S: the middle points on opposite sides
        height = rng.uniform(0.25, 0.5)
        return np.array([[0, 0], [1 / 3, bend * height], [2 / 3, -bend * height], [1, 0]])
    # "loop": out and back, the middle points spread apart, as in a teardrop
    width = rng.uniform(0.4, 0.8)
    return np.array([[0, 0], [0.9, bend * width], [0.9, -bend * width], [0.05, -bend * 0.1]])


def _random_stroke(rng: np.random.Generator, kind_probs: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """float64 ``[4, 2]``: a stroke of a kind drawn from ``kind_probs``, heading in one of ``directions``."""
    stroke = _stroke_of_kind(rng, _STROKE_KINDS[rng.choice(len(_STROKE_KINDS), p=kind_probs)])
    angle = rng.choice(directions) + rng.normal(0.0, 0.1)
    return stroke * rng.uniform(0.5, 1.4) @ _rotation(angle).T


def _make_alphabet_style(rng: np.random.Generator) -> _AlphabetStyle:
    # A quarter of the alphabets are angular (runes), the rest more or less round.
    curviness = 0.0 if rng.random() < 0.25 else float(rng.uniform(0.4, 1.0))
    # Few kinds dominate an alphabet (a Dirichlet with small concentration is peaked).
    kind_probs = rng.dirichlet(np.full(len(_STROKE_KINDS), 0.6))
    # A few preferred writing directions, all turned by an alphabet-wide angle.
    directions = rng.uniform(0, np.pi / 4) + np.pi / 4 * rng.permutation(8)[: rng.integers(2, 5)]
    vocabulary = np.stack([_random_stroke(rng, kind_probs, directions) for _ in range(rng.integers(3, 7))])
    # Some strokes sit in the same place in many characters of the alphabet (a head line, a bar).
    shared = [_random_stroke(rng, kind_probs, directions) * 1.3 for _ in range(rng.choice([0, 1, 1]))]
    shared = [s - (s.min(0) + s.max(0)) / 2 + rng.uniform(-0.6, 0.6, size=2) for s in shared]
    min_strokes = int(rng.choice([1, 2, 2]))
    return _AlphabetStyle(
        kind_probs=kind_probs,
        directions=directions,
        vocabulary=vocabulary,
        shared_strokes=shared,
        shared_prob=float(rng.uniform(0.6, 0.95)),
        curve_weights=_curve_weights(curviness),
        min_strokes=min_strokes,
        max_strokes=int(rng.integers(min_strokes + 1, 5)),
        pen_width=float(rng.uniform(1.2, 2.4)),
        slant=float(rng.uniform(-0.4, 0.4)),
        aspect=float(rng.uniform(0.7, 1.3)),
        reuse_prob=float(rng.uniform(0.6, 0.95)),
        connect_prob=float(rng.uniform(0.6, 0.95)),
    )


def _make_character(rng: np.random.Generator, style: _AlphabetStyle) -> np.ndarray:
    """float64 ``[S, 4, 2]``: control points of the S strokes of a new character, filling ``[-1, 1]^2``."""
    num_strokes = int(rng.integers(style.min_strokes, style.max_strokes + 1))
    strokes: list[np.ndarray] = []
    for _ in range(num_strokes):
        if rng.random() < style.reuse_prob:
            stroke = style.vocabulary[rng.integers(len(style.vocabulary))]
            stroke = stroke * rng.uniform(0.8, 1.2) @ _rotation(rng.normal(0.0, 0.15)).T
        else:
            stroke = _random_stroke(rng, style.kind_probs, style.directions)
        if rng.random() < 0.3:  # the same shape mirrored
            stroke = stroke * np.array([-1.0, 1.0])
        # Strokes of real characters mostly touch: start the stroke on a stroke already drawn (at
        # its end or anywhere along it), or let it cross one there; otherwise put it anywhere.
        if strokes and rng.random() < style.connect_prob:
            traced = style.curve_weights @ strokes[rng.integers(len(strokes))]
            anchor = traced[rng.choice([0, _POINTS_PER_STROKE - 1, rng.integers(_POINTS_PER_STROKE)])]
            pivot = (
                stroke[0] if rng.random() < 0.8 else (style.curve_weights @ stroke)[_POINTS_PER_STROKE // 2]
            )
        else:
            anchor, pivot = rng.uniform(-0.5, 0.5, size=2), stroke[0]
        strokes.append(stroke - pivot + anchor)
    character = _fit_to_box(np.stack(strokes), style.curve_weights, style.aspect)
    # The alphabet's shared strokes are placed in box units, so the character must fill the box first.
    shared = [s for s in style.shared_strokes if rng.random() < style.shared_prob]
    if shared:
        character = np.concatenate([character, np.stack(shared)])
    slant = np.array([[1.0, style.slant], [0.0, 1.0]])
    return _fit_to_box(character @ slant.T, style.curve_weights, style.aspect)


def _fit_to_box(strokes: np.ndarray, curve_weights: np.ndarray, aspect: float) -> np.ndarray:
    """Center the traced strokes and scale them to fill ``[-1, 1]^2``.

    The scale keeps the shape's proportions, except that a shape much narrower (or flatter) than
    ``aspect`` (width / height) is stretched by up to 1.5x towards it, so that characters of one
    alphabet have similar proportions.
    """
    traced = (curve_weights @ strokes).reshape(-1, 2)
    low, high = traced.min(axis=0), traced.max(axis=0)
    # A single straight stroke has zero width: the floor keeps the divisions finite.
    size = np.maximum(high - low, 1e-3)
    stretch_x = np.clip(aspect * size[1] / size[0], 1.0, 1.5)
    stretch_y = np.clip(size[0] / (aspect * size[1]), 1.0, 1.5)
    size = size * np.array([stretch_x, stretch_y])
    return (strokes - (low + high) / 2) * np.array([stretch_x, stretch_y]) / (size.max() / 2)


def _rotation(angle: float | np.ndarray) -> np.ndarray:
    """float64 ``[..., 2, 2]`` rotation matrices for angles in radians."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


# --------------------------------------------------------------------------------------------
# Renderings
# --------------------------------------------------------------------------------------------


def _render_samples(
    rng: np.random.Generator, strokes: np.ndarray, style: _AlphabetStyle, num_samples: int, image_size: int
) -> np.ndarray:
    """uint8 ``[R, H, W]``: ``num_samples`` different drawings of the character ``strokes`` ``[S, 4, 2]``."""
    num_strokes = len(strokes)
    r = num_samples

    # Every person places the control points and the strokes a little differently ...
    controls = strokes[None] + rng.normal(0.0, _POINT_JITTER, size=(r, num_strokes, _CONTROL_POINTS, 2))
    controls = controls + rng.normal(0.0, _STROKE_SHIFT, size=(r, num_strokes, 1, 2))

    # ... and writes the whole character turned, scaled, slanted and moved a little.
    angle = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG, size=r))
    scale = rng.uniform(*_SCALE_RANGE, size=r)
    aspect = rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER, size=r)
    shear = rng.uniform(-_SHEAR, _SHEAR, size=r)
    shift = rng.uniform(-_SHIFT, _SHIFT, size=(r, 2))
    stretch = np.zeros((r, 2, 2))
    stretch[:, 0, 0] = scale * (1 + aspect)
    stretch[:, 1, 1] = scale * (1 - aspect)
    stretch[:, 0, 1] = shear * scale
    affine = _rotation(angle) @ stretch  # [R, 2, 2]
    controls = np.einsum("rij,rscj->rsci", affine, controls) + shift[:, None, None, :]

    # Map box units to pixels of the supersampled canvas, y pointing down as in images (the box's
    # +y is drawn upwards), then trace the curves: [R, S, P, 2].
    canvas = image_size * _SUPERSAMPLE
    half = canvas / 2
    controls = half + controls * np.array([1.0, -1.0]) * half * _BOX_FILL
    traced = np.einsum("pc,rscd->rspd", style.curve_weights, controls)

    # Pen width per drawing, in supersampled pixels; it grows with the image like the strokes do.
    pen = style.pen_width * rng.uniform(*_PEN_WIDTH_RANGE, size=r) * (image_size / 28) * _SUPERSAMPLE
    pen = np.maximum(np.rint(pen), 1).astype(int)

    # Sloppy drawings: one stroke left out (never all of them), or strokes stopped short (or
    # started late): only the traced points start[r, s] to end[r, s] (excluded) are drawn.
    dropped = np.zeros((r, num_strokes), dtype=bool)
    dropped[np.arange(r), rng.integers(num_strokes, size=r)] = rng.random(r) < _DROP_STROKE_PROB
    if num_strokes == 1:
        dropped[:] = False
    shortened = rng.random((r, num_strokes)) < _SHORTEN_STROKE_PROB
    cut = np.rint(rng.uniform(0, _SHORTEN_MAX, size=(r, num_strokes)) * (_POINTS_PER_STROKE - 1)).astype(int)
    cut = np.where(shortened, cut, 0)
    cut_at_start = rng.random((r, num_strokes)) < 0.5
    start = np.where(cut_at_start, cut, 0)
    end = _POINTS_PER_STROKE - np.where(cut_at_start, 0, cut)

    # PIL draws a wide polyline as separate quadrilaterals, which leaves a notch where the line
    # turns sharply; a round dot of the pen's size fills it (dots also round the ends). Sharp
    # turns: more than 30 degrees between consecutive segments, or a zero-length segment (the
    # corner of a "corner" stroke, whose two middle control points coincide).
    before, after = traced[:, :, 1:-1] - traced[:, :, :-2], traced[:, :, 2:] - traced[:, :, 1:-1]
    alignment = (before * after).sum(-1)  # |before| |after| cos(turn)
    sharp = alignment <= np.cos(np.deg2rad(30)) * np.linalg.norm(before, axis=-1) * np.linalg.norm(
        after, axis=-1
    )
    sharp = np.pad(sharp, ((0, 0), (0, 0), (1, 1)))  # [R, S, P]

    # The drawing loop runs 20 times per character: plain Python lists are faster there than
    # small numpy arrays.
    traced_list, sharp_list = traced.tolist(), sharp.tolist()
    out = np.empty((r, image_size, image_size), dtype=np.uint8)
    for i in range(r):
        image = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(image)
        width, radius = int(pen[i]), pen[i] / 2
        for s in range(num_strokes):
            if dropped[i, s]:
                continue
            keep = slice(start[i, s], end[i, s])
            points = traced_list[i][s][keep]
            draw.line([xy for point in points for xy in point], fill=255, width=width)
            # Round ends, and dots at the sharp turns.
            dots = [points[0], points[-1]] + [
                p for p, is_sharp in zip(points, sharp_list[i][s][keep], strict=True) if is_sharp
            ]
            for x, y in dots:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        out[i] = preprocess(image, image_size)
    return out
