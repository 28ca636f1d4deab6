"""Ray Serve deployment of `newsclip serve`'s app: replicas of the same ASGI app on a cluster, each following the job's
runs (its output folder on shared storage) and swapping to a new index when a run finishes.

    serve run cluster.serve:app job=jobs/nightly.yaml replicas=2 token=$NEWSCLIP_TOKEN   # from the repository's root
    # a Serve config (serve deploy): applications: [{name: newsclip, import_path: cluster.serve:app,
    #                                                args: {job: jobs/nightly.yaml, replicas: 2}}]

Args: `job` (the job file), `set` (KEY=VALUE overrides, `;`-separated), `replicas` (default 2), `num_cpus` per
replica (default 2: one for the batched search, one for the query encoder), `num_gpus` per replica (default 0: a job
that encodes on GPUs has its queries encoded on the replica's CPUs; 1, or a share such as 0.25, to encode them on a
GPU as the nights did), `token` (default $NEWSCLIP_TOKEN).
Serve's proxy listens beyond loopback, so a token is required. Needs `ray[serve]` on the cluster's image (the
`ray-serve` extra; cluster/Dockerfile installs it).
"""

from __future__ import annotations

import os


def app(args: dict[str, str]):
    """The Serve application: `NewsclipSearch` replicas, each building the app in its own process."""
    from ray import serve

    job = args["job"]
    overrides = [s for s in args.get("set", "").split(";") if s]
    token = args.get("token") or os.environ.get("NEWSCLIP_TOKEN")
    if not token:
        raise ValueError("cluster/serve.py: Serve's proxy is reachable from the cluster's network; give token=T "
                         "(or set NEWSCLIP_TOKEN)")

    def build():
        # evaluated on each replica: its own index follower, batcher and encoders
        from newsclip.finetune.run import searched_job
        from newsclip.serve.app import create_app
        from newsclip.serve.follow import IndexFollower

        return create_app(IndexFollower(searched_job(job, overrides)), token=token)

    @serve.deployment(num_replicas=int(args.get("replicas", 2)),
                      ray_actor_options={"num_cpus": float(args.get("num_cpus", 2)),
                                         "num_gpus": float(args.get("num_gpus", 0))})
    @serve.ingress(build)
    class NewsclipSearch:
        """The app's routes; nothing of its own."""

    return NewsclipSearch.bind()
