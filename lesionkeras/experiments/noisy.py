"""The noisy-annotation experiments of Mirikharaji, Yan, Hamarneh (MICCAI DART 2019).

`noise_table` is Table 1 (fine-tuning vs pixel-wise meta-reweighting across the
four noise levels, with the fully supervised and the noisy-only baselines);
`clean_size_curve` is Fig. 2 (Dice against the number of clean images for
fine-tuning, per-image reweighting and pixel-wise reweighting). Both train
one ordinary run directory per cell under `out/`, read the validation metrics
of each run's best checkpoint (`metrics.json`), and write `<name>.csv`,
`<name>.md` and `<name>.png` to `out/`.

Every run uses the same data, split (seed), model, optimiser and epochs; only
the method, the noise level and the clean-set size change. A finished cell
(its `metrics.json` exists) is read, not retrained; an interrupted one is
resumed from its backup, so an experiment stopped with Ctrl-C continues where
it stopped when the same command is run again.

Example:
```python
from lesionkeras import config
from lesionkeras.experiments import noisy as experiments

cfg = config.load_config("configs/baseline.toml", {"data.image_size": 96, "train.epochs": 8})
table = experiments.noise_table(cfg, "runs/table1", clean_count=100)
```
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lesionkeras import files
from lesionkeras.data import noise
from lesionkeras.training import run

TABLE_METHODS = ("finetune", "meta")
CURVE_METHODS = ("finetune", "image-reweight", "meta")


def run_cell(cfg, run_dir: Path, log):
    """Trains (or resumes, or reads) one run; returns its `metrics.json` dict."""

    done = run_dir / "metrics.json"
    if done.exists():
        log(f"{run_dir}: finished earlier, reading its metrics")
        return json.loads(done.read_text())
    if run_dir.exists() and (run_dir / "config.toml").exists():
        log(f"{run_dir}: resuming")
        result = run.fit(run.load_run_config(run_dir), resume_dir=run_dir, verbose=2, log=log)
    else:
        log(f"{run_dir}: training")
        result = run.fit(cfg.override({"out": str(run_dir)}), verbose=2, log=log)
    return result.metrics


def noise_stage_dice(run_dir, noisy_epochs: int) -> float:
    """Best validation Dice of a finetune run's first stage (noisy masks only)."""
    history = pd.read_csv(Path(run_dir) / "history.csv")
    return float(history["val_dice"].iloc[:noisy_epochs].max())


def noise_table(base_cfg, out, *, levels=noise.LEVELS, clean_count=100, log=print):
    """Table 1: Dice of fine-tuning and meta-reweighting for each noise level.

    Rows: `none (supervised)` (the baseline on the true masks of every
    training image), then one per noise level with the columns `noisy` (the
    model trained on the noisy masks alone: the first stage of the finetune
    run, its best validation Dice over those `train.epochs` epochs), `finetune`
    (after its clean stage) and `meta`.

    Args:
        base_cfg: `Config`. Data, model, optimiser and epochs shared by every run;
            `meta.finetune_epochs` sets the clean stage of fine-tuning.
        out: str or Path. Folder of the run directories and the table files.
        levels: sequence of `noise.LEVELS` entries. Defaults to all four.
        clean_count: int. Clean training images. Defaults to 100 (the paper's).
        log: callable. Progress lines.

    Returns:
        pandas.DataFrame with columns `noise, noisy, finetune, meta`: validation
        Dice. The first row, `none (supervised)`, fills only `noisy`'s place,
        under the name `supervised`.
    """
    out = Path(out)
    sup = base_cfg.override({"method": "baseline", "meta.simulate_noise": ""})
    rows = [{"noise": "none (supervised)",
             "supervised": run_cell(sup, out / "supervised", log)["dice"]}]
    for level in levels:
        row = {"noise": level}
        for method in TABLE_METHODS:
            cfg = base_cfg.override({
                "method": method, "meta.simulate_noise": level, "meta.clean_count": clean_count,
            })
            row[method] = run_cell(cfg, out / level / method, log)["dice"]
        row["noisy"] = noise_stage_dice(out / level / "finetune", base_cfg.train.epochs)
        rows.append(row)
        _write_frame(_table_frame(rows), out, "noise_table", _plot_table)  # partial results on disk
    return _table_frame(rows)


def _table_frame(rows):
    return pd.DataFrame(rows, columns=["noise", "supervised", "noisy", "finetune", "meta"])


def clean_size_curve(base_cfg, out, *, sizes=(10, 25, 50, 100), level="3-vertex",
                     methods=CURVE_METHODS, log=print):
    """Fig. 2: Dice against the number of clean training images.

    Args:
        base_cfg: `Config` shared by every run.
        out: str or Path. Folder of the run directories and the curve files.
        sizes: sequence of int. Clean-set sizes.
        level: str. Noise of the other training images. Defaults to `3-vertex`.
        methods: sequence of str. Defaults to finetune, image-reweight, meta.
        log: callable.

    Returns:
        pandas.DataFrame with columns `clean` and one per method (validation Dice).
    """
    out = Path(out)
    rows = []
    for size in sizes:
        row = {"clean": int(size)}
        for method in methods:
            cfg = base_cfg.override({
                "method": method, "meta.simulate_noise": level, "meta.clean_count": int(size),
            })
            row[method] = run_cell(cfg, out / f"clean{size}" / method, log)["dice"]
        rows.append(row)
        _write_frame(pd.DataFrame(rows), out, "clean_size_curve", _plot_curve)
    return pd.DataFrame(rows)


def _markdown(df) -> str:
    """The table as markdown; float columns (Dice) in percent with one decimal."""
    cols = list(df.columns)
    cells = {}
    for c in cols:
        if pd.api.types.is_float_dtype(df[c]):
            cells[c] = ["" if pd.isna(v) else f"{100 * v:.1f}" for v in df[c]]
        else:
            cells[c] = [str(v) for v in df[c]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells[c][i] for c in cols) + " |" for i in range(len(df))]
    return "\n".join(lines) + "\n\nValidation Dice (%) of each run's best checkpoint.\n"


def write_table(out: Path, name: str, df, markdown: str, plot):
    """Writes `out/name.csv`, `.md` and `.png` (drawn by `plot(df, path)`), each atomically.

    A table is rewritten after each row: a reader, or a kill, never meets a
    half-written file.
    """
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / f"{name}.csv", df.to_csv(index=False, float_format="%.4f"))
    files.write_text(out / f"{name}.md", markdown)
    with files.atomic_path(out / f"{name}.png") as tmp:  # keeps the suffix: PNG
        plot(df, tmp)


def _write_frame(df, out: Path, name: str, plot):
    write_table(out, name, df, _markdown(df), plot)


def _plot_table(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = df[df["noise"] != "none (supervised)"]
    methods = ("noisy", *TABLE_METHODS)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, 100 * levels[m].astype(float), width, label=m)
    sup = df["supervised"].dropna()
    if len(sup):
        ax.axhline(100 * float(sup.iloc[0]), color="k", ls="--", label="supervised")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], list(levels["noise"]))
    ax.set_ylabel("validation Dice (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curve(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in [c for c in df.columns if c != "clean"]:
        ax.plot(df["clean"], 100 * df[m].astype(float), marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("clean training images")
    ax.set_ylabel("validation Dice (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
