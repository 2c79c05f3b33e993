"""``vlm-safety export``: a model folder that ``transformers serve DIR --trust-remote-code`` serves defended.

The folder holds the source model's weights as symlinks (never copies), copies of its other
top-level files (config, processor, tokenizer, chat template), its generation config plus
the operator's policy under ``vlm_safety_policy`` (never ``vlm_safety``: that key is a
request's flags), and ``custom_generate/generate.py``. transformers binds that file's
``generate`` as ``model.generate`` (transformers' ``custom_generate``, with
``trust_remote_code``); it calls :func:`defended_generate`, which attaches the model on
first use under the policy read from the folder's own generation_config.json, never from a
request's generation config. Every request then runs the operator's defenses or fails with
the policy's error (core/policy.py).
"""

from __future__ import annotations

import json
import shutil
import threading
import types
from importlib import resources
from pathlib import Path

import click

from ..core.errors import ConfigError
from ..core.policy import Policy, load_policy

POLICY_KEY = "vlm_safety_policy"
CUSTOM_GENERATE = resources.files(__package__) / "data" / "custom_generate.py"
LINKED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")  # weights and their indexes
WRITTEN = ("generation_config.json", "custom_generate")  # what the export writes itself
_ATTACH_LOCK = threading.Lock()


@click.command()
@click.argument("model_name", metavar="MODEL")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The operator policy (YAML): a safety config, plus `client_flags` (default none).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The folder to write.")
@click.option(
    "--continuous-batching",
    is_flag=True,
    help="The folder will be served with `transformers serve --continuous-batching`: refused for a text-only "
    "model, which that serves without calling generate (undefended).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
def export_command(model_name, config_path, out, continuous_batching, force):
    """Write a folder that `transformers serve DIR --trust-remote-code` serves under the policy of --config.

    MODEL is a local transformers folder, a hub id in the local cache, or `testbed`. The
    random `tiny-*` models have no folder: save them with save_pretrained and export that.
    """
    policy = read_policy(config_path)
    source = model_folder(model_name)
    export(source, policy, out, continuous_batching=continuous_batching, force=force)
    click.echo(f"exported {model_name} to {out}; serve it with: transformers serve {out} --trust-remote-code")


def read_policy(path) -> Policy:
    """The policy of a YAML file; an invalid one ends the command with a one-line error."""
    try:
        return load_policy(path)
    except ConfigError as error:
        raise click.ClickException(f"invalid safety config: {error}") from None


def model_folder(name: str) -> Path:
    """The folder of MODEL: an offline model that has one, a local folder, or a hub id in the local cache."""
    from huggingface_hub import snapshot_download

    from .. import testbed
    from ..testing import offline

    if name in testbed.NAMES and name in offline.VLMS:
        return testbed.WEIGHTS / testbed.NAMES[name]
    if name in offline.VLMS:
        raise click.ClickException(
            f"offline model {name!r} is built in memory and has no folder; save it (model and processor) "
            "with save_pretrained and export that folder"
        )
    folder = Path(name)
    if not folder.is_dir():
        try:
            folder = Path(snapshot_download(name, local_files_only=True))
        except (OSError, ValueError):
            raise click.ClickException(
                f"model {name!r} is neither a local folder nor a hub id in the local cache (download it first)"
            ) from None
    if not (folder / "config.json").is_file():
        raise click.ClickException(f"model {name!r} has no config.json: not a transformers model folder")
    return folder


def export(source: Path, policy: Policy, out: Path, *, continuous_batching: bool = False, force: bool = False):
    """Write the defended folder ``out`` for the model folder ``source`` (see the module docstring)."""
    from transformers import AutoConfig, GenerationConfig

    source, out = source.resolve(), Path(out).absolute()
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise click.ClickException(
            f"cannot read the config of {source}: {str(error).strip().splitlines()[0]}"
        ) from None
    if continuous_batching and getattr(config, "vision_config", None) is None:
        raise click.ClickException(
            f"--continuous-batching: {source} is a text-only model (no vision_config); transformers serve's "
            "continuous batching never calls its generate, so it would be served undefended"
        )
    own = source / "custom_generate" / "generate.py"
    if own.is_file() and own.read_text() != CUSTOM_GENERATE.read_text():
        raise click.ClickException(f"{source} has its own custom_generate/generate.py, which the export would replace")
    if out.exists():
        if not out.is_dir():
            raise click.ClickException(f"--out {out} exists and is not a folder")
        if out.resolve() == source or out.resolve() in source.parents:
            raise click.ClickException(f"--out {out} is or holds the model folder {source}")
        if any(out.iterdir()):
            if not force:
                raise click.ClickException(f"--out {out} exists and is not empty; pass --force to replace it")
            shutil.rmtree(out)
    generation_file = source / "generation_config.json"
    if generation_file.is_file():
        generation = json.loads(generation_file.read_text())
    else:  # transformers would derive it from config.json; the written file must keep those values
        generation = GenerationConfig.from_model_config(config).to_diff_dict()
        generation.pop("_from_model_config", None)
    generation.pop("vlm_safety", None)  # per-call flags in the operator's file would make every request an error
    generation[POLICY_KEY] = {**policy.config.to_dict(), "client_flags": policy.client_flags}

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name in WRITTEN or not path.is_file():
            continue
        if path.name.endswith(LINKED_SUFFIXES):
            (out / path.name).symlink_to(path.resolve())
        else:
            shutil.copyfile(path, out / path.name)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    (out / "custom_generate").mkdir()
    (out / "custom_generate" / "generate.py").write_text(CUSTOM_GENERATE.read_text())
    return out


def folder_policy(folder: str) -> Policy:
    """The operator policy stored in a model folder's generation_config.json (a local folder or a cached hub id)."""
    from transformers.utils import cached_file

    path = cached_file(folder, "generation_config.json")
    data = json.loads(Path(path).read_text())
    if POLICY_KEY not in data:
        raise ConfigError(f"no `{POLICY_KEY}`: write the folder with `vlm-safety export`", source=str(path))
    return load_policy(data[POLICY_KEY])


def defended_generate(model, *args, **kwargs):
    """``model.generate`` of an exported folder: attach the model once under the folder's policy, then
    generate through the attachment.

    The attachment must wrap the class's generate, not the custom generate that led here (that
    would recurse): after ``attach`` its original generate is set to the class's. From then on
    ``model.generate`` is the attachment's; ``detach`` puts the custom generate back, and the
    next call attaches again. A model someone else attached over the custom generate is refused.
    """
    from ..core.runtime import get_attachment

    attachment = get_attachment(model)
    if attachment is None or not _wraps_class_generate(attachment, model):
        with _ATTACH_LOCK:  # also waits for an attach in progress in another thread
            attachment = get_attachment(model)
            if attachment is None:
                attachment = _attach(model)
            elif not _wraps_class_generate(attachment, model):
                raise ValueError(
                    "this model was loaded from a folder written by `vlm-safety export`, whose generate attaches "
                    "it under the folder's policy: do not attach it yourself (detach it first)"
                )
    return attachment.generate(*args, **kwargs)


def _attach(model):
    from transformers import AutoProcessor

    from ..core.runtime import attach, get_attachment

    policy = folder_policy(model.name_or_path)
    processor = AutoProcessor.from_pretrained(model.name_or_path)
    attachment = get_attachment(attach(model, processor, policy=policy))
    attachment.original_generate = types.MethodType(type(model).generate, model)
    return attachment


def _wraps_class_generate(attachment, model) -> bool:
    return getattr(attachment.original_generate, "__func__", None) is type(model).generate
