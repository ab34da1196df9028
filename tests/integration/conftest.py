"""Fixtures that start real services (redis-server, moto's S3 server) live in services.py; those
that the vLLM tests share live in vllm_support.py."""

from services import *  # noqa: F403
from vllm_support import model_path, plugin_env  # noqa: F401
