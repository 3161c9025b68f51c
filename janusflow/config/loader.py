"""Loading recipes: YAML files (with ``base:`` inheritance), dotted overrides, type conversion and validation.

``load_recipe(name_or_path, overrides)`` reads a recipe, applies overrides such as ``train.log_every=5`` or
``stages.0.max_steps=20`` and builds the typed ``Recipe``; an unknown key, a value of the wrong type or one that
breaks a rule of the schema raises ``ConfigError`` naming its dotted key, before any work starts. A recipe names
its base by a path relative to its own folder or by a shipped recipe's name (``base: janusflow-1.3b-sft``).

    recipe = load_recipe("2to8", ["stages.1.max_steps=50"])
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from janusflow.config.presets import model_preset_dict
from janusflow.config.schema import ConfigError, ModelConfig, Recipe, problems_of

SHIPPED_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is not type(None):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")


def _convert_scalar(value: Any, tp: type, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e308:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    return _convert_scalar(value, tp, key)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys, types and the schema's rules recursively."""
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        data = deep_merge(model_preset_dict(data["preset"], prefix), data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    where = f"{prefix}." if prefix else ""
    if unknown:
        valid = ", ".join(sorted(names))
        raise ConfigError(f"unknown key {where}{unknown[0]} (valid keys for {cls.__name__}: {valid})")
    obj = cls(**{name: _convert(value, hints[name], f"{where}{name}") for name, value in data.items()})
    for name, message in problems_of(obj):
        raise ConfigError(f"{where}{name}: {message}")
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- overrides


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _parent_node(data: dict, parts: list[str], key: str) -> Any:
    """The dict or list that holds the last part of a dotted key (missing mappings are created)."""
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:i])} is {node!r}, not a mapping or a list")
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"override {key}: {'.'.join(parts[:-1])} is {node!r}, not a mapping or a list")
    return node


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict/list."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = _parent_node(data, parts, key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: {raw!r} is not a valid YAML value ({_yaml_problem(e)})") from None
        if isinstance(node, list):
            node[_list_index(node, parts[-1], key)] = value
        else:
            node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------- files


def recipe_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A recipe file: a path (relative to ``relative_to`` when given), else a name looked up in ./recipes and in
    the shipped recipes (``2to8`` -> recipes/2to8.yaml)."""
    p = Path(name_or_path)
    candidates = [relative_to / p] if relative_to is not None else []
    candidates.append(p)
    if p.suffix not in (".yaml", ".yml"):
        candidates += [Path.cwd() / "recipes" / f"{p}.yaml", SHIPPED_RECIPES / f"{p}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and len(candidates) == 1:
        raise ConfigError(f"recipe file {p} does not exist")
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise ConfigError(f"recipe {name_or_path!r} not found (looked for {looked})")
    return found


def load_yaml_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe; a top-level ``base:`` (a file next to it, or a shipped recipe's name) is loaded first and
    deep-merged under it."""
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: its base recipes form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe file or name, got {base!r}")
    if base:
        data = deep_merge(load_yaml_with_base(recipe_path(base, path.parent), (*_seen, path.resolve())), data)
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = recipe_path(name_or_path)
    data = load_yaml_with_base(path)
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)


def model_config(preset: str = "janusflow-1.3b", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset plus keyword overrides (nested dicts merge)."""
    return from_dict(ModelConfig, {"preset": preset, **overrides}, "model")
