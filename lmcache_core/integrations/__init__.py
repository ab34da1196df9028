"""Integrations with serving engines (each imports its engine only when used)."""
