"""ISIC 2018 Tasks 2 and 3 (Xue et al. 2018, sections 2 and 3): attributes and classification.

`--task classify` and `--task attributes` share the run-directory contract of
segmentation but have their own data, models, metrics and outputs; they live
here so the segmentation modules stay untouched.
"""
