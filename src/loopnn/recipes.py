"""Configs from files: JSON and TOML values checked against the config fields, the shipped TOML recipes, and
`resolve`, the precedence defaults < preset < TOML file < CLI flags.

    model_cfg, train_cfg = resolve("debug", "cpu/loop-81m", {"n_loops": 3}, {"max_steps": 10})
    cfg = model_config_from_dict(json_values, where="the run's saved config")

`*_from_dict` refuses unknown fields and values of the wrong type, so a foreign JSON cannot smuggle settings in;
train configs saved under an older field name (RENAMED_TRAIN_FIELDS) still load.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from loopnn.config import ModelConfig, TrainConfig, preset
from loopnn.errors import LoopnnError


def _known(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LoopnnError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(sorted(names))}"
        )
    for f in dataclasses.fields(cls):
        if f.name in values:
            values[f.name] = _coerce(f, values[f.name], where)
    return values


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check a JSON/TOML value against the field's annotated type (no eval, no imports)."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    allowed = [kinds[t.strip()] for t in str(f.type).split("|") if t.strip() in kinds]
    optional = "None" in str(f.type)
    if value is None and optional:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1023:
        return float(value)
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value
    raise LoopnnError(f"{where}: field {f.name} must be {f.type}, got {value!r}")


def model_config_from_dict(values: dict[str, Any], where: str = "model config") -> ModelConfig:
    return ModelConfig(**_known(ModelConfig, dict(values), where))


# TrainConfig fields under an earlier name, still read from run directories and TOML files written before the
# rename (same meaning): one name per concept, the loop bounds matching AdaptiveConfig's and the serving API's.
RENAMED_TRAIN_FIELDS = {"loop_min": "min_loops", "loop_max": "max_loops"}


def _renamed(values: dict[str, Any]) -> dict[str, Any]:
    """values with the old field names of RENAMED_TRAIN_FIELDS under their current names. Where both appear (a
    run saved under the old name, resumed with a flag under the new one) the current name wins."""
    values = dict(values)
    for old, new in RENAMED_TRAIN_FIELDS.items():
        if old in values:
            values.setdefault(new, values[old])
            del values[old]
    return values


def train_config_from_dict(values: dict[str, Any], where: str = "train config") -> TrainConfig:
    return TrainConfig(**_known(TrainConfig, _renamed(values), where))


RECIPES = Path(__file__).parent / "configs"  # shipped with the package: paper/*.toml (GPU), cpu/*.toml


def recipe_names() -> list[str]:
    """The shipped recipes by name, e.g. ['cpu/gpt2-124m', ..., 'paper/loop-81m']."""
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.glob("*/*.toml"))


def recipe_path(name: str | Path) -> Path:
    """A --config value as a file: the path itself if it exists, else the shipped recipe of that name
    (`cpu/loop-81m`, `cpu/loop-81m.toml` or the checkout path `configs/cpu/loop-81m.toml`, from any directory)."""
    path = Path(name)
    if path.is_file():
        return path
    rel = path.as_posix().removeprefix("configs/").removeprefix("src/loopnn/configs/")
    for candidate in (RECIPES / rel, RECIPES / f"{rel}.toml"):
        if candidate.is_file() and not path.is_absolute():
            return candidate
    return path


def load_toml(path: str | Path) -> dict[str, Any]:
    path = recipe_path(path)
    if not path.is_file():
        raise LoopnnError(
            f"config file {path} not found; pass a .toml file or a shipped recipe: {', '.join(recipe_names())}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LoopnnError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"preset", "model", "train"})
    if unknown:
        raise LoopnnError(
            f"config file {path}: unknown section(s) {', '.join(map(repr, unknown))}; use preset, [model], [train]"
        )
    for key in ("model", "train"):
        if not isinstance(data.get(key, {}), dict):
            raise LoopnnError(f"config file {path}: {key} must be a [{key}] table, got {data[key]!r}")
    if not isinstance(data.get("preset", ""), str):
        raise LoopnnError(f"config file {path}: preset must be a string, got {data['preset']!r}")
    return data


def resolve(
    preset_name: str | None = None,
    toml_path: str | Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """defaults < preset < TOML < overrides. The TOML's own `preset` key is used if none is given."""
    data = load_toml(toml_path) if toml_path else {}
    name = preset_name or data.get("preset")
    model_values = preset(name) if name else {}
    model_values.update(data.get("model", {}))
    model_values.update({k: v for k, v in (model_overrides or {}).items() if v is not None})
    train_values = _renamed(data.get("train", {}))
    train_values.update({k: v for k, v in (train_overrides or {}).items() if v is not None})
    return model_config_from_dict(model_values), train_config_from_dict(train_values)


__all__ = [
    "RECIPES",
    "RENAMED_TRAIN_FIELDS",
    "load_toml",
    "model_config_from_dict",
    "recipe_names",
    "recipe_path",
    "resolve",
    "train_config_from_dict",
]
