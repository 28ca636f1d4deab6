"""`newsclip demo-finetune`: demo-tiny adapted to an archive it never saw. The shifted demo archive's scenes use
colours and backgrounds held out of demo-tiny's training (`Scene.sample_shifted`), so zero-shot retrieval is poor;
fine-tuning on the archive's own pairs, the eval sample held out, lifts it. jobs/finetune-demo.yaml is this job."""

from __future__ import annotations

from pathlib import Path

from newsclip.config import JobConfig, from_dict
from newsclip.finetune.config import SECTION, FinetuneConfig
from newsclip.yaml_config import build

ARTICLES = 3000
# the job's keys besides the paths (tests check jobs/finetune-demo.yaml says the same)
JOB = {"name": "finetune-demo", "backbones": ["demo-tiny"], "prepare": {"text": "title_body"},
       "translate": {"enabled": False},  # the shifted archive is in English
       "eval": {"sample_size": 1000, "seed": 0}}
FINETUNE = {"backbone": "demo-tiny", "run": "demo", "lr": 5.0e-4, "warmup_share": 0.05, "weight_decay": 0.1,
            "steps": 200, "batch_size": 64, "validation_share": 0.1, "eval_every": 25, "patience": 3, "seed": 0}


def demo_job(folder: Path) -> tuple[JobConfig, FinetuneConfig]:
    """The demo's job and fine-tune settings with data in `folder/data` and outputs in `folder/output`."""
    paths = {"input": {"articles": str(folder / "data" / "articles"), "images": str(folder / "data" / "images")},
             "output_dir": str(folder / "output")}
    return from_dict(JOB | paths), build(FinetuneConfig, FINETUNE, SECTION)


def run_demo(folder: Path, articles: int = ARTICLES, seed: int = 0) -> int:
    """Write the shifted archive and train demo-tiny if missing, then fine-tune, compare and report."""
    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.finetune.run import finetune_and_compare
    from newsclip.runtime import console

    cfg, ft = demo_job(folder)
    data = folder / "data"
    if not (data / "articles").exists():
        with console.stage("demo data (shifted)") as line:
            write_demo_data(data, articles, seed, shifted=True)
            line.finish(f"{articles} articles in colours and places demo-tiny never saw, written to {data}")
    with console.stage("demo model", lazy=True):
        ensure_demo_model(log=console.log)
    finetune_and_compare(cfg, ft)
    return 0
