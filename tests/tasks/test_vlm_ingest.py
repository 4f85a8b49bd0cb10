"""Image-text ingestion: every bad-image case is quarantined with its reason, ids hash image bytes (not
paths), the images are stored once per content hash, Parquet bytes columns work, and a refresh run values,
gates, releases and reports an image-text set end to end with a tiny VLM."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from test_flow import _run
from tiny import write_jsonl
from tiny_vlm import build_tiny_vlm, image_bytes, image_rows, write_images

from valuegate.inputs.rows import read_samples
from valuegate.storage import images as istore
from valuegate.storage import samples as sstore
from valuegate.storage.images import export_images
from valuegate.storage.lance import Workspace
from valuegate.tasks.ingest import ingest_file


@pytest.fixture
def ws(tmp_path):
    w = Workspace(str(tmp_path / "ws"))
    sstore.ensure_sample_tables(w)
    return w


def _bad_images(folder):
    """One file per refusal the ingestion must name."""
    from PIL import Image

    good = image_bytes(1)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not-an-image.png").write_bytes(b"this is text, not a picture\n" * 4)
    buf = io.BytesIO()  # 100 megapixels of 1-bit zeros: a small file that would decode to a huge image
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    (folder / "bomb.png").write_bytes(buf.getvalue())
    (folder / "cmyk.jpg").write_bytes(image_bytes(2, fmt="JPEG", mode="CMYK"))
    buf = io.BytesIO()
    Image.new("I;16", (20, 20)).save(buf, format="PNG")
    (folder / "deep.png").write_bytes(buf.getvalue())
    return {"truncated": "truncated.png", "garbage": "not-an-image.png", "bomb": "bomb.png",
            "cmyk": "cmyk.jpg", "16-bit": "deep.png", "missing": "nowhere.png"}


def test_bad_images_are_quarantined_with_their_reason(ws, tmp_path):
    pics = write_images(tmp_path / "pics", 2)
    bad = _bad_images(tmp_path / "pics")
    # the same bytes under another name: the same sample
    (tmp_path / "pics" / "copy.png").write_bytes(pics[0].read_bytes())
    user = [{"type": "image"}, {"type": "text", "text": " w1 w2"}]
    rows = [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "w3"}],
             "images": [f"pics/{name}"]} for name in ("img0.png", "copy.png", *bad.values())]
    rows.append({"messages": [{"role": "user", "content": "<image> w1"}, {"role": "assistant", "content": "w4"}],
                 "images": ["pics/img0.png", "pics/img1.png"]})  # two images, one placeholder
    rows.append({"prompt": "w1 ", "response": "w2", "images": ["pics/img1.png"]})  # prompt/response: other file
    rows.append({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": [
        {"type": "image"}]}], "images": ["pics/img1.png"]})  # an image in the answer
    src = write_jsonl(tmp_path / "train.jsonl", rows[:-2] + rows[-1:])
    rep = ingest_file(ws, "d", src, 10_000)
    q = {r["row"]: r["reason"] for r in sstore.read_quarantine(ws, "d").to_pylist()}
    expect = {2: "truncated or corrupt image data", 3: "not an image Pillow can read",
              4: "decompression bomb (10000×10000 = 100000000 pixels > 40000000)", 5: "unsupported mode ('CMYK'",
              6: "unsupported mode ('I;16'", 7: "file not found (pics/nowhere.png)",
              8: "images: not as many images as image placeholders in the user turns (2 images, 1 placeholders",
              9: "messages[1]: an image in an assistant or tool turn"}
    assert sorted(q) == sorted(expect), q
    for row, why in expect.items():
        assert why in q[row], (row, q[row])
        if row < 8:
            assert q[row].startswith("images[0]: ")
    assert (rep.rows, rep.kept, rep.new_samples, rep.duplicates, rep.quarantined) == (10, 2, 1, 1, 8)
    members = sstore.read_members(ws, "d").to_pylist()
    assert len({m["id"] for m in members}) == 1  # img0.png and copy.png: one sample (bytes, not paths)
    sha = json.loads(members[0]["metadata"])["images"][0]
    stored = istore.read_images(ws, [sha])
    assert stored[sha]["data"] == pics[0].read_bytes() and stored[sha]["format"] == "PNG"
    assert sstore.read_samples_by_id(ws, [members[0]["id"]]).to_pylist()[0]["images"] == [sha]
    # releases list hashes; the images are exported from the workspace by hash
    out = export_images(ws, [sha], tmp_path / "export")
    assert out[sha].read_bytes() == pics[0].read_bytes() and out[sha].name == f"{sha}.png"


def test_parquet_image_bytes_and_score_file_errors(ws, tmp_path):
    pics = write_images(tmp_path / "pics", 3)
    rows = image_rows(3, 1, pics, "prompt_response")
    for r in rows:
        r["images"] = [{"bytes": Path(p).read_bytes(), "path": None} for p in r["images"]]
    pl.DataFrame(rows).write_parquet(tmp_path / "t.parquet")
    rep = ingest_file(ws, "d", tmp_path / "t.parquet", 10_000)
    assert (rep.kept, rep.quarantined) == (3, 0)
    # the path form of the same rows gives the same ids
    write_jsonl(tmp_path / "p.jsonl", image_rows(3, 1, pics, "prompt_response"))
    rep2 = ingest_file(ws, "e", tmp_path / "p.jsonl", 10_000)
    assert rep2.new_samples == 0 and sstore.dataset_ids(ws, "d") == sstore.dataset_ids(ws, "e")
    # raw rows of quarantined bytes name the bytes, never inline them
    pl.DataFrame({"prompt": ["w1 "], "response": ["w2"], "images": [[b"\x89PNG broken"]]}).write_parquet(
        tmp_path / "b.parquet")
    ingest_file(ws, "f", tmp_path / "b.parquet", 10_000)
    q = sstore.read_quarantine(ws, "f").to_pylist()[0]
    assert "images[0]: " in q["reason"] and "11 bytes, sha256" in q["raw"]
    # `valuegate score` reads files directly: a bad image is an error naming file, row and field
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "w1", "response": "w2", "images": ["gone.png"]}])
    with pytest.raises(Exception, match=r"s\.jsonl: row 0: images\[0\]: file not found \(gone\.png\)"):
        read_samples(tmp_path / "s.jsonl")


def test_refresh_values_an_image_text_set_end_to_end(prefect_harness, tmp_path):
    from valuegate.storage.releases import read_current, read_manifest, read_release_data

    model = build_tiny_vlm("llava", tmp_path / "llava")
    pics = write_images(tmp_path / "pics", 4)
    train = image_rows(12, 21, pics, "messages")
    for i, r in enumerate(train):
        r["family"] = "ab"[i % 2]
    src = write_jsonl(tmp_path / "train.jsonl", train)
    valid = write_jsonl(tmp_path / "valid.jsonl", image_rows(3, 22, pics, "messages"))
    cfg = tmp_path / "vg.toml"
    cfg.write_text(f"""workspace = "{tmp_path / 'ws'}"
