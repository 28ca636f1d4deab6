"""The fine-tuning demo twice on the same shifted archive: undisturbed, and with its train worker's process killed
midway (it resumes from its last checkpoint); both against zero-shot demo-tiny on the same held-out pairs, with the
paired bootstrap; prints JSON.

    .venv/bin/python benchmarks/finetune_resume.py [--kill-at 110] [--workdir DIR] [--out FILE.json]

The archive, the job and the fine-tune settings are `newsclip demo-finetune`'s (jobs/finetune-demo.yaml). The two
runs are `finetune.run: undisturbed` and `killed`; then one job scores [demo-tiny, both models] on the eval sample,
so the killed run's model is compared with the undisturbed one's on the same articles."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-at", type=int, default=110, help="SIGKILL the train worker after this step")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from newsclip.demo.data import write_demo_data
    from newsclip.demo.model import ensure_demo_model
    from newsclip.finetune.demo import ARTICLES, demo_job
    from newsclip.finetune.loop import KILL_ENV
    from newsclip.finetune.run import finetune
    from newsclip.runtime.runner import run_stages

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        cfg, ft = demo_job(folder)
        if not (folder / "data" / "articles").exists():
            write_demo_data(folder / "data", ARTICLES, 0, shifted=True)
        ensure_demo_model()
        runs = {}
        for run, kill in (("undisturbed", None), ("killed", args.kill_at)):
            if kill:
                os.environ[KILL_ENV] = str(kill)
            folder_of_run = cfg.layout.finetune(run)
            if not (folder_of_run / "model.pt").exists():  # a --workdir keeps what an earlier call trained
                finetune(cfg, replace(ft, run=run, evaluate=False))
            os.environ.pop(KILL_ENV, None)
            losses = json.loads((folder_of_run / "losses.json").read_text())
            runs[run] = {"model": str(folder_of_run / "model.pt"), "seconds": losses["seconds"],
                         "resumed_from": losses["resumed_from"], "best_step": losses["best_step"],
                         "best_validation_loss": round(losses["best_validation_loss"], 4)}
        models = [runs["undisturbed"]["model"], runs["killed"]["model"]]
        compared = replace(cfg, backbones=(ft.backbone, *models))
        run_stages(compared)
        metrics = json.loads(compared.layout.metrics_json.read_text())
    overall = {r["backbone"]: r for r in metrics["rows"] if r["source"] == "all" and r["direction"] == "text_to_image"}
    result = {"articles": ARTICLES, "eval_pairs": overall[ft.backbone]["n"], "kill_at_step": args.kill_at,
              "mrr": {name: {key: round(overall[model][key], 4) for key in ("mrr", "mrr_lo", "mrr_hi")}
                      for name, model in (("zero_shot", ft.backbone), ("undisturbed", models[0]),
                                          ("killed", models[1]))},
              "runs": runs,
              "paired": [{k: p[k] for k in ("a", "b", "difference", "lo", "hi", "p_holm", "decision")}
                         for p in metrics["paired"] if p["direction"] == "text_to_image"]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
