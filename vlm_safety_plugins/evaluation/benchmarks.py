"""Benchmark loaders: each reads one published format from local files into Samples.

``load_benchmark("NAME:PATH", **options)`` picks the loader by name; a bare PATH is
recognised by its layout (see :func:`detect_format`). Formats and the fields read are
documented in docs/evaluation.md. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .samples import LABELS, BenchmarkError, Sample

# -- reading helpers --------------------------------------------------------------------------


def _existing(path: str | Path, what: str, *, directory: bool = False) -> Path:
    path = Path(path)
    if not (path.is_dir() if directory else path.is_file()):
        raise BenchmarkError(
            f"{what} not found{' (expected a folder)' if directory and path.exists() else ''}", source=path
        )
    return path


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad JSON or a non-object names the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"cannot read: {error}", source=path) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkError(
                f"invalid JSON: {error.msg} (column {error.colno})", source=path, where=f"line {number}"
            ) from None
        if not isinstance(value, dict):
            raise BenchmarkError(
                f"expected a JSON object, got {type(value).__name__}", source=path, where=f"line {number}"
            )
        yield number, value


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) per data row, after checking that the header has ``required`` columns."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in required if column not in (reader.fieldnames or [])]
            if missing:
                raise BenchmarkError(
                    f"missing column {missing[0]!r}; header has {reader.fieldnames or []}, expected {list(required)}",
                    source=path,
                )
            for row in reader:
                yield reader.line_num, row
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BenchmarkError(f"cannot read CSV: {error}", source=path) from None


def _text_field(record: dict, key: str, path: Path, where: str, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BenchmarkError(f"missing field {key!r}", source=path, where=where)
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise BenchmarkError(f"field {key!r} must be a string, got {type(value).__name__}", source=path, where=where)
    return str(value)


def _image_file(path: Path, source: Path, where: str) -> Path:
    if not path.is_file():
        raise BenchmarkError(f"image file not found: {path}", source=source, where=where)
    return path


# -- MM-SafetyBench ------------------------------------------------------------------------------

MM_SAFETYBENCH_VARIANTS = {
    "SD": "Rephrased Question(SD)",
    "SD_TYPO": "Rephrased Question",
    "TYPO": "Rephrased Question",
    "text": "Question",
}
"""Image variant -> the question field that goes with it (``text``: no image, the original question)."""


def load_mm_safetybench(
    root: str | Path, *, variant: str = "SD_TYPO", scenarios: str | list | None = None
) -> list[Sample]:
    """MM-SafetyBench (Liu et al., ECCV 2024) from its release folder.

    Reads ``processed_questions/<scenario>.json`` (an object of id -> entry) and, unless
    ``variant`` is ``text``, the image ``imgs/<scenario>/<variant>/<id>.jpg``. The prompt is
    the entry's field for the variant (:data:`MM_SAFETYBENCH_VARIANTS`); the category is
    the scenario. ``scenarios``: a comma-separated list (or list) of scenario names to keep.
    """
    if variant not in MM_SAFETYBENCH_VARIANTS:
        raise BenchmarkError(f"variant must be one of {', '.join(MM_SAFETYBENCH_VARIANTS)}, got {variant!r}")
    root = _existing(root, "MM-SafetyBench folder", directory=True)
    questions = root / "processed_questions"
    if not questions.is_dir():
        raise BenchmarkError(
            "no processed_questions/ folder; expected the MM-SafetyBench layout "
            "processed_questions/<scenario>.json and imgs/<scenario>/<variant>/<id>.jpg",
            source=root,
        )
    files = {file.stem: file for file in sorted(questions.glob("*.json"))}
    if isinstance(scenarios, str):
        scenarios = [name.strip() for name in scenarios.split(",") if name.strip()]
    for name in scenarios or []:
        if name not in files:
            raise BenchmarkError(f"no scenario {name!r}; scenarios: {', '.join(files) or 'none'}", source=questions)
    field = MM_SAFETYBENCH_VARIANTS[variant]
    samples = []
    for scenario, file in files.items():
        if scenarios and scenario not in scenarios:
            continue
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BenchmarkError(f"cannot read JSON: {error}", source=file) from None
        if not isinstance(entries, dict):
            raise BenchmarkError(
                f"expected an object of id -> question entry, got {type(entries).__name__}", source=file
            )
        for key in sorted(entries, key=lambda key: (not key.isdigit(), int(key) if key.isdigit() else 0, key)):
            entry, where = entries[key], f"entry {key!r}"
            if not isinstance(entry, dict):
                raise BenchmarkError(f"expected an object, got {type(entry).__name__}", source=file, where=where)
            prompt = _text_field(entry, field, file, where)
            image = (
                None
                if variant == "text"
                else _image_file(root / "imgs" / scenario / variant / f"{key}.jpg", file, where)
            )
            samples.append(
                Sample(
                    f"{scenario}/{key}",
                    prompt,
                    image,
                    "harmful",
                    scenario,
                    meta={"variant": variant, "key_phrase": entry.get("Key Phrase")},
                )
            )
    return samples


# -- FigStep SafeBench --------------------------------------------------------------------------

FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def load_figstep_safebench(path: str | Path, *, images: str | Path | None = None) -> list[Sample]:
    """FigStep's SafeBench: ``safebench.csv`` (columns :data:`FIGSTEP_COLUMNS`) and its images
    ``query_<dataset>_<category_id>_<task_id>_6.png``, asked with FigStep's fixed prompt.

    ``path``: the CSV, or the FigStep repository (or its ``data/``) folder holding
    ``question/safebench.csv``. ``images``: the image folder; default the first of
    ``<csv>/../../images/SafeBench``-style places that exists (``data/images/SafeBench``).
    """
    from .figstep import FIGSTEP_PROMPT

    path = Path(path)
    if path.is_dir():
        found = [path / part / "safebench.csv" for part in ("data/question", "question", ".")]
        path = next((candidate for candidate in found if candidate.is_file()), found[0])
    path = _existing(path, "FigStep SafeBench CSV")
    if images is None:
        candidates = [path.parent.parent / "images" / "SafeBench", path.parent / "images" / "SafeBench", path.parent]
        images = next(folder for folder in candidates if folder.is_dir())
    images = _existing(images, "FigStep image folder", directory=True)
    samples = []
    for line, row in _read_csv(path, FIGSTEP_COLUMNS):
        where = f"line {line}"
        ids = [_text_field(row, column, path, where) for column in ("dataset", "category_id", "task_id")]
        image = _image_file(images / f"query_{'_'.join(ids)}_6.png", path, where)
        samples.append(
            Sample(
                "_".join(ids),
                FIGSTEP_PROMPT,
                image,
                "harmful",
                _text_field(row, "category_name", path, where),
                meta={"question": row.get("question"), "instruction": row.get("instruction")},
            )
        )
    return samples


# -- SPA-VL ---------------------------------------------------------------------------------------

SPA_VL_COLUMNS = ("image", "question", "class1")


def load_spa_vl(path: str | Path, *, label: str = "harmful") -> list[Sample]:
    """SPA-VL's test split (``test/harm`` or ``test/help`` parquet, or a folder of parquet files).

    Reads ``image`` (a Hugging Face Image column: a struct whose ``bytes`` hold the encoded
    image, or plain binary), ``question`` and ``class1`` (the category; ``class2`` and
    ``class3`` go to ``meta``). Every sample gets ``label`` (``harmful`` for the Harm split).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [_existing(path, "SPA-VL parquet file")]
    if not files:
        raise BenchmarkError("no .parquet files in the folder", source=path)
    samples = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise BenchmarkError(f"cannot read parquet: {error}", source=file) from None
        missing = [column for column in SPA_VL_COLUMNS if column not in table.column_names]
        if missing:
            raise BenchmarkError(f"missing column {missing[0]!r}; columns: {table.column_names}", source=file)
        for index, row in enumerate(table.to_pylist()):
            where = f"row {index}"
            samples.append(
                Sample(
                    f"{file.stem}:{index}",
                    _text_field(row, "question", file, where),
                    _image_from_bytes(row["image"], file, where),
                    label,
                    _text_field(row, "class1", file, where),
                    meta={"class2": row.get("class2"), "class3": row.get("class3")},
                )
            )
    return samples


