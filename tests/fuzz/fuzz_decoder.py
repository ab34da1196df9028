"""Coverage-guided fuzzing (atheris / libFuzzer) of the framed-object decoder.

    python tests/fuzz/fuzz_decoder.py CORPUS_DIR -runs=20000 -seed=1

The first input byte picks the reader: odd = with the key secret's MAC key, even = without. The
target fails (libFuzzer reports a crash) when decoding raises anything but ``CorruptEntryError``,
or when it returns other data than was encoded: with the MAC key, anything accepted must be one of
the seed objects' tensors; without it, an object whose header is a seed's header must decode to
that seed's tensor (a payload that matches the header's checksum). Without the secret a fuzzer that
rewrites both checksums is forging, which only the MAC can catch (docs/security.md).

CORPUS_DIR is created and seeded with valid objects (raw and fp8, with and without a MAC).
``tests/unit/test_faults_serde.py`` runs it with a fixed number of runs and seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
import torch

with atheris.instrument_imports(include=["lmcache_core.serde", "lmcache_core.codecs"]):
    from lmcache_core.errors import CorruptEntryError
    from lmcache_core.keys import CacheScope, ChunkHasher, KVLayout
    from lmcache_core.serde import HEADER_SIZE, decode_chunk, derive_mac_key, encode_to_bytes

KEY = ChunkHasher(CacheScope("fuzz", "model", "0" * 16, KVLayout(2, 2, 8, "bfloat16")), chunk_size=4).keys(
    list(range(4)))[0]
MAC_KEY = derive_mac_key("fuzz-secret")
KV = (torch.randn((2, 2, 4, 2, 8), generator=torch.Generator().manual_seed(7)) * 3).bfloat16()
SEEDS = {
    (codec, authenticated): encode_to_bytes(KEY, KV, codec=codec, mac_key=MAC_KEY if authenticated else None)
    for codec in ("raw", "fp8") for authenticated in (False, True)
}
EXPECTED_BY_HEADER = {data[:HEADER_SIZE]: decode_chunk(data, KEY).tensor for data in SEEDS.values()}
EXPECTED_AUTHENTICATED = [EXPECTED_BY_HEADER[data[:HEADER_SIZE]] for (_, auth), data in SEEDS.items() if auth]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    with_secret, obj = bool(data[0] & 1), data[1:]
    try:
        tensor = decode_chunk(obj, KEY, mac_key=MAC_KEY if with_secret else None).tensor
    except CorruptEntryError:
        return
    if with_secret:
        if not any(same_bits(tensor, expected) for expected in EXPECTED_AUTHENTICATED):
            raise AssertionError("an object that is no seed passed the MAC check")
    elif obj[:HEADER_SIZE] in EXPECTED_BY_HEADER and not same_bits(tensor, EXPECTED_BY_HEADER[obj[:HEADER_SIZE]]):
        raise AssertionError("a seed's header decoded into other data")


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for (codec, authenticated), data in SEEDS.items():
        for reader in (0, 1):
            (directory / f"{codec}-mac{int(authenticated)}-reader{reader}").write_bytes(bytes([reader]) + data)


def main() -> None:
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    for directory in corpus:
        write_corpus(Path(directory))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
