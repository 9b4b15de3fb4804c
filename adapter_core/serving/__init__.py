"""How replies are served: prompts and users' adapter states -> tokens, many users in one batch.

  decoding       ReplyRequest -> Reply; DecodeBatch, the batch rows join and leave
  scheduler      InferenceLoop, the one thread that owns the engine (replies, compressions)
  sampling       SamplingConfig and how each next token is picked
  lean_decoder   the CPU decode step (lean_step.cpp), on the model file's 4-bit weights (int4.py),
                 with the batch's KV cache (kv_cache.py)
"""
