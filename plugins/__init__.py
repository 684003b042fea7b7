"""nextoken's built-in plugins, registered through the same hooks as a third party's:

- ``hf_tokenizer``: the Hugging Face ``tokenizers`` tokenizer (``hf``);
- ``sampling``: strategies ``greedy`` and ``sample``; processors ``repetition_penalty``,
  ``temperature``, ``top_k``, ``top_p``, ``min_p``;
- ``stopping``: stop conditions ``eos``, ``stop_token_ids``, ``stop_strings``, ``max_new_tokens``,
  ``deadline``;
- ``costs``: cost meters ``per_token`` and ``device_hour``.
"""
