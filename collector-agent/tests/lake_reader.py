"""Reads a Parquet lake the way an engine other than DuckDB would: Apache Arrow's own
Parquet implementation (pyarrow), Hive partitions discovered from the paths, each
table's files unified into one schema (files written before a column existed lack
it). Prints, as JSON, each table's schema as Arrow types it, the Parquet logical types
of its files, and its rows sorted by message_id.

Used by `parquet_lake.rs`; `cargo xtask setup` installs pyarrow (xtask/dbt-requirements.txt).
"""

import datetime
import json
import os
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def plain(v):
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    raise TypeError(repr(v))


def main(root):
    out = {}
    for entry in sorted(os.listdir(root)):
        if not entry.startswith("table="):
            continue
        path = os.path.join(root, entry)
        files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(path)
            for f in fs
            if f.endswith(".parquet")
        )
        schemas = [pq.read_schema(f) for f in files]
        logical = {}
        for f in files:
            meta = pq.ParquetFile(f).metadata
            for i in range(meta.num_columns):
                col = meta.schema.column(i)
                logical.setdefault(col.name, set()).add(
                    f"{col.physical_type}/{col.logical_type}"
                )
        partitioning = ds.partitioning(
            pa.schema([("date", pa.string())]), flavor="hive"
        )
        dataset = ds.dataset(
            path,
            format="parquet",
            partitioning=partitioning,
            schema=pa.unify_schemas(schemas + [pa.schema([("date", pa.string())])]),
        )
        table = dataset.to_table()
        rows = sorted(table.to_pylist(), key=lambda r: r["message_id"])
        out[entry[len("table="):]] = {
            "files": len(files),
            "schema": {f.name: str(f.type) for f in table.schema},
            "logical": {k: sorted(v) for k, v in logical.items()},
            "rows": rows,
        }
    json.dump(out, sys.stdout, default=plain, ensure_ascii=False, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
