"""ByteLRU: the one prefix-aware LRU-by-bytes index the cpu, disk and example tiers share."""

from __future__ import annotations

import threading

from lmcache_core.plugin_api import ByteLRU


def drain(lru: ByteLRU[str, object]) -> list[str]:
    victims = []
    while (victim := lru.pop_victim()) is not None:
        victims.append(victim[0])
    return victims


def test_a_touched_batch_keeps_its_first_key_most_recent() -> None:
    lru: ByteLRU[str, object] = ByteLRU()
    for name in ("c", "b", "a", "x"):  # a batch a, b, c written last first, then another entry
        lru.add(name, None, 1)
    assert lru.touch(["a", "b", "c", "missing"]) == 3
    assert drain(lru) == ["x", "c", "b", "a"]  # the tail goes before the head


def test_get_many_returns_values_and_touches_only_what_it_found() -> None:
    lru: ByteLRU[str, str] = ByteLRU()
    lru.add("a", "A", 1)
    lru.add("b", "B", 1)
    lru.add("c", "C", 1)
    assert lru.get_many(["a", "missing", "b"]) == ["A", None, "B"]
    assert lru.keys() == ["c", "b", "a"]


def test_sizes_follow_every_change() -> None:
    lru: ByteLRU[str, None] = ByteLRU()
    lru.add("a", None, 10)
    lru.add("b", None, 20)
    lru.add("a", None, 5)  # replaced: counted once, at its new size, now most recent
    assert (lru.nbytes, len(lru), lru.keys()) == (25, 2, ["b", "a"])
    assert lru.remove("b") and not lru.remove("b")
    assert lru.nbytes == 5
    assert lru.pop_victim() == ("a", 5)
    assert (lru.nbytes, len(lru), lru.pop_victim()) == (0, 0, None)


def test_an_adopted_entry_goes_first_and_never_displaces_a_known_one() -> None:
    lru: ByteLRU[str, None] = ByteLRU()
    lru.add("mine", None, 1)
    assert lru.adopt("theirs", None, 3)
    assert not lru.adopt("mine", None, 100)  # known: its recency and size stand
    assert lru.nbytes == 4
    assert lru.pop_victim() == ("theirs", 3)


def test_pop_victim_skips_what_the_tier_cannot_evict() -> None:
    lru: ByteLRU[str, str] = ByteLRU()
    lru.add("held", "in use", 1)
    lru.add("free", "idle", 2)
    assert lru.pop_victim(evictable=lambda value: value != "in use") == ("free", 2)
    assert lru.pop_victim(evictable=lambda value: value != "in use") is None
    assert "held" in lru


def test_prefix_length_stops_at_the_first_gap() -> None:
    lru: ByteLRU[int, None] = ByteLRU()
    for key in (0, 1, 3):
        lru.add(key, None, 1)
    assert lru.prefix_length([0, 1, 2, 3]) == 2


def test_concurrent_writers_and_evictors_keep_the_byte_count_exact() -> None:
    lru: ByteLRU[int, None] = ByteLRU()

    def write(offset: int) -> None:
        for key in range(offset, offset + 2000):
            lru.add(key % 500, None, 1 + key % 7)
            if key % 3 == 0:
                lru.pop_victim()

    threads = [threading.Thread(target=write, args=(offset,)) for offset in (0, 2000, 4000, 6000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = 0
    while (victim := lru.pop_victim()) is not None:
        expected += victim[1]
    assert expected > 0 and lru.nbytes == 0
