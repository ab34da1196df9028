"""Fixtures the lookup-socket tests share live in lookup_support.py."""

from lookup_support import servers, socket_base  # noqa: F401
