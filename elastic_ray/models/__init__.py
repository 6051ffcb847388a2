"""Model loading: supported families, prompts, random test models and the demo models by name."""
