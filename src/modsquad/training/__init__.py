"""Training with Accelerate: recipes (`recipe`), the data and model a recipe describes (`task_data`), the multi-task
step and its routing statistics (`step`), the loop (`trainer`), checkpoints (`checkpointing`) and trackers
(`tracking`)."""
