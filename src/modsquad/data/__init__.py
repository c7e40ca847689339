"""Datasets to model batches: Hub column schemas per task type (`schemas`), loading datasets (`loading`), rows to
model samples (`adapter`) with consistent augmentations (`transforms`), reproducible task DataLoaders (`batching`),
multi-task mixing (`mixing`) and the synthetic demo benchmark (`demo`)."""

from .adapter import TaskDataAdapter, collate_task_samples
from .batching import build_task_dataloader
from .demo import demo_task_configs, make_demo_datasets, save_demo_datasets
from .loading import load_split, load_task_dataset
from .schemas import SCHEMAS, TaskSchema, parse_columns, task_schema
from .transforms import AugmentConfig

__all__ = [
    "SCHEMAS",
    "AugmentConfig",
    "TaskDataAdapter",
    "TaskSchema",
    "build_task_dataloader",
    "collate_task_samples",
    "demo_task_configs",
    "load_split",
    "load_task_dataset",
    "make_demo_datasets",
    "parse_columns",
    "save_demo_datasets",
    "task_schema",
]
