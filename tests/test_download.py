"""`prunestudy coco download` against a local HTTP server serving tiny COCO-like zips."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from prunestudy import cli, data, download, progress

# --------------------------------------------------------------------------- fixtures


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def _instances(split: str) -> bytes:
    return json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg", "width": 8, "height": 8}],
                       "annotations": [], "categories": [{"id": 1, "name": "thing"}], "split": split}).encode()


ZIPS = {
    "annotations/annotations_trainval2017.zip": _zip({
        "annotations/instances_train2017.json": _instances("train"),
        "annotations/instances_val2017.json": _instances("val"),
        "annotations/captions_val2017.json": b"{}",
    }),
    # stored with a big repeated payload so the interruption test has bytes to cut
    "zips/train2017.zip": _zip({f"train2017/{i:012d}.jpg": _jpeg((i * 40, 0, 0)) for i in range(1, 4)}
                               | {"train2017/padding.bin": bytes(range(256)) * 400}),
    "zips/val2017.zip": _zip({f"val2017/{i:012d}.jpg": _jpeg((0, i * 40, 0)) for i in range(1, 3)}),
}


def _archives(**md5_overrides) -> dict[str, download.Archive]:
    """The official table with this test's sizes and md5s."""
    out = {}
    for split, arc in download.ARCHIVES.items():
        payload = ZIPS[arc.path]
        md5 = md5_overrides.get(split, hashlib.md5(payload).hexdigest())
        out[split] = download.Archive(arc.path, len(payload), md5, arc.provides)
    return out


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours ``Range: bytes=N-`` with 206 unless server.ignore_range;
    drops the connection after server.drop_after[path] bytes on that path's first request."""

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.lstrip("/")
        srv.requests.append((path, self.headers.get("Range")))
        body = srv.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = srv.drop_after.pop(path, None)
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.drop_after, srv.ignore_range = dict(ZIPS), [], {}, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(server, to, **kw):
    logs: list[str] = []
    kw.setdefault("archives", _archives())
    download.download_coco(to, base_url=server.url, log=logs.append, progress=False, **kw)
    return logs


# --------------------------------------------------------------------------- download_coco


def test_full_download_unpacks_the_official_layout(server, tmp_path):
    to = tmp_path / "coco"
    _get(server, to)
    data.check_layout(to)
    assert sorted(p.name for p in (to / "train2017").glob("*.jpg")) == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert len(list((to / "val2017").glob("*.jpg"))) == 2
    with Image.open(to / "val2017" / "000000000002.jpg") as im:
        assert im.size == (8, 8)
    assert json.loads((to / "annotations" / "instances_val2017.json").read_text())["split"] == "val"
    assert sorted(p.name for p in to.glob(".coco-*.done")) == [
        ".coco-annotations.done", ".coco-train2017.done", ".coco-val2017.done"]
    # archives deleted by default, no temporary leftovers
    assert not list(to.glob("*.zip*")) and not list(to.glob(".unpack-*"))


def test_keep_archives_keeps_the_verified_zips(server, tmp_path):
    _get(server, tmp_path, splits=["val2017"], keep_archives=True)
    assert (tmp_path / "val2017.zip").read_bytes() == ZIPS["zips/val2017.zip"]
    assert not (tmp_path / "train2017").exists()


def test_second_run_is_a_no_op_and_says_so(server, tmp_path):
    _get(server, tmp_path)
    n = len(server.requests)
    jpg = tmp_path / "train2017" / "000000000001.jpg"
    before = jpg.stat().st_mtime_ns
    logs = _get(server, tmp_path)
    assert len(server.requests) == n
    assert jpg.stat().st_mtime_ns == before
    assert "nothing to do" in logs[-1]


def test_interrupted_unpack_is_not_taken_as_complete(server, tmp_path, monkeypatch):
    real_merge = download._merge

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_merge", crash)
    with pytest.raises(KeyboardInterrupt):
        _get(server, tmp_path, splits=["val2017"], keep_archives=True)
    assert not (tmp_path / ".coco-val2017.done").exists()
    monkeypatch.setattr(download, "_merge", real_merge)
    _get(server, tmp_path, splits=["val2017"])
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 2
    assert (tmp_path / ".coco-val2017.done").is_file() and not list(tmp_path.glob(".unpack-*"))


