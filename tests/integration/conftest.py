"""Fixtures that start real services (redis-server, moto's S3 server) live in services.py."""

from services import *  # noqa: F403