def _image_from_bytes(value, file: Path, where: str) -> Image.Image:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkError(
            "field 'image' holds no image bytes (expected a struct with 'bytes', or binary)", source=file, where=where
        )
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        raise BenchmarkError(f"field 'image' is not a readable image: {error}", source=file, where=where) from None


# -- VLSafe, AdvBench, generic JSONL ------------------------------------------------------------


def load_vlsafe(path: str | Path, *, images: str | Path | None = None) -> list[Sample]:
    """VLSafe (``VLSafe_harmlessness_examine.jsonl``): per line ``image_id`` (a COCO image file
    name) and ``query``. ``images``: the COCO image folder (default: the JSONL's folder)."""
    path = _existing(path, "VLSafe JSONL file")
    folder = _existing(images, "COCO image folder", directory=True) if images is not None else path.parent
    samples = []
    for line, record in _read_jsonl(path):
        where = f"line {line}"
        image_id = _text_field(record, "image_id", path, where)
        samples.append(
            Sample(
                f"vlsafe-{line}",
                _text_field(record, "query", path, where),
                _image_file(folder / image_id, path, where),
                "harmful",
                "vlsafe",
                meta={"image_id": image_id},
            )
        )
    return samples


def load_advbench(path: str | Path) -> list[Sample]:
    """AdvBench-style CSV (``harmful_behaviors.csv``): columns ``goal`` (the prompt, text only)
    and ``target`` (the attack's target opening, kept in ``meta``); all harmful."""
    path = _existing(path, "AdvBench CSV file")
    return [
        Sample(
            f"advbench-{number}",
            _text_field(row, "goal", path, f"line {line}"),
            None,
            "harmful",
            None,
            meta={"target": row.get("target")},
        )
        for number, (line, row) in enumerate(_read_csv(path, ("goal", "target")), 1)
    ]


