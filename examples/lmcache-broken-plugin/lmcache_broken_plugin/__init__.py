"""Fails on import, the way a plugin whose dependency is missing does.

lmcache-core must log it under its entry-point name (``broken``), show it as failed in
``lmcache-core info`` and keep every other plugin working; ``LMCACHE_PLUGINS__STRICT=1`` makes the
failure fatal.
"""

raise ImportError("lmcache-broken-plugin fails on purpose: its dependency 'lmcache_not_installed' is missing")
