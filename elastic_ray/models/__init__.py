"""Model loading and the bundled demo VLM."""
