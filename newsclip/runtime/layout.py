"""The output layout: every path under a job's `output_dir`, named here and nowhere else (DESIGN.md, convention 13)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# where stages write before they commit by rename; a reader of output_dir skips whatever lies under it
STAGING = ".staging"


@dataclass(frozen=True)
class Prepared:
    """`prepared/`, which the prepare stage commits whole: built on the committed folder, or on the staged folder
    that will replace it, so that both name the same files."""

    dir: Path

    @property
    def articles(self) -> Path:
        """The usable articles: id, image, source, language, whether sampled for evaluation, input shard."""
        return self.dir / "articles.parquet"

    @property
    def queries(self) -> Path:
        """The sampled articles with their texts, one part per input shard."""
        return self.dir / "queries"

    @property
    def candidates(self) -> Path:
        """The images with their hash, shard and whether they are ranked (`candidate`)."""
        return self.dir / "candidates.parquet"

    @property
    def articles_all(self) -> Path:
        """Every input article's id and hash: what the next run compares its input against."""
        return self.dir / "articles_all.parquet"

    @property
    def image_hashes(self) -> Path:
        """Every input image's hash and decode check, which the next run reuses."""
        return self.dir / "image_hashes.parquet"


@dataclass(frozen=True)
class Layout:
    """The paths under `root` (a job's `output_dir`): `Layout(cfg.output)`, or `cfg.layout`."""

    root: Path

    def relative(self, path: Path) -> str:
        """`path` relative to `root`, `/`-separated: the name `staged_dir` commits a folder under."""
        return path.relative_to(self.root).as_posix()

    @property
    def prepared(self) -> Prepared:
        """`prepared/`: the prepare stage's output."""
        return Prepared(self.root / "prepared")

    @property
    def translated(self) -> Path:
        """`translated/`: the query rows with their English texts."""
        return self.root / "translated"

    def query_texts(self, translated: bool) -> Path:
        """Where encode and evaluate read the query texts: `translated/` when the job translates, else the prepared
        queries."""
        return self.translated if translated else self.prepared.queries

    @property
    def rejects(self) -> Path:
        """`rejects/`: every dropped or failed row with its stage and reason."""
        return self.root / "rejects"

    def rejects_file(self, name: str) -> Path:
        """`rejects/<name>.parquet`, e.g. `prepare` or `encode-<slug>-<side>`."""
        return self.rejects / f"{name}.parquet"

    @property
    def embeddings(self) -> Path:
        """`embeddings/`: each backbone's embeddings of this run's rows."""
        return self.root / "embeddings"

    def embeddings_of(self, backbone_slug: str, side: str) -> Path:
        """`embeddings/<slug>/<side>/`, side `texts` or `images`."""
        return self.embeddings / backbone_slug / side

    @property
    def rankings(self) -> Path:
        """`rankings/`: the top-k per query of each backbone and direction."""
        return self.root / "rankings"

    def rankings_parquet(self, stem: str) -> Path:
        """`rankings/<stem>.parquet`: the rankings with their scores (see runtime/rankings.py)."""
        return self.rankings / f"{stem}.parquet"

    def rankings_tsv(self, stem: str) -> Path:
        """`rankings/<stem>.tsv`: the official NewsImages format."""
        return self.rankings / f"{stem}.tsv"

    def rankings_database(self, stem: str) -> Path:
        """`rankings/<stem>.database.parquet`: the database an exact search ranked against."""
        return self.rankings / f"{stem}.database.parquet"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def results(self) -> Path:
        """`results/`: one CLIP_benchmark-style file per backbone."""
        return self.root / "results"

    def result(self, backbone_slug: str) -> Path:
        """`results/<slug>.json`."""
        return self.results / f"{backbone_slug}.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def resolved_config(self) -> Path:
        """`config.resolved.yaml`: the job's config as the last run resolved it."""
        return self.root / "config.resolved.yaml"

    @property
    def manifest(self) -> Path:
        """`manifest.json`: what each stage committed (read it with `runtime.store.read_manifest`)."""
        return self.root / "manifest.json"

    @property
    def runs(self) -> Path:
        """`runs/`: one record per run."""
        return self.root / "runs"

    def run_record(self, run_id: str) -> Path:
        """`runs/<run id>.json`."""
        return self.runs / f"{run_id}.json"

    @property
    def logs(self) -> Path:
        """`logs/`: the runs' own log and Ray's logs."""
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        """`logs/newsclip.log`: every message of the runs that did work."""
        return self.logs / "newsclip.log"

    @property
    def lock(self) -> Path:
        """`.lock`: held by the one run (or store compaction) that uses the folder."""
        return self.root / ".lock"

    @property
    def staging(self) -> Path:
        """`.staging/`: what stages write before they commit it; a run starts by clearing it."""
        return self.root / STAGING

    def scratch(self, stage: str) -> Path:
        """`.staging/<stage>-work-<random>/`: a stage's spill files while it runs (it removes them)."""
        import uuid

        return self.staging / f"{stage}-work-{uuid.uuid4().hex[:8]}"

    @property
    def store(self) -> Path:
        """`store/`: the embedding store when the job sets no `store_dir`."""
        return self.root / "store"

    @property
    def store_refs(self) -> Path:
        """`store-refs/`: which store rows each encode used."""
        return self.root / "store-refs"

    def store_refs_file(self, store_folder: str, digest: str) -> Path:
        """`store-refs/<store folder>/<digest>.parquet`."""
        return self.store_refs / store_folder / f"{digest}.parquet"

    def finetune(self, run: str) -> Path:
        """`finetune/<run>/`: one fine-tuning run's checkpoints, split and losses."""
        return self.root / "finetune" / run
