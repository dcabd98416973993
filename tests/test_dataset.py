"""Corpus runs (onnx_lrp.dataset, onnx_lrp.scale): readers, deterministic shards, exact per-row equality with
TextExplainer.explain (in this process and on 2 Ray actors), a worker killed mid-run, resuming after an
interruption, Ctrl-C on the CLI, bad rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onnx_lrp import TargetError
from onnx_lrp.dataset import DatasetError, read_results, read_rows, run
from onnx_lrp.jobs import ExplainJob
from onnx_lrp.text import TextExplainer

from _corpus import texts

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    rows = texts(20)
    p = tmp_path_factory.mktemp("corpus") / "rows.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return p, rows


@pytest.fixture(scope="module")
def reference(text_model, corpus):
    """TextExplainer.explain on each row, one by one."""
    tx = TextExplainer(text_model)
    return [tx.explain(t) for t in corpus[1]]


def _assert_same(table: pa.Table, reference, rows=None) -> None:
    d = table.to_pydict()
    rows = rows if rows is not None else range(len(reference))
    assert d["row"] == list(rows), "rows missing, repeated or out of order"
    for k, ref in zip(rows, (reference[r] for r in rows)):
        j = d["row"].index(k)
        assert d["error"][j] is None
        assert d["ids"][j] == ref.ids and d["tokens"][j] == ref.tokens
        np.testing.assert_array_equal(np.asarray(d["relevance"][j], np.float32), ref.relevance)  # exactly
        assert d["score"][j] == ref.score and d["target"][j] == ref.target
        assert d["prediction"][j] == ref.prediction and d["target_text"][j] == ref.target_text


# ---------------------------------------------------------------------------------------------- readers
def test_readers_give_rows_and_report_bad_ones_by_number(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"t5 t6\n\xff\xfe bad\nt7\n")
    rows = list(read_rows(tmp_path / "a.txt"))
    assert [r.index for r in rows] == [0, 1, 2] and rows[0].fields == {"text": "t5 t6"}
    assert rows[1].fields is None and "row 1" in rows[1].error and "UTF-8" in rows[1].error
    (tmp_path / "b.jsonl").write_text('{"text": "t5"}\n{oops\n{"input_ids": [4, 5]}\n{"txt": "t1"}\n[1]\n')
    rows = list(read_rows(tmp_path / "b.jsonl"))
    assert rows[0].fields == {"text": "t5"} and rows[2].fields == {"input_ids": [4, 5]}
    assert "row 1 (line 2): not valid JSON" in rows[1].error
    assert "row 3: no 'text'" in rows[3].error and "row 4: expected an object" in rows[4].error
    (tmp_path / "c.csv").write_text('id,sentence\n1,"t5, t6"\n2,\n3,t9\n')
    rows = list(read_rows(tmp_path / "c.csv", text_column="sentence"))
    assert rows[0].fields == {"text": "t5, t6"} and "row 1: no 'sentence'" in rows[1].error
    pq.write_table(pa.table({"text": ["t3", None, "t4 t5"]}), tmp_path / "d.parquet")
    rows = list(read_rows(tmp_path / "d.parquet"))
    assert rows[2].fields == {"text": "t4 t5"} and "row 1" in rows[1].error
    rows = list(read_rows(HERE / "data" / "saved_dataset"))  # written by the datasets library (tests/data)
    assert [r.fields for r in rows if r.fields] == [{"text": "t5 t9 t17"}, {"text": "t3 t4"},
                                                    {"text": "t100 t101 t102 t103"}]
    assert "row 2" in rows[2].error
    with pytest.raises(Exception, match="no such file"):
        list(read_rows(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------- runs
def test_in_process_run_equals_text_explainer_exactly_and_resumes(text_model, corpus, reference, tmp_path):
    data, _ = corpus
    out = tmp_path / "run"
    job = ExplainJob(text_model)

    def interrupted():  # Ctrl-C arriving while the 11th row is read: shards 0 and 1 (rows 0-7) are complete
        for r in read_rows(data):
            if r.index == 10:
                raise KeyboardInterrupt
            yield r

    with pytest.raises(KeyboardInterrupt):
        run(job, data, out, shard_size=4, rows=interrupted(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    s = run(job, data, out, shard_size=4, progress=False)
    assert (s.skipped, s.written, s.shards, s.errors) == (2, 3, 5, 0)
    _assert_same(read_results(out), reference)
    assert read_results(out).schema.field("relevance").type == pa.list_(pa.float32())
    with pytest.raises(DatasetError, match="another config"):  # another job configuration, same folder
        run(ExplainJob(text_model, "cp-lrp"), data, out, shard_size=4, progress=False)


def test_two_ray_actors_equal_text_explainer_exactly(ray_session, text_model, corpus, reference, tmp_path):
    s = run(ExplainJob(text_model), corpus[0], tmp_path / "ray", shard_size=3, workers=2, progress=False)
    assert s.written == 7
    _assert_same(read_results(tmp_path / "ray"), reference)


def test_local_ray_workers_run_at_our_priority(ray_session):
    """Ray would start its workers at nice 15: beside other jobs they would get a fraction of the CPU."""
    import ray

    def niceness() -> int:
        return os.nice(0)

    assert ray.get(ray.remote(num_cpus=1)(niceness).remote()) == os.nice(0)


class DiesOnce(ExplainJob):
    """Kills its own worker process (SIGKILL) the first time it is given row 9."""

    def __init__(self, model, marker: str, **kw):
        super().__init__(model, **kw)
        self.marker = marker

    def process(self, items):
        if any(it["row"] == 9 for it in items) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(items)


def test_a_killed_worker_is_restarted_and_its_shard_redone(ray_session, text_model, corpus, reference, tmp_path):
    marker = tmp_path / "killed"
    out = tmp_path / "run"
    run(DiesOnce(text_model, str(marker)), corpus[0], out, shard_size=4, workers=2, progress=False)
    assert marker.exists(), "the worker was not killed"
    _assert_same(read_results(out), reference)  # complete, each row once, the same numbers
    assert len(list(out.glob("shard-*.parquet"))) == 5


def test_batched_rows_and_latent_top_k(text_model, corpus, reference, tmp_path):
    """Batches of rows bucketed by length (right-padded) agree with one by one to fp32 rounding; the latent top-k
    columns are those of LatentExplainer on the row alone."""
    from onnx_lrp.latent import LatentExplainer

    job = ExplainJob(text_model, batch_size=4, latent=["mlp:1", "head:0"], top_k=3)
    run(job, corpus[0], tmp_path / "b", shard_size=10, progress=False)
    d = read_results(tmp_path / "b").to_pydict()
    assert d["row"] == list(range(20))
    lat = LatentExplainer(TextExplainer(text_model).explainer)
    for j, ref in enumerate(reference):
        r = np.asarray(d["relevance"][j])
        np.testing.assert_allclose(r, ref.relevance, rtol=1e-5, atol=1e-6 * np.abs(ref.relevance).max())
        ids = np.asarray([ref.ids])
        one = lat.explain({"input_ids": ids, "attention_mask": np.ones_like(ids)}, ["mlp:1", "head:0"])
        for entry in d["latent"][j]:
            top, val = one.top(entry["selector"], 3)
            assert entry["units"] == top[0].tolist()
            np.testing.assert_allclose(entry["relevance"], val[0], rtol=1e-4, atol=1e-7)


def test_bad_rows_skip_or_fail(ray_session, text_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = texts(6, seed=2)
    lines = [json.dumps({"text": good[0]}), json.dumps({"text": good[1]}), "{not json", json.dumps({"text": ""}),
             json.dumps({"text": good[2]}), json.dumps({"input_ids": [5, 500, 6]}), json.dumps({"text": good[3]})]
    data.write_text("\n".join(lines) + "\n")
    s = run(ExplainJob(text_model), data, tmp_path / "skip", shard_size=2, progress=False)
    d = read_results(tmp_path / "skip").to_pydict()
    assert d["row"] == list(range(7)) and s.errors == 3
    errors = {k: e for k, e in zip(d["row"], d["error"]) if e}
    assert set(errors) == {2, 3, 5}
    assert "not valid JSON" in errors[2] and "no tokens" in errors[3] and "row 5" in errors[5]
    assert d["relevance"][2] is None and d["relevance"][4] is not None
    with pytest.raises(DatasetError, match="row 2"):
        run(ExplainJob(text_model, on_error="fail"), data, tmp_path / "fail", shard_size=2, progress=False)
    assert [p.name for p in sorted((tmp_path / "fail").glob("shard-*"))] == ["shard-00000.parquet"]
    with pytest.raises(DatasetError, match="row 5"):  # a row the model refuses (id 500 of a 128-token vocabulary)
        run(ExplainJob(text_model, on_error="fail"), data, tmp_path / "fail-ray", shard_size=2, workers=1,
            rows=(r for r in read_rows(data) if r.index not in (2, 3)), progress=False)


def test_ctrl_c_on_the_cli_leaves_complete_shards_and_resumes(text_model, tmp_path):
    rows = texts(30, seed=5)
    data = tmp_path / "rows.txt"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "onnx_lrp", "explain-dataset", str(text_model), str(data), "--out", str(out),
           "--workers", "0", "--shard-size", "1", "--quiet"]
    # SIGINT as a terminal sends it, even when this test runs in a background job (which ignores SIGINT)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while len(list(out.glob("shard-*.parquet"))) < 3 and time.time() - t0 < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    written = sorted(out.glob("shard-*.parquet"))
    assert 3 <= len(written) < 30 and not list(out.glob(".*tmp*"))
    for f in written:  # every shard under its final name is complete
        assert pq.read_table(f).num_rows == 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(written)} already complete" in done.stderr
    d = read_results(out).to_pydict()
    assert d["row"] == list(range(30)) and d["text"] == rows


def test_a_bad_selector_fails_the_run_with_its_message(ray_session, text_model, corpus, tmp_path):
    """An error in a worker's setup (here: a layer the model does not have) ends the run with that error, not as
    a worker crash retried by Ray."""
    with pytest.raises(TargetError, match="selector 'mlp:9': this model offers"):
        run(ExplainJob(text_model, latent=["mlp:9"]), corpus[0], tmp_path / "x", workers=1, progress=False)
    assert not list((tmp_path / "x").glob("shard-*"))
