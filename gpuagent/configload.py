"""Load a YAML config file into a pydantic model, with errors people can act on.

Every problem becomes one line naming the key path (``runtime.docker.cpu_reserve``)
and what is wrong with it. Callers print the lines and exit with code 2; nothing
here raises a traceback at a user for a bad file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

SECRET_MASK = "********"  # noqa: S105 - the mask itself, not a secret


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the sub-model at ``loc`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        # Optional[Sub] / Sub | None: take the model out of the union.
        args = getattr(current, "__args__", None)
        if args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            current = models[0] if models else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def format_validation_error(model: type[BaseModel], exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            elif allowed:
                hint = f"; allowed keys here: {', '.join(allowed)}"
            problems.append(f"{path}: unknown key{hint}")
            continue
        msg = err["msg"]
        if kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        if kind == "missing":
            msg = "required key is missing"
        got = err.get("input")
        # Our own validators already quote the bad value; pydantic's messages do not.
        quoted = kind.startswith("value_error") or kind == "missing"
        if not quoted and not isinstance(got, dict | list) and got is not None:
            msg = f"{msg} (got {got!r})"
        problems.append(f"{path}: {msg}")
    return problems


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except PermissionError:
        raise ConfigError(source, ["permission denied reading the file"]) from None
    except IsADirectoryError:
        raise ConfigError(source, ["is a directory, not a config file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"invalid YAML: {where}{problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, [f"top level must be a mapping of keys, got {type(data).__name__}"]
        )
    return data


def load_config(
    model: type[M],
    path: Path | None,
    env_overrides: Mapping[str, tuple[str, ...]] = {},
    environ: Mapping[str, str] | None = None,
) -> M:
    """Read ``path`` (or start from defaults when None), apply env overrides, validate.

    ``env_overrides`` maps an environment variable to the key path it sets; the
    environment wins over the file so one file can serve a fleet of hosts.
    """
    environ = os.environ if environ is None else environ
    source = str(path) if path is not None else "(built-in defaults)"
    data = read_yaml(path) if path is not None else {}
    applied = []
    for var, key_path in env_overrides.items():
        if var in environ:
            _set_path(data, key_path, environ[var])
            applied.append(var)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(model, exc)
        if applied:
            problems.append(f"(environment overrides applied: {', '.join(applied)})")
        raise ConfigError(source, problems) from None


def masked_dump(config: BaseModel, secret_keys: frozenset[str]) -> dict[str, Any]:
    """The effective config as plain data, with secret-looking values masked."""

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (SECRET_MASK if k in secret_keys and v not in (None, "", {}, []) else mask(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [mask(v) for v in node]
        return node

    result: dict[str, Any] = mask(config.model_dump(mode="json"))
    return result