[data]
dataset = "t"
sources = ["{src}"]
valset = "v"
valset_file = "{valid}"
[model]
name = "{model}"
device = "cpu"
[extract]
support_k = 8
hidden_dim = 0
error_dim = 8
batch_size = 4
[select]
policy = "top_fraction"
fraction = 0.75
[gate]
min_retained_fraction = 0.5
[release]
name = "r"
""")
    out, _ = _run(str(cfg))
    root = tmp_path / "ws"
    assert out["current"] and read_current(root, "r") == out["version"]
    data = read_release_data(root, "r", out["version"], verify=True)
    assert data.height == 9 and "images" in data.columns
    hashes = sorted({h for imgs in data["images"].to_list() for h in imgs})
    assert hashes and all(len(h) == 64 for h in hashes)
    exported = export_images(Workspace(str(root)), hashes, tmp_path / "export")
    assert {p.read_bytes() for p in exported.values()} <= {p.read_bytes() for p in pics}
    assert read_manifest(root, "r", out["version"])["gate"]["passed"] is True
    report = (root / "releases" / "r" / out["version"] / "report.html").read_text()
    assert report.count("<img class='thumb' src='data:image/jpeg;base64,") >= 20  # top and bottom 10 rows
    assert "[image " not in report
    assert report.count("class='tokens'") >= 4  # per-token highlighting works on image-text samples too
