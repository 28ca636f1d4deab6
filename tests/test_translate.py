"""The demo translator and the translate stage, end to end through argostranslate, offline."""

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from newsclip.translate.demo_translator import (
    PACKAGE_DIRNAME,
    PACKAGE_FILENAME,
    build_demo_translator,
    eval_paragraphs,
    eval_sentences,
    sample_pairs,
    split_of,
)
from newsclip.translate.packages import (
    MissingLanguagePackageError,
    argos_env,
    import_argos,
    install_packages,
    installed_pairs,
)
from newsclip.translate.translator import TranslateConfig, Translator

TEST_BAR = 0.9  # exact matches on held-out sentences (the real build's bar too); bodies: TEST_BAR ** 4 - 0.05


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or name lookup raises, and is recorded, so even a swallowed attempt fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkAttempt(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="session")
def argos_home(tmp_path_factory):
    """Import argostranslate once with its folders in a temporary place (it reads them at import)."""
    packages = tmp_path_factory.mktemp("argos") / "packages"
    import_argos(packages, also=("translate",))
    return packages


def test_argosmodel_is_a_valid_package(demo_package):
    assert demo_package.name == PACKAGE_FILENAME
    with zipfile.ZipFile(demo_package) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
        meta = json.loads(zf.read(f"{PACKAGE_DIRNAME}/metadata.json"))
    for name in ("metadata.json", "sentencepiece.model", "model/model.bin", "model/config.json",
                 "minisbd/de.onnx", "README.md"):
        assert f"{PACKAGE_DIRNAME}/{name}" in names, name
    assert (meta["from_code"], meta["to_code"], meta["type"]) == ("de", "en", "translate")
    assert meta["from_name"] == "German" and meta["to_name"] == "English" and meta["package_version"]
    assert all(n.startswith(PACKAGE_DIRNAME + "/") for n in names)  # Argos unzips it as one folder
    assert demo_package.stat().st_size < 3_000_000
    # cached: a second call returns the same file without rebuilding
    mtime = demo_package.stat().st_mtime_ns
    assert build_demo_translator(demo_package.parent, log=pytest.fail) == demo_package
    assert demo_package.stat().st_mtime_ns == mtime


def test_build_is_deterministic(tmp_path, argos_home):
    """Two tiny builds with one seed give the same bytes (zip timestamps fixed, one thread, seeded sampling)."""
    a = build_demo_translator(tmp_path / "a", seed=3, steps=2, n_pairs=2000, in_subprocess=False, log=lambda m: None)
    b = build_demo_translator(tmp_path / "b", seed=3, steps=2, n_pairs=2000, in_subprocess=False, log=lambda m: None)
    assert a.read_bytes() == b.read_bytes()


def test_held_out_sentences_are_not_trained():
    held_out = eval_sentences(200)
    assert len({de for de, _ in held_out}) == 200
    assert all(split_of(en) == "eval" for _, en in held_out)


def test_install_and_translate_offline(no_network, tmp_path, demo_package, argos_home):
    """Install into a fresh packages dir and translate held-out sentences with every socket blocked."""
    from argostranslate.package import get_installed_packages
    from argostranslate.translate import Language, PackageTranslation

    target = tmp_path / "packages"
    assert install_packages([demo_package], target) == [PACKAGE_DIRNAME]
    assert installed_pairs(target) == {("de", "en")}
    (pkg,) = get_installed_packages([target])
    # Argos' own translation path: its sentencizer (our minisbd/de.onnx), tokenizer and CTranslate2 call
    argos = PackageTranslation(Language("de", "German"), Language("en", "English"), pkg)
    assert type(argos.sentencizer).__name__ == "MiniSBDSentencizer"
    sentences = eval_sentences(500)
    exact = sum(argos.translate(de) == en for de, en in sentences[:100])
    assert exact / 100 >= TEST_BAR, exact

    translator = Translator(TranslateConfig(packages_dir=str(target)))
    english = translator.translate_texts("de", [de for de, _ in sentences])
    rate = np.mean([e == en for e, (_, en) in zip(english, sentences)])
    print(f"held-out sentences exact: {rate:.3f}")
    assert rate >= TEST_BAR, rate
    assert translator.stats["translate_calls"] == 1  # 500 sentences, one translate_batch call
    assert translator.splitters["de"].startswith("minisbd")
    # the stage reuses Argos' pieces, so it gives Argos' own result
    assert english[:100] == [argos.translate(de) for de, _ in sentences[:100]]

    paragraphs = eval_paragraphs(40)
    body_rate = np.mean([e == en for e, (_, en) in
                         zip(translator.translate_texts("de", [de for de, _ in paragraphs]), paragraphs)])
    print(f"held-out article bodies exact: {body_rate:.3f}")
    assert body_rate >= TEST_BAR ** 4 - 0.05, body_rate  # four sentences, each must be exact
    assert not no_network


