"""Tables every reader can open: a root written by two models whose frames have different
token counts (16 and 15), read with plain pyarrow, pandas, polars, DuckDB and Ray Data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import RUNS


def _lengths(run_ids, tokens) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for run_id, t in zip(run_ids, tokens, strict=True):
        out.setdefault(run_id, set()).add(len(t))
    return out


EXPECTED = {run_id: {n} for run_id, (_, n) in RUNS.items()}


def test_plain_pyarrow_and_pandas(two_models: Path) -> None:
    table = ds.dataset(two_models / "steps", partitioning="hive").to_table()
    assert table.num_rows == 2 * 4 * (1 + 3)
    assert table.column("image_tokens").null_count == 0  # context steps have tokens too
    assert _lengths(table.column("run_id").to_pylist(),
                    table.column("image_tokens").to_pylist()) == EXPECTED
    frame = table.to_pandas()
    assert {t.dtype for t in frame["image_tokens"]} == {np.dtype(np.uint16)}
    assert frame["image_logprob"].dtype == np.float32
    rollouts = ds.dataset(two_models / "rollouts", partitioning="hive").to_table().to_pandas()
    assert len(rollouts) == 8 and rollouts["mean_logprob"].notna().all()


def test_polars(two_models: Path) -> None:
    pl = pytest.importorskip("polars")
    frame = pl.scan_parquet(str(two_models / "steps" / "**" / "*.parquet"),
                            hive_partitioning=True).collect()
    assert frame.height == 32 and frame.schema["image_tokens"] == pl.List(pl.UInt16)
    lengths = frame.group_by("run_id").agg(pl.col("image_tokens").list.len().unique())
    assert {r: set(v) for r, v in lengths.iter_rows()} == EXPECTED


def test_duckdb(two_models: Path) -> None:
    import duckdb

    rows = duckdb.sql(
        f"SELECT run_id, count(*), min(len(image_tokens)), max(len(image_tokens)) "
        f"FROM read_parquet('{two_models}/steps/**/*.parquet', hive_partitioning = true) "
        "GROUP BY run_id ORDER BY run_id").fetchall()
    assert rows == [("run-tiny", 16, 16, 16), ("run-vit", 16, 15, 15)]


def test_ray_data(two_models: Path, ray_local: None) -> None:
    import ray

    dataset = ray.data.read_parquet(str(two_models / "steps"),
                                    partitioning=ray.data.datasource.Partitioning("hive"))
    assert dataset.count() == 32
    for run_id, (_, n) in RUNS.items():
        one_model = dataset.filter(expr=f"run_id == '{run_id}'").select_columns(
            ["image_tokens", "step", "generated", "image_logprob", "action_bins"])
        batch = next(iter(one_model.iter_torch_batches(batch_size=16)))
        assert tuple(batch["image_tokens"].shape) == (16, n)
        assert tuple(batch["action_bins"].shape) == (16, 16)
