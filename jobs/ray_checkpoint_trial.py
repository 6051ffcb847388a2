"""Ray 2.60's CheckpointConfig (beta) on its own, as the caption job would use it: read_parquet ->
map_batches -> write_parquet over 40 rows with two null ids and one id twice. Run 1 stands for a
run killed part-way (the blocks of rows 20-39 fail and are skipped), run 2 resumes, run 3 resumes
again after the checkpoint folder is lost. Prints what each run left in the output.

    python jobs/ray_checkpoint_trial.py /tmp/ray-checkpoint-trial
    python jobs/ray_checkpoint_trial.py /tmp/ray-checkpoint-trial --no-null-ids
"""

import argparse
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import DataContext
from ray.data.checkpoint import CheckpointConfig

ROWS = 40


def write_input(folder: str, null_ids: bool) -> list:
    ids = [f"r{i:02d}" for i in range(ROWS)]
    if null_ids:
        ids[3] = ids[23] = None
    ids[30] = ids[5]  # r05 twice
    os.makedirs(folder)
    for part in range(4):
        rows = slice(part * 10, (part + 1) * 10)
        pq.write_table(pa.table({"id": pa.array(ids[rows], pa.string()), "x": list(range(ROWS))[rows]}),
                       f"{folder}/{part}.parquet")
    return ids


class Caption:
    """Stands for the caption step; fails on rows 20-39 while `fail` exists."""

    def __init__(self, fail: str):
        self.fail = fail

    def __call__(self, batch: pa.Table) -> dict:
        x = batch["x"].to_pylist()
        if os.path.exists(self.fail) and min(x) >= ROWS // 2:
            raise RuntimeError("killed part-way")
        return {"id": batch["id"], "x": batch["x"], "caption": [f"caption {i}" for i in x]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--no-null-ids", action="store_true")
    args = p.parse_args()
    root = args.folder
    shutil.rmtree(root, ignore_errors=True)
    ids = write_input(f"{root}/in", null_ids=not args.no_null_ids)
    distinct = len({i for i in ids if i is not None})
    fail = f"{root}/fail"
    open(fail, "w").close()
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=128 * 2**20,
             logging_level="ERROR")
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=f"{root}/checkpoint",
                                                 delete_checkpoint_on_success=False)
    for attempt in (1, 2, 3):
        context.max_errored_blocks = -1 if attempt == 1 else 0  # run 1 skips its failed blocks
        if attempt == 3:
            shutil.rmtree(f"{root}/checkpoint")
        try:
            ds = ray.data.read_parquet(f"{root}/in").repartition(target_num_rows_per_block=5)
            ds.map_batches(Caption, fn_constructor_args=(fail,), batch_size=5, batch_format="pyarrow",
                           compute=ray.data.ActorPoolStrategy(size=1)).write_parquet(f"{root}/out")
            print(f"run {attempt}: finished")
        except Exception as e:  # noqa: BLE001 - the trial reports what happened
            print(f"run {attempt}: failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
        if os.path.exists(fail):
            os.remove(fail)
        out = pq.read_table(f"{root}/out").column("id").to_pylist() if os.listdir(f"{root}/out") else []
        print(f"  output: {len(out)} rows for {ROWS} input rows; null ids {out.count(None)}; r05 {out.count('r05')} "
              f"times (twice in the input); distinct ids {len({i for i in out if i is not None})} of {distinct}")
    ray.shutdown()


if __name__ == "__main__":
    main()
