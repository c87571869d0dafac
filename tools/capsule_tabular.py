#!/usr/bin/env python3
"""Fit and apply a Capsule tabular pipeline spec in Python, with the capsule's arithmetic.

The capsule computes tabular features inside the guest from the `[input.tabular]` part of
its pipeline spec. This module is the training side of the same spec: it fits the
statistics the spec asks for (imputation fills, standardization mean/std, min-max range,
most frequent category) from a CSV file, and `transform` turns records into the exact
feature matrix the capsule computes, so training and serving use the same numbers.

    python3 tools/capsule_tabular.py fit --csv train.csv --spec pipeline.toml -o fitted.json
    python3 tools/capsule_tabular.py transform --spec fitted.json --records records.json

The fitted spec is JSON (a pipeline spec in JSON form is accepted by `capsule build
--pipeline`). Arithmetic, per numeric field, in float64 (scikit-learn's precision):

    missing (absent key, empty CSV cell, null, NaN)  -> fill (mean / median of the
        non-missing training values, or the constant), as sklearn's SimpleImputer
    clip [low, high]                                  -> np.clip
    standard: (x - mean) / std   with mean/std of the imputed, clipped training column and
        std the population standard deviation (ddof=0; 1.0 when 0), as StandardScaler
    min_max:  (x - min) / (max - min)  (range 1.0 when 0), as MinMaxScaler

Categories become one-hot columns in `categories` order, plus an unknown bucket column
unless `unknown = "error"`. Only the standard library and NumPy are needed.
"""

import argparse
import copy
import csv
import json
import math
import sys

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None


def load_spec(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".json"):
        return json.loads(data)
    if tomllib is None:
        sys.exit("reading TOML needs Python 3.11 (tomllib); give the spec as JSON")
    return tomllib.loads(data.decode("utf-8"))


def tabular_inputs(spec):
    return [i for i in spec.get("input", []) if "tabular" in i]


def _missing(v):
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip() == "" or v.strip().lower() == "nan"
    return isinstance(v, float) and math.isnan(v)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(v, name):
    if _missing(v):
        return math.nan
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"field {name!r}: {v!r} is not a number") from None


def fit(spec, rows):
    """Returns a copy of `spec` with every tabular field's statistics fitted on `rows`
    (a list of dicts, e.g. csv.DictReader rows)."""
    fitted = copy.deepcopy(spec)
    for raw in tabular_inputs(fitted):
        for field in raw["tabular"]["fields"]:
            name = field["name"]
            kind = field.get("type", "number")
            impute = field.get("impute", "none")
            if kind == "category":
                if not field.get("categories"):
                    seen = sorted({str(r[name]) for r in rows if not _missing(r.get(name))})
                    field["categories"] = seen
                if impute == "most_frequent":
                    values = [str(r[name]) for r in rows if not _missing(r.get(name))]
                    counts = {}
                    for v in values:
                        counts[v] = counts.get(v, 0) + 1
                    # sklearn's most_frequent: the smallest value among the most frequent.
                    top = max(counts.values())
                    field["fill_category"] = min(v for v, c in counts.items() if c == top)
                continue
            column = np.array([_number(r.get(name), name) for r in rows], dtype=np.float64)
            present = column[~np.isnan(column)]
            if impute == "mean":
                field["fill"] = float(np.mean(present))
            elif impute == "median":
                field["fill"] = float(np.median(present))
            if "fill" in field:
                column = np.where(np.isnan(column), field["fill"], column)
            if field.get("clip"):
                low, high = field["clip"]
                column = np.clip(column, low, high)
            scale = field.get("scale", "none")
            if scale == "standard":
                field["mean"] = float(np.mean(column))
                std = float(np.std(column))
                field["std"] = std if std != 0.0 else 1.0
            elif scale == "min_max":
                field["min"] = float(np.min(column))
                field["max"] = float(np.max(column))
    return fitted


def transform_record(tabular, record):
    """The feature vector of one record (a dict), as the capsule computes it."""
    out = []
    for field in tabular["fields"]:
        name = field["name"]
        v = record.get(name)
        if field.get("type", "number") == "category":
            cats = field["categories"]
            bucket = field.get("unknown", "bucket") == "bucket"
            if _missing(v):
                v = field.get("fill_category")
                if v is None and not bucket:
                    raise ValueError(f"field {name!r}: the value is missing")
            hot = [0.0] * (len(cats) + (1 if bucket else 0))
            if v in cats:
                hot[cats.index(v)] = 1.0
            elif bucket:
                hot[-1] = 1.0
            else:
                raise ValueError(f"field {name!r}: unknown category {v!r}")
            out.extend(hot)
            continue
        if field.get("type") == "boolean" and isinstance(v, bool):
            x = float(v)
        else:
            x = _number(v, name)
        if math.isnan(x):
            if "fill" not in field:
                raise ValueError(f"field {name!r}: the value is missing")
            x = field["fill"]
        if field.get("clip"):
            x = min(max(x, field["clip"][0]), field["clip"][1])
        scale = field.get("scale", "none")
        if scale == "standard":
            x = (x - field["mean"]) / (field["std"] or 1.0)
        elif scale == "min_max":
            rng = field["max"] - field["min"]
            x = (x - field["min"]) / (rng or 1.0)
        out.append(x)
    return out


def transform(spec, records, input_name=None):
    """Feature matrix (float64, [N, F]) of `records` for the spec's tabular input."""
    inputs = tabular_inputs(spec)
    if input_name is not None:
        inputs = [i for i in inputs if i["name"] == input_name]
    if len(inputs) != 1:
        raise ValueError("the spec must have exactly one tabular input (or name it)")
    tabular = inputs[0]["tabular"]
    return np.array([transform_record(tabular, r) for r in records], dtype=np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the spec's statistics on a CSV file")
    f.add_argument("--csv", required=True)
    f.add_argument("--spec", required=True, help="pipeline spec (TOML or JSON)")
    f.add_argument("-o", "--output", required=True, help="fitted spec (JSON)")
    t = sub.add_parser("transform", help="print the feature matrix of JSON records")
    t.add_argument("--spec", required=True)
    t.add_argument("--records", required=True, help="a JSON array of objects")
    args = ap.parse_args()
    if args.cmd == "fit":
        fitted = fit(load_spec(args.spec), read_csv(args.csv))
        with open(args.output, "w", encoding="utf-8") as out:
            json.dump(fitted, out, indent=2)
            out.write("\n")
        print(f"wrote {args.output}")
    else:
        with open(args.records, encoding="utf-8") as f:
            records = json.load(f)
        np.savetxt(sys.stdout, transform(load_spec(args.spec), records), fmt="%.17g")


if __name__ == "__main__":
    main()
