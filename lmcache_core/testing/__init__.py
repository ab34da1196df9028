"""Test helpers shipped with lmcache-core: the backend conformance suite and test fixtures."""
