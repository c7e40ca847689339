"""The model, shipped next to every checkpoint as remote code: exactly what `save_pretrained` copies. One flat folder
whose modules import only torch, transformers and each other (Transformers copies remote code flat), so a saved folder
loads with `trust_remote_code=True` where the package is not installed."""
