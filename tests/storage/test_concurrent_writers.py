"""Several processes writing one features table at once, on local disk and on the S3 server: Lance's
optimistic commits (rebased inside Lance, or retried by the Workspace) neither lose nor duplicate a row."""

from __future__ import annotations

import pytest
from feature_writers import MODEL_FP, Writers, batch_ids

from valuegate.storage import schemas
from valuegate.storage.lance import Workspace

N = 4
COMMITS = 3
ROWS = 8


@pytest.fixture(scope="module")
def writers():
    pool = Writers(N)
    yield pool
    pool.close()


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ws"), None, None
    server = request.getfixturevalue("s3_server")
    import uuid

    return server.make_bucket(f"vg-writers-{uuid.uuid4().hex[:8]}") + "/ws", server.storage_options, server


@pytest.mark.parametrize("mode", ["append", "insert"])
def test_concurrent_feature_writers(writers, where, mode):
    uri, options, server = where
    rep = writers.run(uri, options, N, mode, COMMITS, ROWS)
    ids = Workspace(uri, options).read(schemas.features_table(MODEL_FP), columns=["id"])["id"].to_pylist()
    expected = {i for w in range(N) for c in range(COMMITS) for i in batch_ids(mode, w, c, ROWS)}
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected  # no row lost, none twice
    line = (f"[{'s3' if server else 'local'}] {N} writers x {COMMITS} {mode} commits of {ROWS} rows in "
            f"{rep['writer_s']:.2f}s: commit conflicts retried by the workspace={rep['conflicts_retried']}, "
            f"transient={rep['transient_retried']}")
    if server is not None:
        line += f", manifest PUTs answered 412 (rebased inside Lance)={server.count_status(412, uri[5:].split('/')[0])}"
    print(line)
