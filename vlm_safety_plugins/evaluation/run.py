"""run_eval: answer a benchmark with a (defended) model, judge the answers, write the run folder.

The folder gets ``responses.jsonl`` (one record per sample, appended batch by batch: the
run resumes after an interruption), ``run.json`` (the settings), ``summary.json`` (the
metrics), ``report.md`` and ``plots/``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..core import plugins
from .judge import Judge, make_judge
from .metrics import answer_matches, summarize
from .plots import tradeoff_plot
from .refusal import is_refusal
from .report import write_report
from .responses import ResponseLog
from .samples import EvaluationError, Sample

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
TRADEOFF_PLOT = "plots/tradeoff.png"


def generation_config(model, config, **settings):
    """The model's generation config with ``settings``; with an enabled ``config``, its ``vlm_safety`` flag too."""
    if config is not None and config.enabled:
        return config.to_generation_config(model.generation_config, **settings)
    result = copy.deepcopy(model.generation_config)
    result.update(**settings)
    return result


def run_eval(
    model,
    processor,
    config,
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    judge: str | Judge | None = "refusal",
    judge_options: dict | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    limit: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
    benchmark: str | None = None,
    progress: Callable[[int], None] | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate ``model`` (attached here if it is not yet) on ``samples``; returns the summary.

    ``config``: a SafetyConfig, a YAML path or a mapping, or None for the vanilla model.
    ``judge``: a registered judge name (built with ``judge_options``) or a Judge instance.
    ``limit``: only the first ``limit`` samples. Samples already answered in ``out_dir``
    are skipped; the summary and report cover every selected sample answered so far.
    ``progress(n)`` is called with the number of samples skipped, then after each batch.
    ``model_name`` / ``benchmark`` label the run (and must match when resuming).
    """
    import vlm_safety_plugins as vsp

    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size and max_new_tokens must be >= 1 and limit >= 0")
    config = vsp.load_config(config) if config is not None else None
    judge = make_judge(judge, **(judge_options or {}))
    samples = list(samples)[:limit] if limit is not None else list(samples)
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(sample_id for sample_id in ids if ids.count(sample_id) > 1)
        raise EvaluationError(f"duplicate sample id {duplicate!r}; a resumable run needs unique ids")
    defenses = list(config.defenses) if config is not None else []
    run = {
        "label": "+".join(defenses) or "vanilla",
        "model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        "config": config.to_dict() if config is not None and config.enabled else None,
        "benchmark": benchmark or "<samples>",
        "judge": judge.settings(),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    log = ResponseLog(out_dir)
    log.bind(run)
    try:
        done = log.read()
        pending = [sample for sample in samples if sample.id not in done]
        if progress is not None and len(samples) > len(pending):
            progress(len(samples) - len(pending))
        if pending:
            vsp.attach(model, processor, trust_remote_code=trust_remote_code)
            settings = generation_config(model, config, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                log.append(_answer(model, batch, settings, judge, seed))
                if progress is not None:
                    progress(len(batch))
        records = log.read()
        answered = [records[sample.id] for sample in samples if sample.id in records]
        summary = summarize(answered)
        summary["run"] = {
            **run,
            "config_source": config.source if config is not None else None,
            "defenses": defenses,
            "batch_size": batch_size,
            "limit": limit,
        }
        write_outputs(Path(out_dir), summary, answered)
    finally:
        log.release()
    return summary


def _answer(model, batch: Sequence[Sample], settings, judge: Judge, seed: int) -> list[dict]:
    """Generate, time, decode and judge one batch; its response records."""
    import transformers

    import vlm_safety_plugins as vsp

    adapter = vsp.get_attachment(model).adapter
    images = [sample.load_image() for sample in batch]
    inputs = adapter.build_inputs([(sample.prompt, image) for sample, image in zip(batch, images)]).to(model.device)
    transformers.set_seed(seed)
    started = time.perf_counter()
    output = model.generate(**inputs, images=images, generation_config=settings)
    elapsed = time.perf_counter() - started
    new = output.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    responses = adapter.tokenizer.batch_decode(new, skip_special_tokens=True)
    verdicts = judge.judge(batch, responses)
    if len(verdicts) != len(batch):
        raise EvaluationError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(batch)} responses")
    reports = getattr(output, "safety", None) or [None] * len(batch)
    stops = _stop_ids(settings)
    return response_records(
        batch,
        responses,
        verdicts,
        latency_s=elapsed,
        tokens=[next((index for index, token in enumerate(ids) if token in stops), len(ids)) for ids in new],
        reports=[report.to_dict() if report is not None else None for report in reports],
    )


def response_records(
    batch: Sequence[Sample], responses: list[str], verdicts: list, *, latency_s: float, tokens: list[int], reports
) -> list[dict]:
    """The response records (``responses.jsonl``) of one batch answered together in ``latency_s``:
    each sample with its answer, the judge's verdict, refusal and correctness, its token count
    and its safety report (a dict, or None)."""
    return [
        {
            "id": sample.id,
            "prompt": sample.prompt,
            "image": sample.image_ref(),
            "label": sample.label,
            "category": sample.category,
            "reference_answer": sample.reference_answer,
            "meta": sample.meta,
            "response": response,
            "verdict": verdict.to_dict(),
            "refused": is_refusal(response),
            "correct": (
                answer_matches(sample.reference_answer, response)
                if sample.label == "benign" and sample.reference_answer
                else None
            ),
            "latency_s": latency_s / len(batch),
            "batch_latency_s": latency_s,
            "batch_size": len(batch),
            "tokens": count,
            "safety": report,
        }
        for sample, response, verdict, count, report in zip(batch, responses, verdicts, tokens, reports)
    ]


def _stop_ids(settings) -> set[int]:
    """Token ids that end an answer: EOS and padding (not counted as generated tokens)."""
    from ..core.runtime import token_id_list

    return {*token_id_list(settings.eos_token_id), *token_id_list(settings.pad_token_id)}


def write_outputs(folder: Path, summary: dict, records: list[dict]) -> None:
    """``summary.json``, the plots and ``report.md`` of a run folder."""
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plots: dict[str, tuple[str | None, str]] = {}
    drawn = tradeoff_plot([summary], folder / TRADEOFF_PLOT)
    plots["Unsafe rate vs benign utility"] = (
        (TRADEOFF_PLOT, "") if drawn else (None, "needs harmful samples with a judge decision and benign samples")
    )
    plugins.load_plugins()
    for contributed in plugins.pm.hook.evaluation_plots(summary=summary, records=records, folder=folder):
        for title, file, why_not in contributed:
            plots[title] = (file, why_not)
    write_report(summary, plots, folder / REPORT_FILE)
