"""Translate-stage pieces that need no trained model: detection, the sentence splitter, config, cache, packages."""

import json
import zipfile
from pathlib import Path

import pytest

from newsclip.translate.detect import detect, normalize_lang, resolve_lang
from newsclip.translate.packages import (
    MissingLanguagePackageError,
    argos_env,
    installed_pairs,
    read_package_metadata,
    require_packages,
)
from newsclip.translate.splitter import build_sbd_onnx, split_sentences
from newsclip.translate.translator import TranslateConfig, TranslationCache, truncate

MIXED = {
    "en": "The council met in Berlin on Monday to discuss the new budget for the city's schools.",
    "de": "Der Rat traf sich am Montag in Berlin, um den neuen Haushalt für die Schulen zu besprechen.",
    "fr": "Le conseil s'est réuni lundi à Berlin pour discuter du nouveau budget des écoles de la ville.",
    "es": "El consejo se reunió el lunes en Berlín para discutir el nuevo presupuesto de las escuelas.",
    "it": "Il consiglio si è riunito lunedì a Berlino per discutere il nuovo bilancio delle scuole.",
    "nl": "De raad kwam maandag in Berlijn bijeen om de nieuwe begroting voor de scholen te bespreken.",
    "ru": "Совет собрался в понедельник в Берлине, чтобы обсудить новый бюджет городских школ.",
}


def test_detect_mixed_languages():
    for lang, text in MIXED.items():
        got, conf = detect(text)
        assert got == lang, (text, got, conf)
        assert 0.5 < conf <= 1.0
    # an article quoting a sentence in another language keeps its main language
    assert detect(MIXED["de"] + " Er sagte: 'We will see.' " + MIXED["de"])[0] == "de"
    assert detect(MIXED["en"] + " He said: 'Wir schaffen das.' " + MIXED["en"])[0] == "en"
    assert detect("") == (None, 0.0) and detect("12:30 - 4.5") == (None, 0.0) and detect(None) == (None, 0.0)


def test_given_language_wins():
    assert resolve_lang("de", "The council met", "in Berlin on Monday.") == ("de", 1.0)
    assert resolve_lang(" DE ", None, None) == ("de", 1.0)
    assert resolve_lang(None, None, MIXED["de"])[0] == "de"
    assert resolve_lang("", MIXED["fr"], None)[0] == "fr"
    assert normalize_lang(float("nan")) is None and normalize_lang("pt-BR") == "pt" and normalize_lang("und") is None


SPLIT_CASES = [
    ("Ein großer roter Kreis oben links, auf einer Wiese. Der Rat traf sich am Montag in Berlin.",
     ["Ein großer roter Kreis oben links, auf einer Wiese.", "Der Rat traf sich am Montag in Berlin."]),
    ("Am 3. Mai kamen z. B. viele Leute! Er sagte: „Hallo.“ Dann ging er?! ja. usw. und so weiter",
     ["Am 3. Mai kamen z. B. viele Leute!", "Er sagte: „Hallo.“", "Dann ging er?! ja. usw. und so weiter"]),
    ("Nachrichten aus München", ["Nachrichten aus München"]),
    ("", []),
    ("Ende...    Neu. 40 Menschen kamen.", ["Ende...", "Neu.", "40 Menschen kamen."]),
]


@pytest.mark.parametrize("text,expected", SPLIT_CASES)
def test_rule_splitter(text, expected):
    assert split_sentences(text) == expected


def test_onnx_splitter_matches_rules_through_minisbd(tmp_path):
    from minisbd import SBDetect

    model = build_sbd_onnx(tmp_path / "de.onnx", "de")
    sbd = SBDetect(str(model), use_gpu=False)  # a file path: minisbd uses it as is, no download
    for text, expected in SPLIT_CASES:
        assert (sbd.sentences(text) if text else []) == expected
    long = " ".join(f"Satz Nummer {i} ist hier." for i in range(300))  # > MiniSBD's 1,000-char window
    assert sbd.sentences(long) == split_sentences(long) and len(split_sentences(long)) == 300


