"""Pretraining of the D-RoPE masked autoencoder: config, data, schedules, checkpoints, the epoch loop.

The script ``DRoPETrain/train.py`` wires these together; nothing here reads command-line arguments.
"""
