"""Reversible monkey-patching of SGLang attributes, applied when their module is imported.

SGLang's files are never edited. A :class:`Patch` replaces ``module.attr`` (or
``module.Class.attr``) by a wrapper function (whose ``__wrapped__`` it sets to the original), also
rebinds every ``from module import attr`` copy other modules already hold (as SGLang's own
``HookRegistry`` does), and can be undone.
:class:`PostImportHooks` defers a patch until its module is imported, so that a process that
never imports SGLang's MoE code (detokenizer, tokenizer manager) never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import Any, Callable

__all__ = ["Patch", "PostImportHooks", "post_import_hooks"]


class Patch:
    """One replaced attribute.

    Args:
        module: dotted module name (``"sglang.srt.layers.moe.topk"``).
        attr: ``"name"`` or ``"Class.name"``.
        wrapper: the replacement, a function that calls ``wrapper.__wrapped__`` (the original).
    """

    def __init__(self, module: str, attr: str, wrapper: Callable[..., Any]) -> None:
        self.module, self.attr, self.wrapper = module, attr, wrapper
        self.original: Any = None
        self._rebound: list[tuple[Any, str]] = []
        self.applied = False

    def _owner(self) -> tuple[Any, str]:
        mod = sys.modules[self.module]
        *path, name = self.attr.split(".")
        owner: Any = mod
        for p in path:
            owner = getattr(owner, p)
        return owner, name

    def apply(self) -> None:
        """Replace the attribute (idempotent); its module must be imported."""
        if self.applied:
            return
        owner, name = self._owner()
        raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if raw is None:
            raise AttributeError(f"{self.module}.{self.attr} not found (SGLang version mismatch?)")
        self.original = raw
        self.wrapper.__wrapped__ = raw
        setattr(owner, name, self.wrapper)
        self._rebound = []
        if not isinstance(owner, type) and callable(raw):
            for mod in list(sys.modules.values()):
                if mod is None or mod is owner or not isinstance(mod, types.ModuleType):
                    continue
                try:
                    items = list(vars(mod).items())
                except TypeError:
                    continue
                for k, v in items:
                    if v is raw:
                        setattr(mod, k, self.wrapper)
                        self._rebound.append((mod, k))
        self.applied = True

    def revert(self) -> None:
        """Put the original back everywhere it was replaced."""
        if not self.applied:
            return
        owner, name = self._owner()
        setattr(owner, name, self.original)
        for mod, k in self._rebound:
            if getattr(mod, k, None) is self.wrapper:
                setattr(mod, k, self.original)
        self._rebound = []
        self.applied = False


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader and runs callbacks after the module body executed."""

    def __init__(self, loader: Any, callbacks: list[Callable[[types.ModuleType], None]]) -> None:
        self._loader, self._callbacks = loader, callbacks

    def create_module(self, spec):  # noqa: D401 - loader protocol
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        for cb in list(self._callbacks):
            cb(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PostImportHooks(importlib.abc.MetaPathFinder):
    """Run callbacks right after a named module is first imported (or now, if it already is)."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[types.ModuleType], None]]] = {}
        self._lock = threading.RLock()
        self._busy: set[str] = set()

    def register(self, module: str, callback: Callable[[types.ModuleType], None]) -> None:
        """Call ``callback(module)`` once ``module`` is imported (immediately if it is)."""
        with self._lock:
            if module in sys.modules and getattr(sys.modules[module], "__spec__", None) is not None \
                    and module not in self._busy:
                callback(sys.modules[module])
                return
            self._callbacks.setdefault(module, []).append(callback)
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def clear(self) -> None:
        """Forget every pending callback and leave ``sys.meta_path``."""
        with self._lock:
            self._callbacks.clear()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def find_spec(self, fullname, path, target=None):  # noqa: D401 - finder protocol
        cbs = self._callbacks.get(fullname)
        if not cbs or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
            if spec is None:
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        callbacks = self._callbacks.pop(fullname)
        spec.loader = _HookedLoader(spec.loader, callbacks)
        return spec


#: The process-wide instance.
post_import_hooks = PostImportHooks()
