"""`newsclip ingest`: NewsImages layouts, hostile file names, image URLs against a local HTTP server, config errors."""

import argparse
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from newsclip.ingest.cli import add_parser, format_summary, standalone
from newsclip.ingest.cli import main as ingest_main
from newsclip.ingest.config import from_dict, load
from newsclip.ingest.errors import IngestError
from newsclip.ingest.job import ingest
from newsclip.ingest.paths import UnsafePath, safe_path
from newsclip.yaml_config import ConfigError


def jpeg(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run(tmp_path: Path, config: dict) -> tuple[dict, Path]:
    config = {"output_dir": str(tmp_path / "out"), **config}
    summary = ingest(from_dict(config))
    return summary, tmp_path / "out"


def articles(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "articles")


def images(out: Path) -> dict[str, bytes]:
    table = pl.read_parquet(out / "images")
    return dict(zip(table["image_id"], table["image"], strict=True))


def rejects(out: Path) -> dict[str, str]:
    table = pl.read_parquet(out / "ingest-rejects.parquet")
    return {f"{r['kind']}:{r['id']}": r["reason"] for r in table.iter_rows(named=True)}


@pytest.fixture
def release_2021(tmp_path) -> Path:
    """A NewsImages 2021-style part: TSV `aid, url, iid, hashvalue, title, text, imgFile` and an image folder."""
    folder = tmp_path / "ni2021" / "images"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"f{i}.jpg").write_bytes(jpeg(i))
    (folder / "broken.jpg").write_bytes(b"<html>not found</html>")
    rows = [
        ("a1", "https://news.example/1", "i1", "h", "Title one", "Body \"one\" with quotes", "f1.jpg"),
        ("a2", "https://news.example/2", "i2", "h", "Title two", "Body two", "f2.jpg"),
        ("a3", "https://news.example/3", "i3", "h", "Title three", "", "gone.jpg"),
        ("a4", "https://news.example/4", "i4", "h", "", "Body four", "broken.jpg"),
        ("a2", "https://news.example/2b", "i9", "h", "Duplicate", "Duplicate", "f3.jpg"),
        ("", "https://news.example/5", "i5", "h", "No id", "No id", "f0.jpg"),
        ("a6", "https://news.example/6", "", "h", "No image", "No image", ""),
    ]
    header = "aid\turl\tiid\thashvalue\ttitle\ttext\timgFile\n"
    (tmp_path / "ni2021" / "content.tsv").write_text(header + "".join("\t".join(r) + "\n" for r in rows))
    return tmp_path / "ni2021"


def test_newsimages2021_tsv_and_folder(tmp_path, release_2021):
    summary, out = run(tmp_path, {
        "layout": "newsimages2021", "quote_char": None,
        "parts": [{"name": "GER", "file": str(release_2021 / "content.tsv"), "images": str(release_2021 / "images"),
                   "lang": "DE"}]})
    frame = articles(out)
    assert frame["article_id"].to_list() == ["a1", "a2", "a3", "a4", "a6"]  # the duplicate and the id-less row go
    assert set(frame["source"]) == {"GER"} and set(frame["lang"]) == {"de"}
    assert frame.filter(pl.col("article_id") == "a1")["text"].item() == 'Body "one" with quotes'
    assert frame.filter(pl.col("article_id") == "a3")["text"].item() is None  # empty cells are null, not ""
    assert frame.filter(pl.col("article_id") == "a6")["image_id"].item() is None
    # the input contract, exactly: the schema the demo data and the prepare stage use
    from newsclip.articles import ARTICLE_SCHEMA, IMAGE_SCHEMA
    from newsclip.demo import data
    from newsclip.ingest import job

    written = pq.read_schema(next((out / "articles").glob("*.parquet")))
    assert written.names == ARTICLE_SCHEMA.names  # Parquet keeps timestamp[s] as [ms], like the demo's shards
    assert [f.type for f in written][:-1] == [f.type for f in ARTICLE_SCHEMA][:-1]
    assert pq.read_schema(next((out / "images").glob("*.parquet"))).remove_metadata() == IMAGE_SCHEMA
    assert job.ARTICLE_SCHEMA is data.ARTICLE_SCHEMA is ARTICLE_SCHEMA and job.IMAGE_SCHEMA is data.IMAGE_SCHEMA

    got = images(out)
    assert got == {"i1": jpeg(1), "i2": jpeg(2)}  # bytes exactly as on disk
    why = rejects(out)
    assert why["image:i3"] == "missing: not in the image folder: gone.jpg"
    assert why["image:i4"].startswith("unreadable: not an image")
    assert why["article:a2"].startswith("duplicate article id")
    assert why["article:None"] == "missing article id"
    part = summary["parts"]["GER"]
    assert (part["rows"], part["articles"], part["rejected_rows"], part["articles_without_image_id"]) == (7, 5, 2, 1)
    assert (part["images"], part["images_missing"], part["images_unreadable"]) == (2, 1, 1)
    assert summary["reasons"]["missing: not in the image folder"] == 1
    assert json.loads((out / "ingest-summary.json").read_text())["articles"] == 5
    text = format_summary(summary)
    assert "GER: 7 rows -> 5 articles" in text and "1 missing, 1 unreadable" in text


