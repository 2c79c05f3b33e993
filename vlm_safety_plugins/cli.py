"""The ``vlm-safety`` root command: list plugins, run one defended generation, print the config reference.

Every other command comes from its owner through the ``register_commands`` hook
(``calibrate cmrm`` from ``defenses/cmrm/``, ``eval`` from ``evaluation/``). Heavy modules
(torch, transformers, the tiny test models) are imported inside the commands that use
them. Bad input (a missing file, an invalid config, an unknown model) ends with a
one-line error and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import textwrap
import time

import click

TINY_PREFIX = "tiny-"

trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow defenses to load checkpoints that run their own code (a reward model's modeling_*.py). "
    "Off by default; a config or a model folder's flags cannot turn it on.",
)

# Per registered kind: the JSON key and value that say what it provides.
PROVIDES = {
    "defense": ("work", lambda cls: list(cls.kinds())),
    "evaluator": ("scores", lambda cls: [cls.kind]),
    "model_adapter": ("model_types", lambda cls: list(cls.model_types)),
    "judge": ("judges", lambda cls: ["safety verdicts"]),
}


class PluginCommands(click.Group):
    """The root group: its own commands, plus those plugins add through ``register_commands``.

    Plugin commands are collected the first time the group lists or looks up a command,
    so ``vlm-safety`` imports the plugin modules only when it runs.
    """

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            from .core import plugins
            from .core.errors import ConfigError

            try:
                plugins.load_plugins()
            except ConfigError as error:  # e.g. two installed plugins under one entry-point name
                raise click.ClickException(str(error)) from None
            self._loaded = True
            plugins.pm.hook.register_commands(cli=self)

    def list_commands(self, ctx):
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):
        self._load()
        return super().get_command(ctx, cmd_name)


@click.group(cls=PluginCommands)
@click.version_option(package_name="vlm-safety-plugins")
def cli():
    """Inference-time safety defenses for transformers vision-language models."""


# -- plugins -------------------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_plugins(as_json):
    """List the discovered defenses, evaluators and model adapters, and where they come from."""
    from .core import plugins

    rows = [_plugin_row(item) for item in sorted(plugins.registry().all(), key=lambda item: (item.kind, item.name))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("KIND", "NAME", "PROVIDES", "DISTRIBUTION", "VERSION", "DESCRIPTION")
    table = [header] + [
        (
            row["kind"],
            row["name"],
            ", ".join(row[PROVIDES[row["kind"]][0]]) or "-",
            row["distribution"],
            row["version"],
            row["description"],
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in table) for column in range(len(header) - 1)]
    for line in table:
        click.echo("  ".join([cell.ljust(width) for cell, width in zip(line, widths)] + [line[-1]]).rstrip())


def _plugin_row(item) -> dict:
    """One registered class as JSON-ready data."""
    key, provides = PROVIDES[item.kind]
    doc_lines = (item.cls.__doc__ or "").strip().splitlines()
    description = getattr(item.cls, "description", "") or (doc_lines[0] if doc_lines else "")
    return {
        "kind": item.kind,
        "name": item.name,
        key: provides(item.cls),
        "distribution": item.distribution,
        "version": item.version,
        "description": description,
    }


# -- generate ------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--model",
    "model_name",
    default="tiny-llava",
    show_default=True,
    help="tiny-llava, tiny-qwen2-vl or tiny-gemma3 (random offline test models), or the hub id "
    "or local directory of a transformers image-text-to-text checkpoint (set HF_HUB_OFFLINE=1 "
    "to use only local files and the hub cache).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Safety config (YAML). Without it the generation is not defended.",
)
@click.option(
    "--image",
    "image_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Image file. Without it the request is text-only.",
)
@click.option("--prompt", required=True, help="The user's text.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--stream", is_flag=True, help="Print the answer token by token as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: answer, safety report and time.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling and for the tiny models' weights.")
@trust_remote_code_option
def generate(model_name, config_path, image_path, prompt, max_new_tokens, stream, as_json, seed, trust_remote_code):
    """Answer one prompt (and image) with the defenses of --config applied, then summarise what they did."""
    if stream and as_json:
        raise click.UsageError("--stream and --json cannot be used together")
    # Cheap checks first, so bad input fails before a model loads.
    config = read_config(config_path)
    image = _load_image(image_path)
    model, processor = load_model(model_name, seed)

    import transformers

    import vlm_safety_plugins as vsp

    from .evaluation import run as evaluation_run

    try:
        vsp.attach(model, processor, trust_remote_code=trust_remote_code)
        adapter = vsp.get_attachment(model).adapter
        inputs = adapter.build_inputs([(prompt, image)])
        generation_config = evaluation_run.generation_config(
            model, config, max_new_tokens=max_new_tokens, return_dict_in_generate=True
        )
        streamer = (
            transformers.TextStreamer(adapter.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        )
        transformers.set_seed(seed)
        started = time.perf_counter()
        output = model.generate(
            **inputs,
            images=[image] if image is not None else None,
            generation_config=generation_config,
            streamer=streamer,
        )
        elapsed = time.perf_counter() - started
    except vsp.VLMSafetyError as error:
        raise click.ClickException(str(error)) from None
    answer = adapter.tokenizer.decode(output.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    safety = getattr(output, "safety", None)
    report = safety[0] if safety else None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": model_name,
                    "prompt": prompt,
                    "image": image_path,
                    "answer": answer,
                    "safety": report.to_dict() if report else None,
                    "time_s": elapsed,
                },
                default=str,
            )
        )
        return
    if not stream:
        click.echo(answer)
    click.echo()
    _echo_summary(report, elapsed)


def read_config(path):
    if path is None:
        return None
    import vlm_safety_plugins as vsp

    try:
        return vsp.load_config(path)
    except vsp.ConfigError as error:
        raise click.ClickException(f"invalid safety config: {error}") from None


def _load_image(path):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        reason = "not in an image format PIL can read"
    except Image.DecompressionBombError as error:
        reason = f"refused: {error}"
    except OSError as error:
        reason = error.strerror or str(error)
    raise click.BadParameter(f"cannot read image {path!r}: {reason}", param_hint="'--image'")


def load_model(name, seed):
    """(model, processor): a tiny offline model, or a checkpoint by hub id or local path."""
    from .testing import offline

    if name in offline.VLMS:
        return offline.VLMS[name](seed)
    if name.startswith(TINY_PREFIX):
        raise click.BadParameter(
            f"unknown offline model {name!r}; offline models: {', '.join(sorted(offline.VLMS))}", param_hint="'--model'"
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name)
    except (OSError, ValueError, ImportError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise click.ClickException(f"cannot load model {name!r}: {reason}") from None
    return model.eval(), processor


def _echo_summary(report, elapsed: float) -> None:
    """What the defenses did to the answer, one line per defense."""
    if report is None:
        click.echo(f"safety: not defended (no defense enabled)  [{elapsed:.2f} s]")
        return
    click.echo(f"safety: {report.decision}  [{elapsed:.2f} s]")
    if report.error:
        click.echo(f"  error: {report.error}")
    for record in report.defenses.values():
        facts = ["ran" if record.ran else "did not run", record.decision, f"{record.time_s * 1000:.1f} ms"]
        facts += [f"{key}={_short(value)}" for key, value in {**record.scores, **record.details}.items()]
        click.echo(f"  {record.name}: {', '.join(facts)}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return textwrap.shorten(str(value), width=60, placeholder=" ...")


# -- calibrate -----------------------------------------------------------------------------


@cli.group()
def calibrate():
    """Compute the calibration artifact (safetensors) of a steering defense for one model.

    Each steering defense adds its subcommand here (``register_commands``)."""


# -- reference -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--defense",
    "defense_name",
    metavar="NAME",
    help="Print only this defense's options table (as in docs/defenses/NAME.md).",
)
def reference(defense_name):
    """Print the configuration reference (Markdown) of the built-in defenses."""
    from .core import plugins
    from .core.errors import ConfigError
    from .core.reference import configuration_reference, options_table

    if defense_name is None:
        click.echo(configuration_reference(), nl=False)
        return
    try:
        click.echo(options_table(plugins.get_defense(defense_name)), nl=False)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="'--defense'") from None
