"""Config plumbing shared by the entry points (train.py, sample.py, `python -m vsa.eval.samples`).

- `ConfigError`: a bad configuration value; Hydra prints its message alone (no traceback).
- `config_section(name)`: errors raised while building config section `name` become one-line
  ConfigErrors that name the section.
- `check_missing(cfg)`: one ConfigError naming every mandatory value (`???`) left unset.
- `RunStopped`: a run that cannot go on (a non-finite loss, a dead data-loader worker); its
  message says what happened and which checkpoint holds what was saved, printed alone.
"""

from __future__ import annotations

import contextlib

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf

_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError,
                AttributeError)


class ConfigError(CompactHydraException, ValueError):
    """A bad configuration value; Hydra prints its message alone (no traceback)."""


class RunStopped(CompactHydraException, RuntimeError):
    """A run that stopped on a fault; Hydra prints its message alone (no traceback)."""


@contextlib.contextmanager
def config_section(name: str):
    """Turn errors raised while building config section `name` into one-line ConfigErrors."""
    try:
        yield
    except ConfigError:
        raise
    except InstantiationException as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, _USER_ERRORS):
            raise
        message = str(cause) if cause is not None else str(exc).splitlines()[0]
        raise ConfigError(f"{name}: {message}") from exc
    except _USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConfigError(f"{name}: {message}") from exc


def check_missing(cfg: DictConfig) -> None:
    """Raise a ConfigError naming every mandatory value (`???`) left unset."""
    def walk(node, prefix: str):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            name = f"{prefix}.{key}" if prefix else str(key)
            if value == "???":
                yield name
            yield from walk(value, name)

    # (OmegaConf.missing_keys would resolve interpolations, and fail on those leading to a `???`.)
    missing = sorted(walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), ""))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"missing mandatory value(s): {', '.join(missing)}; set them on the command "
                          f"line, e.g. `{example}`")