def test_auto_layout_csv_quoting_dates_and_image_id_file_names(tmp_path):
    """2023-style names in a quoted CSV (commas and newlines in texts); images named `<image_id>.<ext>`."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "x1.png").write_bytes(jpeg(1))  # the extension need not match the format
    (folder / "x2.JPG").write_bytes(jpeg(2))
    (folder / "x2.jpeg").write_bytes(jpeg(3))  # config order: jpg before jpeg
    (tmp_path / "part.csv").write_text(
        "article_id,article_url,article_title,text,image_id,Published\n"
        '1,u,"Hello, world","line one\nline two",x1,2022-03-01 10:20:30\n'
        '2,u,Second,"say ""hi""",x2,not a date\n'
        "3,u,Third,plain,x3,\n")
    summary, out = run(tmp_path, {"parts": [{"name": "RSS", "file": str(tmp_path / "part.csv"),
                                             "images": str(folder)}]})
    frame = articles(out).sort("article_id")
    assert frame["title"].to_list() == ["Hello, world", "Second", "Third"]
    assert frame["text"].to_list() == ["line one\nline two", 'say "hi"', "plain"]
    assert frame["lang"].to_list() == [None, None, None]  # unknown: the translate stage detects it
    assert str(frame["published"][0]) == "2022-03-01 10:20:30" and frame["published"][1] is None
    assert summary["parts"]["RSS"]["published_unparsed"] == 1
    assert summary["parts"]["RSS"]["columns"]["title"] == "article_title"
    assert images(out) == {"x1": jpeg(1), "x2": jpeg(2)}


def test_hostile_file_names_never_leave_the_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "ok.jpg").write_bytes(jpeg(1))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(9))  # a real image, so only the path check can refuse it
    (folder / "link-out.jpg").symlink_to(secret)
    (folder / "link-in.jpg").symlink_to(folder / "sub" / "ok.jpg")
    (folder / "big.jpg").write_bytes(jpeg(2) + b"\0" * 5000)
    names = {"a1": "sub/ok.jpg", "a2": "../secret.jpg", "a3": str(secret), "a4": "link-out.jpg",
             "a5": "link-in.jpg", "a6": "sub/../../secret.jpg", "a7": "..\\secret.jpg", "a8": "C:\\secret.jpg",
             "a9": "big.jpg", "a10": "sub"}
    lines = "".join(f"{a}\ti{a}\tt\tx\t{name}\n" for a, name in names.items())
    (tmp_path / "c.tsv").write_text("aid\tiid\ttitle\ttext\timgFile\n" + lines)
    _, out = run(tmp_path, {"layout": "newsimages2021", "max_image_bytes": 4000,
                            "parts": [{"name": "P", "file": str(tmp_path / "c.tsv"), "images": str(folder)}]})
    assert sorted(images(out)) == ["ia1", "ia5"]  # in the folder, directly or through an in-folder link
    why = rejects(out)
    for a in ("a2", "a3", "a4", "a6", "a7", "a8"):
        assert why[f"image:i{a}"].startswith("unreadable: unsafe file name"), (a, why[f"image:i{a}"])
    assert why["image:ia9"].startswith("unreadable: too large")
    assert why["image:ia10"].startswith("unreadable: cannot read file")  # a folder, not a file
    assert secret.read_bytes() not in images(out).values()


