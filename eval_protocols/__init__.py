"""Protocols that judge frozen features: feature extraction, k-NN (FAISS) and linear probing.

Each protocol is a ``python -m eval_protocols.<name>`` command and a set of plain functions
(``knn_classify``, ``extract_features``, ...) that the trainer and the tests call directly.
"""
