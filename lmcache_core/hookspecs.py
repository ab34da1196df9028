"""The plugin contract: every hook a plugin may implement, typed and documented.

A plugin is any module exposed under the ``lmcache_core`` entry-point group; our own backends in
``plugins/`` are declared there exactly like a third-party package would. Hooks receive a
``register`` callable instead of returning values, so the core owns name collisions, validation
and error attribution. Registering costs no heavy import: a backend is named by ``"module:Class"``
strings and imported only when a tier uses it.

A plugin module may set ``PLUGIN_API_VERSION``; modules written for a newer API than this core's
are refused with a clear message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lmcache_core.registry import BackendRegistrar, CodecRegistrar

PROJECT_NAME = "lmcache_core"
ENTRY_POINT_GROUP = "lmcache_core"
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def lmcache_register_backends(register: BackendRegistrar) -> None:
    """Called once when plugins load; call ``register(name, target, ...)`` for each storage backend.

    ``target`` is ``"module:Class"`` of a :class:`lmcache_core.backend.StorageBackend` subclass,
    ``settings`` is ``"module:Model"`` of a :class:`lmcache_core.backend.BackendSettings` subclass
    (its fields are read from ``LMCACHE_<NAME>__<FIELD>``), ``requires`` lists importable modules the
    backend needs and ``extra`` the pip extra that provides them, ``url_schemes`` the URL schemes of
    ``LMCACHE_REMOTE_URL`` it serves and ``url_setting`` the field such a URL sets, ``medium``
    where it keeps chunks (``host``, ``disk`` or ``remote``: vLLM's hit-source metrics and the order
    of tiers), ``aliases`` more tier names it answers to, ``legacy`` the LMCache variables it maps
    onto its settings (:class:`lmcache_core.registry.LegacyVariable`). Since API version 1; the
    keywords after ``description`` are optional, so a plugin written before them still registers.
    """


@hookspec
def lmcache_register_codecs(register: CodecRegistrar) -> None:
    """Called once when plugins load; call ``register(codec)`` for each payload codec.

    ``codec`` implements :class:`lmcache_core.codecs.Codec`; a name another plugin registered is
    refused. The built-in ``raw`` and ``fp8`` come from the ``builtin_codecs`` plugin, which always
    loads. Since API version 1.
    """