def test_safe_path_unit(tmp_path):
    assert safe_path(tmp_path, "a/b.jpg") == (tmp_path / "a" / "b.jpg").resolve()
    for bad in ("", "a\x00b", "/etc/passwd", "../x", "a/../../x", "\\\\server\\share\\x", "D:x"):
        with pytest.raises(UnsafePath):
            safe_path(tmp_path, bad)


def test_unreferenced_images_id_prefix_and_parts(tmp_path):
    for part in ("RT", "TW"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "1.jpg").write_bytes(jpeg(len(part)))
        (tmp_path / part / "extra.jpg").write_bytes(jpeg(7))
        (tmp_path / part / "notes.txt").write_text("not an image extension")
        (tmp_path / f"{part}.csv").write_text("aid,iid,title,text\n1,1,t,x\n")
    parts = [{"name": p, "file": str(tmp_path / f"{p}.csv"), "images": str(tmp_path / p)} for p in ("RT", "TW")]
    _, out = run(tmp_path, {"layout": "newsimages2022", "parts": parts})
    assert articles(out)["article_id"].to_list() == ["1"]  # both parts use id 1: the second is a duplicate
    assert "id_prefix" in rejects(out)["article:1"]

    _, out = run(tmp_path, {"layout": "newsimages2022", "parts": parts, "id_prefix": True,
                            "include_unreferenced_images": True})
    assert articles(out)["article_id"].to_list() == ["RT:1", "TW:1"]
    assert articles(out)["image_id"].to_list() == ["RT:1", "TW:1"]
    got = images(out)
    assert sorted(got) == ["RT:1", "RT:extra", "TW:1", "TW:extra"]
    assert got["RT:1"] == jpeg(2) and got["TW:1"] == jpeg(2)


def test_shard_sizes_and_rerun_replaces_shards(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(7):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"{i},{i},title {i},text {i}\n")
    (tmp_path / "c.csv").write_text("aid,iid,title,text\n" + "".join(rows))
    config = {"parts": [{"name": "P", "file": str(tmp_path / "c.csv"), "images": str(tmp_path / "img")}],
              "article_shard_rows": 2, "image_shard_rows": 3}
    summary, out = run(tmp_path, config)
    assert len(list((out / "articles").glob("*.parquet"))) == 4 == summary["article_shards"]
    assert len(list((out / "images").glob("*.parquet"))) == 3 == summary["image_shards"]
    assert pl.read_parquet(out / "images").height == 7
    summary, out = run(tmp_path, {**config, "article_shard_rows": 100, "image_shard_rows": 100})
    assert len(list((out / "articles").glob("*.parquet"))) == 1  # the old shards went with the old folder
    assert len(list((out / "images").glob("*.parquet"))) == 1
    assert not list((out / ".staging").glob("*"))


