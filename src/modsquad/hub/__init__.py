"""Publishing to the Hugging Face Hub: model cards from templates (`model_card`) and pushing a run (`push`)."""
