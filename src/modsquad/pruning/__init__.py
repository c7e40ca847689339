"""Splitting a multi-task model into per-task models: expert usage (`usage`), `prune_for_task` (`prune`), pruning a
whole run (`run`) and usage heat-maps (`heatmap`)."""
