"""newsclip finetune: a short fine-tune of demo-tiny on a shifted archive through the CLI, with its train worker's
process killed midway; its outputs, the held-out eval sample, the comparison with the start, a later job scoring the
model, config errors; two tiny 2-worker runs, one killed and run again, give the same model.pt bytes."""

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from newsclip.cli import main
from newsclip.config import from_dict
from newsclip.finetune.config import FinetuneConfig, load
from newsclip.yaml_config import ConfigError, to_dict

ARTICLES = 300
ADDED = 30  # a new day of articles, arriving after the last prepare and before the fine-tune
EVAL = 60
STEPS = 30
KILL_AT = 15  # rank 0's process is SIGKILLed after this step: the run resumes from its step-10 checkpoint


def _job(tmp, data, **finetune) -> str:
    job = {"name": "ft", "input": {"articles": str(data / "articles"), "images": str(data / "images")},
           "output_dir": str(tmp / "out"), "eval": {"sample_size": EVAL, "seed": 3},
           "translate": {"enabled": False}, "ray": {"num_cpus": 2},
           "finetune": {"backbone": "demo-tiny", "batch_size": 32, "lr": 5e-4, "warmup_share": 0.1,
                        "validation_share": 0.1, **finetune}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from newsclip.demo.data import write_demo_data

    folder = tmp_path_factory.mktemp("ft-data")
    write_demo_data(folder, ARTICLES, seed=5, shifted=True)  # colours and places demo-tiny never saw
    articles = pl.read_parquet(folder / "articles")
    images = pl.read_parquet(folder / "images")
    return folder, articles, images


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data, demo_tiny, ray_local):
    import time

    from newsclip.demo.data import append_demo_data
    from newsclip.finetune.loop import KILL_ENV
    from newsclip.runtime.runner import run_stages

    tmp = tmp_path_factory.mktemp("ft")
    shutil.copytree(data[0], tmp / "data")
    job = _job(tmp, tmp / "data", steps=STEPS, eval_every=10, max_failures=1)
    # prepared/ as a last run left it, then a new day arrives: the sample of the new input is another one, so a
    # fine-tune that split the stale prepared/ would be compared on articles it trained on
    run_stages(load(job)[0], ("prepare",))
    stale = pl.read_parquet(tmp / "out" / "prepared" / "articles.parquet").filter("in_eval")["article_id"].to_list()
    append_demo_data(tmp / "data", ADDED, seed=6, shifted=True)
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as env:  # one Ray Train run, killed once, for all the tests below
        env.setenv(KILL_ENV, str(KILL_AT))
        assert main(["finetune", job]) == 0
    seconds = time.perf_counter() - started
    cfg, ft = load(job)
    folder = cfg.output / "finetune" / ft.run
    print(f"finetune of {STEPS} steps: {seconds:.1f}s")
    return cfg, ft, folder, job, stale


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_finetune_writes_its_files_and_the_loss_goes_down(finetuned):
    cfg, ft, folder, _, _ = finetuned
    for name in ("model.pt", "config.yaml", "split.json", "losses.json"):
        assert (folder / name).is_file(), name
    assert yaml.safe_load((folder / "config.yaml").read_text())["finetune"]["steps"] == STEPS
    losses = json.loads((folder / "losses.json").read_text())
    train = [row["loss"] for row in losses["train_loss"]]
    assert len(train) == losses["steps"] == STEPS
    first, last = np.mean(train[:5]), np.mean(train[-5:])
    print(f"train loss {first:.3f} -> {last:.3f}; validation {losses['validation_loss']}")
    assert last < first - 0.1
    assert [row["step"] for row in losses["validation_loss"]] == [10, 20, 30]
    assert losses["best_step"] in (10, 20, 30)
    assert (folder / "ray" / f"ft-{ft.run}").is_dir()  # Ray Train's run folder: named by the job and the run


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_finetune_ends_with_a_paired_comparison_with_its_start_and_a_report_with_the_curve(finetuned):
    cfg, _, folder, _, _ = finetuned
    out, model = cfg.output, str(folder / "model.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["backbone"]: r for r in metrics["rows"] if r["source"] == "all" and r["direction"] == "text_to_image"}
    assert set(rows) == {"demo-tiny", model} and rows[model]["n"] == rows["demo-tiny"]["n"] >= EVAL - 3
    print(f"held-out MRR: demo-tiny {rows['demo-tiny']['mrr']:.3f}, fine-tuned {rows[model]['mrr']:.3f}")
    assert rows[model]["mrr"] > rows["demo-tiny"]["mrr"] + 0.1  # 0.088 -> 0.268 (the test build of demo-tiny)
    [pair] = [p for p in metrics["paired"] if p["direction"] == "text_to_image"]
    assert (pair["a"], pair["b"]) == ("demo-tiny", model) and pair["hi"] < 0 and pair["p_holm"] < 0.05
    html = (out / "report.html").read_text()
    assert 'aria-label="Training curve"' in html and "Fine-tuning: default/model.pt" in html
    assert "resumed from the checkpoint of step 10" in html and "from demo-tiny" in html
    assert "## Fine-tuning" in (out / "report.md").read_text()
    # the comparison scored the prepared/ the split was drawn from: it ran every stage but prepare
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert "prepare" not in runs[-1]["stages"] and runs[-1]["status"] == "finished"
    assert runs[-2]["stages"]["prepare"]["status"] == "done"  # fine-tuning's own, of the new day's input


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_the_fine_tune_job_file_is_searched_with_both_models(finetuned, capsys):
    """`newsclip search` and `newsclip backbones` read a fine-tune's job file as the comparison its command ran: the
    fine-tuned model is searched by the name the report gives it."""
    cfg, _, folder, job, _ = finetuned
    capsys.readouterr()
    assert main(["backbones", job]) == 0
    assert str(folder / "model.pt") in capsys.readouterr().out
    assert main(["search", job, "a red car in Oslo", "--backbone", "default/model.pt", "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["backbone"] == str(folder / "model.pt") and len(answer["results"]) == 3
    runs = sorted((cfg.output / "runs").glob("*.json"))
    assert answer["index"] == runs[-1].stem  # the comparison's run


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_the_saved_model_loads_as_a_backbone_and_gives_the_trainers_embeddings(finetuned):
    import torch
    from clip.clip import _transform

    from newsclip.retrieval.backbones import load_backbone

    _, _, folder, _, _ = finetuned
    probe = np.load(folder / "probe.npz")
    assert len(probe["image"]) >= 4
    pixels = _transform(64).transforms[-1](torch.from_numpy(probe["pixels"]).float().div(255))
    tokens = torch.from_numpy(probe["tokens"])

    def embeddings(model):
        with torch.no_grad():
            return model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()

    # the file holds the trainer's fp32 weights, and load_backbone (as a job loads it) gives them back bit for
    # bit (no round trip through fp16), so the embeddings are the trainer's
    state = torch.load(folder / "model.pt", weights_only=True)["state_dict"]  # beside it: its training record
    assert all(v.dtype != torch.float16 for v in state.values())
    model, _ = load_backbone(str(folder / "model.pt"))
    loaded = model.state_dict()
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in state.items())
    image, text = embeddings(model)
    np.testing.assert_allclose(image, probe["image"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text, probe["text"], rtol=1e-5, atol=1e-5)
    # and it is not the starting model
    start, _ = load_backbone("demo-tiny")
    assert not np.allclose(embeddings(start)[1], probe["text"], atol=1e-2)


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_nothing_of_the_eval_sample_is_trained_or_validated_on(finetuned):
    from newsclip.articles import sample_pairs

    cfg, _, folder, _, _ = finetuned
    split = json.loads((folder / "split.json").read_text())
    usable = pl.read_parquet(cfg.output / "prepared" / "articles.parquet")
    hashes = pl.read_parquet(cfg.output / "prepared" / "candidates.parquet").select("image_id", "image_hash")
    expected = sample_pairs(usable, EVAL, 3).to_list()
    assert sorted(split["eval"]) == sorted(expected) and len(expected) == EVAL
    seen = split["train"] + split["validation"]
    assert len(seen) == len(set(seen)) and not set(split["train"]) & set(split["validation"])
    assert not set(seen) & set(expected)
    pairs = usable.join(hashes, on="image_id")
    eval_pairs = pairs.filter(pl.col("article_id").is_in(expected))
    used = pairs.filter(pl.col("article_id").is_in(seen))
    assert not set(used["image_id"]) & set(eval_pairs["image_id"])
    assert not set(used["image_hash"]) & set(eval_pairs["image_hash"])
    # every usable article is in exactly one place: a split, the eval sample or the excluded count
    excluded = sum(v for k, v in split["excluded"].items() if k != "images")
    assert len(seen) + EVAL + excluded == len(usable)


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_the_comparison_scores_exactly_the_held_out_sample_of_what_finetune_prepared(finetuned):
    """A new day came in after the last prepare: fine-tuning prepared it (under the job's lock) and split that, and
    the comparison scored exactly the sample the split held out, none of which the model saw."""
    import torch

    from newsclip.articles import sample_pairs
    from newsclip.retrieval.trained import TRAINING_KEY

    cfg, _, folder, _, stale = finetuned
    split = json.loads((folder / "split.json").read_text())
    usable = pl.read_parquet(cfg.output / "prepared" / "articles.parquet")
    assert len(usable) > ARTICLES - 15 + ADDED - 5  # the new day is in
    assert sorted(split["eval"]) == sorted(sample_pairs(usable, EVAL, 3).to_list())
    assert len(set(split["eval"]) - set(stale)) > EVAL // 2  # the stale sample was another one
    scored = pl.read_parquet(cfg.output / "prepared" / "queries")["article_id"].to_list()
    assert sorted(scored) == sorted(split["eval"])
    metrics = pl.read_csv(cfg.output / "metrics.csv")
    assert (metrics["n_excluded_trained"] == 0).all()
    overall = metrics.filter(pl.col("source") == "all", pl.col("direction") == "text_to_image")
    assert (overall["n_sampled"] == EVAL).all()
    # the checkpoint carries its split: what it trained and validated on
    record = torch.load(folder / "model.pt", weights_only=True)[TRAINING_KEY]
    assert record["train"]["articles"] == sorted(split["train"])
    assert record["validation"]["articles"] == sorted(split["validation"])
    assert record["start"] == "demo-tiny" and len(record["train"]["image_hashes"]) > 100


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_a_later_job_scoring_the_model_leaves_out_what_it_trained_on(finetuned, tmp_path):
    """A job that scores model.pt on every article leaves out those it trained or validated on (for every backbone,
    so pairs stay paired), counts them in metrics.csv and metrics.json, and its report says so; a checkpoint
    without a record (someone else's) is scored on everything, and the report says its training data is unknown."""
    import torch

    from newsclip.runtime.runner import run_stages

    cfg, _, folder, _, _ = finetuned
    model = str(folder / "model.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.load(model, weights_only=True)["state_dict"], foreign)  # the weights alone: no record
    later = from_dict({"name": "later", "input": to_dict(cfg.input), "output_dir": str(tmp_path / "out"),
                       "backbones": [model, str(foreign)], "translate": {"enabled": False},
                       "eval": {"sample_size": None, "seed": 3, "directions": ["text_to_image"]}})
    run_stages(later)
    split = json.loads((folder / "split.json").read_text())
    seen = set(split["train"]) | set(split["validation"])
    metrics = pl.read_csv(later.output / "metrics.csv").filter(pl.col("source") == "all")
    sampled = len(pl.read_parquet(later.output / "prepared" / "queries"))
    for row in metrics.iter_rows(named=True):
        assert row["n_sampled"] == sampled and row["n_excluded_trained"] >= len(seen)
        assert row["n"] == sampled - row["n_excluded_trained"]
    trained = {f["backbone"]: f for f in json.loads((later.output / "metrics.json").read_text())["trained"]}
    assert trained[str(foreign)] == {"backbone": str(foreign), "training": "unknown"}
    assert trained[model]["n_excluded_trained"] == metrics["n_excluded_trained"][0]
    assert trained[model]["trained_images_among_candidates"] > 100  # every image is a candidate here
    print(f"later job: {sampled} queries, {metrics['n_excluded_trained'][0]} left out as trained on")
    report = (later.output / "report.md").read_text()
    assert f"{model} was fine-tuned from demo-tiny on {len(seen)} articles" in report
    assert f"{foreign}: its training data is unknown" in report
    assert "trained or validated on them" in report


@pytest.mark.slow  # needs demo-tiny's weights
def test_finetune_takes_the_jobs_lock(tmp_path, data, demo_tiny, capsys):
    """While another run holds the job's output folder, fine-tuning neither prepares, splits nor trains."""
    import fcntl

    from newsclip.runtime.runner import run_stages

    job = _job(tmp_path, data[0], steps=1)
    run_stages(load(job)[0], ("prepare",))  # so only the lock can stop it before it trains
    with open(tmp_path / "out" / ".lock", "a") as other:  # another process's run, as far as this one can tell
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["finetune", job]) == 2
    assert "another newsclip run is using this output_dir" in capsys.readouterr().err
    assert not (tmp_path / "out" / "finetune").exists()


@pytest.mark.slow  # needs the demo translator
def test_training_texts_are_the_texts_the_job_scores_translated(tmp_path, packages_dir):
    """With translation on, fine-tuning trains on the English the translate stage gives (the same translator and
    cache), not on the input's German."""
    from newsclip.articles import article_texts
    from newsclip.demo.data import write_demo_data
    from newsclip.finetune.split import compute_split
    from newsclip.finetune.texts import training_texts
    from newsclip.runtime.runner import run_stages

    write_demo_data(tmp_path / "data", 60, seed=7)  # German sources among them
    cfg, ft = load(_job(tmp_path, tmp_path / "data", steps=1), ["translate.enabled=true", "eval.sample_size=15"])
    run_stages(cfg, ("prepare", "translate"))
    usable = pl.read_parquet(cfg.output / "prepared" / "articles.parquet")
    texts, untranslated = training_texts(cfg, usable.select("article_id", "file"))
    translated = pl.read_parquet(cfg.output / "translated").select("article_id", "query_text")
    assert len(untranslated) == 0 and len(translated) == 15
    assert translated.join(texts, on="article_id", suffix="_ft").filter(
        pl.col("query_text") != pl.col("query_text_ft")).is_empty()  # the stage's texts, exactly
    split = compute_split(cfg, ft)
    original = article_texts(cfg.input.articles, cfg.prepare.text)
    german = usable.filter(pl.col("lang") == "de")["article_id"]
    trained = split.train.filter(pl.col("article_id").is_in(german.implode())).join(original, on="article_id",
                                                                                     suffix="_input")
    assert len(trained) >= 5 and (trained["query_text"] != trained["query_text_input"]).all()


def test_the_comparison_encodes_the_model_with_its_starts_settings():
    """The fine-tuned model keeps the starting backbone's encode settings: precision, batch, GPU share."""
    from newsclip.finetune.run import comparison_job

    model = Path("/runs/out/finetune/default/model.pt")
    for encode in ({"num_gpus_per_actor": 1},  # the defaults from ViT-B/32's cost, not a checkpoint's guess
                   {"per_backbone": {"ViT-B/32": {"precision": "fp32", "batch_size": 96, "actors": 3}}}):
        cfg = from_dict({"backbones": ["ViT-B/32"], "encode": encode})
        compared = comparison_job(cfg, FinetuneConfig(backbone="ViT-B/32"), model)
        start, tuned = compared.encode.for_backbone("ViT-B/32"), compared.encode.for_backbone(str(model))
        for key in ("precision", "batch_size", "num_gpus_per_actor", "actors"):
            assert getattr(tuned, key) == getattr(start, key) == getattr(cfg.encode.for_backbone("ViT-B/32"), key)


def test_each_step_trains_on_a_seeded_shuffle_of_the_whole_split():
    """What a rank trains on at a step is a function of (seed, epoch, step): an epoch is a permutation of the whole
    train split, a resumed epoch goes on with the same rows, and no rank or micro-batch repeats a pair."""
    from newsclip.finetune.feed import steps_per_epoch, train_plan

    ft = FinetuneConfig(batch_size=4, workers=2, grad_accum=2, seed=3)
    rows = 101
    assert steps_per_epoch(rows, ft) == 6
    epoch = {rank: list(train_plan(rows, ft, 0, 0, rank)) for rank in (0, 1)}
    taken = np.concatenate([b for batches in epoch.values() for b in batches])
    assert len(taken) == 96 == len(set(taken.tolist())) and taken.max() > 90
    assert not all((np.diff(b) == 1).all() for b in epoch[0])  # not windows of consecutive rows
    for rank in (0, 1):  # resumed at step 2: the rows of steps 2.. exactly
        assert [b.tolist() for b in train_plan(rows, ft, 0, 2, rank)] == [b.tolist() for b in epoch[rank][4:]]
        assert [b.tolist() for b in train_plan(rows, ft, 0, 0, rank)] == [b.tolist() for b in epoch[rank]]
    assert [b.tolist() for b in train_plan(rows, ft, 1, 0, 0)] != [b.tolist() for b in epoch[0]]


def test_a_run_folder_resumes_only_the_same_fine_tune(tmp_path):
    """The same fine-tune (split and settings) resumes in its folder; another one is refused, naming --restart,
    and --restart empties the folder."""
    from dataclasses import replace

    from newsclip.finetune.run import open_run, run_name
    from newsclip.finetune.split import Split

    cfg = from_dict({"name": "a job", "output_dir": str(tmp_path), "translate": {"enabled": False}})
    ft = FinetuneConfig(run="r")
    pairs = pl.DataFrame({"article_id": ["a1", "a2"], "query_text": ["x", "y"], "image_id": ["i1", "i2"],
                          "image_hash": ["h1", "h2"], "file": ["f", "f"]})
    split = Split(pairs, pairs.clear(), ["a3"], {"eval_image": 0, "images": 0})
    folder = open_run(cfg, ft, split)
    assert run_name(cfg, ft) == "a-job-r"
    (folder / "ray" / run_name(cfg, ft)).mkdir(parents=True)  # what Ray Train left of a run whose driver died
    assert open_run(cfg, replace(ft, evaluate=False, max_failures=5), split) == folder  # the same training
    with pytest.raises(ValueError, match=r"other settings \(finetune\.lr\).*--restart"):
        open_run(cfg, replace(ft, lr=2e-5), split)
    with pytest.raises(ValueError, match=r"other data \(split\.json.*--restart"):
        open_run(cfg, ft, replace(split, eval_ids=["a4"]))
    open_run(cfg, replace(ft, lr=2e-5), split, restart=True)
    assert not (folder / "ray").exists() and (folder / "split.json").exists()


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_an_article_sharing_eval_image_bytes_is_excluded(tmp_path, data, demo_tiny, ray_local):
    """A byte-identical copy of an eval image under another id, with its own article, is never trained on."""
    from newsclip.articles import sample_pairs
    from newsclip.finetune.split import compute_split
    from newsclip.runtime.runner import run_stages

    folder, articles, images = data
    copy = tmp_path / "data"
    (copy / "articles").mkdir(parents=True)
    (copy / "images").mkdir()
    # every image duplicated under a new id with a new article: whichever are sampled for eval, copies exist
    dup_images = images.with_columns(pl.concat_str(pl.lit("dup-"), "image_id").alias("image_id"))
    dup_articles = articles.with_columns(pl.concat_str(pl.lit("dup-"), "article_id").alias("article_id"),
                                         pl.concat_str(pl.lit("dup-"), "image_id").alias("image_id"),
                                         pl.concat_str(pl.lit("Another "), "title").alias("title"))
    pl.concat([articles, dup_articles]).write_parquet(copy / "articles" / "a.parquet")
    pl.concat([images, dup_images]).write_parquet(copy / "images" / "i.parquet")
    cfg, ft = load(_job(tmp_path, copy, steps=1))
    run_stages(cfg, ("prepare",))
    split = compute_split(cfg, ft)
    expected = set(sample_pairs(pl.read_parquet(cfg.output / "prepared" / "articles.parquet"), EVAL, 3))
    images_of_eval = {a["image_id"].removeprefix("dup-") for a in
                      pl.concat([articles, dup_articles]).filter(pl.col("article_id").is_in(expected)).to_dicts()}
    used = set(pl.concat([split.train, split.validation])["image_id"].str.strip_prefix("dup-"))
    assert not used & images_of_eval
    assert split.excluded["eval_image_bytes"] >= EVAL - 5  # the copies of (nearly) every eval image


@pytest.mark.parametrize("assignment, key", [
    ("finetune.lr=0", "finetune.lr"),
    ("finetune.batch_size=0", "finetune.batch_size"),
    ("finetune.precision=fp8", "finetune.precision"),
    ("finetune.precision=bf16", "finetune.precision"),  # on CPU workers
    ("finetune.validation_share=1.5", "finetune.validation_share"),
    ("finetune.lock_imag=true", "finetune.lock_imag"),
    ("finetune.patience=2", "finetune.patience"),  # with validation_share 0 below
    ("finetune.epochs=null", "finetune.epochs"),
    ("eval.k=0", "eval.k"),  # the job's own keys are checked as `newsclip run` checks them
])
def test_config_errors_name_the_key(tmp_path, assignment, key, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"finetune": {"validation_share": 0.0} if "patience" in assignment else {}}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(job, [assignment])
    assert main(["finetune", str(job), "--set", assignment]) == 2
    assert key in capsys.readouterr().err


def test_defaults_and_lock_options():
    assert FinetuneConfig().resolved_precision == "fp32"
    assert FinetuneConfig(gpus_per_worker=1).resolved_precision == "bf16"
    with pytest.raises(ValueError, match="freeze_text"):
        FinetuneConfig(lock_image=True, freeze_text=True)


def test_lr_warms_up_then_decays_by_cosine():
    from newsclip.finetune.loop import lr_at

    ft = FinetuneConfig(lr=1.0, warmup_share=0.1, min_lr_share=0.1)
    lrs = [lr_at(s, 100, ft) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_clip_loss_matches_a_direct_computation():
    import torch

    from newsclip.finetune.loop import clip_loss

    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    i, t = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    logits = 10.0 * i @ t.T
    expected = 0
    for m in (logits, logits.T):
        expected += -np.mean([np.log(np.exp(m[k].numpy()).astype(np.float64)[k] / np.exp(m[k].numpy()).sum())
                              for k in range(6)]) / 2
    assert clip_loss(image, text, torch.tensor(10.0)).item() == pytest.approx(expected, rel=1e-5)


def test_lock_image_leaves_the_image_tower_as_it_was():
    from newsclip.demo.model import build_demo_clip
    from newsclip.finetune.loop import freeze
    from newsclip.finetune.optim import param_groups

    model = build_demo_clip()
    freeze(model, FinetuneConfig(lock_image=True))
    trained = {id(p) for group in param_groups(model, 0.1) for p in group["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert "logit_scale" in names and "token_embedding.weight" in names
    assert not any(n.startswith("visual.") for n in names)


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_a_killed_worker_resumes_from_its_last_checkpoint(finetuned):
    """Rank 0's process was SIGKILLed after step 15; Ray Train restarted the worker group, which resumed at the
    step-10 checkpoint (not at 0) and ran every step once."""
    _, _, folder, _, _ = finetuned
    losses = json.loads((folder / "losses.json").read_text())
    assert (folder / f".killed-at-{KILL_AT}").exists()
    assert losses["resumed_from"] == [10]
    assert [r["step"] for r in losses["train_loss"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in losses["validation_loss"]] == [10, 20, 30]


TWIN_STEPS, TWIN_KILL_AT, TWIN_SHORT_AT = 4, 3, 2


@pytest.fixture(scope="module")
def twins(tmp_path_factory, data, demo_tiny, ray_local):
    """Two tiny fine-tunes of 2 workers on one prepared archive, the last rank's micro-batch of step 2 short (an
    image that no longer decodes) in both: `undisturbed`, and `killed`, whose rank 0 is SIGKILLed after step 3 with
    no retry left, so the command fails as if its driver died; the same command again resumes it. Their model.pt."""
    import time

    from newsclip.finetune.loop import KILL_ENV, SHORT_ENV

    tmp = tmp_path_factory.mktemp("twins")
    settings = {"steps": TWIN_STEPS, "batch_size": 8, "eval_every": 2, "workers": 2, "cpus_per_worker": 0.5,
                "max_failures": 0, "evaluate": False}
    seconds = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SHORT_ENV, str(TWIN_SHORT_AT))
        for run, kill in (("undisturbed", None), ("killed", TWIN_KILL_AT)):
            job = _job(tmp, data[0], run=run, **settings)
            started = time.perf_counter()
            if kill:
                env.setenv(KILL_ENV, str(kill))
                with pytest.raises(Exception, match="(?i)worker"):  # Ray Train's error: the worker group died
                    main(["finetune", job])
                env.delenv(KILL_ENV)
                seconds["killed (fails)"] = time.perf_counter() - started
                started = time.perf_counter()
            assert main(["finetune", job]) == 0
            seconds[run] = time.perf_counter() - started
    print("2-worker fine-tunes of", TWIN_STEPS, "steps:", {k: round(v, 1) for k, v in seconds.items()})
    return {run: tmp / "out" / "finetune" / run for run in ("undisturbed", "killed")}


@pytest.mark.slow  # Ray Train runs of demo-tiny
@pytest.mark.long  # three 2-worker Ray Train runs: ~2 minutes on 2 cores
def test_a_killed_run_of_two_workers_run_again_gives_the_undisturbed_bytes(twins):
    """The run resumed from its step-2 checkpoint (after its driver's command failed, the same command again) with
    every rank's data position and RNG, so its model.pt is byte for byte the undisturbed run's."""
    losses = {run: json.loads((folder / "losses.json").read_text()) for run, folder in twins.items()}
    assert losses["killed"]["resumed_from"] == [2] and losses["undisturbed"]["resumed_from"] == []
    assert (twins["killed"] / f".killed-at-{TWIN_KILL_AT}").exists()
    assert (twins["killed"] / "model.pt").read_bytes() == (twins["undisturbed"] / "model.pt").read_bytes()
    assert losses["killed"]["train_loss"] == losses["undisturbed"]["train_loss"]


@pytest.mark.slow  # Ray Train runs of demo-tiny
@pytest.mark.long  # the same runs
def test_an_epoch_that_comes_up_short_ends_on_every_rank(twins):
    """One rank's micro-batch came up short at step 2: both ranks ended epoch 0 after step 1 (no loop, no DDP
    hang) and the run went on in epoch 1 to its planned steps."""
    for folder in twins.values():
        losses = json.loads((folder / "losses.json").read_text())
        assert losses["epochs_cut_short"] == [{"epoch": 0, "at_step": TWIN_SHORT_AT - 1}]
        assert losses["steps"] == TWIN_STEPS and len(losses["train_loss"]) == TWIN_STEPS


def test_the_demo_job_file_is_what_demo_finetune_runs():
    from pathlib import Path

    from newsclip.finetune.demo import demo_job

    repo = Path(__file__).resolve().parents[1]
    assert load(repo / "jobs" / "finetune-demo.yaml") == demo_job(Path("newsclip-demo/shifted"))
