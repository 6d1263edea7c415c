"""Every algorithm of conf/algorithm/ on every dataset of conf/dataset/: does the combination run (or learn), or
does it refuse with one clear error? Writes docs/composition.md, one row per algorithm and one column per dataset.

The image datasets are tiny files written into a temporary folder in each loader's own format (a few classes of
a few images, each class a fixed random pattern plus noise, so that there is something to learn); glyphs is the
generated default at a tiny size, sinusoid needs no files. Each combination is composed by Hydra as the command
composes it and run in this process through :func:`metarun.loop.run` (the path the ``metarun`` command takes):

    python scripts/composition_matrix.py            # composition pass: one iteration each
    python scripts/composition_matrix.py --learn    # learning pass: LEARN_ITERATIONS iterations each, the test
                                                    # accuracy (MSE) of the untrained model -> the trained one
                                                    # (docs/composition_learning.md)

A cell is ``runs``, ``learns (before -> after)``, ``does not learn (before -> after)`` or ``refused: <reason>``
(a ConfigError or DatasetError, the one line the command prints). Anything else is a crash and is raised.
tests/test_composition.py runs the same cells.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from metarun.commands import CONFIG_DIR, user_error
from metarun.data import cifar, miniimagenet, omniglot
from metarun.errors import one_line

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = sorted(p.stem for p in (Path(CONFIG_DIR) / "algorithm").glob("*.yaml"))
# The generated ones first, then the image benchmarks as conf/dataset/ has them.
DATASETS = ["glyphs", "sinusoid", *sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml")
                                          if p.stem not in ("glyphs", "sinusoid"))]

PER_CLASS = 5  # images per class of the tiny files: shots + query_shots of the tiny tasks, and some to spare
NOISE = 100  # pixel noise of the tiny images, on 0..255
CONTRAST = 0.7  # of the classes' patterns around mid-grey: an untrained network tells them apart in some tasks only
SIZE = 28  # the tiny colour images' side (the loaders resize; conv4's pooling needs 16 or more)
LEARN_ITERATIONS = 40
# How much better than untrained the trained model must be on the same test tasks to "learn": the fraction of its
# error it must lose, of 1 - accuracy (classification: 0.5 -> 0.625, 0.9 -> 0.925) or of the MSE (regression; a
# few dozen iterations move MAML's sinusoid MSE by some percent, thousands to a fifth of it).
LEARN_MARGIN = {"acc": 0.25, "mse": 0.05}

# Every run: one thread, no W&B, no console, small evaluations; a cell adds iterations and its dataset's files.
RUN = ["threads=1", "wandb.mode=disabled", "console=false", "device=cpu", "meta_batch_size=2", "eval.tasks=4",
       "eval.val_tasks=2", "eval_every=1", "checkpoint_every=1000"]
LEARN = ["eval.tasks=40", "eval.val_tasks=10", "meta_batch_size=4", f"eval_every={LEARN_ITERATIONS // 4}",
         "optimizer.lr=0.005"]
# 2-way tasks of one support and two query images per class fit the tiny files' splits (2 classes at least);
# a Conv4 of 8 filters keeps the methods that run once per parameter (meta_lstm) quick.
IMAGE_TASK = ["ways=2", "shots=1", "query_shots=2", "backbone.hidden=8"]


def _pattern(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _images(class_seed: int, count: int, shape: tuple[int, ...], contrast: float | None = None) -> list[np.ndarray]:
    """``count`` images of one class: its pattern, smooth (a random 4x4 image seeded by ``class_seed``, scaled up,
    at CONTRAST), under strong pixel noise (uniform, +-NOISE): a network does better than its untrained self by learning to
    look past the noise."""
    contrast = CONTRAST if contrast is None else contrast
    low = (128 + contrast * (_pattern(class_seed, (4, 4, *shape[2:])).astype(float) - 128)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize(shape[1::-1], Image.BILINEAR)).astype(np.int16)
    noise = np.random.default_rng(10_000 + class_seed).integers(-NOISE, NOISE + 1, size=(count, *shape))
    return [np.clip(base + n, 0, 255).astype(np.uint8) for n in noise]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _dump(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path


def _checksum_file(folder: Path, files: list[Path]) -> Path:
    """A sha256sum file vouching for ``files`` (what a user passes as dataset.checksums)."""
    sums = folder / "SHA256SUMS"
    sums.write_text("".join(f"{_sha256(f)}  {f.name}\n" for f in files))
    return sums


def write_omniglot(root: Path) -> list[str]:
    """Omniglot's folders: 2 background + 1 evaluation alphabets of 4 characters, 105x105 black-on-white drawings."""
    index = 0
    for part, alphabets in {"images_background": ["Alpha", "Beta"],
                            "images_evaluation": [omniglot.EVALUATION_ALPHABETS[0]]}.items():  # split=alphabets: a real one
        for alphabet in alphabets:
            for character in range(1, 5):
                # full contrast: the ink is the pattern thresholded, and the noise already moves its edges
                for drawing, image in enumerate(_images(index, PER_CLASS, (15, 15), contrast=1.0)):
                    ink = np.kron(image > 127, np.ones((7, 7), dtype=bool))  # 105x105, True where ink
                    _save(np.where(ink, 0, 255).astype(np.uint8),
                          root / part / alphabet / f"character{character:02d}" / f"{index:04d}_{drawing + 1:02d}.png")
                index += 1
    # split=maml: 6/3/3 characters; split=alphabets: Alpha or Beta for validation, the evaluation alphabet for test
    return [f"dataset.root={root}", "dataset.split_sizes=[6,3,3]", "dataset.val_alphabets=1"]


