"""The plugin manager: finds plugins, keeps the name table, and picks a backend by name.

Plugins come from the ``qplug`` entry-point group (loaded lazily, once, each in isolation) or are
registered at run time with :func:`qplug.register_plugin`. First-party backends are ordinary
entry-point plugins: nothing is registered as a side effect of importing qplug.

Entry points are keyed by distribution and name. The same entry point seen twice (an editable and
a regular install of one distribution) loads once; the same name from two distributions loads
both, so a backend name both claim is a conflict naming both distributions (``qplug backends``,
:class:`~qplug.BackendConflictError`), never a silent replacement. A plugin that fails to import,
``SystemExit`` and ``KeyboardInterrupt`` included, is reported as failed and the others still load.

Environment variables:

``QPLUG_DISABLE_PLUGIN_AUTOLOAD=1``
    Do not load entry points; only plugins registered at run time exist.
``QPLUG_DISABLED_PLUGINS=a,b``
    Never import the entry points (or distributions) with these names. Names compare the way
    PEP 503 compares distribution names: case-insensitively, with runs of ``-``, ``_`` and ``.``
    equal (``qplug_gptq`` blocks ``qplug-gptq``).
``QPLUG_TRACE=1``
    Print every hook call and its result to stderr.
"""

from __future__ import annotations

import difflib
import os
import re
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
from qplug.environment import env_flag
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

_HOOK_NAMES = hookspecs.HOOK_NAMES


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
    """A backend record together with the plugin that provided it.

    ``quantizes_modules``: that plugin implements the ``quantize_module`` hook for the backend's
    config class, so quantize-on-load hands it one layer at a time. ``calibrates_blocks``: it
    implements ``calibrate_blocks``, so a calibrating method quantizes a checkpoint from disk one
    decoder block at a time (:func:`qplug.quantize_checkpoint` with ``calibration=``).
    """

    backend: Backend
    plugin: PluginInfo
    quantizes_modules: bool = False
    calibrates_blocks: bool = False


