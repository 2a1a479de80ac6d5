"""Integrations with other libraries (each imports its library only when used).

- :mod:`.transformers`: ``register(segment_lengths, dilation_rates)`` makes dilated
  attention an ``attn_implementation`` of Hugging Face ``transformers`` models.
"""
