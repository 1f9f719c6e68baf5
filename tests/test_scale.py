"""Scale-out on a local Ray cluster (started once for this module): maps equal to the local engine's, a corrupt
image reported and skipped, Parquet read back, a run killed with SIGKILL resumed to the clean run's output,
and the graphs built once on the driver (the engine's graph_source seam, checked without Ray too)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from onnx_saliency import Explainer
from onnx_saliency.cli.main import main
from onnx_saliency.output.batch import explain_images
from onnx_saliency.scale.graphs import GraphRecorder, ShippedGraphs, record_graphs
from tests.graphs import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["gradcam", "lrp", "relevance-cam"]
CORRUPT = 7


def _write_images(folder: Path, n: int, corrupt=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        picture = rng.integers(0, 255, (20 + i % 3, 24, 3), dtype=np.uint8)
        if i == corrupt:
            p.write_bytes(b"not an image\n")
        else:
            cv2.imwrite(str(p), picture)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model = tiny_classifier(root / "tiny.onnx")
    images = _write_images(root / "imgs", 20, corrupt=CORRUPT)
    good = [p for i, p in enumerate(images) if i != CORRUPT]
    ex = Explainer(model, threads=1)  # the actors run one thread each: equal thread counts, equal bits
    local = root / "local"
    outcome = explain_images(ex, good, METHODS, local, layer="auto", targets=ex.targets(None, len(good)),
                             batch_size=4, options={})
    assert len(outcome.written) == 19
    return root, model, images, local


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="needs the [ray] extra (pip install 'onnx-saliency[ray]')")
    from onnx_saliency.scale import init_ray

    init_ray(num_cpus=2)  # without the dashboard, as explain_dataset starts one
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _local_map(local: Path, stem: str, method: str) -> np.ndarray:
    return np.load(local / stem / f"{method}.npy")


# --- without Ray: the graphs the driver ships are the ones the actor runs --------------------------------

def test_shipped_graphs_replace_building_and_give_identical_maps(data, monkeypatch):
    root, model, images, local = data
    ex = Explainer(model, threads=1)
    graphs = record_graphs(ex, METHODS, "auto", {})
    assert {k[0] for k in graphs} >= {"vjp", "lrp"}
    actor = Explainer.from_loaded(ex.model, ex.preprocessing, threads=1)
    actor.engine.expect_images(19)  # as ExplainShard does: the tier of the local run of the 19 images
    shipped = ShippedGraphs(graphs)
    actor.engine.graph_source = shipped
    import graph_passes as gp

    def refuse(*a, **k):
        raise AssertionError("an actor rebuilt a graph the driver had shipped")

    for name in ("expose_tensors", "append_vjp"):  # every rewrite starts with one of these
        monkeypatch.setattr(gp, name, refuse)
    monkeypatch.setattr("onnx_saliency.lrp.relevance.build_relevance_graph", refuse)
    good = [p for i, p in enumerate(images) if i != CORRUPT][:4]
    for method in METHODS:
        r = actor.explain(good, method=method, target=None, batch_size=4)
        for k, p in enumerate(good):
            assert np.array_equal(r.maps[k], _local_map(local, p.stem, method)), (method, p.name)
    assert shipped.missed == []
    recorder = GraphRecorder()
    assert recorder.load(("vjp",)) is None


def test_uri_folders_are_listed_and_uris_read_as_local_files(data):
    pytest.importorskip("pyarrow", reason="needs the [ray] extra")
    from onnx_saliency.intake.preprocess import load_image
    from onnx_saliency.scale.actor import read_image
    from onnx_saliency.scale.runner import _paths_of

    root, model, images, local = data
    uris = _paths_of([images[0].parent.as_uri()])
    assert uris == [p.as_uri() for p in images]
    assert np.array_equal(read_image(uris[0], 10 ** 8), load_image(images[0]))
    with pytest.raises(Exception, match=f"^{uris[CORRUPT]}: not a readable image"):
        read_image(uris[CORRUPT], 10 ** 8)
    with pytest.raises(Exception, match="cannot read"):
        read_image((root / "missing.png").as_uri(), 10 ** 8)


# --- on the local cluster ------------------------------------------------------------------------------

def test_ray_files_equal_the_local_engine_and_resume_rewrites_nothing(data, cluster, tmp_path):
    from onnx_saliency.scale import explain_dataset

    root, model, images, local = data
    out = tmp_path / "ray"
    lines = []
    outcome = explain_dataset(images, model, METHODS, out=out, actors=2, cpus_per_actor=1, batch_size=4,
                              shard_size=4, on_failure=lines.append)
    assert outcome.written == 19 and list(outcome.failed) == [f"img{CORRUPT:02d}"]
    assert lines == [f"{images[CORRUPT]}: not a readable image (unknown format; supported: PNG, JPEG, BMP, GIF, "
                     "WebP, TIFF, PNM)"]
    assert outcome.graph_misses == 0  # every actor ran the driver's graphs
    assert {s["pid"] for s in outcome.shards} and all(s["total_s"] > 0 for s in outcome.shards)
    worst = 0.0
    for i, p in enumerate(images):
        if i == CORRUPT:
            assert not (out / p.stem).exists()
            continue
        for m in METHODS:
            a, b = np.load(out / p.stem / f"{m}.npy"), _local_map(local, p.stem, m)
            worst = max(worst, float(np.abs(a - b).max()))
            assert np.array_equal(a, b), (p.name, m)  # one thread each side: bit-identical
            assert (out / p.stem / f"{m}.png").read_bytes() == (local / p.stem / f"{m}.png").read_bytes()
            ours, theirs = (json.loads((d / p.stem / f"{m}.json").read_text()) for d in (out, local))
            ours.pop("notes"), theirs.pop("notes")  # LRP's conservation note lists its batch's images
            assert ours == theirs
    assert worst <= 1e-6
    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    again = explain_dataset(images, model, METHODS, out=out, actors=1, shard_size=10, resume=True)
    assert again.resumed == 19 and again.written == 0 and list(again.failed) == [f"img{CORRUPT:02d}"]
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == stamps


def test_cli_parquet_reports_the_corrupt_image_and_reads_back(data, cluster, tmp_path):
    import pyarrow.parquet as pq

    from onnx_saliency.scale import read_maps

    root, model, images, local = data
    out = tmp_path / "pq"
    res = CliRunner().invoke(main, ["explain", str(model), str(images[0].parent), "--engine", "ray", "--format",
                                    "parquet", "--actors", "2", "--shard-size", "5", "--out", str(out),
                                    *sum((["-m", m] for m in METHODS), [])], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    assert f"error: {images[CORRUPT]}: not a readable image" in res.output
    assert f"error: 1 of 20 image(s) failed and were skipped: img{CORRUPT:02d}.png" in res.output
    assert "wrote 19 image(s) x 3 method(s)" in res.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [(e["id"], e["path"]) for e in errors] == [(f"img{CORRUPT:02d}", str(images[CORRUPT]))]
    table = pq.read_table(out / "maps")
    assert table.num_rows == 19 * 3 and not list(out.glob("maps/.*"))
    maps = read_maps(out)
    for i, p in enumerate(images):
        for m in METHODS:
            if i == CORRUPT:
                assert (p.stem, m) not in maps
                continue
            want = _local_map(local, p.stem, m)
            assert maps[(p.stem, m)].dtype == np.float16
            assert np.array_equal(maps[(p.stem, m)], want.astype(np.float16)), (p.name, m)
    row = next(r for r in table.to_pylist() if r["id"] == "img00" and r["method"] == "gradcam")
    sidecar = json.loads((local / "img00" / "gradcam.json").read_text())
    assert (row["target"], row["label"], row["model_sha256"]) == (
        sidecar["target"]["class"], sidecar["target"]["label"], sidecar["model_sha256"])
    assert row["score"] == np.float32(sidecar["target"]["score"]) and row["layer"] == ",".join(sidecar["layers"])
    assert row["execution_provider"] == "CPUExecutionProvider" and json.loads(row["versions"])["onnxruntime"]
    # the folder holds one run's dataset: no silent duplicates, no mixing of methods
    again = CliRunner().invoke(main, ["explain", str(model), str(images[0].parent), "--engine", "ray", "--format",
                                      "parquet", "--out", str(out), "-m", "gradcam"])
    assert again.exit_code == 2 and "already holds a Parquet dataset; pass --resume" in again.output
    mixed = CliRunner().invoke(main, ["explain", str(model), str(images[0].parent), "--engine", "ray", "--format",
                                      "parquet", "--out", str(out), "-m", "gradcam", "--resume"])
    assert mixed.exit_code == 2 and "was written with a different methods" in mixed.output


def test_a_dataset_of_encoded_files_gives_the_same_maps(data, cluster, tmp_path):
    import ray

    from onnx_saliency.scale import explain_dataset, read_maps

    root, model, images, local = data
    ds = ray.data.read_binary_files(str(images[0].parent), include_paths=True)
    out = tmp_path / "ds"
    outcome = explain_dataset(ds, model, ["gradcam"], out=out, fmt="parquet", actors=1, shard_size=8)
    assert outcome.written == 19 and list(outcome.failed) == [f"img{CORRUPT:02d}"]
    maps = read_maps(out)
    assert len(maps) == 19
    for (stem, m), saliency in maps.items():
        assert np.array_equal(saliency, _local_map(local, stem, m).astype(np.float16)), stem


KILLED_RUN = textwrap.dedent("""
    import sys
    from onnx_saliency.scale import explain_dataset
    model, out, address, *images = sys.argv[1:]
    explain_dataset(images, model, ["gradcam", "relevance-cam"], out=out, fmt="parquet", actors=1, shard_size=2,
                    batch_size=2, address=address)