def test_config_validation():
    assert TranslateConfig().on_missing_package == "error"
    with pytest.raises(ValueError, match="on_missing_package"):
        TranslateConfig(on_missing_package="ignore")
    with pytest.raises(ValueError, match="max_chars"):
        TranslateConfig(max_chars=0)


def test_truncate():
    assert truncate("kurz", 10) == ("kurz", False)
    text = "Wort " * 100
    cut, was_cut = truncate(text, 103)
    assert was_cut and len(cut) <= 103 and not cut.endswith(" ") and cut.endswith("Wort")


def test_cache_roundtrip_and_concurrent_writers(tmp_path):
    a, b = TranslationCache(tmp_path), TranslationCache(tmp_path)  # two actors, one file
    k1, k2 = TranslationCache.key("de_en@1#x", "Hallo"), TranslationCache.key("de_en@2#y", "Hallo")
    assert k1 != k2  # another package version never reuses a translation
    a.put_many([(k1, "de_en@1#x", "Hello")])
    b.put_many([(k1, "de_en@1#x", "Hi"), (k2, "de_en@2#y", "Hello there")])  # first writer wins
    assert a.get_many([k1, k2, "missing"]) == {k1: "Hello", k2: "Hello there"}
    assert len(b) == 2
    assert (tmp_path / TranslationCache.FILENAME).exists()


def test_argos_env_points_everything_at_the_packages_dir(tmp_path):
    env = argos_env(tmp_path / "pk", "cuda:0", 3)
    assert env["ARGOS_PACKAGES_DIR"] == str((tmp_path / "pk").resolve())
    assert env["ARGOS_DEVICE_TYPE"] == "cuda" and env["ARGOS_INTRA_THREADS"] == "3"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert all(env[k].startswith(str(tmp_path)) for k in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"))
    assert env["ARGOS_PACKAGE_INDEX"].startswith("file://")  # even a stray index update cannot go online


def _fake_package(path: Path, from_code: str, to_code: str = "en") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"translate-{from_code}_{to_code}/metadata.json",
                    json.dumps({"from_code": from_code, "to_code": to_code, "package_version": "1.0"}))
        zf.writestr(f"translate-{from_code}_{to_code}/model/model.bin", b"")
    return path


def test_installed_pairs_and_missing_package_error(tmp_path):
    packages = tmp_path / "packages"
    (packages / "translate-fr_en" / "model").mkdir(parents=True)
    (packages / "translate-fr_en" / "metadata.json").write_text(json.dumps({"from_code": "fr", "to_code": "en"}))
    (packages / "stray-folder").mkdir()
    assert installed_pairs(packages) == {("fr", "en")}
    assert installed_pairs(tmp_path / "nowhere") == set()
    require_packages({"fr": 5, "en": 100}, packages)
    with pytest.raises(MissingLanguagePackageError) as err:
        require_packages({"fr": 5, "de": 7, "en": 100}, packages)
    message = str(err.value)
    assert "'de'" in message and "7 article" in message and "newsclip translate install" in message
    assert err.value.lang == "de" and err.value.n_articles == 7


def test_package_metadata_checks(tmp_path):
    assert read_package_metadata(_fake_package(tmp_path / "x.argosmodel", "it"))["from_code"] == "it"
    (tmp_path / "bad.argosmodel").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="zip"):
        read_package_metadata(tmp_path / "bad.argosmodel")


def test_stage_output_helpers_keep_none():
    from newsclip.translate.translator import _objects

    arr = _objects(["a", None])
    assert arr.dtype == object and arr.tolist() == ["a", None]
    # one cell per row even when the values are equal-length lists, where np.array would make a 2-d array
    nested = _objects([["a", "b"], ["c", "d"]])
    assert nested.shape == (2,) and nested[1] == ["c", "d"]
