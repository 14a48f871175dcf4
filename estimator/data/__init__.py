"""Data the estimator ships: the config alias table generated from transformers (scripts/gen_config_aliases.py)."""
