"""Resolve `--data` (a folder, a manifest CSV or `synthetic`) into a manifest."""

from __future__ import annotations

from pathlib import Path

from lesionkeras.data import layout, synthetic


def resolve_source(source: str, *, synthetic_count=240, synthetic_size=64, synthetic_seed=0):
    """Returns the folder or CSV behind `source`, generating the synthetic set if needed."""
    if source == "synthetic":
        return synthetic.cached_dataset(synthetic_count, synthetic_size, synthetic_seed)
    return Path(source)


def load_manifest(source: str, *, limit: int = 0, **synthetic_options):
    """Builds the manifest of `source` (see `resolve_source`), cut to `limit` rows."""
    df = layout.build_manifest(resolve_source(source, **synthetic_options))
    if limit:
        df = df.iloc[:limit].reset_index(drop=True)
    return df
