"""How much of a chat's previous answer still hits after the client sends it back as text.

    python benchmarks/chat_retokenize.py [--samples 200]

lmcache-core saves the KV of the tokens vLLM generated (``LMCACHE_SAVE_DECODE_CACHE``), keyed by
their ids. A chat client sends the answer back as text inside the chat template, and the server
tokenizes the whole conversation again: the next turn hits through the answer only as far as the
new ids equal the generated ones. This measures that, with the tiny model's byte-level BPE tokenizer
and chat template, for two kinds of answers:

- ``text``: answers that are natural text (slices of the license corpus the tokenizer was trained
  on), generated as the tokenizer would encode them (a trained model mostly emits such ids);
- ``random ids``: answers of random token ids (what a model with random weights emits), whose
  decoded text the tokenizer may split differently.

Reported: the share of turns whose turn-2 ids start with turn 1's prompt + answer ids, and the
share of those tokens that the next turn shares as a prefix (what chunk hits can cover).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from lmcache_core.testing.tiny_model import CHAT_TEMPLATE, build_tiny_llama, corpus_text


def render(messages: list[dict[str, str]], bos: str) -> str:
    """The tiny model's chat template (see CHAT_TEMPLATE), with the generation prompt."""
    text = bos + "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n"


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def measure(tokenizer: Any, answers: list[list[int]], bos: str, rng: random.Random) -> tuple[float, float]:
    exact = shared = total = 0
    for answer_ids in answers:
        user, follow_up = corpus_text(300, rng.randrange(100_000)), corpus_text(200, rng.randrange(100_000))
        turn_1 = tokenizer.encode(render([{"role": "user", "content": user}], bos), add_special_tokens=False).ids
        answer_text = tokenizer.decode(answer_ids)
        turn_2 = tokenizer.encode(render([{"role": "user", "content": user},
                                          {"role": "assistant", "content": answer_text},
                                          {"role": "user", "content": follow_up}], bos), add_special_tokens=False).ids
        expected = turn_1 + answer_ids
        exact += turn_2[: len(expected)] == expected
        shared += common_prefix(turn_2, expected)
        total += len(expected)
    return exact / len(answers), shared / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--answer-tokens", type=int, default=100)
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    model = build_tiny_llama()
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert "<|" in CHAT_TEMPLATE  # the template render() mirrors
    bos = "<s>"
    rng = random.Random(0)
    text_answers = [tokenizer.encode(corpus_text(2000, rng.randrange(100_000)), add_special_tokens=False)
                    .ids[: args.answer_tokens] for _ in range(args.samples)]
    vocab = tokenizer.get_vocab_size()
    random_answers = [[rng.randrange(3, vocab) for _ in range(args.answer_tokens)] for _ in range(args.samples)]
    print(f"{args.samples} two-turn chats, {args.answer_tokens}-token answers, tiny model's tokenizer and template\n")
    print("| answers | turn 2 starts with turn 1 + answer ids | tokens shared as a prefix |")
    print("|---|---|---|")
    for name, answers in (("text", text_answers), ("random ids", random_answers)):
        exact, shared = measure(tokenizer, answers, bos, rng)
        print(f"| {name} | {exact:.0%} | {shared:.1%} |")


if __name__ == "__main__":
    main()