def test_a_marker_whose_files_are_gone_is_redone(server, tmp_path):
    _get(server, tmp_path, splits=["val2017"])
    for p in (tmp_path / "val2017").iterdir():
        p.unlink()
    (tmp_path / "val2017").rmdir()
    _get(server, tmp_path, splits=["val2017"])
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 2


# --------------------------------------------------------------------------- fetch


def test_interrupted_download_resumes_from_the_part_file(server, tmp_path):
    path = "zips/train2017.zip"
    body, cut = ZIPS[path], 10_000
    server.drop_after[path] = cut
    dest = tmp_path / "train2017.zip"
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(download.DownloadError) as e:
        download.fetch(f"{server.url}/{path}", dest, len(body), md5, progress=False, log=lambda m: None)
    assert f"{server.url}/{path}" in str(e.value) and "resume" in str(e.value)
    part = tmp_path / "train2017.zip.part"
    assert part.stat().st_size == cut and not dest.exists()

    assert download.fetch(f"{server.url}/{path}", dest, len(body), md5, progress=False, log=lambda m: None) == dest
    assert server.requests[-1] == (path, f"bytes={cut}-")
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5 and not part.exists()


def test_a_server_ignoring_range_restarts_cleanly(server, tmp_path):
    path = "zips/val2017.zip"
    body = ZIPS[path]
    server.ignore_range = True
    (tmp_path / "val2017.zip.part").write_bytes(b"garbage" * 100)
    dest = download.fetch(f"{server.url}/{path}", tmp_path / "val2017.zip", len(body),
                          hashlib.md5(body).hexdigest(), progress=False, log=lambda m: None)
    assert server.requests[-1][1] == "bytes=700-"
    assert dest.read_bytes() == body


def test_a_complete_part_file_is_verified_without_refetching(server, tmp_path):
    path = "zips/val2017.zip"
    body = ZIPS[path]
    (tmp_path / "val2017.zip.part").write_bytes(body)
    download.fetch(f"{server.url}/{path}", tmp_path / "val2017.zip", None, hashlib.md5(body).hexdigest(),
                   progress=False, log=lambda m: None)
    assert server.requests == [(path, f"bytes={len(body)}-")]  # answered 416, nothing re-sent
    assert (tmp_path / "val2017.zip").read_bytes() == body


@pytest.mark.parametrize("kind", ["md5", "size"])
def test_a_mismatch_is_clear_and_leaves_nothing_to_trust(server, tmp_path, kind):
    path = "zips/val2017.zip"
    body = ZIPS[path]
    size, md5 = (len(body), "0" * 32) if kind == "md5" else (len(body) + 1, None)
    with pytest.raises(download.VerificationError) as e:
        download.fetch(f"{server.url}/{path}", tmp_path / "val2017.zip", size, md5, progress=False,
                       log=lambda m: None)
    msg = str(e.value)
    assert "val2017.zip" in msg and "removed" in msg
    if kind == "md5":
        assert "0" * 32 in msg and hashlib.md5(body).hexdigest() in msg
    else:
        assert f"{len(body) + 1:,}" in msg and f"{len(body):,}" in msg
    assert list(tmp_path.iterdir()) == []


def test_download_coco_with_a_wrong_md5_unpacks_nothing(server, tmp_path):
    with pytest.raises(download.VerificationError, match="md5 mismatch"):
        _get(server, tmp_path, splits=["val2017"], archives=_archives(val2017="f" * 32))
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_shows_bytes_and_stays_quiet_off_a_terminal(server, tmp_path, capsys):
    path = "zips/val2017.zip"
    download.fetch(f"{server.url}/{path}", tmp_path / "val2017.zip", len(ZIPS[path]), progress=True,
                   log=lambda m: None)
    err = capsys.readouterr().err
    assert "val2017.zip: 100%" in err and "B/s" in err
    with download._bar("x", 10, 0, True, "B") as bar:  # pytest's stderr is not a terminal
        assert bar.mininterval >= progress.LOG_INTERVAL


