"""Adapting models: PEFT LoRA helpers (`lora`), growing a trained model by a task (`continual`) and sparse upcycling
of a dense ViT / DeiT / DINOv2 checkpoint (`upcycling`)."""
