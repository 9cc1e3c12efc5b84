"""Data: folder layouts to manifests, checks, the synthetic dataset, noise and missing labels, the tf.data pipeline."""
