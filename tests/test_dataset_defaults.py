"""A dataset brings what fits it (issue 21): its backbone, the algorithm settings that depend on the data
and the task shape, through conf/'s defaults lists; the user's choices always win, and a backbone that does
not fit the data is one line naming the ones that do.

``dataset=sinusoid`` alone is the case that matters today: an image backbone, MAML's classification inner
rate (0.4, which makes regression diverge) and a 1-shot task used to come with it.
"""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import CONF, TINY, run_cli
from metarun import config
from metarun.errors import ConfigError

# The gradient-based methods that adapt with an inner rate and run on sinusoid regression (Reptile adapts
# with its own Adam rate, which regression does not change).
GRADIENT_METHODS = ["maml", "fomaml", "maml_plus_plus", "metasgd", "anil", "pretrained"]
IMAGE_DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml") if p.stem != "sinusoid")
REGRESSION_INNER_LR = 0.01  # Finn et al. 2017, §5.1


def own_value(algorithm: str, key: str):
    """``key`` as conf/algorithm/<algorithm>.yaml sets it, following its ``defaults`` (fomaml: maml's)."""
    node = OmegaConf.load(CONF / "algorithm" / f"{algorithm}.yaml")
    if key in node:
        return node[key]
    return own_value(next(d for d in node.defaults if d != "_self_"), key)


# ----------------------------------------------------------------------------------------------
# dataset=sinusoid brings the regressor, the regression inner rate and the paper's K
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", GRADIENT_METHODS)
def test_sinusoid_brings_its_backbone_and_the_regression_inner_rate(compose_cfg, algorithm):
    cfg = compose_cfg("dataset=sinusoid", f"algorithm={algorithm}")
    assert cfg.backbone == compose_cfg("dataset=sinusoid", "backbone=mlp_sinusoid").backbone
    assert cfg.backbone.in_features == 1 and list(cfg.backbone.hidden) == [40, 40]
    assert cfg.algorithm.inner_lr == REGRESSION_INNER_LR
    # Nothing else of the algorithm changes: its other values are its own file's.
    for key, value in cfg.algorithm.items():
        if key != "inner_lr":
            assert value == own_value(algorithm, key), key
    config.check_references(cfg)  # the composition fits together


def test_sinusoid_alone_is_maml_on_the_papers_regression_task(compose_cfg):
    cfg = compose_cfg("dataset=sinusoid")
    assert cfg.algorithm._target_ == "metarun.algorithms.maml.MAML" and cfg.algorithm.inner_lr == REGRESSION_INNER_LR
    assert (cfg.ways, cfg.shots, cfg.query_shots, cfg.train_shots, cfg.train_query_shots) == (1, 10, 10, 10, 10)


@pytest.mark.parametrize("algorithm", ["reptile", "meta_lstm", "synaptic", "protonet"])
def test_algorithms_without_a_regression_setting_keep_their_own_values(compose_cfg, algorithm):
    """Only an algorithm the dataset has a file for (conf/dataset/algorithm/sinusoid/) changes: none gains a key."""
    on_sinusoid = compose_cfg("dataset=sinusoid", f"algorithm={algorithm}").algorithm
    on_glyphs = compose_cfg(f"algorithm={algorithm}").algorithm
    assert on_sinusoid == on_glyphs


# ----------------------------------------------------------------------------------------------
# Image datasets keep today's defaults
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
def test_an_image_dataset_brings_nothing_new(compose_cfg, dataset):
    cfg = compose_cfg(f"dataset={dataset}")
    conv4 = OmegaConf.load(CONF / "backbone" / "conv4.yaml")
    assert OmegaConf.to_container(cfg.backbone, resolve=False) == OmegaConf.to_container(conv4, resolve=False)
    assert cfg.algorithm.inner_lr == own_value("maml", "inner_lr") == 0.4
    assert (cfg.ways, cfg.shots, cfg.query_shots) == (5, 1, 1)


@pytest.mark.parametrize("algorithm", GRADIENT_METHODS)
def test_on_images_a_gradient_method_keeps_its_own_inner_rate(compose_cfg, algorithm):
    assert compose_cfg("dataset=omniglot", f"algorithm={algorithm}").algorithm.inner_lr == own_value(algorithm, "inner_lr")


