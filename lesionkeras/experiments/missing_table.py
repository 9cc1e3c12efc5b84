"""The SMILE experiment table: baseline vs SMILE vs SMILEr at several missing-label rates.

Petit, Thome et al. (2018) compare, at a fraction alpha of removed
annotations (per structure, training images only), the (K+1)-way softmax
baseline (`multiclass`), SMILE and SMILEr by per-structure Dice on images
with the full truth. `missing_table` trains every (method, alpha) pair as an
ordinary `fit` run (`OUT/runs/<method>-a<alpha>/`) and gathers the
validation Dice of each structure (the validation split keeps every label).

Example:
```python
table = missing_table("tables/smile", alphas=(0.0, 0.5, 0.7),
                      overrides={"train.epochs": 10, "data.image_size": 128})
```
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from lesionkeras import config as config_lib
from lesionkeras.data import missing
from lesionkeras.errors import ConfigError
from lesionkeras.experiments.noisy import run_cell, write_table

METHODS = ("multiclass", "smile", "smiler")


def missing_table(out, *, alphas=(0.0, 0.5, 0.7), methods=METHODS, config=None,
                  overrides=None, relabel_rounds=2, log=print):
    """Trains each method at each alpha; writes `missing_table.{csv,md,png}` in `out`.

    Every (method, alpha) cell is an ordinary run directory, so the command can
    be run again after an interruption: finished cells are read, an interrupted
    one resumes. SMILEr warm-starts from the SMILE cell of the same alpha when
    that one is in the table (a copy of it, then `relabel_rounds` rounds), as in
    the paper's Algorithm 1; alone, it trains SMILE first. The table files are
    rewritten after each alpha, so partial results are on disk.

    Args:
        out: str. Output folder.
        alphas: sequence of float in [0, 1]. Fractions of removed annotations.
        methods: sequence of `"multiclass"`, `"smile"`, `"smiler"` (SMILE then
            `relabel_rounds` SMILEr rounds). Defaults to all three.
        config: str or None. TOML config the runs start from. Defaults to None.
        overrides: dict or None. `{"section.key": value}` applied to every run.
        relabel_rounds: int >= 1. SMILEr rounds T. Defaults to 2.
        log: callable. Status lines.

    Returns:
        DataFrame, one row per (method, alpha): `dice_<structure>` and `mean_dice`.

    Raises:
        ConfigError: a bad method or alpha.
    """

    out = Path(out)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"`methods` must be among {', '.join(METHODS)}. Received: {bad[0]!r}")
    if not methods or not alphas:
        raise ConfigError("`methods` and `alphas` must not be empty")
    for a in alphas:
        if not 0.0 <= float(a) <= 1.0:
            raise ConfigError(f"`alphas` must be in [0, 1]. Received: {a}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a folder")
    base = config_lib.load_config(config, overrides or {})
    names = missing.parse_structures(base.smile.structures)
    rows = []
    for alpha in alphas:
        for method in methods:
            run_dir = out / "runs" / f"{method}-a{alpha:g}"
            cfg = base.override({
                "method": "multiclass" if method == "multiclass" else "smile",
                "smile.simulate_missing": float(alpha),
                "smile.relabel_rounds": relabel_rounds if method == "smiler" else 0,
                "out": str(run_dir),
            })
            smile_dir = out / "runs" / f"smile-a{alpha:g}"
            if method == "smiler" and "smile" in methods and not run_dir.exists():
                _warm_start(smile_dir, run_dir, cfg)
            log(f"{method}, alpha {alpha:g}")
            metrics = run_cell(cfg, run_dir, log)
            row = {"method": method, "alpha": float(alpha)}
            row.update({f"dice_{s}": metrics.get(f"dice_{s}", float("nan")) for s in names})
            row["mean_dice"] = metrics.get("dice", float("nan"))
            rows.append(row)
            log(f"{method}, alpha {alpha:g}: mean dice {row['mean_dice']:.4f}")
        _write(pd.DataFrame(rows), names, out)
    return pd.DataFrame(rows)


def _warm_start(smile_dir, run_dir, cfg):
    """Copies the finished SMILE run into `run_dir`; resuming it then runs SMILEr only."""
    if not (smile_dir / "metrics.json").exists():
        return
    tmp = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(smile_dir, tmp)
    # Without metrics.json the cell counts as interrupted: `fit --resume` skips the
    # finished SMILE stage and trains the SMILEr rounds, its remaining stages.
    (tmp / "metrics.json").unlink()
    cfg.save(tmp / "config.toml")
    tmp.rename(run_dir)


def _write(table, names, out):
    write_table(out, "missing_table", table, to_markdown(table, names) + "\n",
                lambda df, path: plot(df, names, path))


def to_markdown(table, names) -> str:
    """One row per (method, alpha), one column per structure plus the mean."""
    head = ["method", "alpha"] + list(names) + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [r["method"], f"{r['alpha']:g}"] + [f"{r[f'dice_{s}']:.3f}" for s in names]
        lines.append("| " + " | ".join(cells + [f"{r['mean_dice']:.3f}"]) + " |")
    return "\n".join(lines)


def plot(table, names, path):
    """Mean and per-structure Dice against alpha, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean_dice"] + [f"dice_{s}" for s in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, col in zip(axes[0], panels):
        for method, part in table.groupby("method", sort=False):
            ax.plot(part["alpha"], part[col], marker="o", label=method)
        ax.set_title(col.replace("dice_", "").replace("mean_", "mean "), fontsize=9)
        ax.set_xlabel("alpha")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("validation Dice")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
