"""Demo data: the input contract, the paper's source mix, the defects real data has, same seed same bytes."""

import polars as pl

from newsclip.demo.data import append_demo_data, write_demo_data
from newsclip.demo.scenes import N_SCENES, Scene


def test_same_seed_same_bytes_and_contract(tmp_path):
    counts = write_demo_data(tmp_path / "a", articles=2000, seed=3)
    write_demo_data(tmp_path / "b", articles=2000, seed=3)
    for sub in ("articles", "images"):
        files_a = sorted((tmp_path / "a" / sub).glob("*.parquet"))
        assert files_a and [f.read_bytes() for f in files_a] == [
            (tmp_path / "b" / sub / f.name).read_bytes() for f in files_a]

    articles = pl.read_parquet(tmp_path / "a" / "articles")
    images = pl.read_parquet(tmp_path / "a" / "images")
    assert counts == {"articles": len(articles), "images": len(images)}
    assert articles["article_id"].is_unique().all() and images["image_id"].is_unique().all()
    assert articles.group_by("source").len().sort("source").rows() == [("RSS", 134), ("RT", 354), ("TW", 1512)]
    assert set(articles.filter(pl.col("source") == "RT")["lang"]) == {"de"}
    assert set(articles.filter(pl.col("source") != "RT")["lang"]) == {"en"}
    # ~3% of articles lack text or an image they can be matched to; some images belong to no article
    unusable = articles.filter(pl.col("text").is_null() | pl.col("image_id").is_null()
                               | ~pl.col("image_id").is_in(images["image_id"].implode()))
    assert 0.015 < len(unusable) / len(articles) < 0.05
    orphans = images.filter(~pl.col("image_id").is_in(articles["image_id"].drop_nulls().implode()))
    assert len(orphans) >= 50
    magic = {bytes(b[:4]) for b in images["image"]}
    assert {b"\xff\xd8\xff\xe0", b"\x89PNG"} <= magic  # JPEG and PNG


def test_different_seed_differs(tmp_path):
    write_demo_data(tmp_path / "a", articles=50, seed=1)
    write_demo_data(tmp_path / "b", articles=50, seed=2)
    assert pl.read_parquet(tmp_path / "a" / "articles")["text"].to_list() != \
        pl.read_parquet(tmp_path / "b" / "articles")["text"].to_list()


def test_scene_space_and_german_captions():
    assert N_SCENES == 25_920
    assert Scene.from_index(N_SCENES - 1).caption("en").startswith("Two large")
    scene = Scene(count=0, shape=5, colour=0, size=1, position=4, background=0)  # diamond is feminine
    assert scene.caption("de") == "Eine große rote Raute in der Mitte, auf einer Wiese."
    assert scene.caption("en") == "A large red diamond in the centre, in a meadow."


def test_append_adds_a_new_day_with_new_ids_even_with_the_same_seed(tmp_path):
    write_demo_data(tmp_path, articles=40, seed=0)
    append_demo_data(tmp_path, articles=10, seed=0)
    articles = pl.read_parquet(tmp_path / "articles")
    images = pl.read_parquet(tmp_path / "images")
    assert len(articles) == 50 and articles["article_id"].n_unique() == 50
    assert images["image_id"].n_unique() == len(images)
    assert sorted(p.name for p in (tmp_path / "articles").iterdir())[0] == "add-0000040-00000.parquet"


def test_the_shifted_archive_is_in_colours_and_places_demo_tiny_never_saw(tmp_path):
    from newsclip.demo.scenes import BACKGROUNDS, COLOURS, SHIFTED_BACKGROUNDS, SHIFTED_COLOURS

    write_demo_data(tmp_path, articles=200, seed=1, shifted=True)
    articles = pl.read_parquet(tmp_path / "articles").drop_nulls("text")
    assert set(articles["lang"]) == {"en"} and len(articles) > 180

    def named(sentence: str, table: list) -> set[str]:
        return {row[0] for row in table if f" {row[0]} " in f" {sentence.rstrip('.')} "}

    for text in articles["text"]:
        scene = text.split(".")[0] + "."  # the body opens with the scene sentence
        assert len(named(scene, SHIFTED_COLOURS)) == 1 and len(named(scene, SHIFTED_BACKGROUNDS)) == 1, scene
        assert not named(scene, COLOURS) and not named(scene, BACKGROUNDS), scene
    # demo-tiny's training scenes (Scene.sample) never reach the shifted tables
    assert N_SCENES == 25_920 and Scene.from_index(N_SCENES - 1).colour == len(COLOURS) - 1
