"""Recipes: YAML files merged over `defaults.yaml`, `key=value` overrides, and `_component_` nodes.

Why a schema made of a commented YAML file rather than dataclasses: the defaults are the documentation a user
reads, and a recipe is checked against them key by key, so a typo fails with the list of valid keys and a value
of the wrong type fails naming its key, before any model is loaded. A node with a `_component_` key is free
form: its keys are the arguments of the class or function it names, checked against that signature instead.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

COMPONENT_KEY = "_component_"
DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
REWARD_ENTRY_KEYS = {"name": str, "weight": float, "required": bool, "feeds": str, "scorer": dict}
REWARD_ENTRY_DEFAULTS = {"weight": 1.0, "required": True, "feeds": "both"}
FEEDS = ("policy", "decoder", "both")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file, the key and what is wrong."""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load a recipe, merge it over the defaults, apply `key=value` overrides and check every key and type."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        recipe = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and OmegaConf's own parse errors
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(recipe, DictConfig):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    defaults = OmegaConf.load(DEFAULTS_PATH)
    _check_known_keys(defaults, recipe, prefix="", source=str(path))
    cfg = OmegaConf.merge(defaults, recipe)
    _complete_reward_entries(cfg.rewards)
    _unlock_components(cfg)
    for item in overrides:
        _apply_override(cfg, item)
    _unlock_components(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise RecipeError(f"{path}: cannot resolve an interpolation: {err}") from err
    _check_types(defaults, cfg, prefix="", source=str(path))
    _check_reward_entries(cfg.rewards, source=str(path))
    return cfg


def is_component(node: Any) -> bool:
    return isinstance(node, (dict, DictConfig)) and COMPONENT_KEY in node


def instantiate(node: Any, **extra: Any) -> Any:
    """Build a component node (nested components and lists of them included); other values pass through."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, list):
        return [instantiate(item) for item in node]
    if not isinstance(node, dict):
        return node
    if COMPONENT_KEY not in node:
        return {key: instantiate(value) for key, value in node.items()}
    target = import_dotted(node[COMPONENT_KEY])
    kwargs = {key: instantiate(value) for key, value in node.items() if key != COMPONENT_KEY}
    return target(**kwargs, **extra)


def import_dotted(path: str) -> Any:
    """Import `package.module.Name` (the last part an attribute of the module)."""
    module_name, _, attr = str(path).rpartition(".")
    if not module_name:
        raise RecipeError(f"'{path}' is not a dotted path such as package.module.Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(f"cannot import module '{module_name}' for '{path}': {err}") from err
    if not hasattr(module, attr):
        raise RecipeError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')")
    return getattr(module, attr)


def validate_components(node: Any, where: str = "") -> int:
    """Import every component of a config and bind its arguments to the signature, without calling it.

    Returns how many components were checked. Nested components are checked in turn and bound as
    placeholders, so nothing is built and no weight is loaded.
    """
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    checked = 0
    if isinstance(node, list):
        for index, item in enumerate(node):
            checked += validate_components(item, f"{where}.{index}" if where else str(index))
        return checked
    if not isinstance(node, dict):
        return 0
    for key, value in node.items():
        if key != COMPONENT_KEY:
            checked += validate_components(value, f"{where}.{key}" if where else key)
    if COMPONENT_KEY in node:
        target = import_dotted(node[COMPONENT_KEY])
        kwargs = {key: value for key, value in node.items() if key != COMPONENT_KEY}
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as err:
            raise RecipeError(f"'{where}': arguments do not fit {node[COMPONENT_KEY]}: {err}") from err
        checked += 1
    return checked


def _check_known_keys(defaults: DictConfig, recipe: DictConfig, prefix: str, source: str) -> None:
    for key in recipe:
        full = f"{prefix}{key}"
        if key not in defaults:
            valid = ", ".join(sorted(str(k) for k in defaults))
            raise RecipeError(f"{source}: unknown key '{full}'; valid keys here are: {valid}")
        default, value = defaults[key], recipe[key]
        if isinstance(default, DictConfig) and isinstance(value, DictConfig) and not is_component(value):
            _check_known_keys(default, value, f"{full}.", source)


def _unlock_components(cfg: DictConfig) -> None:
    """Component nodes take any argument their target accepts, so struct mode is lifted below them."""
    OmegaConf.set_struct(cfg, True)
    for node in _walk(cfg):
        if is_component(node):
            OmegaConf.set_struct(node, False)


def _walk(node: Any):
    if isinstance(node, DictConfig):
        yield node
        for key in node:
            yield from _walk(node._get_node(key))
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _walk(node._get_node(index))


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override '{item}' is not of the form key=value")
    value = OmegaConf.from_dotlist([f"_={raw}"])["_"]
    try:
        # a new component replaces the old one whole: its arguments are not the old component's
        OmegaConf.update(cfg, key, value, merge=not is_component(value))
    except OmegaConfBaseException as err:
        parent_key, _, _ = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        valid = ", ".join(sorted(str(k) for k in parent)) if isinstance(parent, DictConfig) else "(none)"
        raise RecipeError(f"override '{item}': unknown key '{key}'; valid keys here are: {valid}") from err


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), "a list")


def _fits(default: Any, value: Any) -> bool:
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return isinstance(value, (list, ListConfig))


def _check_types(defaults: DictConfig, cfg: DictConfig, prefix: str, source: str) -> None:
    for key in defaults:
        full = f"{prefix}{key}"
        default, value = defaults[key], cfg[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                raise RecipeError(f"{source}: '{full}' must be a mapping, got {value!r}")
            if not is_component(value):
                _check_types(default, value, f"{full}.", source)
        elif not _fits(default, value):
            raise RecipeError(f"{source}: '{full}' must be {_type_name(default)}, got {value!r}")


def _complete_reward_entries(rewards: Any) -> None:
    """Give each reward entry its default weight and `required` flag, so that an override can set either."""
    if not isinstance(rewards, ListConfig):
        return
    for entry in rewards:
        if isinstance(entry, DictConfig):
            for key in REWARD_ENTRY_DEFAULTS:
                if key not in entry:
                    entry[key] = REWARD_ENTRY_DEFAULTS[key]


def _check_reward_entries(rewards: ListConfig, source: str) -> None:
    if not isinstance(rewards, ListConfig):
        raise RecipeError(f"{source}: 'rewards' must be a list of {{name, weight, required, scorer}}")
    seen: set[str] = set()
    for index, entry in enumerate(rewards):
        where = f"rewards.{index}"
        if not isinstance(entry, DictConfig):
            raise RecipeError(f"{source}: '{where}' must be a mapping with keys {sorted(REWARD_ENTRY_KEYS)}")
        unknown = set(entry) - set(REWARD_ENTRY_KEYS)
        missing = {"name", "scorer"} - set(entry)
        if unknown or missing:
            problem = f"unknown key(s) {sorted(unknown)}" if unknown else f"missing key(s) {sorted(missing)}"
            raise RecipeError(f"{source}: '{where}': {problem}; valid keys are {sorted(REWARD_ENTRY_KEYS)}")
        if not isinstance(entry.name, str) or entry.name in seen:
            raise RecipeError(f"{source}: '{where}.name' must be a unique string, got {entry.name!r}")
        seen.add(entry.name)
        if not is_component(entry.scorer):
            raise RecipeError(f"{source}: '{where}.scorer' must be a node with a {COMPONENT_KEY} key")
        weight = entry.get("weight", REWARD_ENTRY_DEFAULTS["weight"])
        required = entry.get("required", REWARD_ENTRY_DEFAULTS["required"])
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RecipeError(f"{source}: '{where}.weight' must be a number, got {weight!r}")
        if not isinstance(required, bool):
            raise RecipeError(f"{source}: '{where}.required' must be a boolean, got {required!r}")
        feeds = entry.get("feeds", REWARD_ENTRY_DEFAULTS["feeds"])
        if feeds not in FEEDS:
            raise RecipeError(f"{source}: '{where}.feeds' must be one of {list(FEEDS)}, got {feeds!r}")


def reward_specs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The recipe's rewards as plain dicts with defaults filled in (weight 1.0, required true, feeds both)."""
    return [
        {
            "name": entry.name,
            "weight": float(entry.get("weight", REWARD_ENTRY_DEFAULTS["weight"])),
            "required": bool(entry.get("required", REWARD_ENTRY_DEFAULTS["required"])),
            "feeds": str(entry.get("feeds", REWARD_ENTRY_DEFAULTS["feeds"])),
            "scorer": OmegaConf.to_container(entry.scorer, resolve=True),
        }
        for entry in cfg.rewards
    ]