def write_miniimagenet(root: Path) -> list[str]:
    """learn2learn's pickles (3/2/2 classes) and a sha256sum file for them."""
    files = []
    for s, split in enumerate(("train", "val", "test")):
        wnids = [f"n{s}{c}" for c in range(3 if split == "train" else 2)]
        images = [image for c, _ in enumerate(wnids) for image in _images(100 * s + c, PER_CLASS, (SIZE, SIZE, 3))]
        data = {"image_data": np.stack(images),
                "class_dict": {w: list(range(c * PER_CLASS, (c + 1) * PER_CLASS)) for c, w in enumerate(wnids)}}
        files.append(_dump(data, root / miniimagenet.PICKLES[split].name))
    return [f"dataset.root={root}", f"dataset.checksums={_checksum_file(root, files)}", f"dataset.image_size={SIZE}"]


def write_tieredimagenet(root: Path) -> list[str]:
    """The train/val/test folders of class folders of JPEGs (3/2/2 classes)."""
    for s, split in enumerate(("train", "val", "test")):
        for c in range(3 if split == "train" else 2):
            for i, image in enumerate(_images(200 + 10 * s + c, PER_CLASS, (SIZE, SIZE, 3))):
                _save(image, root / split / f"n{s}{c}" / f"{i}.png")
    return [f"dataset.root={root}", f"dataset.image_size={SIZE}"]


def write_cifarfs(root: Path) -> list[str]:
    """learn2learn's data/<class>/*.png for the 100 CIFAR-100 classes."""
    for c, name in enumerate(cifar.FINE_NAMES):
        for i, image in enumerate(_images(300 + c, PER_CLASS, (32, 32, 3))):
            _save(image, root / "data" / name / f"{i}.png")
    return [f"dataset.root={root}", f"dataset.image_size={SIZE}"]


def write_fc100(root: Path) -> list[str]:
    """MetaOptNet's FC100_{train,val,test}.pickle and a sha256sum file for them."""
    files = []
    for split, names in cifar.FC100_SPLIT.items():
        labels = [cifar.FINE_NAMES.index(n) for n in names for _ in range(PER_CLASS)]
        images = [image for n in names for image in _images(500 + cifar.FINE_NAMES.index(n), PER_CLASS, (32, 32, 3))]
        files.append(_dump({"data": np.stack(images), "labels": labels}, root / f"FC100_{split}.pickle"))
    return [f"dataset.root={root}", f"dataset.checksums={_checksum_file(root, files)}", f"dataset.image_size={SIZE}"]


