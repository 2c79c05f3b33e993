"""Safety evaluation: benchmarks, judges, metrics and reports (``vlm-safety eval``).

    from . import load_benchmark, run_eval
    samples = load_benchmark("mm-safetybench:data/MM-SafetyBench", variant="SD_TYPO")
    summary = run_eval(model, processor, "configs/eta.yaml", samples, "runs/eta", judge="refusal")

Names are imported on first use, so importing the package (as the plugin manager does
for the built-in judges) stays cheap.
"""

from ..core.lazy import lazy_exports

_LAZY = {
    "Sample": ".samples",
    "BenchmarkError": ".samples",
    "BENCHMARKS": ".benchmarks",
    "load_benchmark": ".benchmarks",
    "load_advbench": ".benchmarks",
    "load_figstep_safebench": ".benchmarks",
    "load_jsonl": ".benchmarks",
    "load_mm_safetybench": ".benchmarks",
    "load_spa_vl": ".benchmarks",
    "load_testbed": ".benchmarks",
    "load_vlsafe": ".benchmarks",
    "FIGSTEP_PROMPT": ".figstep",
    "figstep_samples": ".figstep",
    "list_heading": ".figstep",
    "render_figstep": ".figstep",
    "Judge": ".judge",
    "Verdict": ".judge",
    "make_judge": ".judge",
    "REFUSAL_PHRASES": ".refusal",
    "RefusalJudge": ".refusal",
    "is_refusal": ".refusal",
    "LlamaGuardJudge": ".llama_guard",
    "parse_guard_output": ".llama_guard",
    "Rate": ".metrics",
    "answer_matches": ".metrics",
    "summarize": ".metrics",
    "wilson_interval": ".metrics",
    "run_eval": ".run",
    "ResponseLog": ".responses",
    "compare_runs": ".compare",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
