"""Reading an explicit manifest CSV: its columns, paths relative to the CSV, and line-numbered problems."""

import os

import pandas as pd

from lesionkeras.data.classes import DIAGNOSES
from lesionkeras.data.layout_frame import BASE_COLUMNS, _absolute, _first_line, _frame
from lesionkeras.errors import DataError

MANIFEST_NAME = "manifest.csv"

_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


def _manifest_csv(root):
    if os.path.isfile(root):
        return root
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{root}: no {MANIFEST_NAME} in this folder")
    return path


def _path_columns(columns):
    return [c for c in columns if c in ("image", "mask") or str(c).startswith("attr_")]


def _build_from_csv(csv_path):
    base = os.path.dirname(csv_path)
    try:
        header = pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig").columns
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty manifest: no header and no rows") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: cannot read manifest: {_first_line(exc)}") from exc
    if "image" not in header:
        raise DataError(f"{csv_path}: manifest has no 'image' column")

    known = [c for c in header if c in BASE_COLUMNS or c == "diagnosis" or c.startswith("attr_")]
    extras = [c for c in header if c not in known]
    try:
        raw = pd.read_csv(
            csv_path, dtype=str, usecols=known, keep_default_na=False, encoding="utf-8-sig"
        )
        # Extra columns are the user's; let pandas infer their types as usual.
        user = pd.read_csv(csv_path, usecols=extras, encoding="utf-8-sig") if extras else None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: cannot read manifest: {_first_line(exc)}") from exc
    if raw.empty:
        raise DataError(f"{csv_path}: empty manifest: no images listed")

    problems = []

    def bad(row_index, message):
        # +2: one for the header line, one because CSV lines count from 1.
        problems.append((csv_path, f"line {row_index + 2}: {message}"))

    def paths(column):
        if column not in raw:
            return [""] * len(raw)
        return [_absolute(v.strip(), base) for v in raw[column]]

    df = pd.DataFrame({"image": paths("image")})
    for i in df.index[df["image"] == ""]:
        bad(i, "empty 'image' cell")
    given_ids = raw["id"].str.strip() if "id" in raw else pd.Series([""] * len(raw))
    stems = [os.path.splitext(os.path.basename(p))[0] for p in df["image"]]
    df.insert(0, "id", [g or s for g, s in zip(given_ids, stems)])
    df["mask"] = paths("mask")
    df["split"] = raw["split"].str.strip() if "split" in raw else ""
    df["fold"] = [_parse_fold(v, i, bad) for i, v in enumerate(raw.get("fold", [""] * len(raw)))]
    df["clean"] = [_parse_clean(v, i, bad) for i, v in enumerate(raw.get("clean", [""] * len(raw)))]
    if "diagnosis" in raw:
        df["diagnosis"] = [_parse_diagnosis(v, i, bad) for i, v in enumerate(raw["diagnosis"])]
    attr_columns = [c for c in known if c.startswith("attr_")]
    for column in attr_columns:
        df[column] = paths(column)

    seen = {}
    for i, image_id in enumerate(df["id"]):
        if image_id in seen:
            bad(i, f"id {image_id} already used on line {seen[image_id] + 2}")
        else:
            seen[image_id] = i
    if problems:
        path, problem = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {problem}{more}", problems=problems)

    extra = (["diagnosis"] if "diagnosis" in raw else []) + attr_columns
    out = _frame(df.to_dict("records"), extra)
    if user is not None:
        # Re-attach the user's columns by id, since _frame sorted the rows.
        user.index = df["id"]
        out = out.join(user, on="id")
    return out


def _parse_fold(value, i, bad):
    value = value.strip()
    if not value:
        return -1
    try:
        number = float(value)
        if number == int(number):
            return int(number)
    except (ValueError, OverflowError):
        pass
    bad(i, f"fold must be an integer, got {value!r}")
    return -1


def _parse_clean(value, i, bad):
    value = value.strip().lower()
    if not value or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    bad(i, f"clean must be true or false, got {value!r}")
    return True


def _parse_diagnosis(value, i, bad):
    value = value.strip().upper()
    if value and value not in DIAGNOSES:
        bad(i, f"diagnosis must be one of {', '.join(DIAGNOSES)} or empty, got {value!r}")
        return ""
    return value
