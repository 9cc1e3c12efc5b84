"""Missing labels (SMILE): flags, drop-labels, weight maps, the multi-structure pipeline."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkeras.data import missing
from lesionkeras.errors import ConfigError, DataError

# 4x4 hand cases: structure 0 in the top-left 2x2, structure 1 in the bottom row.
A = np.zeros((4, 4), np.float32)
A[:2, :2] = 1
B = np.zeros((4, 4), np.float32)
B[3, :] = 1


def _weights(masks, flags):
    return missing.smile_weights(np.stack(masks, -1)[None], np.asarray(flags, np.float32)[None])[
        0
    ].numpy()


def test_weights_all_annotated_are_ones():
    w = _weights([A, B], [1, 1])
    assert np.array_equal(w, np.ones((4, 4, 2)))


def test_weights_missing_structure_keeps_other_structures_pixels():
    # Structure 1 not annotated: known negatives for it = pixels of structure 0.
    w = _weights([A, np.zeros_like(B)], [1, 0])
    assert np.array_equal(w[..., 0], np.ones((4, 4)))
    assert np.array_equal(w[..., 1], A)


def test_weights_missing_without_other_structures_are_zero():
    w = _weights([np.zeros_like(A), np.zeros_like(B)], [0, 0])
    assert not w.any()
    # An annotated but empty other structure gives no known negatives either.
    w = _weights([np.zeros_like(A), np.zeros_like(B)], [1, 0])
    assert np.array_equal(w[..., 0], np.ones((4, 4))) and not w[..., 1].any()


def test_weights_ignore_positives_of_non_annotated_structures():
    # Structure 1's mask is not annotated: its pixels are no evidence for structure 2.
    w = _weights([A, B, np.zeros_like(A)], [1, 0, 0])
    assert np.array_equal(w[..., 1], A) and np.array_equal(w[..., 2], A)


def test_weights_batch_vectorised():
    masks = np.stack([np.stack([A, B], -1), np.stack([B, A], -1)])
    flags = np.array([[1, 0], [0, 1]], np.float32)
    w = missing.smile_weights(masks, flags).numpy()
    assert np.array_equal(w[0, ..., 1], A) and np.array_equal(w[1, ..., 0], A)
    assert w.shape == (2, 4, 4, 2)


def _png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def small_manifest(tmp_path):
    rows = []
    for i in range(4):
        img = _png(tmp_path / f"im{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
        lesion = np.zeros((8, 8), np.uint8)
        lesion[2:6, 2:6] = 255
        glob = np.zeros((8, 8), np.uint8)
        if i != 1:
            glob[3:5, 3:5] = 255
        rows.append({
            "id": f"im{i}", "image": img, "mask": _png(tmp_path / f"m{i}.png", lesion),
            # Image 3 has no globules file: not annotated.
            "attr_globules": "" if i == 3 else _png(tmp_path / f"g{i}.png", glob),
            "split": "train",
        })
    return pd.DataFrame(rows)


def test_annotate_isic_rule(small_manifest):
    df = missing.annotate(small_manifest, ("lesion", "globules"))
    assert df["annotated_lesion"].all()
    assert df["annotated_globules"].tolist() == [True, True, True, False]
    # Image 1's globules mask is empty: annotated and absent, unless empty means missing.
    df = missing.annotate(small_manifest, ("lesion", "globules"), empty_means_missing=True)
    assert df["annotated_globules"].tolist() == [True, False, True, False]


def test_annotate_reads_flag_columns_and_reports_bad_ones(small_manifest):
    df = small_manifest.assign(annotated_globules=["1", "false", "yes", "0"])
    out = missing.annotate(df, ("globules",))
    assert out["annotated_globules"].tolist() == [True, False, True, False]
    with pytest.raises(DataError, match="annotated_globules"):
        missing.annotate(df.assign(annotated_globules=["1", "maybe", "1", "0"]), ("globules",))
    with pytest.raises(DataError, match="annotated_globules` is true but"):
        missing.annotate(df.assign(annotated_globules=True), ("globules",))
    with pytest.raises(DataError, match="attr_streaks"):
        missing.annotate(df, ("streaks",))
    with pytest.raises(DataError, match="not found"):
        missing.annotate(df.assign(mask="/nope/x.png"), ("lesion",))


def test_parse_structures():
    assert missing.parse_structures("") == missing.DEFAULT_STRUCTURES
    assert missing.parse_structures(" lesion, globules ") == ("lesion", "globules")
    for bad in ("lesion,lesion", "Lesion"):
        with pytest.raises(ConfigError):
            missing.parse_structures(bad)


def test_drop_annotations_fraction_per_structure_and_seeded():
    n = 40
    df = pd.DataFrame({"id": [str(i) for i in range(n)],
                       "annotated_a": [True] * n, "annotated_b": [True] * 30 + [False] * 10})
    out = missing.drop_annotations(df, ("a", "b"), 0.5, seed=3)
    assert out["dropped_a"].sum() == 20 and out["dropped_b"].sum() == 15
    assert out["annotated_a"].sum() == 20 and out["annotated_b"].sum() == 15
    assert not out.loc[30:, "dropped_b"].any()  # only annotated images lose labels
    again = missing.drop_annotations(df, ("a", "b"), 0.5, seed=3)
    assert again.equals(out)
    other = missing.drop_annotations(df, ("a", "b"), 0.5, seed=4)
    assert not other["dropped_a"].equals(out["dropped_a"])
    # Per structure: a's choice does not depend on b being there.
    alone = missing.drop_annotations(df, ("a",), 0.5, seed=3)
    assert alone["dropped_a"].equals(out["dropped_a"])
    rows = np.arange(n) < 10
    only = missing.drop_annotations(df, ("a",), 1.0, seed=0, rows=rows)
    assert only["dropped_a"].tolist() == rows.tolist()
    with pytest.raises(ConfigError, match="alpha"):
        missing.drop_annotations(df, ("a",), 1.5, seed=0)


def test_pipeline_yields_masks_and_weight_maps(small_manifest):
    names = ("lesion", "globules")
    df = missing.annotate(small_manifest, names)
    dec = missing.decoded_dataset(df, names, 8)
    img, masks, flags = next(iter(dec))
    assert img.shape == (8, 8, 3) and masks.shape == (8, 8, 2) and flags.shape == (2,)
    ds = missing.make_dataset(dec, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1), training=False)
    x, y, w = next(iter(ds))
    assert x.shape == (4, 8, 8, 3) and y.shape == (4, 8, 8, 2) and w.shape == (4, 8, 8, 2)
    y, w = y.numpy(), w.numpy()
    assert y[0, 3, 3, 1] == 1 and not y[3, ..., 1].any()
    # Image 3 has no globules annotation: weight 1 exactly on the lesion pixels.
    assert np.array_equal(w[3, ..., 1], y[3, ..., 0])
    assert np.array_equal(w[:3], np.ones_like(w[:3]))
    ones = missing.make_dataset(
        dec, batch_size=4, mean=(0, 0, 0), std=(1, 1, 1), training=True, with_weights=False,
        crop_size=4,
    )
    _, y2, w2 = next(iter(ones))
    assert y2.shape == (4, 4, 4, 2) and np.all(w2.numpy() == 1)


def test_dropped_masks_are_zero_in_training_targets(small_manifest):
    names = ("lesion", "globules")
    df = missing.annotate(small_manifest, names)
    df.loc[0, "annotated_globules"] = False  # e.g. dropped: the file is kept for evaluation
    _, masks, flags = next(iter(missing.decoded_dataset(df, names, 8)))
    assert flags.numpy().tolist() == [1.0, 0.0] and not masks.numpy()[..., 1].any()


def test_cli_drop_labels_then_fit_smile(tmp_path):
    from click.testing import CliRunner

    from lesionkeras.cli import main
    from lesionkeras.data import layout, synthetic

    src = synthetic.write_isic(tmp_path / "isic", count=12, size=32, seed=0)
    runner = CliRunner()
    args = ["data", "drop-labels", "--alpha", "0.5", "--seed", "1", "--in", str(src)]
    res = runner.invoke(main, args + ["--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "lesion: 6 of 12 annotations removed" in res.output
    df = layout.build_manifest(tmp_path / "d" / "manifest.csv")
    assert df["dropped_globules"].sum() == 6 and (~df["annotated_globules"]).sum() == 6
    assert len((tmp_path / "d" / "dropped.csv").read_text().splitlines()) == 1 + 6 * 6
    again = runner.invoke(main, args + ["--out", str(tmp_path / "d2")])
    assert again.exit_code == 0
    assert (tmp_path / "d2" / "dropped.csv").read_text() == (tmp_path / "d" / "dropped.csv").read_text()
    # A non-empty output folder is bad input: exit 2, one line.
    res = runner.invoke(main, args + ["--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "not empty" in res.output

    res = runner.invoke(main, [
        "fit", "--method", "smile", "--data", str(tmp_path / "d" / "manifest.csv"),
        "--out", str(tmp_path / "run"), "--image-size", "32", "--epochs", "1",
        "--batch-size", "4", "--model", "unet", "--filters", "4", "--depth", "2",
        "--no-progress", "--structures", "lesion,globules,pigment_network",
    ])
    assert res.exit_code == 0, res.output
    assert "per-structure dice: " in res.output and "pigment_network" in res.output
    assert "lesion " in res.output.split("per-structure dice: ")[1]
    res = runner.invoke(main, ["fit", "--method", "smile", "--structures", "lesion,bogus",
                               "--data", str(src), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "attr_bogus" in res.output


def test_nested_rule_for_attributes_inside_the_lesion():
    # Channels: 0 = lesion (container), 1 = globules, 2 = streaks; one 1x4 image.
    lesion = [0, 1, 1, 1]
    glob = [0, 0, 1, 0]
    streaks = [0, 0, 0, 1]
    masks = np.stack([lesion, glob, streaks], -1).astype(np.float32)[None, None]  # (1,1,4,3)

    # Lesion not annotated (target zeroed), both attributes annotated: their
    # pixels are known lesion pixels; the rest of the lesion map is unknown.
    m = masks.copy()
    m[..., 0] = 0
    t, w = missing.nested_targets_and_weights(m, np.array([[0, 1, 1]], np.float32), 0)
    np.testing.assert_array_equal(t.numpy()[0, 0, :, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(w.numpy()[0, 0, :, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(w.numpy()[0, 0, :, 1:], np.ones((4, 2)))

    # Lesion annotated, globules not: outside the lesion globules are known
    # absent; inside, unknown (the paper's rule would call streak pixels negative).
    m = masks.copy()
    m[..., 1] = 0
    t, w = missing.nested_targets_and_weights(m, np.array([[1, 0, 1]], np.float32), 0)
    np.testing.assert_array_equal(t.numpy(), m)
    np.testing.assert_array_equal(w.numpy()[0, 0, :, 1], [1, 0, 0, 0])
    np.testing.assert_array_equal(w.numpy()[0, 0, :, 0], [1, 1, 1, 1])
    paper = missing.smile_weights(m, np.array([[1, 0, 1]], np.float32)).numpy()
    assert paper[0, 0, 3, 1] == 1  # the paper's rule: streak pixel = known non-globule

    # Nothing annotated: nothing is known.
    t, w = missing.nested_targets_and_weights(np.zeros_like(masks), np.zeros((1, 3)), 0)
    assert w.numpy().sum() == 0 and t.numpy().sum() == 0


# --------------------------------------------------------------------------- #
# Volumes
# --------------------------------------------------------------------------- #


def _write_volumes(root, count=3, depth=4, size=32):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for v in range(count):
        img = rng.normal(100.0, 30.0, size=(depth, size, size, 1)).astype("float32")  # CT-like
        liver = np.zeros((depth, size, size), "uint8")
        liver[:, 4:20, 4:20] = 1
        img[liver > 0] += 200
        pancreas = np.zeros((depth, size, size, 1), "uint8")
        pancreas[:, 22:28, 22:28] = 1
        np.save(root / f"v{v}.npy", img)
        np.save(root / f"v{v}_liver.npy", liver)
        np.save(root / f"v{v}_pancreas.npy", pancreas)
        rows.append({"id": f"v{v}", "image": f"v{v}.npy", "attr_liver": f"v{v}_liver.npy",
                     # Volume 2: pancreas not annotated (no file).
                     "attr_pancreas": f"v{v}_pancreas.npy" if v < 2 else ""})
    pd.DataFrame(rows).to_csv(root / "volumes.csv", index=False)
    return root / "volumes.csv"


def test_slice_volumes_share_flags_and_split_per_volume(tmp_path):
    import numpy as np
    from PIL import Image

    from lesionkeras.data import missing

    csv = _write_volumes(tmp_path)
    assert missing.is_volume_manifest(csv)
    df = missing.slice_volumes(csv, ("liver", "pancreas"), tmp_path / "slices")
    assert len(df) == 12 and list(df["id"][:2]) == ["v0_0000", "v0_0001"]
    df = missing.annotate(df, ("liver", "pancreas"))
    assert df.groupby("volume")["annotated_pancreas"].all().to_dict() == {
        "v0": True, "v1": True, "v2": False}
    # Scaled to 0-255 per volume (not per slice), grey replicated to RGB.
    vol = np.stack([np.asarray(Image.open(p)) for p in df["image"][:4]])
    assert vol.shape == (4, 32, 32, 3) and vol.min() == 0 and vol.max() == 255
    assert (vol[..., 0] == vol[..., 2]).all()
    liver = np.asarray(Image.open(df["attr_liver"][5]))
    assert liver[10, 10] == 255 and liver[30, 30] == 0
    split = missing.split_by_volume(df, 0.34, seed=0)
    assert (split.groupby("volume")["split"].nunique() == 1).all()
    assert (split.drop_duplicates("volume")["split"] == "val").sum() == 1
    dropped = missing.drop_annotations_by_volume(df, ("liver",), 0.67, seed=1)
    per_volume = dropped.groupby("volume")["dropped_liver"]
    assert (per_volume.nunique() == 1).all() and per_volume.first().sum() == 2


def test_bad_volume_names_file(tmp_path):
    import numpy as np
    import pytest

    from lesionkeras.data import missing
    from lesionkeras.errors import DataError

    csv = _write_volumes(tmp_path, count=1)
    np.save(tmp_path / "v0_liver.npy", np.zeros((4, 16, 16), "uint8"))
    with pytest.raises(DataError, match="v0_liver.npy: liver mask volume has shape"):
        missing.slice_volumes(csv, ("liver", "pancreas"), tmp_path / "s")


def test_fit_smile_on_volumes(tmp_path):
    import math

    from click.testing import CliRunner

    from lesionkeras.cli import main

    csv = _write_volumes(tmp_path)
    out = CliRunner().invoke(main, [
        "fit", "--method", "smile", "--data", str(csv), "--structures", "liver,pancreas",
        "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--model", "unet",
        "--filters", "8", "--depth", "2", "--val-fraction", "0.34", "--no-progress",
        "--out", str(tmp_path / "run"),
    ])
    assert out.exit_code == 0, out.output
    assert "per-structure dice: liver" in out.output
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in out.output
    import pandas as pd

    ann = pd.read_csv(tmp_path / "run" / "annotations.csv")
    assert len(ann) == 8  # two training volumes of 4 slices
    line = [l for l in out.output.splitlines() if l.startswith("per-structure")][0]
    assert all(math.isfinite(float(p.split()[-1])) for p in line.split(": ")[1].split(", "))