JSONL_FIELDS = ("id", "prompt", "image", "label", "category", "reference_answer", "meta")


def load_jsonl(path: str | Path) -> list[Sample]:
    """Generic JSONL, one sample per line: ``prompt`` and ``label`` (harmful|benign) required;
    optional ``image`` (path, relative to the file's folder; null = text only), ``id``
    (default ``line-<n>``), ``category``, ``reference_answer``, ``meta`` (an object).
    Other keys are errors (a misspelt field never goes unnoticed)."""
    path = _existing(path, "JSONL benchmark file")
    samples = []
    for line, record in _read_jsonl(path):
        where = f"line {line}"
        unknown = sorted(set(record) - set(JSONL_FIELDS))
        if unknown:
            raise BenchmarkError(
                f"unknown field {unknown[0]!r}; fields: {', '.join(JSONL_FIELDS)}", source=path, where=where
            )
        label = _text_field(record, "label", path, where)
        if label not in LABELS:
            raise BenchmarkError(
                f"field 'label' must be one of {', '.join(LABELS)}, got {label!r}", source=path, where=where
            )
        image = _text_field(record, "image", path, where, required=False)
        meta = record.get("meta") or {}
        if not isinstance(meta, dict):
            raise BenchmarkError("field 'meta' must be an object", source=path, where=where)
        samples.append(
            Sample(
                _text_field(record, "id", path, where, required=False) or f"line-{line}",
                _text_field(record, "prompt", path, where),
                _image_file(path.parent / image, path, where) if image else None,
                label,
                _text_field(record, "category", path, where, required=False),
                _text_field(record, "reference_answer", path, where, required=False),
                meta,
            )
        )
    return samples


# -- the testbed world ---------------------------------------------------------------------------


def load_testbed(split: str = "test", *, n: int = 200, seed: int = 0) -> list[Sample]:
    """``n`` requests of the testbed world's ``split`` (``vlm_safety_plugins.testbed.world``),
    drawn deterministically from ``seed`` in the world's training proportions, less the
    training-only ``continuation`` samples (refusals already begun in the answer).

    Category = ``<kind>/<image kind>`` (e.g. ``harmful/blank``, ``question/scene``); benign
    samples carry the world's correct answer as the reference answer.
    """
    try:
        from ..testbed import world
    except ImportError as error:
        raise BenchmarkError(f"the testbed world is not available: {error}") from None
    if split not in world.SPLITS:
        raise BenchmarkError(f"testbed split must be one of {', '.join(world.SPLITS)}, got {split!r}")
    return [
        Sample(
            f"testbed-{split}-{seed}-{index:05d}",
            item.text,
            item.image,
            "harmful" if item.harmful else "benign",
            f"{item.kind}/{item.image_kind}",
            None if item.harmful else item.answer,
            meta={"kind": item.kind, **item.meta},
        )
        for index, item in enumerate(
            world.samples(
                n, split, seed, mix=[(spec, weight) for spec, weight in world.TRAIN_MIX if spec != "continuation"]
            )
        )
    ]


