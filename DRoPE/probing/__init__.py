"""Probing the encoder's CLS latents (paper Section 4.3, Tables 3, 4, 6, 7); the script is ``DRoPETrain/probe.py``.

Modules: ``extract`` (scan latents with random protocol draws), ``splits`` (stratified seeded folds),
``probes`` (linear and MLP probes), ``metrics`` (regression / classification metrics), ``crossval`` (features +
labels + splits -> per-fold results), ``finetune`` (last block + head, optional LoRA), ``figures``.
"""
