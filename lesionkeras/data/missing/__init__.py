"""Multi-structure data with missing annotations (SMILE, Petit, Thome et al. 2018).

Every image has K structures (by default the lesion and the five ISIC 2018
Task 2 attributes). For each image and structure the manifest holds the mask
path (`mask` for `lesion`, `attr_<name>` otherwise) and a flag
`annotated_<name>`: was this structure drawn by the annotator of this image?

Annotated / not annotated, when the manifest has no `annotated_<name>` column
(the ISIC 2018 Task 2 rule):
* no mask file (empty path cell)  -> not annotated (unknown);
* an empty mask file               -> annotated, and the structure is absent,
  unless `empty_means_missing=True`, which makes it "not annotated".

A non-annotated structure has an all-zero target, and its SMILE weight map
(`smile_weights`) keeps only the pixels that are known negatives for it: the
pixels annotated as positive for another annotated structure. That rule
assumes the structures exclude one another, as the organs of the paper do.
Dermoscopic attributes do not: they lie inside the lesion and overlap each
other. With `container="lesion"` (`smile.container`, the default for the
lesion + attributes set) the known labels follow the nesting instead:
* lesion not annotated: pixels of an annotated attribute are known lesion
  pixels (target 1, weight 1); everything else is unknown;
* attribute not annotated, lesion annotated: pixels outside the lesion are
  known negatives (weight 1); inside the lesion it is unknown.

`drop_annotations` implements the paper's protocol (remove the annotation of
each structure from a fraction alpha of the images, independently per
structure). Dropped annotations keep their path, so evaluation can use the
full truth; only the flag changes, and `dropped_<name>` records it.

The package holds `labels` (structures, flags, dropping annotations),
`weights` (SMILE weight maps, SMILEr relabelling), `dataset` (tf.data) and
`volumes` (`.npy` volumes sliced into 2D samples); this module re-exports
their public names.

Example:
```python
df = annotate(layout.build_manifest("ISIC2018/"), ("lesion", "globules"))
df = drop_annotations(df, ("lesion", "globules"), alpha=0.5, seed=0)
ds = make_dataset(decoded_dataset(df, ("lesion", "globules"), 64), batch_size=8,
                  mean=(0, 0, 0), std=(1, 1, 1), training=True)
image, masks, weights = next(iter(ds))  # (8, 64, 64, 3), (8, 64, 64, 2), (8, 64, 64, 2)
```
"""

from __future__ import annotations

from lesionkeras.data.missing.dataset import decoded_dataset, make_dataset
from lesionkeras.data.missing.labels import (
    DEFAULT_STRUCTURES, annotate, drop_annotations, flags_array, mask_column, parse_structures,
    write_dropped)
from lesionkeras.data.missing.volumes import (
    drop_annotations_by_volume, is_volume_manifest, slice_volumes, split_by_volume)
from lesionkeras.data.missing.weights import nested_targets_and_weights, relabel, smile_weights

__all__ = [
    "DEFAULT_STRUCTURES", "parse_structures", "mask_column", "annotate", "drop_annotations",
    "flags_array", "smile_weights", "nested_targets_and_weights", "decoded_dataset",
    "make_dataset", "write_dropped", "relabel", "is_volume_manifest", "slice_volumes",
    "split_by_volume", "drop_annotations_by_volume",
]
