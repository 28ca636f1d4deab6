"""newsclip finetune: a short fine-tune of demo-tiny on a shifted archive through the CLI, with its train worker's
process killed midway; its outputs, the held-out eval sample, the comparison with the start, config errors."""

import json

import numpy as np
import polars as pl
import pytest
import yaml

from newsclip.cli import main
from newsclip.finetune.config import FinetuneConfig, load
from newsclip.yaml_config import ConfigError

ARTICLES = 300
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

    from newsclip.finetune.loop import KILL_ENV

    tmp = tmp_path_factory.mktemp("ft")
    job = _job(tmp, data[0], steps=STEPS, eval_every=10, max_failures=1)
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as env:  # one Ray Train run, killed once, for all the tests below
        env.setenv(KILL_ENV, str(KILL_AT))
        assert main(["finetune", job]) == 0
    seconds = time.perf_counter() - started
    cfg, ft = load(job)
    folder = cfg.output / "finetune" / ft.run
    print(f"finetune of {STEPS} steps: {seconds:.1f}s")
    return cfg, ft, folder, job


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_finetune_writes_its_files_and_the_loss_goes_down(finetuned):
    _, ft, folder, _ = finetuned
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


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_finetune_ends_with_a_paired_comparison_with_its_start_and_a_report_with_the_curve(finetuned):
    cfg, _, folder, _ = finetuned
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
    # the comparison reused the prepared texts: prepare's key does not read the backbones
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert runs[-1]["stages"]["prepare"] == {"status": "up to date"} and runs[-1]["status"] == "finished"


@pytest.mark.slow  # a Ray Train run of demo-tiny
def test_the_saved_model_loads_as_a_backbone_and_gives_the_trainers_embeddings(finetuned):
    import torch
    from clip.clip import _transform

    from newsclip.retrieval.backbones import load_backbone

    _, _, folder, _ = finetuned
    probe = np.load(folder / "probe.npz")
    assert len(probe["image"]) >= 4
    pixels = _transform(64).transforms[-1](torch.from_numpy(probe["pixels"]).float().div(255))
    tokens = torch.from_numpy(probe["tokens"])

    def embeddings(model):
        with torch.no_grad():
            return model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()

    # the file holds the trainer's fp32 weights, and load_backbone (as a job loads it) gives them back bit for
    # bit (no round trip through fp16), so the embeddings are the trainer's
    state = torch.load(folder / "model.pt", weights_only=True)
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

    cfg, _, folder, _ = finetuned
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
    _, _, folder, _ = finetuned
    losses = json.loads((folder / "losses.json").read_text())
    assert (folder / f".killed-at-{KILL_AT}").exists()
    assert losses["resumed_from"] == [10]
    assert [r["step"] for r in losses["train_loss"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in losses["validation_loss"]] == [10, 20, 30]


def test_the_demo_job_file_is_what_demo_finetune_runs():
    from pathlib import Path

    from newsclip.finetune.demo import demo_job

    repo = Path(__file__).resolve().parents[1]
    assert load(repo / "jobs" / "finetune-demo.yaml") == demo_job(Path("newsclip-demo/shifted"))
