"""The serving engine: sequences, paged KV blocks, scheduling, the model runner, the LLM API."""
