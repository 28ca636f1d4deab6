"""The runner: it alone skips, times and records stages, knows none of them by name, and checks before the first one
what they need; a job never waits in silence for what it cannot get."""

import re
import time
from pathlib import Path

import pytest
import torch

from newsclip import config
from newsclip.cli import main
from newsclip.config import RayConfig
from newsclip.runtime import console, runner
from newsclip.runtime.ray_setup import ResourcesUnavailableError, map_actors
from newsclip.runtime.stage import ActorRequest, Needs, Stage
from newsclip.runtime.store import read_manifest, record_stage

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")


@pytest.fixture(autouse=True)
def plain_console():
    console.configure()
    yield
    console.configure()


def test_the_runner_names_no_stage():
    """Only the order of the stages knows their names: the runner asks each stage what it reads and needs."""
    source = Path(runner.__file__).read_text().splitlines()
    order = [i for i, line in enumerate(source) if line.startswith("STAGE_NAMES = (")]
    assert len(order) == 1
    rest = "\n".join(line for i, line in enumerate(source) if i != order[0])
    named = {name for name in runner.STAGE_NAMES if re.search(rf"\b{name}\b", rest)}
    assert not named, f"runner.py names the stages {sorted(named)} outside STAGE_NAMES"


def _job(tmp_path, *overrides: str) -> config.JobConfig:
    return config.load(None, [f"output_dir={tmp_path / 'out'}", *overrides])


def _stages(calls: list[str], naps: dict[str, float] | None = None):
    """Stages that count their calls; `naps`: seconds a stage's one entry (or each of its two, side by side) takes."""

    def make(name: str) -> Stage:
        def work(cfg):
            calls.append(name)
            if name == "encode":  # two entries, each from a thread of its own, as encode's backbones run

                def side(part: str) -> dict:
                    time.sleep((naps or {}).get(name, 0))
                    return record_stage(cfg.output, f"{name}:{part}", [], rows=1)

                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(2) as pool:
                    return list(pool.map(side, ["a", "b"]))
            time.sleep((naps or {}).get(name, 0))
            return record_stage(cfg.output, name, [], rows=1)

        # prepare depends on `input` only: another eval setting must not redo it
        return Stage(name, work, sections=("input",) if name == "prepare" else None)

    return make