class PluginManager:
    """Discovers and registers qplug plugins, and resolves backend names.

    :param autoload: load the ``qplug`` entry points on first use. ``None`` (the default) reads
        ``QPLUG_DISABLE_PLUGIN_AUTOLOAD``.
    """

    def __init__(self, *, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = not env_flag(ENV_DISABLE_AUTOLOAD)
        self._autoload = autoload
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._loading = False
        self._seen_entry_points: set[tuple[str | None, str]] = set()
        self._lock = threading.RLock()
        self._plugins: dict[str, PluginInfo] = {}
        self._entries: list[BackendEntry] = []
        if env_flag(ENV_TRACE):
            self._pm.add_hookcall_monitoring(_trace_before, _trace_after)

    # -- hooks -------------------------------------------------------------------------------

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hook relay (``pm.hook.replace_modules(...)``); loads entry points first."""
        self.load_entrypoints()
        return self._pm.hook

    # -- loading -----------------------------------------------------------------------------

    def load_entrypoints(self) -> None:
        """Load every ``qplug`` entry point once, each in isolation. Idempotent.

        A plugin whose import re-enters the manager (it calls :func:`qplug.get_config_class`, say)
        sees the plugins loaded so far; loading is not started again.
        """
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                if self._autoload:
                    blocked = _names_in(os.environ.get(ENV_DISABLED_PLUGINS, ""))
                    for ep in _entry_points():
                        self._load_entrypoint(ep, blocked)
                self._loaded = True
            finally:
                self._loading = False

    def _load_entrypoint(self, ep: metadata.EntryPoint, blocked: set[str]) -> None:
        dist = getattr(ep, "dist", None)
        try:
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
        except Exception:  # unreadable metadata: the entry point is still named by its own name
            dist_name = version = None
        key = (pep503_name(dist_name) if dist_name else None, ep.name)
        if key in self._seen_entry_points:
            return  # the same entry point of the same distribution seen twice (editable + regular install)
        self._seen_entry_points.add(key)
        # Another distribution's entry point of the same name is a second plugin under its own key, so
        # a backend name both claim is a reported conflict, never a silent replacement.
        plugin_name = ep.name if not self._name_taken(ep.name) else f"{ep.name}[{dist_name or ep.value}]"
        if pep503_name(ep.name) in blocked or (dist_name and pep503_name(dist_name) in blocked):
            # Blocked before import: a blocked plugin's code never runs.
            self._pm.set_blocked(plugin_name)
            self._plugins[plugin_name] = PluginInfo(ep.name, "blocked", dist_name, version)
            return
        try:
            plugin = ep.load()
            self._register(plugin, plugin_name, dist_name, version, strict=False, label=ep.name)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # A broken plugin is reported; the others keep working. Its import may call sys.exit()
            # or be interrupted: neither may escape `qplug backends` or leave the manager half-loaded.
            self._plugins[plugin_name] = PluginInfo(
                ep.name, "failed", dist_name, version, error=f"{type(exc).__name__}: {exc}"
            )

    def _name_taken(self, name: str) -> bool:
        return name in self._plugins or self._pm.has_plugin(name) or self._pm.is_blocked(name)

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
            if name is None:
                name = self._readable_name(plugin)
            return self._register(plugin, name, dist, version, strict=True)

    def _readable_name(self, plugin: object) -> str:
        """A name for a plugin registered without one: its module, or its class's dotted name."""
        if isinstance(plugin, type(sys)):
            base = plugin.__name__
        elif isinstance(plugin, type):
            base = f"{plugin.__module__}.{plugin.__qualname__}"
        else:
            base = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
        name, n = base, 1
        while self._name_taken(name):
            n += 1
            name = f"{base}#{n}"
        return name

    def unregister(self, plugin: object | None = None, name: str | None = None) -> None:
        """Remove a plugin registered at run time (by object or name) and its backends."""
        with self._lock:
            if name is None:
                name = self._pm.get_name(plugin) if plugin is not None else None
            if name is None or not self._pm.has_plugin(name):
                raise PluginError(f"no plugin {name or plugin!r} is registered")
            self._pm.unregister(name=name)
            info = self._plugins.pop(name, None)
            self._entries = [e for e in self._entries if e.plugin is not info]

    def _register(self, plugin: object, name: str, dist: str | None, version: str | None,
                  *, strict: bool, label: str | None = None) -> str:
        """Register under pluggy name ``name``; ``label`` is the name shown (default: ``name``)."""
        label = label or name
        who = _describe(label, dist, version)
        try:
            registered = self._pm.register(plugin, name)
        except ValueError as exc:  # pluggy: name or object already registered
            raise PluginError(f"cannot register {who}: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{who}: {exc}") from exc
        if registered is None:  # blocked name
            raise PluginError(f"{who} is blocked")
        name = registered
        try:
            self._check_hook_names(plugin, who)
            hooks = tuple(sorted(impl_name for impl_name in _HOOK_NAMES if self._implements(plugin, impl_name)))
            records = self._collect_backends(plugin, who)
            info = PluginInfo(label, "loaded", dist, version, backends=tuple(b.name for b in records), hooks=hooks)
            new_entries = [self._entry(plugin, record, info) for record in records]
            if strict:
                for entry in new_entries:
                    self._raise_on_conflict(entry)
        except BaseException:
            self._pm.unregister(name=name)
            raise
        self._plugins[name] = info
        self._entries.extend(new_entries)
        return name

    def _entry(self, plugin: object, record: Backend, info: PluginInfo) -> BackendEntry:
        """The entry for ``record``; unset ``streams`` becomes whether the plugin has ``quantize_module``."""
        quantizes = self._answers(plugin, "quantize_module", record.config_class)
        if record.streams is None:
            record = attrs.evolve(record, streams=quantizes)
        return BackendEntry(record, info, quantizes, self._answers(plugin, "calibrate_blocks", record.config_class))

    def _answers(self, plugin: object, hook_name: str, config_class: type) -> bool:
        """Whether ``plugin`` answers ``hook_name`` for ``config_class`` (wrappers only watch)."""
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin or impl.wrapper or impl.hookwrapper:
                continue
            owner = getattr(impl.function, "qplug_config_class", None)  # set by qplug.backend_hookimpl
            if owner is None or issubclass(config_class, owner):
                return True
        return False

    def _implements(self, plugin: object, hook_name: str) -> bool:
        caller = getattr(self._pm.hook, hook_name)
        return any(impl.plugin is plugin for impl in caller.get_hookimpls())

    def _check_hook_names(self, plugin: object, who: str) -> None:
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
                    f"{who} implements {hook_name!r}, which is not a qplug hook{hint}; "
                    f"the hooks are: {', '.join(_HOOK_NAMES)}"
                )

    def _collect_backends(self, plugin: object, who: str) -> list[Backend]:
        """The records of ``plugin``'s ``register_backends``; anything wrong is a PluginError naming ``who``."""
        records: list[Backend] = []
        for impl in self._pm.hook.register_backends.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                result = impl.function()
            except PluginError as exc:  # e.g. an invalid qplug.Backend(...) built inside the hook
                raise PluginError(f"{who}: register_backends failed: {exc}") from exc
            except (Exception, SystemExit) as exc:
                raise PluginError(f"{who}: register_backends raised {type(exc).__name__}: {exc}") from exc
            if result is None:
                continue
            if isinstance(result, str | bytes | dict) or not isinstance(result, Iterable):
                raise PluginError(f"{who}: register_backends must return a list of qplug.Backend records, "
                                  f"got {_short(result)}")
            try:
                returned = list(result)
            except Exception as exc:  # a generator that fails half-way
                raise PluginError(f"{who}: register_backends raised {type(exc).__name__}: {exc}") from exc
            for record in returned:
                if not isinstance(record, Backend):
                    raise PluginError(f"{who}: register_backends must return qplug.Backend records, "
                                      f"got {_short(record)}")
                records.append(record)
        seen: dict[str, str] = {}
        for record in records:
            for n in record.names:
                if n in seen:
                    raise PluginError(f"{who} declares the backend name {n!r} twice "
                                      f"(backends {seen[n]!r} and {record.name!r}); each name selects one backend")
                seen[n] = record.name
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
        """The backend whose config class claims a dict that has no ``quant_method`` most specifically.

        Every config class whose :meth:`~qplug.QuantConfig.recognizes` accepts the dict makes a claim,
        weighed by :meth:`~qplug.QuantConfig.claimed_keys`: the number of the dict's keys it knows.
        The claim with the most keys wins, so no config class needs to know another's keys; a tie
        at the top is ambiguous and refused.
        """
        claims: list[tuple[int, Backend]] = []
        for entry in self.backend_entries():
            config_class = entry.backend.config_class
            try:
                if config_class.recognizes(data):
                    claims.append((len(config_class.claimed_keys(data)), entry.backend))
            except Exception:  # a faulty recogniser must not break config loading
                continue
        best = max((weight for weight, _ in claims), default=None)
        top = [backend for weight, backend in claims if weight == best]
        if len(top) == 1:
            return top[0]
        known = ", ".join(self.backend_names()) or "none"
        if top:
            why = f"it could be any of {', '.join(b.name for b in top)} (each knows {best} of its keys)"
        else:
            why = "no backend recognises its keys"
        raise UnknownBackendError(
            f"quantization_config has no 'quant_method' and {why}; set quant_method to one of: {known}",
            available=self.backend_names(),
        )


def _conflict_message(name: str, entries: Iterable[BackendEntry]) -> str:
    providers = " and ".join(f"plugin {e.plugin.name!r} ({e.plugin.provider})" for e in entries)
    return f"backend name {name!r} is provided by {providers}; uninstall or block one (QPLUG_DISABLED_PLUGINS)"


def pep503_name(name: str) -> str:
    """A distribution or entry-point name as PEP 503 compares them: ``Qplug_GPTQ`` → ``qplug-gptq``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _names_in(value: str) -> set[str]:
    return {pep503_name(part) for part in value.split(",") if part.strip()}


def _describe(name: str, dist: str | None, version: str | None) -> str:
    """``plugin 'gptq' (qplug-gptq 0.1.0)``: how messages name a plugin."""
    if dist:
        return f"plugin {name!r} ({dist} {version or ''}".rstrip() + ")"
    return f"plugin {name!r}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
