"""Every option of every config group composes, validates and instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, backbone
from metarun import config
from metarun.algorithms.base import Algorithm
from metarun.backbones import Conv4
from metarun.build import build_algorithm, build_data, resolve_device
from metarun.commands import user_error
from metarun.data.base import ClassSplits
from metarun.errors import ConfigError
from metarun.objectives import Classification


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("algorithm"))
def test_algorithm_options_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"algorithm={name}")
    algorithm, optimizer, _ = build_algorithm(cfg, torch.device("cpu"))
    assert isinstance(algorithm, Algorithm)
    # Methods without an inner loop have no such options and take 0 steps.
    assert algorithm.inner_steps == cfg.algorithm.get("inner_steps", 0)
    assert algorithm.eval_inner_steps == cfg.algorithm.get("eval_inner_steps", 0)


@pytest.mark.parametrize("name", options("backbone"))
def test_backbone_options_instantiate(compose_cfg, name):
    from metarun import config

    cfg = compose_cfg(f"backbone={name}")
    if name not in config.fitting_backbones(cfg):  # a backbone made for another dataset (mlp_sinusoid)
        cfg = compose_cfg("dataset=sinusoid", f"backbone={name}")
    features = instantiate(cfg.backbone)
    size = cfg.backbone.get("image_size", 28)
    channels = cfg.backbone.get("in_channels", 1)
    # An MLP takes flat inputs of in_features (1 for the sinusoid network), images flatten into them.
    x = torch.rand(3, cfg.backbone.in_features) if "in_features" in cfg.backbone else torch.rand(3, channels, size, size)
    out = features(x)
    assert out.shape == (3, features.out_features)


def test_paper_backbone_sizes(compose_cfg):
    conv4 = instantiate(compose_cfg("backbone=conv4").backbone)
    conv4_84 = instantiate(compose_cfg("backbone=conv4_84").backbone)
    assert conv4.out_features == 64  # stride-2 convs, spatial mean (MAML's Omniglot code)
    assert conv4_84.out_features == 32 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5, flattened (MAML's mini-ImageNet code)
    assert instantiate(compose_cfg("backbone=conv4", "backbone.pool=max").backbone).out_features == 64


@pytest.mark.parametrize("pool", ["stride", "max"])
@pytest.mark.parametrize("size", [28, 30, 84])
@pytest.mark.parametrize("pooled", [(4, 1), (2, 0), (2, 1)], ids=["all-pooled", "sung", "two-pooled"])
def test_conv4_out_features_and_map_shape_match_a_forward_pass(pool, size, pooled):
    net = Conv4(in_channels=1, hidden=8, image_size=size, pool=pool, flatten=True, pooled_blocks=pooled[0],
                pooled_padding=pooled[1])
    x = torch.rand(2, 1, size, size)
    assert net(x).shape == (2, net.out_features)
    assert net.feature_maps(x).shape == (2, *net.map_shape)


def test_relation_network_embedding_sizes():
    """Sung et al. (2018): 64 x 5 x 5 maps for 28x28 Omniglot, 64 x 19 x 19 for 84x84 mini-ImageNet."""
    assert backbone("conv4_relation", in_channels=1, image_size=28).map_shape == (64, 5, 5)
    assert backbone("conv4_relation", in_channels=3, image_size=84).map_shape == (64, 19, 19)
    assert backbone("mlp").map_shape == (64, 1, 1)


def test_building_a_backbone_leaves_batchnorm_statistics_untouched():
    for net in (backbone("conv4"), backbone("conv4", pool="max", flatten=True), backbone("mlp")):
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
            assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options_instantiate(compose_cfg, name):
    cfg = compose_cfg(f"optimizer={name}")
    _, optimizer, _ = build_algorithm(cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_compose(compose_cfg, name):
    cfg = compose_cfg(f"dataset={name}")
    assert cfg.dataset._target_.startswith("metarun.data.")


def test_glyphs_dataset_instantiates_into_task_samplers(compose_cfg):
    cfg = compose_cfg()
    splits = instantiate(cfg.dataset, _convert_="all")
    assert isinstance(splits, ClassSplits)
    train, val, test, objective = build_data(cfg, torch.device("cpu"))
    assert len(val) == cfg.eval.val_tasks and len(test) == cfg.eval.tasks
    assert train.sample().support.x.shape == (5, 1, 28, 28)
    assert isinstance(objective, Classification)


def preset(name: str):
    """An experiment preset as a user gets it: no test overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}"])


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_presets_compose(name):
    cfg = preset(name)
    OmegaConf.resolve(cfg)
    config.validate(cfg)
    assert cfg.iterations >= 1000  # presets are paper protocols, not the tiny test run
    build_algorithm(cfg, torch.device("cpu"))


def test_maml_omniglot_preset_is_the_paper_protocol():
    cfg = preset("maml_omniglot_5w1s")
    assert (cfg.ways, cfg.shots, cfg.meta_batch_size, cfg.iterations) == (5, 1, 32, 60000)
    assert (cfg.algorithm.inner_lr, cfg.algorithm.inner_steps, cfg.algorithm.eval_inner_steps) == (0.4, 1, 3)
    assert cfg.optimizer.lr == 0.001 and cfg.eval.tasks == 600
    assert cfg.dataset.split_sizes == [1100, 100, 423] and cfg.dataset.rotations


def test_fomaml_is_maml_first_order(compose_cfg):
    cfg = compose_cfg("algorithm=fomaml")
    assert cfg.algorithm._target_ == compose_cfg().algorithm._target_
    assert cfg.algorithm.first_order is True


def test_schema_rejects_unknown_keys_and_wrong_types(compose_cfg):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("iterationz=3")
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_cfg("iterations=many")