def test_a_network_error_names_the_url(server, tmp_path):
    with pytest.raises(download.DownloadError, match=re.escape(f"{server.url}/nope.zip")):
        download.fetch(f"{server.url}/nope.zip", tmp_path / "nope.zip", progress=False, log=lambda m: None)


# --------------------------------------------------------------------------- unsafe zips


@pytest.mark.parametrize("member", ["../evil.txt", "train2017/../../evil.txt", "/tmp/evil.txt", "C:\\evil.txt",
                                    "..\\evil.txt"])
def test_unsafe_members_are_refused(tmp_path, member):
    to = tmp_path / "coco"
    to.mkdir()
    archive = to / "bad.zip"
    archive.write_bytes(_zip({"train2017/ok.jpg": _jpeg((1, 2, 3)), member: b"pwned"}))
    with pytest.raises(download.UnsafeArchiveError, match=re.escape(repr(member))):
        download.unpack(archive, to, progress=False)
    assert sorted(p.name for p in to.iterdir()) == ["bad.zip"]  # nothing extracted, not even ok.jpg
    assert not (tmp_path / "evil.txt").exists()


def test_download_coco_refuses_an_unsafe_archive(server, tmp_path):
    server.files["zips/val2017.zip"] = bad = _zip({"val2017/1.jpg": _jpeg((0, 0, 0)), "../evil": b"x"})
    arcs = _archives()
    arcs["val2017"] = download.Archive("zips/val2017.zip", len(bad), hashlib.md5(bad).hexdigest(), ("val2017",))
    to = tmp_path / "coco"
    with pytest.raises(download.UnsafeArchiveError, match="'../evil'"):
        _get(server, to, splits=["val2017"], archives=arcs)
    assert not (tmp_path / "evil").exists() and not (to / "val2017").exists()
    assert not (to / ".coco-val2017.done").exists()


# --------------------------------------------------------------------------- arguments and CLI


def test_an_unknown_split_lists_the_valid_ones(tmp_path):
    with pytest.raises(download.UsageError, match="unknown split 'test2017'; valid splits: annotations, val2017, "
                                                  "train2017"):
        download.download_coco(tmp_path, ["val2017", "test2017"], log=lambda m: None)


def test_an_unwritable_target_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(download.UsageError, match="cannot write to .*--to DIR"):
        download.download_coco(blocker / "coco", ["val2017"], log=lambda m: None)


def test_a_read_only_target_says_so(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # what a folder without write permission does (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(download.tempfile, "TemporaryFile", refuse)
    with pytest.raises(download.UsageError, match=f"cannot write to {re.escape(str(tmp_path))} "
                                                  r"\(Permission denied\)"):
        download.download_coco(tmp_path, ["val2017"], log=lambda m: None)


def test_cli_downloads_with_base_url_from_the_environment(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "ARCHIVES", _archives())
    monkeypatch.setenv(download.URL_ENV, server.url)
    to = tmp_path / "coco"
    assert cli.main(["coco", "download", "--to", str(to), "--no-progress", "--keep-archives"]) == 0
    data.check_layout(to)
    assert (to / "annotations_trainval2017.zip").is_file()
    assert all(p.startswith(("zips/", "annotations/")) for p, _ in server.requests)
    assert cli.main(["coco", "download", "--to", str(to), "--splits", "val2017"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_cli_exit_codes_for_bad_arguments_and_failures(server, tmp_path, capsys):
    assert cli.main(["coco", "download", "--to", str(tmp_path), "--splits", "val2017", "test2017"]) == 2
    assert "valid splits: annotations, val2017, train2017" in capsys.readouterr().err
    # the official md5 cannot match what the local server sends: verification failure
    assert cli.main(["coco", "download", "--to", str(tmp_path), "--splits", "val2017",
                     "--base-url", server.url, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "val2017.zip: size mismatch: expected 815,585,330 bytes" in err
    assert list(tmp_path.glob("val2017.zip*")) == []
