"""A tiny Llama-style model built offline, for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on text every Debian-like
machine already has (license texts), and the weights are deterministic random numbers. The model
talks nonsense, but it is a real ``LlamaForCausalLM`` that vLLM serves with its normal code path,
its KV cache has the real shape, and greedy decoding is deterministic. That is all a KV-cache test
needs: "same greedy tokens with and without the cache" is a strong check even on random weights.

:func:`build_tiny_model` also builds a Mistral whose layers all use a sliding window and a
text-only Gemma 3 that mixes sliding-window and full-attention layers, the same way.

The build is cached: a folder with a matching marker file is returned as is, so a test session or
the demo pays the ~10 s build once per machine. Builds go to a temporary sibling folder that is
renamed into place, so two processes building at once never see half a model.

    python -m lmcache_core.testing.tiny_model ~/.cache/lmcache-core/tiny-llama
    python -m lmcache_core.testing.tiny_model --architecture gemma3 --sliding-window 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = "lmcache-tiny-model.json"
BUILD_VERSION = 2
DEFAULT_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmcache-core" / "tiny-llama"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# A plain chat template so the OpenAI chat endpoint and the demo's multi-turn chat work.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS_LIMIT_BYTES = 6 * 1024 * 1024


def _corpus_files() -> list[Path]:
    """Local text in a deterministic order: license texts first, then the stdlib as a fallback
    (present wherever Python is), so the build also works on minimal containers."""
    files: list[Path] = []
    for pattern_root, pattern in (
        (Path("/usr/share/common-licenses"), "*"),
        (Path("/usr/share/doc"), "*/copyright"),
        (Path(sysconfig.get_paths()["stdlib"]), "*.py"),
    ):
        if pattern_root.is_dir():
            files.extend(sorted(p for p in pattern_root.glob(pattern) if p.is_file() and not p.is_symlink()))
    return files


def _corpus() -> Iterator[str]:
    total = 0
    for path in _corpus_files():
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        total += len(text)
        yield text
        if total >= _CORPUS_LIMIT_BYTES:
            return


def corpus_text(num_chars: int, offset: int = 0) -> str:
    """Deterministic natural-ish text from the same local corpus, for building prompts."""
    parts: list[str] = []
    have = 0
    for text in _corpus():
        parts.append(text)
        have += len(text)
        if have >= offset + num_chars:
            break
    joined = "".join(parts)
    if len(joined) < offset + num_chars:  # tiny corpus: repeat it
        joined = joined * ((offset + num_chars) // max(1, len(joined)) + 1)
    return joined[offset : offset + num_chars]


def _train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Prepend <s> the way Llama tokenizers do, so prompts look like real ones.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _is_complete(path: Path, params: dict) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


ARCHITECTURES = ("llama", "mistral", "gemma3")


def build_tiny_model(
    path: str | os.PathLike[str] | None = None,
    *,
    architecture: str = "llama",
    sliding_window: int | None = None,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    vocab_size: int = 8192,
    max_position_embeddings: int = 16384,
    seed: int = 0,
) -> Path:
    """Build (once) a tiny float32 causal LM with its tokenizer at ``path`` and return the folder.

    ``architecture`` picks how its layers attend (``path`` defaults to a cache folder per choice):

    - ``"llama"``: full attention everywhere (:func:`build_tiny_llama`);
    - ``"mistral"``: every layer attends to the last ``sliding_window`` tokens only;
    - ``"gemma3"``: text-only Gemma 3, a hybrid: sliding-window and full-attention layers alternate.

    KV per token is ``2 * num_layers * num_kv_heads * head_dim * 4`` bytes (4 KiB by default).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if (sliding_window is None) != (architecture == "llama"):
        raise ValueError(f"sliding_window is required for {architecture!r} and refused for 'llama'")
    if path is None:
        name = "tiny-llama" if architecture == "llama" else f"tiny-{architecture}-{sliding_window}"
        path = DEFAULT_PATH.with_name(name)
    path = Path(path).expanduser().resolve()
    params: dict[str, Any] = {
        "build_version": BUILD_VERSION,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }
    if architecture != "llama":  # a Llama build's marker stays as it was: existing builds remain valid
        params.update(architecture=architecture, sliding_window=sliding_window)
    if _is_complete(path, params):
        return path

    import torch
    from transformers import PreTrainedTokenizerFast

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_tokenizer(vocab_size),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            model_max_length=max_position_embeddings,
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)

        common: dict[str, Any] = dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            # With the default 0.02 a random model repeats one token forever, which makes "same
            # greedy tokens with and without the cache" a weak check; 0.1 gives varied, input-
            # dependent continuations with clear top-1 margins.
            initializer_range=0.1,
            torch_dtype="float32",
            # Recorded so that two builds with different seeds (same shapes) have different config
            # digests, hence different cache keys: their KV must never be shared.
            lmcache_tiny_model_seed=seed,
        )
        config, model_class = _config_and_class(architecture, common, sliding_window)
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = model_class(config).to(torch.float32).eval()
        finally:
            torch.random.set_rng_state(generator_state)
        model.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps(params, indent=1, sort_keys=True))
        staging.chmod(0o755)  # mkdtemp makes it private; the model is shared by every user's tests
        for item in staging.iterdir():
            item.chmod(0o644)

        if path.exists():  # an incomplete or outdated build
            shutil.rmtree(path)
        try:
            staging.rename(path)
        except OSError:
            if not _is_complete(path, params):  # lost a race against a builder that failed
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _config_and_class(architecture: str, common: dict[str, Any], sliding_window: int | None) -> tuple[Any, Any]:
    """The transformers config and model class of a tiny ``architecture``."""
    if architecture == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralConfig(**common, sliding_window=sliding_window), MistralForCausalLM
    if architecture == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        head_dim = common["hidden_size"] // common["num_attention_heads"]
        layer_types = ["full_attention" if layer % 2 else "sliding_attention"
                       for layer in range(common["num_hidden_layers"])]
        config = Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=head_dim,
                                  query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                                  layer_types=layer_types)
        return config, Gemma3ForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig(**common), LlamaForCausalLM


def build_tiny_llama(path: str | os.PathLike[str] = DEFAULT_PATH, **shape: Any) -> Path:
    """Build (once) a tiny float32 Llama with its tokenizer at ``path`` and return the folder
    (``shape``: the keyword arguments of :func:`build_tiny_model`, ``seed`` included)."""
    return build_tiny_model(path, architecture="llama", **shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help=f"default: {DEFAULT_PATH} (tiny-ARCHITECTURE-WINDOW beside it)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--sliding-window", type=int, help="required for mistral and gemma3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.path, architecture=args.architecture, sliding_window=args.sliding_window,
                           seed=args.seed))


if __name__ == "__main__":
    main()