def test_the_runner_skips_what_is_up_to_date_and_times_every_stage(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(runner, "_stage", _stages(calls, {"translate": 0.3, "encode": 0.3}))
    cfg = _job(tmp_path)
    record = runner.run_stages(cfg)
    assert calls == list(runner.STAGE_NAMES)
    assert all(record["stages"][name]["status"] == "done" for name in runner.STAGE_NAMES)
    assert record["stages"]["translate"]["seconds"] >= 0.3 and record["stages"]["prepare"]["seconds"] < 0.3
    # each entry its own seconds, from the runner's clock, also for entries recorded side by side in two threads
    stages = read_manifest(cfg.output)["stages"]
    assert stages["translate"]["seconds"] >= 0.3 and stages["prepare"]["seconds"] < 0.3
    assert 0.3 <= stages["encode:a"]["seconds"] < 0.55 and 0.3 <= stages["encode:b"]["seconds"] < 0.55

    calls.clear()
    record = runner.run_stages(cfg)
    assert calls == [] and {s["status"] for s in record["stages"].values()} == {"up to date"}

    calls.clear()
    runner.run_stages(_job(tmp_path, "eval.seed=7"))  # prepare's sections are unchanged: it stays up to date
    assert calls == list(runner.STAGE_NAMES[1:])
    assert "seconds" not in record_stage(cfg.output, "outside", [])  # no stage running: nothing to time


def _demo_job(tmp_path) -> list[str]:
    from newsclip.demo.data import write_demo_data

    write_demo_data(tmp_path / "data", 40, seed=3)
    return [f"input.articles={tmp_path / 'data' / 'articles'}", f"input.images={tmp_path / 'data' / 'images'}",
            f"output_dir={tmp_path / 'out'}", "translate.enabled=false"]


def _run(tmp_path, settings: list[str]) -> int:
    job = tmp_path / "job.yaml"
    job.write_text("name: preflight\n")
    return main(["run", str(job), *(a for s in settings for a in ("--set", s))])


def test_missing_weights_stop_the_job_before_its_first_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    weights = tmp_path / "clip-weights"
    weights.mkdir()
    checkpoint = tmp_path / "models" / "mine.pt"
    settings = [*_demo_job(tmp_path), f'backbones=["RN50", "ViT-B/32", "{checkpoint}"]',
                f"encode.download_root={weights}"]
    assert _run(tmp_path, settings) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran: not even prepare
    # every missing file, where it was looked for, and how to get it
    assert "RN50.pt, ViT-B-32.pt" in err and str(weights) in err and "prefetch" in err
    assert str(checkpoint) in err


@NO_GPU
def test_gpus_a_local_ray_never_has_stop_the_job_naming_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")  # found is enough here: the job stops before anything reads it
    assert _run(tmp_path, [*_demo_job(tmp_path), f'backbones=["{checkpoint}"]', "encode.num_gpus_per_actor=1"]) == 2
    err = capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert "encode.num_gpus_per_actor" in err and "--set encode.num_gpus_per_actor=0" in err and "0 GPUs" in err


class _Identity:
    def __call__(self, batch):
        return batch


def test_a_pool_waits_for_a_node_on_a_cluster_then_says_which_setting(ray_local, tmp_path, monkeypatch, capsys):
    """A cluster (an address is given) may gain the node a pool needs: the console says what the pool waits for,
    and after ray.wait_timeout_s the job stops naming the setting. The session's local Ray stands in for it."""
    monkeypatch.setattr(runner, "_stage", lambda name: Stage(
        name, lambda cfg: pytest.fail("ran without its GPU"), needs_ray=lambda cfg: True,
        needs=lambda cfg: Needs(actors=(ActorRequest("shards", 1, 1, "shards.num_cpus", "shards.num_gpus"),))))
    started = time.monotonic()
    assert main(["prepare", str(_write(tmp_path)), "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "ray.address=auto", "--set", "ray.wait_timeout_s=1.5"]) == 2
    assert 1.5 <= time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert re.search(r"warning: shards: waiting for 1 GPU and 1 CPU per actor \(the largest node has 0 GPUs", err)
    assert "shards.num_gpus" in err and "ray.wait_timeout_s=1.5" in err

    # the pools that stages start themselves (encode's, translate's) wait the same way, named by their stage
    with console.stage("encode"), pytest.raises(ResourcesUnavailableError, match=r"encode\.num_gpus_per_actor"):
        map_actors(ray_local.data.range(2), RayConfig(address="auto", wait_timeout_s=0.5), _Identity,
                   batch_size=1, compute=ray_local.data.ActorPoolStrategy(size=1), num_cpus=0, num_gpus=1)
    assert "encode _Identity: waiting for 1 GPU per actor" in capsys.readouterr().err
    # on a local Ray, which never grows, at once
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with console.stage("encode"), pytest.raises(ResourcesUnavailableError, match="the local Ray can never give"):
        map_actors(ray_local.data.range(2), RayConfig(wait_timeout_s=600), _Identity,
                   batch_size=1, compute=ray_local.data.ActorPoolStrategy(size=1), num_cpus=0, num_gpus=1)


def _write(tmp_path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text("name: waiting\ninput: {articles: a, images: i}\n")
    return job


def test_the_jobs_lock_is_reentrant_in_the_process_that_holds_it(tmp_path):
    """`newsclip finetune` runs stages under its own hold of the job's lock; another holder is refused meanwhile."""
    import fcntl

    with runner.job_lock(tmp_path):
        with runner.job_lock(tmp_path):  # run_stages inside finetune
            pass
        with open(tmp_path / ".lock", "a") as other, pytest.raises(BlockingIOError):  # still held: another run
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".lock", "a") as other:  # released at the end of the outer hold
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
