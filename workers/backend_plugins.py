"""Backends as plugins: the entry-point group `potluck.backends` and what each entry names.

Parts:
- `ENTRY_POINT_GROUP`: "potluck.backends". A package registers a backend with
  `[project.entry-points."potluck.backends"] NAME = "module:PLUGIN"`, PLUGIN a `BackendPlugin`.
- `BackendPlugin`: frozen; the backend's `name`, `load(config) -> StageBackend`, `devices() ->
  [device names it can run on here]` (empty: none, e.g. its runtime is not installed),
  `default_device()`, the `weight_formats` and `quantizations` it claims, an optional
  `profile(device, model_dir, seconds, slowdown) -> dict` (the worker's profile), and `priority`
  (higher wins `--backend auto`).
- `BackendNotFound`: an unknown or broken backend name, as one line naming what is installed.
- `discover() -> {name: entry point}`: the installed entry points, plus those the source tree this
  module was imported from declares in its pyproject.toml (a checkout run without being
  installed, or beside an editable install of another checkout, finds its own backends).
- `get_plugin(name)`, `resolve_backend(name)` ("auto": the plugin with devices and the highest
  priority), `installed_backends()` (name -> plugin or the error that loading it raised).
- `claimed_formats(name)`: the weight formats and quantizations a backend claims, as the fields
  a worker's Register carries (the scheduler plans a model only onto workers that claim its format).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "potluck.backends"


class BackendNotFound(LookupError):
    """No installed backend of that name (or it failed to load)."""


@dataclass(frozen=True)
class BackendPlugin:
    name: str
    load: Callable[..., Any]  # StageConfig -> StageBackend
    devices: Callable[[], list[str]]  # devices this backend can run on here, best first
    weight_formats: frozenset[str] = frozenset({"safetensors"})
    quantizations: frozenset[str] = frozenset()  # e.g. {"int8", "int4"}
    profile: Callable[..., Any] | None = None  # (device, model_dir, seconds, slowdown) -> DeviceProfile or its JSON
    priority: int = 0  # `--backend auto` takes the highest priority among those with devices
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def default_device(self) -> str:
        devices = self.devices()
        if not devices:
            raise BackendNotFound(f"backend {self.name!r} sees no device on this machine")
        return devices[0]


@dataclass(frozen=True)
class _EntryPoint:
    """An entry point declared in a source tree's pyproject.toml (same `load()` as metadata's)."""

    name: str
    value: str

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        obj = importlib.import_module(module.strip())
        for part in attribute.strip().split(".") if attribute else ():
            obj = getattr(obj, part)
        return obj


def _source_tree_entry_points() -> dict[str, _EntryPoint]:
    """Backends declared by the pyproject.toml of the tree `workers/` was imported from."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    import tomllib

    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if data.get("project", {}).get("name") != "potluck":
        return {}
    declared = data["project"].get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return {name: _EntryPoint(name, value) for name, value in declared.items()}


def discover() -> dict[str, Any]:
    """name -> entry point (anything with `.load()`), sorted by name. This tree's own declarations
    win over an installed potluck's (the code that runs is this tree's)."""
    found: dict[str, Any] = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    found.update(_source_tree_entry_points())
    return dict(sorted(found.items()))


@cache
def get_plugin(name: str) -> BackendPlugin:
    """The plugin registered as `name`; BackendNotFound (one line) if none, or it fails to load."""
    entry_points = discover()
    entry = entry_points.get(name)
    if entry is None:
        known = ", ".join(entry_points) or "none"
        raise BackendNotFound(f"no backend named {name!r} is installed (installed: {known})")
    try:
        plugin = entry.load()
    except Exception as exc:
        raise BackendNotFound(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}") from None
    if callable(plugin) and not isinstance(plugin, BackendPlugin):
        plugin = plugin()  # a factory
    if not isinstance(plugin, BackendPlugin):
        raise BackendNotFound(f"backend {name!r} is not a potluck BackendPlugin (got {type(plugin).__name__})")
    return plugin


def installed_backends() -> dict[str, BackendPlugin | BackendNotFound]:
    """Every registered backend: its plugin, or the error loading it raised."""
    result: dict[str, BackendPlugin | BackendNotFound] = {}
    for name in discover():
        try:
            result[name] = get_plugin(name)
        except BackendNotFound as exc:
            result[name] = exc
    return result


def resolve_backend(name: str) -> BackendPlugin:
    """`name`'s plugin; "auto": the usable plugin (one with devices) of the highest priority."""
    if name != "auto":
        return get_plugin(name)
    usable = []
    for plugin in installed_backends().values():
        if isinstance(plugin, BackendPlugin):
            try:
                if plugin.devices():
                    usable.append(plugin)
            except Exception as exc:  # a broken runtime is skipped, not fatal, for auto
                print(f"potluck: backend {plugin.name!r} skipped: {exc}", file=sys.stderr)
    if not usable:
        raise BackendNotFound("no installed backend sees a device on this machine")
    return max(usable, key=lambda plugin: (plugin.priority, plugin.name == "torch"))


def describe_backends() -> list[str]:
    """One line per installed backend: name, devices, formats (what `potluck backends` prints)."""
    lines = []
    for name, plugin in installed_backends().items():
        if isinstance(plugin, BackendNotFound):
            lines.append(f"{name:<10} unavailable: {plugin}")
            continue
        try:
            devices = ", ".join(plugin.devices()) or "none"
        except Exception as exc:
            devices = f"error: {exc}"
        formats = ", ".join(sorted(plugin.weight_formats)) or "none"
        quant = ", ".join(sorted(plugin.quantizations)) or "none"
        lines.append(f"{name:<10} devices: {devices}; weights: {formats}; quantization: {quant}")
    return lines


def claimed_formats(name: str) -> dict[str, tuple[str, ...]]:
    """`weight_formats` and `quantizations` of the backend `name`, as Register carries them."""
    plugin = get_plugin(name)
    return {"weight_formats": tuple(sorted(plugin.weight_formats)), "quantizations": tuple(sorted(plugin.quantizations))}
