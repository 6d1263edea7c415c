"""How hard the generated glyphs are: generation time and a 1-nearest-neighbour pixel baseline.

1-NN in pixel space on random N-way 1-shot tasks is the classic "no learning" reference for
Omniglot-like data (about 0.6-0.7 on Omniglot 5-way 1-shot). The tests in
tests/test_data_glyphs.py check the same numbers with wide bands; this prints them.

    python scripts/glyphs_difficulty.py
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metarun.data.base import ImageClasses, split_by_seed
from metarun.data.glyphs import generate_glyphs


def one_nn_accuracy(
    classes: ImageClasses, tasks: int = 1000, ways: int = 5, query: int = 5, one_alphabet: bool = False
) -> float:
    """Accuracy of 1-nearest-neighbour (L2 in pixel space) on random ``ways``-way 1-shot tasks.

    With ``one_alphabet``, the classes of a task come from one alphabet (``classes`` must hold
    whole alphabets in order, as generate_glyphs returns them).
    """
    x = classes.images.float().div(255).flatten(1)  # [N, H * W]
    per_class = int(classes.samples_per_class()[0])
    g = torch.Generator().manual_seed(0)
    if one_alphabet:
        alphabets = len(set(classes.groups))
        per_alphabet = classes.num_classes // alphabets
        first = torch.randint(alphabets, (tasks, 1), generator=g) * per_alphabet
        chosen = first + torch.stack([torch.randperm(per_alphabet, generator=g)[:ways] for _ in range(tasks)])
    else:
        chosen = torch.stack([torch.randperm(classes.num_classes, generator=g)[:ways] for _ in range(tasks)])
    drawings = torch.stack([torch.randperm(per_class, generator=g)[: 1 + query] for _ in range(tasks * ways)])
    index = chosen.view(-1, 1) * per_class + drawings  # [tasks * ways, 1 + query]
    index = index.view(tasks, ways, 1 + query)
    support = x[index[:, :, 0]]  # [tasks, ways, D]
    queries = x[index[:, :, 1:].reshape(tasks, ways * query)]  # [tasks, ways * query, D]
    predicted = torch.cdist(queries, support).argmin(-1)
    truth = torch.arange(ways).repeat_interleave(query)
    return (predicted == truth).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    args = parser.parse_args()
    from metarun.commands import CONFIG_DIR  # here, not at the top: the tests import one_nn_accuracy

    glyphs = OmegaConf.load(Path(CONFIG_DIR) / "dataset" / "glyphs.yaml")  # metarun's glyphs, not cached
    start = time.perf_counter()
    classes = generate_glyphs(glyphs.num_alphabets, glyphs.characters_per_alphabet, glyphs.samples_per_class,
                              glyphs.image_size, glyphs.seed)
    seconds = time.perf_counter() - start
    test = split_by_seed(classes, tuple(glyphs.split_sizes), seed=glyphs.split_seed).test
    print(f"hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"generated {classes.num_classes} classes x {int(classes.samples_per_class()[0])} drawings "
          f"in {seconds:.1f} s")
    print(f"1-NN pixel accuracy, {args.ways}-way 1-shot, 1000 tasks:")
    rows = [
        ("test characters of the default split", one_nn_accuracy(test, ways=args.ways)),
        ("all characters, classes of any alphabets", one_nn_accuracy(classes, ways=args.ways)),
        ("all characters, classes of one alphabet", one_nn_accuracy(classes, ways=args.ways, one_alphabet=True)),
    ]
    for name, accuracy in rows:
        print(f"  {name:42s} {accuracy:.3f}")


if __name__ == "__main__":
    main()
