"""The plugin manager: finds plugins, keeps the name table, and picks a backend by name.

Plugins come from the ``qplug`` entry-point group (loaded lazily, once, each in isolation) or are
registered at run time with :func:`qplug.register_plugin`. First-party backends are ordinary
entry-point plugins: nothing is registered as a side effect of importing qplug.

Environment variables:

``QPLUG_DISABLE_PLUGIN_AUTOLOAD=1``
    Do not load entry points; only plugins registered at run time exist.
``QPLUG_DISABLED_PLUGINS=a,b``
    Never import the entry points (or distributions) with these names.
``QPLUG_TRACE=1``
    Print every hook call and its result to stderr.
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
from collections.abc import Iterable
from importlib import metadata
from typing import Any, Literal

import attrs
import pluggy

from qplug import hookspecs
from qplug.backend import Backend, normalize_name
from qplug.config import QuantConfig
from qplug.errors import BackendConflictError, PluginError, UnknownBackendError

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendEntry",
    "PluginInfo",
    "PluginManager",
    "get_plugin_manager",
]

ENTRY_POINT_GROUP = "qplug"
ENV_DISABLE_AUTOLOAD = "QPLUG_DISABLE_PLUGIN_AUTOLOAD"
ENV_DISABLED_PLUGINS = "QPLUG_DISABLED_PLUGINS"
ENV_TRACE = "QPLUG_TRACE"

_HOOK_NAMES = ("register_backends", "validate", "replace_modules", "dequantize", "serialize")


@attrs.frozen
class PluginInfo:
    """What became of one plugin: loaded, failed to load, or blocked."""

    name: str
    status: Literal["loaded", "failed", "blocked"]
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    backends: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        """``dist version`` when known, else the plugin name."""
        if self.distribution:
            return f"{self.distribution} {self.version or ''}".strip()
        return self.name


@attrs.frozen
class BackendEntry:
    """A backend record together with the plugin that provided it."""

    backend: Backend
    plugin: PluginInfo


class PluginManager:
    """Discovers and registers qplug plugins, and resolves backend names.

    :param autoload: load the ``qplug`` entry points on first use. ``None`` (the default) reads
        ``QPLUG_DISABLE_PLUGIN_AUTOLOAD``.
    """

    def __init__(self, *, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in {"1", "true", "yes", "on"}
        self._autoload = autoload
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._lock = threading.RLock()
        self._plugins: dict[str, PluginInfo] = {}
        self._entries: list[BackendEntry] = []
        if os.environ.get(ENV_TRACE, "").strip() not in {"", "0"}:
            self._pm.add_hookcall_monitoring(_trace_before, _trace_after)

    # -- hooks -------------------------------------------------------------------------------

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hook relay (``pm.hook.replace_modules(...)``); loads entry points first."""
        self.load_entrypoints()
        return self._pm.hook

    # -- loading -----------------------------------------------------------------------------

    def load_entrypoints(self) -> None:
        """Load every ``qplug`` entry point once, each in isolation. Idempotent."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if not self._autoload:
                return
            blocked = _names_in(os.environ.get(ENV_DISABLED_PLUGINS, ""))
            for ep in _entry_points():
                self._load_entrypoint(ep, blocked)

    def _load_entrypoint(self, ep: metadata.EntryPoint, blocked: set[str]) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        if normalize_name(ep.name) in blocked or (dist_name and normalize_name(dist_name) in blocked):
            # Blocked before import: a blocked plugin's code never runs.
            self._pm.set_blocked(ep.name)
            self._plugins[ep.name] = PluginInfo(ep.name, "blocked", dist_name, version)
            return
        if self._pm.has_plugin(ep.name) or ep.name in self._plugins:
            return  # the same entry point seen twice (e.g. an editable and a regular install)
        try:
            plugin = ep.load()
            self._register(plugin, ep.name, dist_name, version, strict=False)
        except Exception as exc:  # a broken plugin is reported; the others keep working
            self._plugins[ep.name] = PluginInfo(
                ep.name, "failed", dist_name, version, error=f"{type(exc).__name__}: {exc}"
            )

    # -- run-time registration ---------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module at run time; returns its name.

        :raises PluginError: a hook implementation has no matching hook (a misspelling), or a
            registration record is invalid.
        :raises BackendConflictError: one of its backend names or aliases is taken.
        """
        self.load_entrypoints()
        with self._lock:
            dist, version = _distribution_of(plugin)
            return self._register(plugin, name, dist, version, strict=True)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> None:
        """Remove a plugin registered at run time (by object or name) and its backends."""
        with self._lock:
            if name is None:
                name = self._pm.get_name(plugin) if plugin is not None else None
            if name is None or not self._pm.has_plugin(name):
                raise PluginError(f"no plugin {name or plugin!r} is registered")
            self._pm.unregister(name=name)
            self._plugins.pop(name, None)
            self._entries = [e for e in self._entries if e.plugin.name != name]

    def _register(self, plugin: object, name: str | None, dist: str | None, version: str | None,
                  *, strict: bool) -> str:
        try:
            registered = self._pm.register(plugin, name)
        except ValueError as exc:  # pluggy: name or object already registered
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name or plugin!r}: {exc}") from exc
        if registered is None:  # blocked name
            raise PluginError(f"plugin {name!r} is blocked")
        name = registered
        try:
            self._check_hook_names(plugin, name)
            hooks = tuple(sorted(impl_name for impl_name in _HOOK_NAMES if self._implements(plugin, impl_name)))
            records = self._collect_backends(plugin, name)
            info = PluginInfo(name, "loaded", dist, version, backends=tuple(b.name for b in records), hooks=hooks)
            new_entries = [BackendEntry(b, info) for b in records]
            if strict:
                for entry in new_entries:
                    self._raise_on_conflict(entry)
        except BaseException:
            self._pm.unregister(name=name)
            raise
        self._plugins[name] = info
        self._entries.extend(new_entries)
        return name

    def _implements(self, plugin: object, hook_name: str) -> bool:
        caller = getattr(self._pm.hook, hook_name)
        return any(impl.plugin is plugin for impl in caller.get_hookimpls())

    def _check_hook_names(self, plugin: object, name: str) -> None:
        # pluggy accepts marked functions with no matching spec until check_pending(); in qplug a
        # misspelled hook name is an error at registration, naming the closest real hook.
        for hook_name in dir(self._pm.hook):
            if hook_name.startswith("_"):
                continue
            caller = getattr(self._pm.hook, hook_name)
            if caller.spec is not None:
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                close = difflib.get_close_matches(hook_name, _HOOK_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PluginError(
                    f"plugin {name!r} implements {hook_name!r}, which is not a qplug hook{hint}; "
                    f"the hooks are: {', '.join(_HOOK_NAMES)}"
                )

    def _collect_backends(self, plugin: object, name: str) -> list[Backend]:
        records: list[Backend] = []
        for impl in self._pm.hook.register_backends.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            result = impl.function()
            for record in result or ():
                if not isinstance(record, Backend):
                    raise PluginError(
                        f"plugin {name!r}: register_backends must return qplug.Backend records, got {record!r}"
                    )
                records.append(record)
        return records

    def _raise_on_conflict(self, new: BackendEntry) -> None:
        for entry in self._entries:
            shared = set(entry.backend.names) & set(new.backend.names)
            if shared:
                raise BackendConflictError(_conflict_message(sorted(shared)[0], [entry, new]))

    # -- lookup ------------------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen, with its status, sorted by name."""
        self.load_entrypoints()
        return sorted(self._plugins.values(), key=lambda p: p.name)

    def backend_entries(self) -> list[BackendEntry]:
        """Every registered backend with its provider, sorted by name."""
        self.load_entrypoints()
        return sorted(self._entries, key=lambda e: (e.backend.name, e.plugin.name))

    def backend_names(self) -> list[str]:
        """Canonical names of every registered backend, sorted (usable or not)."""
        return sorted({e.backend.name for e in self.backend_entries()})

    def available_backends(self) -> list[str]:
        """Canonical names of the backends that can run here: registered, unambiguous, requirements met."""
        names = []
        for name in self.backend_names():
            try:
                backend = self.get_backend(name)
            except BackendConflictError:
                continue
            if not backend.missing_requirements():
                names.append(name)
        return names

    def get_entry(self, name: str) -> BackendEntry:
        """The backend entry selected by ``name`` or an alias, case-insensitively.

        :raises UnknownBackendError: listing the registered names.
        :raises BackendConflictError: two plugins provide the name, naming both.
        """
        self.load_entrypoints()
        key = normalize_name(name) if isinstance(name, str) else name
        matches = [e for e in self._entries if key in e.backend.names]
        if not matches:
            known = self.backend_names()
            close = difflib.get_close_matches(str(key), [n for e in self._entries for n in e.backend.names], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(known) if known else "none (is a qplug backend distribution installed?)"
            failed = [p for p in self._plugins.values() if p.status == "failed"]
            note = "".join(f" Plugin {p.name!r} ({p.provider}) failed to load: {p.error}." for p in failed)
            raise UnknownBackendError(
                f"no quantization backend named {name!r}.{hint} Registered backends: {listing}.{note}",
                name=str(name), available=known,
            )
        if len(matches) > 1:
            raise BackendConflictError(_conflict_message(str(key), matches))
        return matches[0]

    def get_backend(self, name: str) -> Backend:
        """The :class:`Backend` selected by ``name`` or an alias (see :meth:`get_entry`)."""
        return self.get_entry(name).backend

    def backend_for_config(self, config: QuantConfig) -> Backend:
        """The backend that owns ``config``'s class."""
        if not isinstance(config, QuantConfig):
            raise TypeError(f"expected a qplug.QuantConfig, got {type(config).__name__}")
        backend = self.get_backend(config.quant_method)
        if not isinstance(config, backend.config_class):
            raise PluginError(
                f"config {type(config).__name__} says quant_method {config.quant_method!r}, but that backend "
                f"owns {backend.config_class.__name__}"
            )
        return backend

    def infer_backend(self, data: dict[str, Any]) -> Backend:
        """The one backend whose config class recognises a dict that has no ``quant_method``."""
        claims = []
        for entry in self.backend_entries():
            try:
                if entry.backend.config_class.recognizes(data):
                    claims.append(entry.backend)
            except Exception:  # a faulty recogniser must not break config loading
                continue
        if len(claims) == 1:
            return claims[0]
        known = ", ".join(self.backend_names()) or "none"
        if claims:
            why = f"it could be any of {', '.join(b.name for b in claims)}"
        else:
            why = "no backend recognises its keys"
        raise UnknownBackendError(
            f"quantization_config has no 'quant_method' and {why}; set quant_method to one of: {known}",
            available=self.backend_names(),
        )


def _conflict_message(name: str, entries: Iterable[BackendEntry]) -> str:
    providers = " and ".join(f"plugin {e.plugin.name!r} ({e.plugin.provider})" for e in entries)
    return f"backend name {name!r} is provided by {providers}; uninstall or block one (QPLUG_DISABLED_PLUGINS)"


def _names_in(value: str) -> set[str]:
    return {normalize_name(part) for part in value.split(",") if part.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _distribution_of(plugin: object) -> tuple[str | None, str | None]:
    module = getattr(plugin, "__module__", None) if not hasattr(plugin, "__file__") else plugin.__name__
    top = (module or "").split(".")[0]
    if not top:
        return None, None
    dists = metadata.packages_distributions().get(top) or []
    if not dists:
        return None, None
    try:
        return dists[0], metadata.version(dists[0])
    except metadata.PackageNotFoundError:
        return dists[0], None


def _trace_before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
    shown = {k: type(v).__name__ for k, v in kwargs.items()}
    print(f"qplug trace: {hook_name}({shown}) -> {[impl.plugin_name for impl in hook_impls]}", file=sys.stderr)


def _trace_after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
    exc = outcome.exception
    shown = f"raised {type(exc).__name__}: {exc}" if exc else f"returned {type(outcome.get_result()).__name__}"
    print(f"qplug trace: {hook_name} {shown}", file=sys.stderr)


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use; entry points load lazily)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next use discovers plugins again (for tests)."""
    global _manager
    with _manager_lock:
        _manager = None