def test_unknown_group_option_lists_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException, match=r"(?s)Available options.*maml.*metasgd"):
        compose_cfg("algorithm=nope")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr must be >= 0"),
        ("meta_batch_size=0", "meta_batch_size must be >= 1"),
        ("eval.tasks=0", "eval.tasks must be >= 1"),
        ("device=tpu", "device must be"),
        ("threads=-1", "threads must be >= 0"),
    ],
)
def test_validate_rejects_bad_values(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        config.validate(compose_cfg(override))


def test_negative_inner_lr_is_rejected(compose_cfg):
    with pytest.raises(Exception) as raised:  # Hydra wraps errors raised by a _target_
        build_algorithm(compose_cfg("algorithm.inner_lr=-1"), torch.device("cpu"))
    cause = user_error(raised.value)
    assert isinstance(cause, ConfigError) and "inner_lr must be >= 0" in str(cause)


def test_device_auto_picks_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_an_algorithm_with_its_own_network_needs_no_fitting_backbone(compose_cfg):
    """dataset=sinusoid with the default image backbone fails for MAML (the backbone is used and does not
    fit), and is fine for the synaptic rule, which builds its own network: its backbone is dropped."""
    from metarun import config
    from metarun.errors import ConfigError

    with pytest.raises(ConfigError, match="backbone.in_channels"):
        config.check_references(compose_cfg("dataset=sinusoid", "algorithm=maml", "backbone=conv4"))
    cfg = compose_cfg("dataset=sinusoid", "algorithm=synaptic", "backbone=conv4")
    config.check_references(cfg)
    assert cfg.backbone is None


def test_hydras_job_directory_names_leave_out_exactly_the_unnamed_keys(compose_cfg):
    """Hydra's override_dirname.exclude_keys (conf/config.yaml) is config.UNNAMED_KEYS (the job keys, the
    seed, resume, output_dir), each prefix (``wandb.``) written out as the keys the config has under it:
    Hydra matches whole keys. metarun-table's RUNTIME_KEYS start from the same list."""
    from metarun.table import RUNTIME_KEYS

    exclude = list(OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    cfg = compose_cfg()
    expected = []
    for key in config.UNNAMED_KEYS:
        node = key.rstrip(".")
        expected += [f"{node}.{k}" for k in cfg[node] if not k.startswith("_")] if key.endswith(".") else [key]
    assert sorted(exclude) == sorted(expected) and len(set(exclude)) == len(exclude)
    assert set(config.JOB_KEYS) <= set(config.UNNAMED_KEYS) <= set(RUNTIME_KEYS)


def written(option: str) -> dict:
    """``group/name`` as its file writes it, with the options of its group it extends (conv4_maxpool: conv4)."""
    return config.option_values(*option.split("/"))


def targets(*groups: str) -> dict[str, list[str]]:
    """``_target_`` -> the configs (``group/name``) of ``groups`` that build it."""
    out: dict[str, list[str]] = {}
    for group in groups:
        for name in options(group):
            out.setdefault(written(f"{group}/{name}")["_target_"], []).append(f"{group}/{name}")
    return out


@pytest.mark.parametrize("target", sorted(targets("backbone", "dataset")))
def test_backbone_and_dataset_values_are_declared_once(target):
    """What conf/backbone/ and conf/dataset/ set has no Python default in its ``_target_`` as well
    (conf/algorithm/: tests/test_algorithms.py). A parameter every config of the target sets has no
    default; one only some set (Conv4's pooled_blocks: the Relation Network's) may keep the default the
    others use, which no config restates."""
    import inspect

    from hydra.utils import get_object

    configs = {name: written(name) for name in targets("backbone", "dataset")[target]}
    for pname, parameter in inspect.signature(get_object(target)).parameters.items():
        setting = [name for name, cfg in configs.items() if pname in cfg]
        if len(setting) == len(configs):
            assert parameter.default is inspect.Parameter.empty, f"{target}.{pname} has a Python default as well"
        for name in setting:
            assert configs[name][pname] != parameter.default, f"{name} restates {target}'s default {pname}"


@pytest.mark.parametrize("iterations,eval_every,validations", [(10, 5, 2), (11, 5, 3), (1, 50, 1), (300, 50, 6)])
def test_top_k_beyond_the_validations_a_run_makes_warns_once(compose_cfg, caplog, iterations, eval_every,
                                                             validations):
    """A run validates every eval_every iterations and after the last (metarun.loop.meta_train): top_k up to
    that many is quiet, one more is one warning line (not an error: the ensemble holds fewer models)."""
    assert config.validations(iterations, eval_every) == validations
    for top_k, warns in ((validations, 0), (validations + 1, 1)):
        caplog.clear()
        cfg = compose_cfg(f"iterations={iterations}", f"eval_every={eval_every}", f"eval.top_k={top_k}")
        with caplog.at_level("WARNING", logger="metarun.config"):
            config.validate(cfg)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == warns, warnings
        if warns:
            assert "\n" not in warnings[0] and f"eval.top_k={top_k}" in warnings[0]
            assert f"validate {validations} time" in warnings[0]


def test_an_option_that_extends_another_has_its_values_and_its_own():
    """conf/backbone/conv4_maxpool.yaml lists conv4 in its defaults and sets pool: what fitting_backbones and the
    declared-once check read is conv4's values with that one changed, not the file's two lines."""
    conv4 = config.option_values("backbone", "conv4")
    assert config.option_values("backbone", "conv4_maxpool") == {**conv4, "pool": "max"}
    assert conv4["pool"] == "stride" and "defaults" not in conv4
