"""lesionkeras: skin-lesion segmentation from imperfect annotations (Keras 3)."""

__version__ = "0.1.0"
