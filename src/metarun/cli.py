"""The ``metarun`` command: compose the config with Hydra, print it, run, return the objective.

Errors a user can fix (bad values, missing or corrupt data, a bad checkpoint, a non-finite
loss) are printed as one line, ``metarun: error: ...``, with exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metarun import config  # registers the run_schema with Hydra's ConfigStore
from metarun.checkpoint import CheckpointError
from metarun.errors import ConfigError, DatasetError, NonFiniteLossError
from metarun.loop import OutputExistsError, run

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, OutputExistsError)

# conf/ sits at the top of the repository, next to src/ (metarun is installed editable).
CONFIG_DIR = os.environ.get("METARUN_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def user_error(error: BaseException) -> BaseException | None:
    """The user-fixable error behind ``error`` (Hydra wraps errors raised while instantiating)."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def wandb_defaults() -> dict[str, str | None]:
    """W&B group/job_type/name derived from the Hydra job: one group per sweep, one name per job."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = Path(hydra_cfg.sweep.dir)
    return {
        "group": f"sweep-{sweep.parent.name}-{sweep.name}" if multirun else None,
        "job_type": f"{choices.get('algorithm')}-{choices.get('dataset')}",
        "name": hydra_cfg.job.override_dirname or None,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        config.check_references(cfg)  # before printing the resolved config
        if cfg.console:
            print(OmegaConf.to_yaml(cfg, resolve=True))
        return run(cfg, Path(cfg.output_dir or HydraConfig.get().runtime.output_dir), wandb_defaults())
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"metarun: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
