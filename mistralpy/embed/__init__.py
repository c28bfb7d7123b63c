"""Embeddings and scores: pooling hidden states through the engine's scheduler.

attention.py (cache-free bidirectional attention of encoders), pooling.py (sentence-transformers'
pooling / dense / normalize), st_config.py (reading a folder's sentence-transformers files),
request.py (a Request's PoolingTask), runner.py (the model runner's pooling half), engine.py
(Engine.embed / score: inputs -> Requests -> vectors).
"""
