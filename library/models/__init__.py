"""Model loading, conversion, saving and the tiny-model factory."""