""")


def test_a_run_killed_midway_resumes_to_the_clean_result(data, cluster, tmp_path):
    import pyarrow.parquet as pq

    from onnx_saliency.scale import explain_dataset

    root, model, _, _ = data
    images = _write_images(tmp_path / "imgs", 12)
    clean = tmp_path / "clean"
    explain_dataset(images, model, ["gradcam", "relevance-cam"], out=clean, fmt="parquet", actors=1,
                    shard_size=2, batch_size=2)
    # image 9 becomes a FIFO: its actor blocks reading it, so the run is certainly unfinished when killed
    blocked = images[9]
    picture = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(model), str(out), cluster, *map(str, images)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "maps").glob("part-*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert list((out / "maps").glob("part-*.parquet")), "no shard committed within 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the actor may commit the shards before the blocked one while Ray notices its driver is gone: at least
    # one shard is committed, never the blocked one
    assert 1 <= len(list((out / "maps").glob("part-*.parquet"))) < 6
    blocked.unlink()
    blocked.write_bytes(picture)
    outcome = explain_dataset(images, model, ["gradcam", "relevance-cam"], out=out, fmt="parquet", actors=1,
                              shard_size=2, batch_size=2, resume=True)
    assert 2 <= outcome.resumed <= 10 and outcome.resumed + outcome.written == 12 and not outcome.failed
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left behind

    def rows(folder):
        table = pq.read_table(folder / "maps").to_pylist()
        return sorted(table, key=lambda r: (r["id"], r["method"]))

    got, want = rows(out), rows(clean)
    assert len(got) == len(want) == 24
    for a, b in zip(got, want):
        assert a == b, (a["id"], a["method"])
    assert pq.read_table(out / "errors.parquet").num_rows == 0


def test_usage_errors_exit_2_before_any_work(data, tmp_path):
    root, model, images, _ = data
    for args, message in [(["--actors", "2"], "--actors: needs --engine ray"),
                          (["--format", "parquet"], "--format: needs --engine ray"),
                          (["--engine", "ray", "--gpus-per-actor", "0.5"], "only used with --provider cuda"),
                          (["--engine", "ray", "--cpus-per-actor", "0"], "--cpus-per-actor 0.0: must be positive"),
                          (["--engine", "ray", "--threads", "2"], "each actor runs --cpus-per-actor threads")]:
        res = CliRunner().invoke(main, ["explain", str(model), str(images[0]), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert not (tmp_path / "x").exists()


def test_an_error_every_image_would_meet_stops_the_run_with_one_line(data, cluster, tmp_path):
    root, model, images, _ = data
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(main, ["explain", str(model), str(images[0]), str(images[1]), "--engine", "ray",
                                    "--out", str(blocker / "out"), "--actors", "1"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"error: {blocker / 'out'}"), res.output
    assert "cannot create folder" in res.output and "Traceback" not in res.output