def test_output_feeds_the_prepare_stage(tmp_path, release_2021, ray_local):
    """What ingest writes is what a job reads: prepare accepts it and accounts for every article."""
    from newsclip import config
    from newsclip.stages.prepare import run as prepare

    run(tmp_path, {"layout": "newsimages2021", "quote_char": None,
                   "parts": [{"name": "GER", "file": str(release_2021 / "content.tsv"),
                              "images": str(release_2021 / "images")}]})
    out = tmp_path / "out"
    cfg = config.from_dict({"input": {"articles": str(out / "articles"), "images": str(out / "images")},
                            "output_dir": str(tmp_path / "job"), "eval": {"sample_size": None}})
    prepare(cfg)
    prepared = pl.read_parquet(tmp_path / "job" / "prepared" / "articles.parquet")
    assert sorted(prepared["article_id"]) == ["a1", "a2"]  # a3/a4: image missing/unreadable, a6: no image id


# ------------------------------------------------------------------------------------------------ image URLs
class _Server:
    """A local HTTP server standing in for publishers' image URLs; it counts requests and concurrency."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                # a timed-out request's handler outlives the client's attempt (it sleeps on), so only requests
                # that answer promptly count towards the client's concurrency
                counted = self.path not in ("/slow", "/trickle")
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    server.active += counted
                    server.max_active = max(server.max_active, server.active)
                try:
                    server.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.active -= counted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path

        def send(code: int, body: bytes = b"", length: bool = True, kind: str = "image/jpeg", **headers) -> None:
            h.send_response(code)
            h.send_header("Content-Type", kind)
            if length:
                h.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                h.send_header(key, value)
            h.end_headers()
            h.wfile.write(body)

        if path.startswith("/img/"):
            time.sleep(0.05)  # long enough for requests to overlap when the client runs them in parallel
            send(200, jpeg(int(path.rsplit("/", 1)[1])))
        elif path == "/missing":
            send(404, b"no")
        elif path == "/slow":
            time.sleep(1.5)
            send(200, jpeg(1))
        elif path == "/trickle":  # never idle for a socket timeout, never done within the total timeout
            h.send_response(200)
            h.end_headers()
            for _ in range(40):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.05)
        elif path == "/big":
            send(200, jpeg(1) + b"\0" * 6000)
        elif path == "/big-no-length":
            send(200, jpeg(1) + b"\0" * 6000, length=False)
        elif path == "/flaky":
            send(503, b"busy") if self.hits[path] == 1 else send(200, jpeg(5))
        elif path == "/html":
            send(200, b"<html>cookie wall</html>", kind="text/html")
        elif path == "/to-file":
            send(302, b"", Location="file:///etc/passwd")
        elif path == "/to-img":
            send(301, b"", Location="/img/6")
        else:
            send(400, b"bad")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    s = _Server()
    yield s
    s.close()


def test_image_urls_with_retries_timeouts_size_cap_and_concurrency(tmp_path, server):
    urls = {f"ok{i}": f"/img/{i}" for i in range(8)} | {
        "missing": "/missing", "slow": "/slow", "trickle": "/trickle", "big": "/big",
        "bignolength": "/big-no-length", "flaky": "/flaky", "html": "/html", "tofile": "/to-file",
        "redirect": "/to-img", "badscheme": None}
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "local.jpg").write_bytes(jpeg(3))  # in the folder: never fetched
    lines = [f"{k},{k},t,x,{server.url + v if v else 'ftp://127.0.0.1/x.jpg'}\n" for k, v in urls.items()]
    lines.append(f"a-local,local,t,x,{server.url}/img/99\n")
    (tmp_path / "c.csv").write_text("aid,iid,title,text,image_url\n" + "".join(lines))
    started = time.time()
    summary, out = run(tmp_path, {
        "parts": [{"name": "W", "file": str(tmp_path / "c.csv"), "images": str(folder)}],
        "max_image_bytes": 4000,
        "network": {"enabled": True, "timeout_s": 0.5, "retries": 1, "backoff_s": 0.01, "concurrency": 3}})
    elapsed = time.time() - started
    got = images(out)
    assert sorted(got) == sorted([f"ok{i}" for i in range(8)] + ["flaky", "redirect", "local"])
    assert got["ok4"] == jpeg(4) and got["flaky"] == jpeg(5) and got["redirect"] == jpeg(6) and got["local"] == jpeg(3)
    assert "/img/99" not in server.hits
    why = rejects(out)
    assert why["image:missing"].startswith("missing: HTTP 404")
    assert why["image:slow"].startswith("unreadable: download failed (timeout)")
    assert why["image:trickle"].startswith("unreadable: download failed (timeout)")
    assert why["image:big"].startswith("unreadable: too large: Content-Length")
    assert why["image:bignolength"].startswith("unreadable: too large: more than")
    assert why["image:html"].startswith("unreadable: not an image")
    assert why["image:tofile"].startswith("unreadable: HTTP 302")
    assert why["image:badscheme"].startswith("unreadable: unsupported URL scheme")
    assert server.hits["/slow"] == 2 and server.hits["/flaky"] == 2  # retried once
    assert server.hits["/missing"] == 1 and server.hits["/big"] == 1  # permanent failures are not retried
    assert server.max_active <= 3  # the concurrency limit
    assert server.max_active >= 2  # ...and downloads did run in parallel
    assert elapsed < 8
    assert summary["parts"]["W"]["images_missing"] == 1


def test_network_disabled_by_default_never_fetches(tmp_path, server):
    (tmp_path / "c.csv").write_text(f"aid,iid,title,text,image_url\n1,1,t,x,{server.url}/img/1\n")
    summary, out = run(tmp_path, {"parts": [{"name": "W", "file": str(tmp_path / "c.csv")}]})
    assert server.hits == {}
    assert rejects(out)["image:1"].startswith("missing: not in the image folder (network disabled)")
    assert summary["images"] == 0 and pl.read_parquet(out / "images").height == 0


# --------------------------------------------------------------------------------------------- config and CLI
def test_config_errors_name_the_key(tmp_path):
    good = {"parts": [{"name": "P", "file": "c.csv"}]}
    cases = [
        ({}, "parts: expected a non-empty list"),
        ({"parts": []}, "parts: expected a non-empty list"),
        ({"parts": [{"name": "P", "fil": "c.csv"}]}, "parts[0].fil: unknown key"),
        ({"parts": [{"name": "P"}]}, "parts[0]"),
        ({**good, "layout": "2021"}, "layout: '2021' is not one of"),
        ({**good, "network": {"timeout_s": "fast"}}, "network.timeout_s: expected float"),
        ({**good, "network": {"timeout_s": 0}}, "network.timeout_s: must be positive"),
        ({**good, "image_shard_rows": 0}, "image_shard_rows: must be at least 1"),
        ({**good, "columns": {"aid": "x"}}, "columns.aid: unknown key"),
        ({"parts": [{"name": "P", "file": "a"}, {"name": "P", "file": "b"}]}, "parts: part names must be unique"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from_dict(raw)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    config = write_yaml(tmp_path / "evil.yaml", f"parts: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(config)
    assert not marker.exists()


def test_missing_columns_and_files_are_clear_errors(tmp_path):
    (tmp_path / "c.csv").write_text("id_of_article,body\n1,x\n")
    cfg = {"parts": [{"name": "P", "file": str(tmp_path / "c.csv")}], "output_dir": str(tmp_path / "o")}
    with pytest.raises(IngestError, match="no article id column.*set columns.article_id"):
        ingest(from_dict(cfg))
    with pytest.raises(IngestError, match="layout newsimages2021 expects a column 'aid'"):
        ingest(from_dict({**cfg, "layout": "newsimages2021"}))
    with pytest.raises(IngestError, match="columns.image_id is 'iid' but the file has no such column"):
        ingest(from_dict({**cfg, "columns": {"article_id": "id_of_article", "image_id": "iid"}}))
    summary = ingest(from_dict({**cfg, "columns": {"article_id": "id_of_article"}}))
    assert summary["articles"] == 1
    with pytest.raises(FileNotFoundError, match=r"parts\[P\].file"):
        ingest(from_dict({**cfg, "parts": [{"name": "P", "file": str(tmp_path / "nope.csv")}]}))


def test_add_parser_and_main(tmp_path, release_2021, capsys):
    config = write_yaml(tmp_path / "ingest.yaml", f"""
