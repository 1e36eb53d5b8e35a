"""What kallm's tests, its benchmarks and users' own tests share, one module per subject (none needs pytest):

- ``models``: tiny random causal LMs of every supported family (``tiny_model``, ``TINY_CONFIGS``, ``chat_model``)
- ``tokenizers``: tiny character-level chat tokenizers built offline (``make_tiny_tokenizer``, ``chat_tokenizer``)
- ``data``: token ids, conversations, texts and BIG-Bench Hard tasks
- ``compare``: logits, per-block errors, snapshots a refused call must keep, compiled against eager
- ``adapters``: an adapter on KAN layers loads only on a base retrofitted alike
- ``processes``: loading checkpoints in fresh processes, with or without kallm; benchmark scripts as modules
- ``threads``: one intra-op thread for tiny models
- ``reference``: the textbook KAN formulation the fused op is checked against
"""