# ----------------------------------------------------------------------------------------------
# The user's choices win
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["backbone=conv4"], "backbone._target_", "metarun.backbones.Conv4"),
        (["algorithm.inner_lr=0.3"], "algorithm.inner_lr", 0.3),
        (["algorithm=maml_plus_plus", "algorithm.inner_lr=0.05"], "algorithm.inner_lr", 0.05),
        (["shots=5"], "shots", 5),
        (["shots=5"], "train_shots", 5),  # train_shots follows shots, as on any dataset
        (["query_shots=100", "ways=3"], "query_shots", 100),
        (["query_shots=100", "ways=3"], "ways", 3),
        (["experiment=maml_sinusoid"], "query_shots", 100),  # a preset's own value
        (["experiment=maml_sinusoid_5shot"], "shots", 5),
        (["experiment=maml_sinusoid", "algorithm.inner_lr=0.02"], "algorithm.inner_lr", 0.02),
    ],
)
def test_the_users_choice_wins_over_what_the_dataset_brings(compose_cfg, overrides, key, expected):
    cfg = compose_cfg("dataset=sinusoid", *overrides)
    assert OmegaConf.select(cfg, key) == expected


def test_a_presets_backbone_wins_over_the_datasets(compose_cfg):
    """``experiment=maml_omniglot_5w1s dataset=sinusoid``: the command line's dataset, the preset's conv4, which
    does not fit it: one line says which does."""
    cfg = compose_cfg("experiment=maml_omniglot_5w1s", "dataset=sinusoid")
    assert cfg.dataset._target_.endswith("Sinusoids") and cfg.backbone._target_.endswith("Conv4")
    with pytest.raises(ConfigError, match="use backbone=mlp_sinusoid$"):
        config.check_references(cfg)


# ----------------------------------------------------------------------------------------------
# A backbone that does not fit: one line naming the ones that do, derived from conf/backbone/
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "fitting"),
    [
        (["dataset=sinusoid", "backbone=conv4"], "backbone.in_channels", "use backbone=mlp_sinusoid"),
        (["dataset=sinusoid", "backbone=mlp"], "backbone.in_features", "use backbone=mlp_sinusoid"),
        (["dataset=sinusoid", "backbone=conv4_84"], "backbone.in_channels", "use backbone=mlp_sinusoid"),
        (["backbone=mlp_sinusoid"], "backbone.in_features",
         "use one of backbone=conv4, backbone=conv4_84, backbone=conv4_maxpool, backbone=conv4_relation, backbone=mlp, backbone=resnet12"),
        (["dataset=miniimagenet", "backbone=mlp_sinusoid"], "backbone.in_features",
         "use one of backbone=conv4, backbone=conv4_84, backbone=conv4_maxpool, backbone=conv4_relation, backbone=mlp, backbone=resnet12"),
    ],
)
def test_a_backbone_that_does_not_fit_names_the_ones_that_do(compose_cfg, overrides, key, fitting):
    with pytest.raises(ConfigError) as caught:
        config.check_references(compose_cfg(*overrides))
    message = str(caught.value)
    assert message.startswith(f"{key}: Interpolation key 'dataset.") and message.endswith(fitting), message
    assert "\n" not in message


@pytest.mark.parametrize("dataset", ["sinusoid", *IMAGE_DATASETS])
def test_every_backbone_named_as_fitting_builds_on_the_dataset(compose_cfg, dataset):
    """What fitting_backbones names composes and resolves with that dataset, and the dataset's own default
    backbone is among them."""
    cfg = compose_cfg(f"dataset={dataset}")
    fitting = config.fitting_backbones(cfg)
    assert fitting and set(fitting) <= {p.stem for p in (CONF / "backbone").glob("*.yaml")}
    for name in fitting:
        config.check_references(compose_cfg(f"dataset={dataset}", f"backbone={name}"))
    chosen = [name for name in fitting if cfg.backbone == compose_cfg(f"dataset={dataset}", f"backbone={name}").backbone]
    assert chosen == (["mlp_sinusoid"] if dataset == "sinusoid" else ["conv4"])


