#!/usr/bin/env python3
"""The DuckDB side of benches/logs.rs: reads every Arrow IPC part of a frames table with pyarrow
and times DuckDB on the same queries. Installs nothing: prints {} when duckdb or pyarrow is
missing (benches/install_references.sh installs them).

    python3 benches/logs_reference.py FRAMES_DIR SQL...
"""
import glob
import json
import os
import sys
import time


def main():
    try:
        import duckdb
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        print("{}")
        return
    d = sys.argv[1]
    t = time.perf_counter()
    tables = []
    for f in sorted(glob.glob(os.path.join(d, "*.arrow"))):
        with pa.memory_map(f) as src:
            tables.append(ipc.open_file(src).read_all())
    frames = pa.concat_tables(tables)  # noqa: F841 (queried by name below)
    load = time.perf_counter() - t
    con = duckdb.connect()
    con.execute("SET threads TO %d" % (os.cpu_count() or 1))
    con.register("frames", frames)
    out = []
    # The first query's (group, count, mean) rows, for the Rust side to compare with its own.
    check = [[str(r[0]), int(r[1]), float(r[2])] for r in con.execute(sys.argv[2]).fetchall()]
    for sql in sys.argv[2:]:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            con.execute(sql).fetchall()
            best = min(best, time.perf_counter() - t)
        out.append(best)
    print(json.dumps({"load_s": load, "queries": out, "rows": frames.num_rows, "check": check, "duckdb": duckdb.__version__, "pyarrow": pa.__version__}))


if __name__ == "__main__":
    main()
