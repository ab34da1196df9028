"""The built-in payload codecs, ``raw`` and ``fp8``, registered like any third-party codec.

The codecs themselves live in the library module :mod:`lmcache_core.codecs`; this plugin only
registers them. It is declared as the ``builtin_codecs`` entry point and always loads, whatever
``LMCACHE_PLUGINS__ALLOW`` / ``DENY`` say: settings default to ``raw``, and every stored object
names its codec.
"""

from lmcache_core.plugin_api import BUILTIN_CODECS, hookimpl


@hookimpl
def lmcache_register_codecs(register) -> None:  # type: ignore[no-untyped-def]
    for codec in BUILTIN_CODECS.values():
        register(codec)