def test_the_fitting_backbones_come_from_the_config_tree(compose_cfg, tmp_path, monkeypatch):
    """A backbone added to conf/backbone/ that reads the sinusoid's keys is named for it: no list to update."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    wide = OmegaConf.load(conf / "backbone" / "mlp_sinusoid.yaml")
    wide.hidden = [80, 80]
    OmegaConf.save(wide, conf / "backbone" / "mlp_sinusoid_wide.yaml")
    monkeypatch.setenv("METARUN_CONFIG_DIR", str(conf))
    with pytest.raises(ConfigError, match=r"use one of backbone=mlp_sinusoid, backbone=mlp_sinusoid_wide$"):
        config.check_references(compose_cfg("dataset=sinusoid", "backbone=conv4"))


def test_an_algorithm_with_its_own_network_still_needs_no_fitting_backbone(compose_cfg):
    cfg = compose_cfg("dataset=sinusoid", "algorithm=synaptic", "backbone=conv4")
    config.check_references(cfg)
    assert cfg.backbone is None


# ----------------------------------------------------------------------------------------------
# Through the command, as a user types it
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fitting"),
    [
        (["dataset=sinusoid", "backbone=conv4"], "use backbone=mlp_sinusoid"),
        (["dataset=glyphs", "backbone=mlp_sinusoid"],
         "use one of backbone=conv4, backbone=conv4_84, backbone=conv4_maxpool, backbone=conv4_relation, backbone=mlp, backbone=resnet12"),
    ],
)
def test_cli_a_backbone_that_does_not_fit_is_one_line_and_exit_2(tmp_path, overrides, fitting):
    out = tmp_path / "run"
    proc = run_cli(*TINY, *overrides, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: error: backbone.") and lines[0].endswith(fitting), lines
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("algorithm", ["maml", "maml_plus_plus"])
def test_cli_sinusoid_runs_with_nothing_else_typed(tmp_path, algorithm):
    """``metarun algorithm=X dataset=sinusoid``, shortened: with MAML's classification rate the validation MSE
    was ~1e10 after 2 iterations (MAML) or the loss infinite at iteration 2 (MAML++, exit 2)."""
    out = tmp_path / "run"
    proc = run_cli(*TINY, "iterations=3", "eval_every=3", f"algorithm={algorithm}", "dataset=sinusoid",
                   f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["backbone"]["in_features"] == 1
    assert results["config"]["algorithm"]["inner_lr"] == REGRESSION_INNER_LR
    assert results["best_val_mse"] < 100 and results["test/mse_mean"] < 100


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", GRADIENT_METHODS)
def test_sinusoid_learns_with_nothing_else_typed(compose_cfg, tmp_path, algorithm):
    """A short run on the dataset's defaults lowers the test MSE well below the untrained model's, on the same
    test tasks (the same seed draws them)."""
    from metarun.loop import run

    def test_mse(iterations: int) -> float:
        out = tmp_path / f"{iterations}"
        run(compose_cfg("dataset=sinusoid", f"algorithm={algorithm}", f"iterations={iterations}",
                        f"eval_every={iterations}", "eval.tasks=200", "eval.val_tasks=20", "meta_batch_size=16"), out)
        return json.loads((out / "results.json").read_text())["test/mse_mean"]

    untrained, trained = test_mse(1), test_mse(1500)
    assert trained < 0.85 * untrained, (untrained, trained)


def test_a_run_saved_with_a_literal_value_resumes_where_today_interpolates_it():
    """Older runs saved ``in_features: 784``; the mlp config now computes it from the dataset. The
    same value written two ways is no difference for resume; another value still is."""
    from metarun.checkpoint import config_differences

    saved = {"dataset": {"channels": 1, "image_size": 28}, "backbone": {"in_features": 784}}
    today = {"dataset": {"channels": 1, "image_size": 28},
             "backbone": {"in_features": "${metarun.product:${dataset.channels},${dataset.image_size},"
                                         "${dataset.image_size}}"}}
    assert config_differences(saved, today) == []
    saved["backbone"]["in_features"] = 400
    assert config_differences(saved, today) == [f"backbone.in_features: 400 -> {today['backbone']['in_features']}"]