def write_cub(root: Path) -> list[str]:
    """CUB_200_2011/ with 8 species (closer_look: 4/2/2) and its index files."""
    folder = root / "CUB_200_2011"
    images, labels, boxes = [], [], []
    names = [f"{c:03d}.Bird_{c}" for c in range(1, 9)]
    for c, name in enumerate(names):
        for i, image in enumerate(_images(700 + c, PER_CLASS, (SIZE, SIZE, 3))):
            relative = f"{name}/{name[4:]}_{i:04d}.png"
            _save(image, folder / "images" / relative)
            images.append(f"{len(images) + 1} {relative}")
            labels.append(f"{len(labels) + 1} {c + 1}")
            boxes.append(f"{len(boxes) + 1} 0.0 0.0 {SIZE}.0 {SIZE}.0")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(names)))
    (folder / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return [f"dataset.root={root}", f"dataset.image_size={SIZE}"]


# The tiny files of each loader (a dataset option is its loader's ``_target_`` with its own settings: an option that
# shares a loader, omniglot_challenge, reads the same files under its own protocol), and the options that generate
# their data (no files).
WRITERS = {"metarun.data.omniglot.load_omniglot": write_omniglot,
           "metarun.data.miniimagenet.load_miniimagenet": write_miniimagenet,
           "metarun.data.tieredimagenet.load_tieredimagenet": write_tieredimagenet,
           "metarun.data.cifar.load_cifarfs": write_cifarfs, "metarun.data.cifar.load_fc100": write_fc100,
           "metarun.data.cub.load_cub": write_cub}
GENERATED = {"metarun.data.glyphs.load_glyphs": ["dataset.num_alphabets=4", "dataset.characters_per_alphabet=10",
                                                 "dataset.split_sizes=[20,10,-1]", *IMAGE_TASK],
             "metarun.data.sinusoid.Sinusoids": []}


def loader(dataset: str) -> str:
    """conf/dataset/<dataset>.yaml's ``_target_``."""
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(CONFIG_DIR) / "dataset" / f"{dataset}.yaml")._target_


def write_datasets(folder: Path) -> dict[str, list[str]]:
    """The tiny files of every image loader under ``folder``; returns each dataset option's overrides (its
    files, and the task shape they fit). Glyphs: the generated default, tiny; sinusoid: its own task shape."""
    written: dict[str, list[str]] = {}
    overrides = {}
    for dataset in DATASETS:
        target = loader(dataset)
        if target in GENERATED:
            overrides[dataset] = GENERATED[target]
            continue
        if target not in WRITERS:
            raise RuntimeError(f"dataset={dataset}: no tiny files for its loader {target}; add a writer to "
                               f"scripts/composition_matrix.py (WRITERS)")
        if target not in written:
            written[target] = WRITERS[target](folder / target.rsplit(".", 1)[1])
        overrides[dataset] = [*written[target], f"dataset.cache_dir={folder / 'cache'}", *IMAGE_TASK]
    return overrides


@dataclass
class Cell:
    """One algorithm on one dataset: ``status`` is runs, learns, does-not-learn or refused."""

    algorithm: str
    dataset: str
    status: str
    reason: str = ""
    metric: str = ""
    before: float | None = None
    after: float | None = None
    seconds: float = 0.0

    def text(self) -> str:
        if self.status == "refused":
            return f"refused: {self.reason}"
        if self.before is None:
            return self.status
        return f"{self.status} ({self.metric} {self.before:.3g} -> {self.after:.3g})"


