"""The sentences both reports print around the numbers: what was scored, what qualifies it, how pairs are decided."""

from __future__ import annotations

# what the intervals are, and what they are not: the images ranked against are held fixed
INTERVALS = ("95% percentile bootstrap intervals over resampled articles, conditional on the gallery: the candidate "
             "images stay fixed, so the intervals leave out how the scores would vary with another set of images")

# how eval.ties ranks a true image against its byte-identical copies
TIE_ORDER = {"id": "the lower id first", "optimistic": "the true image first", "pessimistic": "the true image last"}


def scope_sentence(metrics: dict, stages: dict) -> str:
    """What was scored: queries scored of those sampled, against how many candidates, top k."""
    k = metrics.get("k", 100)
    row = next((r for r in metrics.get("rows", []) if r["source"] == "all"
                and r.get("direction", "text_to_image") == "text_to_image"), {})
    entry = next((e for name, e in stages.items() if name.startswith("knn:") and name.endswith(":text_to_image")), {})
    sampled = f" (of {row['n_sampled']} sampled)" if "n_sampled" in row else ""
    return (f"Text-to-image retrieval: {row.get('n', '?')} article texts{sampled}, each ranked against "
            f"{entry.get('candidates', '?')} candidate images; top {k} by cosine similarity. Recall is a fraction.")


def approximate_note(row: dict, k: int) -> str:
    """How close an approximate index came to exact search: a `knn` row of metrics.json (its recall is not None)."""
    knob = ", ".join(f"{name} {value}" for name, value in (row.get("knob") or {}).items())
    if knob and row.get("target_recall") is not None:
        knob += f", chosen for recall@{k} >= {row['target_recall']} on a sample"
    sample = f"{row['recall_queries']:,} sampled queries" if row.get("recall_queries") else "a sample of queries"
    return (f"`{row['index']}` index{f' ({knob})' if knob else ''} for {row['backbone']} {row['direction']}: "
            f"recall@{k} {row['recall_at_k_vs_exact']:.4f} against exact search on {sample}")


def _count_notes(row: dict) -> list[tuple[str, str]]:
    """Warnings about one direction's counts: queries lost after sampling, queries whose image cannot be found."""
    direction = row["direction"].replace("_", " ")
    notes = []
    trained = row.get("n_excluded_trained", 0)
    if trained:
        notes.append(("Note", f"{direction}: {trained} of the {row.get('n_sampled', '?')} sampled queries were left "
                      "out because a fine-tuned backbone of this job trained or validated on them (their article or "
                      "their image's bytes); every backbone is scored on the same others"))
    if row.get("n_sampled", row["n"]) - trained > row["n"]:
        notes.append(("Warning", f"{direction}: {row['n_sampled'] - trained - row['n']} of the {row['n_sampled']} "
                      "sampled queries were left out after sampling (see the rejected rows, translate stage)"))
    if row.get("n_unscoreable"):
        notes.append(("Warning", f"{direction}: {row['n_unscoreable']} of the {row['n']} scored queries cannot be "
                      "found because their image failed to encode; they are scored as misses"))
    return notes


def training_data_notes(trained: list[dict], labels: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """What each fine-tuned checkpoint saw (metrics.json's `trained`): its record's counts, or that it is unknown."""
    notes = []
    for fact in trained:
        label = (labels or {}).get(fact["backbone"], fact["backbone"])
        if fact["training"] != "recorded":
            notes.append(("Warning", f"{label}: its training data is unknown (the checkpoint holds no newsclip "
                          "training record), so it is scored on every query, and it may have seen some of them"))
            continue
        among = fact["trained_images_among_candidates"]
        notes.append(("Note", f"{label} was fine-tuned{' from ' + fact['start'] if fact.get('start') else ''} on "
                      f"{fact['trained_articles']} articles and {fact['trained_images']} images (the record in the "
                      f"checkpoint): {fact['n_excluded_trained']} of the queries were among them and are left out; "
                      + (f"{among} of its trained images stayed among the candidates (as distractors)" if among
                         else "none of its trained images is among the candidates")))
    return notes


def evaluation_notes(metrics: dict, prep: dict, labels: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(Note | Warning, sentence) for everything that qualifies the numbers: fewer usable pairs than asked for,
    what fine-tuned backbones trained on and the queries left out for them, sampled articles left unscored, true
    images that failed to encode, exact ties, short ranking lines. `labels`: display names of backbones."""
    notes = [("Note", prep["sample_note"])] if prep.get("sample_note") else []
    notes += training_data_notes(metrics.get("trained", []), labels)
    for row in metrics.get("rows", []):
        # the counts are the same for every backbone: the first one's overall rows speak for all
        if row["source"] == "all" and row["backbone"] == metrics["rows"][0]["backbone"]:
            notes += _count_notes(row)
    ties = metrics.get("ties", {})
    if ties.get("duplicate_truths"):
        notes.append(("Note", f"{ties['duplicate_truths']} queries have a byte-identical copy of their true image "
                      f"among the candidates under another id; these exact ties are ranked {TIE_ORDER[ties['policy']]} "
                      f"(eval.ties: {ties['policy']})"))
    notes += [("Warning", f"{x['short_lines']} lines of the {x['backbone']} {x['direction']} rankings hold fewer "
               f"than {metrics['k']} image ids ({x['short_reason']}); the organisers' evaluator expects exactly "
               f"{metrics['k']}") for x in metrics.get("knn", []) if x.get("short_lines")]
    return notes


def paired_note(paired: list[dict]) -> str:
    """How the paired comparisons (at least one, of any direction) decide, and that they are one family."""
    metric, family = paired[0].get("metric", "mrr"), paired[0].get("comparisons", len(paired))
    if "test" not in paired[0]:  # metrics.json of an evaluate from before the permutation test
        return (f"Paired bootstrap of the {metric} difference on the same articles; p from the bootstrap standard "
                f"error. A decision is made when the Holm-adjusted p-value is below 0.05 (Holm over {family} "
                "comparisons). The intervals shown are the uncorrected 95% intervals of A − B.")
    flips = max((p["flips"] for p in paired if p["test"] == "random flips"), default=None)
    how = f"{flips:,} random sign flips otherwise" if flips else "as here, exact"
    return (f"Paired comparison of the {metric} difference on the same articles: a sign-flip permutation test "
            f"(exact over every sign pattern when at most 20 articles differ, {how}; p is never 0). A decision is made "
            f"when the Holm-adjusted p-value is below 0.05: all {family} comparisons of this report (every pair, in "
            "each direction) are one family, so the chance of any false decision stays under 5%. The intervals "
            "shown are the uncorrected 95% paired bootstrap intervals of A − B.")


def training_note(label: str, losses: dict) -> str:
    """One sentence on a fine-tune: from what, how many steps, where the validation loss was best, any resumes."""
    text = f"{label}: {losses.get('steps')} steps"
    if losses.get("start"):
        text += f" from {losses['start']}"
    if losses.get("best_step") is not None:
        text += (f"; the weights of step {losses['best_step']}, the best validation loss "
                 f"({losses['best_validation_loss']:.3f})")
    if losses.get("stopped_early"):
        text += f"; stopped early (planned: {losses.get('planned_steps')})"
    if losses.get("resumed_from"):
        text += f"; resumed from the checkpoint of step {', '.join(map(str, losses['resumed_from']))} after a failure"
    return text + "."