# -- by name --------------------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[..., list[Sample]]] = {
    "mm-safetybench": load_mm_safetybench,
    "figstep-safebench": load_figstep_safebench,
    "spa-vl": load_spa_vl,
    "vlsafe": load_vlsafe,
    "advbench": load_advbench,
    "jsonl": load_jsonl,
    "testbed": load_testbed,
}
"""Format name -> loader(path, **options). ``figstep:SPEC`` renders another benchmark FigStep-style."""


def detect_format(path: str | Path) -> str:
    """The format of a bare path: an MM-SafetyBench or FigStep folder, ``.parquet`` (SPA-VL),
    ``.csv`` by its header (AdvBench goal/target, FigStep SafeBench), ``.jsonl`` by its
    first record (VLSafe image_id/query, else the generic format)."""
    path = Path(path)
    if path.is_dir():
        if (path / "processed_questions").is_dir():
            return "mm-safetybench"
        if any((path / part / "safebench.csv").is_file() for part in ("data/question", "question", ".")):
            return "figstep-safebench"
        if any(path.glob("*.parquet")):
            return "spa-vl"
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return "spa-vl"
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), [])
            if {"goal", "target"} <= set(header):
                return "advbench"
            if set(FIGSTEP_COLUMNS) <= set(header):
                return "figstep-safebench"
        if suffix in (".jsonl", ".json"):
            first = next(_read_jsonl(path), (0, {}))[1]
            return "vlsafe" if {"image_id", "query"} <= set(first) else "jsonl"
    else:
        raise BenchmarkError(
            f"no such file or folder, and not a benchmark name; names: "
            f"{', '.join([*BENCHMARKS, 'figstep'])} (as NAME:PATH)",
            source=path,
        )
    raise BenchmarkError(
        f"cannot tell the benchmark format; name it as NAME:PATH with NAME one of "
        f"{', '.join([*BENCHMARKS, 'figstep'])}",
        source=path,
    )


def resolve(spec: str) -> tuple[str, Callable[..., list[Sample]], str]:
    """(format name, loader, path) of a benchmark spec; ``figstep:SPEC`` resolves to SPEC's."""
    while spec.startswith("figstep:"):
        spec = spec[len("figstep:") :]
    if not spec:
        raise BenchmarkError("empty benchmark spec; expected NAME:PATH or a path")
    name, _, rest = spec.partition(":")
    if name not in BENCHMARKS:
        name, rest = detect_format(spec), spec
    return name, BENCHMARKS[name], rest


def load_benchmark(spec: str, *, figstep_dir: str | Path | None = None, **options) -> list[Sample]:
    """Samples of ``spec``: ``NAME:PATH`` (``testbed`` / ``testbed:SPLIT`` need no path),
    ``figstep:SPEC`` (SPEC's prompts rendered as FigStep images, saved in ``figstep_dir`` if
    given), or a bare path (format detected). ``options`` go to the loader; sample ids must
    be unique (resuming a run relies on them)."""
    name, _, rest = spec.partition(":")
    if name == "figstep":
        if not rest:
            raise BenchmarkError("figstep needs the benchmark to render, e.g. figstep:advbench.csv")
        from .figstep import figstep_samples

        return figstep_samples(load_benchmark(rest, **options), save_dir=figstep_dir)
    name, loader, rest = resolve(spec)
    parameters = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(list(parameters)[1:]))
    if unknown:
        known = ", ".join(list(parameters)[1:]) or "none"
        raise BenchmarkError(f"benchmark {name!r} has no option {unknown[0]!r}; its options: {known}")
    if not rest and name != "testbed":
        raise BenchmarkError(f"benchmark {name!r} needs a path: {name}:PATH")
    samples = loader(rest or "test", **options) if name == "testbed" else loader(rest, **options)
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise BenchmarkError(f"duplicate sample id {sample.id!r}; ids must be unique", source=rest or name)
        seen.add(sample.id)
    return samples
