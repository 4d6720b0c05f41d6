"""What the command-line apps share: a user's mistake is one line on stderr, not a traceback."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from hwprune.errors import HwpruneError

log = logging.getLogger("hwprune")

T = TypeVar("T")

# What hwprune raises for bad input (`hwprune.errors`: a wrong value, a plan or data file it cannot
# use, a model it does not handle), a missing file, an output it will not overwrite; a required
# setting left unset (`task=sts` without its paths, `hwprune-apply` without `out=`) or of the wrong
# type. Anything else is a bug of hwprune's or a library's and keeps its traceback.
USER_ERRORS = (HwpruneError, FileNotFoundError, FileExistsError, MissingMandatoryValue, ValidationError)


def one_line_errors(
    *, interrupted: Callable[[], str]
) -> Callable[[Callable[[T], None]], Callable[[T], None]]:
    """Run the app; a user error is logged as one line (exit status 2), Ctrl-C as one line saying
    what was kept (`interrupted()`, exit status 130).

    `HYDRA_FULL_ERROR=1` (Hydra's own switch) shows the traceback instead.
    """

    def wrap(app: Callable[[T], None]) -> Callable[[T], None]:
        @functools.wraps(app)
        def run(cfg: T) -> None:
            try:
                app(cfg)
            except USER_ERRORS as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                log.error("%s", _one_line(err))
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                log.error("interrupted: %s", interrupted())
                raise SystemExit(130) from None

        return run

    return wrap


def _one_line(err: BaseException) -> str:
    if isinstance(err, MissingMandatoryValue):
        key = err.full_key
        return f"{key} is required and not set; pass {key}=<value> on the command line"
    return " ".join(str(err).split())


def check_keys_before_hydra(config_name: str, args: list[str]) -> str | None:
    """The one-line error for a misspelt key among command-line `args`, naming the valid keys.

    Hydra says only that the key is not in the schema. This composes the overrides first (sweeps,
    `+key=` and every other case are left to Hydra) and, for an unknown key, lists the keys its
    node declares.
    """
    import dataclasses

    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from hwprune.search.config import compose, unknown_key

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        compose(config_name, overrides)
    except ConfigCompositionException as err:
        cause = err.__cause__
        schema = getattr(cause, "object_type", None)
        if isinstance(cause, ConfigAttributeError | ConfigKeyError) and dataclasses.is_dataclass(schema):
            assert isinstance(schema, type)
            return unknown_key(str(cause.full_key), schema)
    except Exception:
        pass
    return None


def run_app(config_name: str, main: Callable[[], None]) -> None:
    """Check the command line's keys, then hand over to Hydra's `main`."""
    import sys

    from hwprune.search.config import register_configs

    register_configs()
    problem = check_keys_before_hydra(config_name, sys.argv[1:])
    if problem is not None:
        sys.stderr.write(f"[hwprune][ERROR] - {problem}\n")
        raise SystemExit(2)
    main()


def save_hydra_record(cfg: DictConfig, run_dir: Path) -> None:
    """Write what Hydra writes to `<run>/.hydra` (config.yaml, hydra.yaml, overrides.yaml).

    The search app sets `hydra.output_subdir: null` and calls this once the run's settings are
    accepted, so that a resume refused for other settings leaves the record of the run as it was.
    """
    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")
