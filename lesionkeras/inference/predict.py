"""Writing predictions: masks, probability maps, overlays and MC-dropout maps per image."""

from __future__ import annotations

import json

import numpy as np

from lesionkeras import files
from lesionkeras import postprocess as postprocess_lib
from lesionkeras.inference.evaluate import _post_summary, _read_batches
from lesionkeras.inference.predictor import mc_dropout_predictor, mc_probabilities
from lesionkeras.inference.report import overlay


def predict(predictor, df, out_dir, *, probabilities=False, overlays=False, batch_size=8,
            progress=None, postprocess=(), post_cfg=None, mc_samples=0):
    """Writes `<id>_mask.png` (0/255, original size) and optional maps and overlays.

    With `postprocess` steps the masks (and overlays) are post-processed, the
    probability maps stay the model's, and `postprocess.json` records the
    steps and their parameters.

    With `mc_samples >= 2` (Monte-Carlo dropout, Gal & Ghahramani 2016) the
    masks come from the mean of that many dropout draws, and `<stem>_mean.png`
    (mean probability x 255) and `<stem>_std.png` (standard deviation x 510:
    the std of values in [0, 1] is at most 0.5) are written too.

    Every file is written whole or not at all (`files.save_image`), after
    `out_dir` is checked (`files.check_output`).

    A K-structure model (`smile`, `multiclass`) writes one mask per structure
    instead: `<id>_<structure>.png` (e.g. `ISIC_0000000_globules.png`), and
    with the options `<id>_<structure>_prob.png` and `<id>_<structure>_overlay.png`.
    """
    out_dir = files.check_output(out_dir)
    if mc_samples:
        # Checked first: a model without dropout must leave nothing written.
        mc_predictor, mc_layers = mc_dropout_predictor(predictor)
    out_dir.mkdir(parents=True, exist_ok=True)
    if postprocess:
        files.write_text(out_dir / "postprocess.json",
                         json.dumps(_post_summary(postprocess, post_cfg), indent=2) + "\n")
    written = []
    for batch in _read_batches(df, batch_size, with_masks=False):
        images = [img for _, img, _ in batch]
        if mc_samples:
            probs, stds = mc_probabilities(mc_predictor, images, mc_samples, mc_layers)
        else:
            probs, stds = predictor.probabilities(images), [None] * len(images)
        for (idx, img, _), prob, std in zip(batch, probs, stds):
            name = df["id"].iloc[idx]
            post_masks = (
                postprocess_lib.apply(postprocess, np.asarray(img), prob, predictor.threshold,
                                      post_cfg)[1] if postprocess else None
            )
            structures = tuple(getattr(predictor, "structures", ()))
            stems = [f"{name}_{s}" for s in structures] if len(structures) > 1 else [name]
            for k, stem in enumerate(stems):
                p = prob[..., k]
                mask = p >= predictor.threshold if post_masks is None else post_masks[..., k]
                suffix = "" if len(stems) > 1 else "_mask"
                files.save_image((mask * 255).astype(np.uint8), out_dir / f"{stem}{suffix}.png")
                if probabilities:
                    files.save_image(np.round(p * 255).astype(np.uint8), out_dir / f"{stem}_prob.png")
                if overlays:
                    files.save_image(overlay(img.numpy(), mask), out_dir / f"{stem}_overlay.png")
                if std is not None:
                    files.save_image(np.round(p * 255).astype(np.uint8), out_dir / f"{stem}_mean.png")
                    files.save_image(np.round(np.clip(std[..., k] * 510, 0, 255)).astype(np.uint8),
                                     out_dir / f"{stem}_std.png")
            written.append(name)
        if progress:
            progress(len(batch))
    return written
