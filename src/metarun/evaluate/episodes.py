"""The episodes-file format of ``metarun-eval --episodes``: fixed episodes of image files.

JSON lines, one episode per line (blank lines are skipped)::

    {"support": [["imgs/a_1.png", 0], ["imgs/b_1.png", 1]], "query": [["imgs/a_2.png", 0]], "name": "optional"}

Paths are relative to the file's folder (or absolute). The labels of an N-way episode are
0..N-1: every class has the same number of support images (K-shot), and every query label has
support images (:func:`parse_episodes`). Each image is decoded by the dataset module's own
``load_image``, as its loader decodes its images (:func:`read_episodes`).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from metarun.errors import ConfigError, DatasetError, one_line
from metarun.tasks.sampling import FixedTasks, image_tensor
from metarun.tasks.types import Task, TaskSplit

log = logging.getLogger(__name__)


@dataclass
class FileEpisode:
    """One episode of an episodes file: image indices into :attr:`EpisodeSet.images` and labels."""

    line: int
    support_index: list[int]
    support_y: list[int]
    query_index: list[int]
    query_y: list[int]
    ways: int
    name: str | None = None


class EpisodeSet:
    """The episodes of a file, each image decoded once (``[M, C, S, S]`` float on the device);
    :class:`metarun.tasks.FixedTasks` materialises them through :meth:`materialise` like any
    sampler's fixed tasks."""

    def __init__(self, images: torch.Tensor, episodes: list[FileEpisode]) -> None:
        self.images = images
        self.episodes = episodes

    def fixed_tasks(self) -> FixedTasks:
        device = self.images.device
        drawn = [tuple(torch.tensor(v, dtype=torch.int64, device=device)
                       for v in (e.support_index, e.support_y, e.query_index, e.query_y)) + (e.ways,)
                 for e in self.episodes]
        return FixedTasks(self, drawn)  # type: ignore[arg-type]  (a Sampler's materialise is all it uses)

    def materialise(self, support_index: torch.Tensor, support_y: torch.Tensor, query_index: torch.Tensor,
                    query_y: torch.Tensor, ways: int) -> Task:
        return Task(support=TaskSplit(self.images.index_select(0, support_index), support_y, ways),
                    query=TaskSplit(self.images.index_select(0, query_index), query_y, ways))


def _pairs(value: Any, where: str, side: str) -> list[tuple[str, int]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: \"{side}\" must be a non-empty list of [path, label] pairs")
    pairs = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not item[0]
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise DatasetError(f"{where}: every {side} entry must be [path, label] with a path string and a label "
                               f"int >= 0, got {json.dumps(item)}")
        pairs.append((item[0], item[1]))
    return pairs


def parse_episodes(path: Path, min_ways: int) -> list[tuple[int, list[tuple[str, int]], list[tuple[str, int]], Any]]:
    """The episodes of a JSON-lines file, checked: ``(line, support pairs, query pairs, name)``.

    The format (README, "Evaluating a checkpoint"): one episode per line,
    ``{"support": [[path, label], ...], "query": [[path, label], ...]}``, optionally ``"name"``;
    blank lines are skipped. Labels of an N-way episode are 0..N-1: every class has the same
    number of support images (K-shot), and every query label has support images.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"episodes file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read the episodes file {path}: {one_line(error)}") from None
    episodes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where} is not a JSON object ({error.msg} at column {error.colno}); an episodes file "
                               f"holds one {{\"support\": [[path, label], ...], \"query\": [...]}} per line") from None
        if not isinstance(record, dict) or not {"support", "query"} <= record.keys():
            raise DatasetError(f"{where}: an episode is an object with \"support\" and \"query\" lists")
        unknown = sorted(record.keys() - {"support", "query", "name"})
        if unknown:
            raise DatasetError(f"{where}: unknown key {unknown[0]!r}; an episode has support, query and name")
        support, query = _pairs(record["support"], where, "support"), _pairs(record["query"], where, "query")
        present = {label for _, label in support}
        ways = max(present) + 1
        if len(present) < ways:  # the first gap, found without an array as long as the largest label (1e30)
            missing = next(c for c in range(ways) if c not in present)
            raise DatasetError(f"{where}: support labels must be 0..N-1 with every class present; label {missing} "
                               f"has no support image (labels up to {ways - 1})")
        counts = np.bincount([label for _, label in support])
        if len(set(counts.tolist())) > 1:
            raise DatasetError(f"{where}: every class needs the same number of support images (N-way K-shot), got "
                               f"{dict(enumerate(counts.tolist()))}")
        if ways < min_ways:
            raise DatasetError(f"{where}: an episode needs >= {min_ways} classes, got {ways}")
        stray = sorted({label for _, label in query if label >= ways})
        if stray:
            raise DatasetError(f"{where}: query label {stray[0]} has no support images (support labels 0..{ways - 1})")
        episodes.append((number, support, query, record.get("name")))
    if not episodes:
        raise DatasetError(f"episodes file {path} holds no episodes")
    return episodes


def image_loader(cfg: DictConfig) -> Callable[[Path, int], np.ndarray]:
    """The dataset module's public ``load_image(path, image_size)``: how its loader turns an image
    file into one of its images (uint8 ``[C, S, S]``)."""
    target = str(cfg.dataset.get("_target_", ""))
    module_name = target.rpartition(".")[0]
    try:
        load = getattr(importlib.import_module(module_name), "load_image", None) if module_name else None
    except ImportError as error:
        raise ConfigError(f"cannot import the dataset module {module_name}: {one_line(error)}") from None
    if load is None or "image_size" not in cfg.dataset:
        raise ConfigError(f"--episodes scores classification episodes of image files and needs an image dataset "
                          f"whose module reads them (load_image); "
                          f"{target or 'this dataset'} has none (e.g. dataset=glyphs or dataset=omniglot)")
    return load


def read_episodes(path: Path, cfg: DictConfig, device: torch.device, min_ways: int) -> EpisodeSet:
    """The episodes of ``path`` with their images, decoded by the dataset module's ``load_image`` at
    ``dataset.image_size`` and made model inputs by :func:`metarun.tasks.image_tensor`, as the
    samplers make them. Image paths are relative to the file's folder (or absolute)."""
    load = image_loader(cfg)  # first: a dataset without image files (sinusoid) is refused whatever the file holds
    parsed = parse_episodes(path, min_ways)
    image_size, channels = int(cfg.dataset.image_size), cfg.dataset.get("channels")
    index: dict[Path, int] = {}
    episodes = []
    for number, support, query, name in parsed:
        indices = {}
        for side, pairs in (("support", support), ("query", query)):
            positions = []
            for image, _ in pairs:
                file = (path.parent / image).resolve()
                if not file.is_file():
                    raise DatasetError(f"{path} line {number}: image {image} not found ({file}); paths are relative "
                                       f"to the episodes file's folder")
                positions.append(index.setdefault(file, len(index)))
            indices[side] = positions
        episodes.append(FileEpisode(number, indices["support"], [label for _, label in support], indices["query"],
                                    [label for _, label in query], max(label for _, label in support) + 1, name))
    arrays = []
    for file in index:
        array = np.asarray(load(file, image_size))
        expected = (channels if channels is not None else array.shape[0], image_size, image_size)
        if array.shape != expected or array.dtype != np.uint8:
            raise DatasetError(f"{file} decodes to {array.dtype} {array.shape}, not the dataset's uint8 {expected}")
        arrays.append(array)
    images = image_tensor(torch.from_numpy(np.stack(arrays)), device)
    log.info("%d episodes, %d images from %s", len(episodes), len(arrays), path)
    return EpisodeSet(images, episodes)
