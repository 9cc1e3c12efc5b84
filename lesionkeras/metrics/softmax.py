"""Per-image scores of K structures predicted by a (K+1)-way softmax (`--method multiclass`)."""

import keras

from lesionkeras.losses.smile import multiclass_probabilities
from lesionkeras.metrics.per_image import _PACKAGE, PerImageScore
from lesionkeras.metrics.scores import SCORE_NAMES


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftmaxStructureScore(PerImageScore):
    """A per-image score of K structures predicted by a (K+1)-way softmax.

    `y_pred` are the K + 1 logits of `--method multiclass` (channel 0 is
    background); they become K per-structure probabilities with
    `losses.multiclass_probabilities` before scoring, so the scores compare
    directly with those of K sigmoid heads.

    Args:
        score: str. One of `SCORE_NAMES`, e.g. "dice".
        container: int or None. Channel of the enclosing structure.
        threshold, class_id, name, dtype: see `PerImageScore`.

    Example:
        SoftmaxStructureScore("dice", container=0, class_id=1, name="dice_globules")
    """

    def __init__(self, score="dice", container=None, threshold=0.5, class_id=None,
                 name=None, dtype=None):
        if score not in SCORE_NAMES:
            raise ValueError(f"`score` must be one of {SCORE_NAMES}. Received: score={score!r}")
        self.score = score
        self.container = None if container is None else int(container)
        super().__init__(threshold, False, class_id, name or score, dtype)

    def per_image(self, y_true, y_pred):
        return super().per_image(y_true, multiclass_probabilities(y_pred, self.container))

    def get_config(self):
        config = super().get_config()
        config.pop("from_logits", None)
        return {**config, "score": self.score, "container": self.container}
