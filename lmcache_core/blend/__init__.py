"""Reuse of KV at any position (CacheBlend-class): the reference implementation, in plain torch.

Text that repeats anywhere in a prompt (a RAG document in another order, after another system
prompt) has KV that was computed at other positions and without the text now before it. Reusing it
needs two corrections:

- positions: keys carry rotary position encodings; :mod:`.rope` turns a key computed at position
  ``p`` into the key at ``q`` exactly (a rotation by ``q - p``);
- context: a token's KV depends on the tokens before it. :mod:`.blender` recomputes the few tokens
  whose KV deviates most from a fresh computation at an early layer (CacheBlend's selection) and
  every token without cached KV, and keeps the rest. A quality guard measures the deviation of what
  is kept and falls back to full recompute above a threshold.

Model families live in modules of their own, selected by architecture name (:mod:`.families`);
:mod:`.llama` covers Llama, Mistral and Qwen2, which share one structure. Segments and their
position-independent keys are :mod:`.segments`.
"""