layout: newsimages2021
quote_char: null
output_dir: {tmp_path / 'ignored'}
parts:
  - {{name: GER, file: {release_2021 / 'content.tsv'}, images: {release_2021 / 'images'}, lang: de}}
""")
    parser = argparse.ArgumentParser(prog="newsclip")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", str(config), "--set", f"output_dir={tmp_path / 'cli'}"])
    assert ingest_main(args) == 0
    assert "GER: 7 rows -> 5 articles" in capsys.readouterr().out
    assert articles(tmp_path / "cli").height == 5 and not (tmp_path / "ignored").exists()


def test_example_config_in_jobs_is_valid():
    cfg = load(Path(__file__).resolve().parents[1] / "jobs" / "ingest.yaml")
    assert [p.name for p in cfg.parts] == ["RT", "RSS", "TW"] and not cfg.network.enabled


def test_standalone_module_exit_codes(tmp_path):
    assert standalone([str(tmp_path / "nope.yaml")]) == 2
    assert os.environ.get("NEWSCLIP_CACHE")  # conftest's private cache: nothing here touches the user's


def test_invalid_utf8_and_a_byte_order_mark_do_not_stop_ingest(tmp_path):
    (tmp_path / "c.csv").write_bytes("\ufeffaid,iid,title,text\n".encode() + b"1,1,caf\xe9,ok\n")
    summary, out = run(tmp_path, {"parts": [{"name": "P", "file": str(tmp_path / "c.csv")}]})
    assert articles(out)["title"].to_list() == ["caf\ufffd"]  # Latin-1 bytes become U+FFFD, the row stays
    assert summary["parts"]["P"]["columns"]["article_id"] == "aid"  # the BOM is not part of the first name


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    (tmp_path / "img").mkdir()
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")  # 400 Mpx in a few KB: over Pillow's bomb bound
    (tmp_path / "img" / "1.png").write_bytes(buffer.getvalue())
    (tmp_path / "c.csv").write_text("aid,iid,title,text\n1,1,t,x\n")
    summary, out = run(tmp_path, {"parts": [{"name": "P", "file": str(tmp_path / "c.csv"),
                                             "images": str(tmp_path / "img")}]})
    assert rejects(out)["image:1"].startswith("unreadable: too many pixels")
    assert summary["reasons"] == {"unreadable: too many pixels": 1}


def test_an_image_id_reused_across_parts_must_be_one_image(tmp_path, capsys):
    from newsclip.cli import main

    for part, seed in (("RT", 1), ("TW", 1)):
        (tmp_path / part).mkdir()
        (tmp_path / part / "7.jpg").write_bytes(jpeg(seed))
        (tmp_path / f"{part}.csv").write_text(f"aid,iid,title,text\n{part.lower()}1,7,t,x\n")
    parts = [{"name": p, "file": str(tmp_path / f"{p}.csv"), "images": str(tmp_path / p)} for p in ("RT", "TW")]
    _, out = run(tmp_path, {"layout": "newsimages2022", "parts": parts})  # the same bytes: one image
    assert articles(out)["image_id"].to_list() == ["7", "7"] and list(images(out)) == ["7"]

    (tmp_path / "TW" / "7.jpg").write_bytes(jpeg(2))  # now another photo under the same id
    job = write_yaml(tmp_path / "ingest.yaml", json.dumps({"layout": "newsimages2022", "parts": parts,
                                                           "output_dir": str(tmp_path / "out")}))
    assert main(["ingest", str(job)]) == 2
    assert "image id '7' names different images in parts 'RT' and 'TW'" in capsys.readouterr().err
    assert list(images(out)) == ["7"]  # nothing was replaced