def compose_cell(algorithm: str, dataset: str, overrides: list[str], extra: list[str] = ()):
    """The config ``metarun algorithm=A dataset=D ...`` composes (Hydra's compose, as the command does)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config",
                       overrides=[f"algorithm={algorithm}", f"dataset={dataset}", *RUN, *overrides, *extra])


def untrained_score(cfg) -> float:
    """The final-step test metric of the model as built, before any meta-update, on the run's own test tasks
    (the build seeds everything, so :func:`metarun.loop.run` then builds the same model and tasks)."""
    from metarun.build import build
    from metarun.loop import score_tasks

    with tempfile.TemporaryDirectory() as scratch:
        parts = build(cfg, Path(scratch))
        scores = score_tasks(parts.algorithm, parts.test_tasks, cfg.eval.bn_batch_stats, cfg.eval.ci_z,
                             parts.objective.loss_metric)
        return float(scores.score(parts.objective.metric))


def run_cell(algorithm: str, dataset: str, overrides: list[str], out: Path, learn: bool = False) -> Cell:
    """Compose and run one combination in this process; a user error is a refusal, anything else raises."""
    from metarun.loop import run

    started = time.perf_counter()
    extra = [f"iterations={LEARN_ITERATIONS if learn else 1}", *(LEARN if learn else [])]
    cell = Cell(algorithm, dataset, "runs")
    try:
        cfg = compose_cell(algorithm, dataset, overrides, extra)
        before = untrained_score(cfg) if learn else None
        run(cfg, out)
    except Exception as error:
        cause = user_error(error)  # what the command prints as one line (Hydra wraps errors of constructors)
        if cause is None:
            raise
        cell.status, cell.reason = "refused", one_line(cause)
    else:
        if learn:
            results = json.loads((out / "results.json").read_text())
            metric = "mse" if "test/mse_mean" in results else "acc"
            after = float(results[f"test/{metric}_mean"])
            error_before, error_after = (1 - before, 1 - after) if metric == "acc" else (before, after)
            learned = error_after <= error_before * (1 - LEARN_MARGIN[metric]) and error_after < error_before
            cell.status = "learns" if learned else "does not learn"
            cell.metric, cell.before, cell.after = metric, before, after
    cell.seconds = time.perf_counter() - started
    return cell


def table(cells: list[Cell], learn: bool, seconds: float) -> str:
    """docs/composition.md: the command and the machine, then one row per algorithm, one column per dataset."""
    by = {(c.algorithm, c.dataset): c for c in cells}
    command = "python scripts/composition_matrix.py" + (" --learn" if learn else "")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    what = (f"{LEARN_ITERATIONS} meta-iterations each ({' '.join(LEARN)}): the untrained model's "
            f"final-step test accuracy (MSE for sinusoid) -> the trained one's, on the same test tasks; "
            f"`learns` when the error (1 - accuracy) falls by {LEARN_MARGIN['acc']:.0%} of itself, the MSE by "
            f"{LEARN_MARGIN['mse']:.0%}" if learn else
            "one meta-iteration each: `runs` means composed, built, trained, validated, tested and written")
    lines = [
        "# Composition matrix" + (": learning pass" if learn else ""),
        "",
        f"Generated by `{command}` on {cpu} ({os.cpu_count()} cores visible, 1 torch thread), "
        f"{platform.platform(terse=True)}, torch {torch.__version__}; {seconds:.0f} s in all.",
        "",
        f"Every algorithm of conf/algorithm/ on every dataset of conf/dataset/, as `metarun algorithm=A dataset=D` "
        f"composes it, run in-process through `metarun.loop.run` (the command's path), {what}. Image datasets are "
        f"tiny files in each loader's own format (scripts/composition_matrix.py writes them, {PER_CLASS} images per "
        f"class); tasks are 2-way 1-shot (2 queries per class) with a Conv4 of 8 filters on images, the "
        f"dataset's own task shape and backbone on sinusoid. `refused:` is the one line "
        f"(`metarun: error: ...`, exit 2) the command prints. tests/test_composition.py checks the same cells.",
        "",
        "| algorithm | " + " | ".join(DATASETS) + " |",
        "|---|" + "---|" * len(DATASETS),
    ]
    for algorithm in ALGORITHMS:
        row = [by[algorithm, d].text().replace("|", "\\|") if (algorithm, d) in by else "" for d in DATASETS]
        lines.append(f"| {algorithm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learn", action="store_true", help=f"{LEARN_ITERATIONS} iterations: untrained -> trained")
    parser.add_argument("--out", help="default: docs/composition.md, with --learn docs/composition_learning.md")
    parser.add_argument("--algorithms", nargs="*", default=ALGORITHMS)
    parser.add_argument("--datasets", nargs="*", default=DATASETS)
    args = parser.parse_args()
    args.out = args.out or str(REPO / "docs" / ("composition_learning.md" if args.learn else "composition.md"))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("METARUN_CACHE", str(Path(scratch) / "cache"))
        os.environ["WANDB_MODE"] = "disabled"
        overrides = write_datasets(Path(scratch) / "data")
        for algorithm in args.algorithms:
            for dataset in args.datasets:
                cell = run_cell(algorithm, dataset, overrides[dataset], Path(scratch) / "runs" / f"{algorithm}-{dataset}",
                                learn=args.learn)
                print(f"{algorithm:16s} {dataset:15s} {cell.seconds:6.1f}s  {cell.text()}", flush=True)
                cells.append(cell)
    Path(args.out).write_text(table(cells, args.learn, time.perf_counter() - started))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