def test_public_argos_api_in_a_fresh_process(packages_dir, tmp_path):
    """argos_env alone points a new process's `argostranslate.translate.translate` at the packages, offline."""
    script = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise SystemExit('network access attempted: %r' % (a,))\n"
        "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n"
        "from argostranslate import settings, translate\n"
        "print(settings.package_data_dir)\n"
        "print(translate.translate(sys.argv[1], 'de', 'en'))\n")
    env = {**os.environ, **argos_env(packages_dir, "cpu", 1)}
    de, en = sample_pairs(1, "train", np.random.default_rng(11))[0]
    out = subprocess.run([sys.executable, "-c", script, f"{de} Nachrichten aus Berlin"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(packages_dir.resolve())
    assert lines[1] == f"{en} News from Berlin"
    assert not (Path.home() / ".local" / "share" / "argos-translate" / "packages" / PACKAGE_DIRNAME).exists()


def test_translator_splits_as_argos_does_without_importing_spacy_or_stanza(packages_dir):
    """In a fresh process the Translator loads the package's MiniSBD splitter itself (Argos' sbd module imports
    spaCy, stanza and transformers: 5 s of every small night), and still translates as Argos' public API does."""
    script = (
        "import json, sys\n"
        "from newsclip.translate.translator import TranslateConfig, Translator\n"
        "texts = json.loads(sys.argv[2])\n"
        "ours = Translator(TranslateConfig(packages_dir=sys.argv[1])).translate_texts('de', texts)\n"
        "heavy = sorted(m for m in ('spacy', 'stanza', 'transformers') if m in sys.modules)\n"
        "from argostranslate import translate\n"
        "print(json.dumps({'heavy': heavy, 'equal': ours == [translate.translate(t, 'de', 'en') for t in texts]}))\n")
    pairs = sample_pairs(6, "train", np.random.default_rng(5))
    texts = [" ".join(de for de, _ in pairs[:3]), " ".join(de for de, _ in pairs[3:])]  # three sentences each
    env = {**os.environ, **argos_env(packages_dir, "cpu", 1)}
    out = subprocess.run([sys.executable, "-c", script, str(packages_dir), json.dumps(texts)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"heavy": [], "equal": True}


def _batch(rows):
    cols = {k: np.empty(len(rows), dtype=object) for k in ("article_id", "title", "text", "lang")}
    for i, row in enumerate(rows):
        for k in cols:
            cols[k][i] = row.get(k)
    return cols


def test_stage_on_mixed_batch(packages_dir, tmp_path, no_network):
    de_title, en_title = "Nachrichten aus Berlin", "News from Berlin"
    # a body of training sentences: this test is about the stage, the held-out tests are about the model
    body = sample_pairs(4, "train", np.random.default_rng(7))
    de_body, en_body = " ".join(de for de, _ in body), " ".join(en for _, en in body)
    rows = [
        {"article_id": "en", "title": "News from London", "text": "A red circle at the top, in a meadow.",
         "lang": "en"},
        {"article_id": "de", "title": de_title, "text": de_body, "lang": "de"},
        {"article_id": "nolang", "title": de_title, "text": de_body, "lang": None},  # detected
        {"article_id": "empty", "title": "", "text": None, "lang": None},
        {"article_id": "en-nolang", "title": "What happened on Monday",
         "text": "The council met in Berlin on Monday. Many readers criticised the budget.", "lang": ""},
    ]
    stage = Translator(TranslateConfig(packages_dir=str(packages_dir), cache_dir=str(tmp_path / "cache")))
    out = stage(_batch(rows))
    assert list(out["article_id"]) == [r["article_id"] for r in rows]
    assert list(out["lang"]) == ["en", "de", "de", None, "en"]
    assert list(out["translated"]) == [False, True, True, False, False]
    assert not out["truncated"].any()
    assert out["title_en"][0] == "News from London" and out["text_en"][0] == rows[0]["text"]  # untouched
    assert out["title_en"][4] == rows[4]["title"] and out["text_en"][4] == rows[4]["text"]
    for i in (1, 2):
        assert out["title"][i] == de_title and out["text"][i] == de_body  # originals kept
        assert out["title_en"][i] == en_title
        assert out["text_en"][i] == en_body
    assert out["title_en"][3] == "" and out["text_en"][3] is None
    assert out["lang_confidence"][1] == 1.0 and 0.5 < out["lang_confidence"][2] <= 1.0
    assert out["lang_confidence"][3] == 0.0
    # the same German title and body in two rows are translated once: 2 distinct texts, one call
    assert stage.stats["translate_calls"] == 1


def test_truncation_is_counted(packages_dir):
    body = " ".join(de for de, _ in eval_sentences(30))
    stage = Translator(TranslateConfig(packages_dir=str(packages_dir), max_chars=300))
    out = stage(_batch([{"article_id": "long", "title": "Nachrichten aus Wien", "text": body, "lang": "de"},
                        {"article_id": "short", "title": "Nachrichten aus Wien", "text": "Kurz.", "lang": "de"}]))
    assert list(out["truncated"]) == [True, False]
    assert stage.stats["truncated"] == 1
    assert out["text"][0] == body  # the original stays whole
    assert len(out["text_en"][0]) < len(" ".join(en for _, en in eval_sentences(30))) / 2


def test_cache_skips_a_second_translation(packages_dir, tmp_path):
    cfg = TranslateConfig(packages_dir=str(packages_dir), cache_dir=str(tmp_path / "cache"))
    sentences = eval_sentences(20)
    batch = _batch([{"article_id": str(i), "title": de, "text": de + " " + de, "lang": "de"}
                    for i, (de, _) in enumerate(sentences)])
    first = Translator(cfg)
    out1 = first(batch)
    assert first.stats["translate_calls"] == 1 and first.stats["cache_hits"] == 0
    second = Translator(cfg)  # a new actor, a later run: same cache file
    out2 = second(batch)
    assert second.stats["translate_calls"] == 0 and second.stats["cache_hits"] == 40
    assert not second._loaded  # all hits: the model was never loaded
    assert list(out2["text_en"]) == list(out1["text_en"]) and list(out2["title_en"]) == list(out1["title_en"])
    # a new article in the next run: only it is translated
    batch3 = _batch([{"article_id": "new", "title": "Nachrichten aus Paris", "text": None, "lang": "de"}])
    assert second(batch3)["title_en"][0] == "News from Paris"
    assert second.stats["translate_calls"] == 1 and second.stats["sentences_translated"] == 1


def test_missing_package(packages_dir, tmp_path):
    rows = [{"article_id": "fr", "title": "Le conseil", "text": "Le conseil s'est réuni lundi à Berlin.",
             "lang": "fr"},
            {"article_id": "fr2", "title": None, "text": "Le conseil a discuté du budget.", "lang": "fr"},
            {"article_id": "de", "title": "Nachrichten aus Berlin", "text": None, "lang": "de"}]
    stage = Translator(TranslateConfig(packages_dir=str(packages_dir)))
    with pytest.raises(MissingLanguagePackageError) as err:
        stage(_batch(rows))
    assert err.value.lang == "fr" and err.value.n_articles == 2
    assert "'fr'" in str(err.value) and "newsclip translate install" in str(err.value)
    skip = Translator(TranslateConfig(packages_dir=str(packages_dir), on_missing_package="skip"))
    out = skip(_batch(rows))
    assert list(out["translated"]) == [False, False, True]
    assert out["text_en"][0] == rows[0]["text"] and "no fr->en package" in out["translate_note"][0]
    assert out["title_en"][2] == "News from Berlin"
    with pytest.raises(MissingLanguagePackageError, match="'de'"):
        Translator(TranslateConfig(packages_dir=str(tmp_path / "empty")))(_batch(rows[2:]))


@pytest.mark.slow
def test_stage_in_ray_data(packages_dir, ray_local):
    import ray

    pairs = eval_sentences(12)
    items = [{"article_id": str(i), "title": de, "text": de, "lang": "de" if i % 2 else None}
             for i, (de, _) in enumerate(pairs)]
    cfg = TranslateConfig(packages_dir=str(packages_dir))
    ds = ray.data.from_items(items).map_batches(Translator, fn_constructor_kwargs={"cfg": cfg}, concurrency=1,
                                                batch_size=6, batch_format="numpy")
    rows = sorted(ds.take_all(), key=lambda r: int(r["article_id"]))
    assert [r["lang"] for r in rows] == ["de"] * 12 and all(r["translated"] for r in rows)
    rate = np.mean([r["title_en"] == en for r, (_, en) in zip(rows, pairs)])
    assert rate >= TEST_BAR - 0.1


@pytest.mark.parametrize("variant", ["no-splitter", "empty-stanza"])
def test_package_without_offline_splitter_falls_back_to_rules(variant, packages_dir, tmp_path, no_network):
    """Argos would download a MiniSBD model (or stanza's resources.json) for such a package; the stage never does."""
    target = tmp_path / "packages"
    copy = target / PACKAGE_DIRNAME
    shutil.copytree(packages_dir / PACKAGE_DIRNAME, copy)
    shutil.rmtree(copy / "minisbd")
    if variant == "empty-stanza":
        (copy / "stanza").mkdir()
    stage = Translator(TranslateConfig(packages_dir=str(target)))
    (de1, en1), (de2, en2) = sample_pairs(2, "train", np.random.default_rng(3))
    assert stage.translate_texts("de", [f"{de1} {de2}"]) == [f"{en1} {en2}"]
    assert stage.splitters["de"].startswith("newsclip rule-based")


def _job(output, packages_dir, inline_rows: int):
    from newsclip import config

    return config.load(None, [f"output_dir={output}", f"translate.packages_dir={packages_dir}",
                              f"translate.cache_dir={output / 'cache'}", f"ray.inline_rows={inline_rows}",
                              "translate.part_rows=3"])


def _prepared(output, shards: list[list[dict]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = output / "prepared" / "queries"
    folder.mkdir(parents=True)
    for index, rows in enumerate(shards):
        rows = [{**r, "image_id": f"i-{r['article_id']}", "source": "TW", "query_text": f"{r['title']} {r['body']}",
                 "article_hash": f"{r['title']}|{r['body']}|{r['lang']}"} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{index:05d}.parquet")


@pytest.mark.slow
def test_stage_writes_id_range_parts_and_a_night_equals_a_fresh_run(packages_dir, tmp_path, ray_local, monkeypatch):
    """translated/ is written in parts of `translate.part_rows` rows sorted by id (an external sort: rows are bucketed
    by id range as they come). A night reuses the last run's rows by content hash and translates the rest on the Ray
    pool, which reads and filters the prepared texts itself: its translated/ must equal a fresh run's, and neither
    depends on how many hash partitions the work was spread over (Ray tasks in the night, this process afresh)."""
    import polars as pl

    from newsclip.runtime import partitions
    from newsclip.stages import translate

    german = [de for de, _ in eval_sentences(9)]
    article = {f"a{i}": {"article_id": f"a{i}", "title": german[i], "body": german[i], "lang": "de" if i % 2 else "en"}
               for i in range(9)}
    first, night = tmp_path / "first", tmp_path / "night"
    _prepared(first, [[article[i] for i in ("a5", "a1", "a7")], [article[i] for i in ("a0", "a3", "a6", "a2", "a4")]])
    facts = translate.run(_job(first, packages_dir, inline_rows=1000))  # in this process
    parts = sorted((first / "translated").glob("*.parquet"))
    assert [len(pl.read_parquet(p)) for p in parts] == [3, 3, 2] and facts["new"] == 8
    translated = pl.read_parquet(parts)
    assert translated["article_id"].to_list() == [f"a{i}" for i in range(8)]
    assert translated["translated"].to_list() == [i % 2 == 1 for i in range(8)]
    assert translated["query_text"][1] == f"{translated['title_en'][1]} {translated['text_en'][1]}"

    shutil.copytree(first, night)
    shutil.rmtree(night / "prepared")
    monkeypatch.setattr(partitions, "PART_ROWS", 2)  # 4 partitions
    changed = {**article["a4"], "lang": "de"}  # another hash: translated again
    _prepared(night, [[article["a5"], article["a8"], article["a1"]], [article["a0"], changed, article["a2"]],
                      [article["a6"], article["a7"]]])  # a3 is gone
    facts = translate.run(_job(night, packages_dir, inline_rows=0))  # the Ray pool, on the new texts only
    assert (facts["new"], facts["reused"]) == (2, 6)
    fresh = tmp_path / "fresh"
    shutil.copytree(night / "prepared", fresh / "prepared")
    translate.run(_job(fresh, packages_dir, inline_rows=1000))
    for folder in (night, fresh):
        assert sorted(p.name for p in (folder / "translated").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    expected = pl.read_parquet(fresh / "translated")
    assert expected.filter(article_id="a4")["translated"].item()
    assert pl.read_parquet(night / "translated").equals(expected)
