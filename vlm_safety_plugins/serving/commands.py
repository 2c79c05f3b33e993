"""``vlm-safety serve``: the OpenAI-compatible server, over the transformers engine (``--model``) or in
front of an OpenAI-compatible engine that generates (``--upstream``: the gateway)."""

from __future__ import annotations

import click

from ..cli import load_model, trust_remote_code_option
from .app import API_KEY_ENV

MIB = 2**20
UPSTREAM_API_KEY_ENV = "VLM_SAFETY_UPSTREAM_API_KEY"


@click.command()
@click.option("--model", "model_name", help="testbed, a tiny-* offline model, a hub id or a local folder.")
@click.option(
    "--upstream",
    help="Instead of --model: the base URL of an OpenAI-compatible server that generates "
    "(e.g. http://127.0.0.1:8001/v1); the policy's defenses run here and, through our vLLM plugin, inside it.",
)
@click.option("--upstream-model", help="The model id the upstream serves (default: the one it lists).")
@click.option(
    "--tokenizer",
    help="With --upstream: the served model's processor or tokenizer (hub id or folder), so that text holding "
    "its special tokens (an image placeholder, a turn marker) is refused as with --model; without it, text "
    "reaches the engine unchecked.",
)
@click.option(
    "--upstream-api-key", envvar=UPSTREAM_API_KEY_ENV, help=f"The upstream's API key (or {UPSTREAM_API_KEY_ENV})."
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The operator policy (YAML): a safety config, plus `client_flags: none|add|any` (default none: "
    "requests may not send flags). Every request runs its defenses; `defenses: {}` serves undefended.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--served-model-name", help="The model id clients send (default: --model).")
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    help=f"Require `Authorization: Bearer KEY` on /v1/* and /metrics (or set {API_KEY_ENV}).",
)
@click.option(
    "--allow-image-urls", is_flag=True, help="Fetch http(s) image URLs (off: only data: URIs; never file paths)."
)
@click.option(
    "--concurrency", type=click.IntRange(1), help="Generations at once (default: 4 with --model, 64 with --upstream)."
)
@click.option(
    "--max-queue", default=64, show_default=True, type=click.IntRange(0), help="Waiting requests (503 beyond)."
)
@click.option(
    "--request-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take, queue included; then it is cancelled (503).",
)
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-image-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-image-pixels", default=36_000_000, show_default=True, type=click.IntRange(1))
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(1), help="Images per request.")
@click.option("--default-max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens-limit", default=4096, show_default=True, type=click.IntRange(1))
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="torch's intra-op threads per generation (default: torch's choice). On CPU, small models "
    "with several --concurrency slots run faster with 1.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the tiny-* models' weights.")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@trust_remote_code_option
def serve_command(
    model_name,
    upstream,
    upstream_model,
    upstream_api_key,
    tokenizer,
    config_path,
    host,
    port,
    served_model_name,
    concurrency,
    threads,
    seed,
    log_level,
    trust_remote_code,
    **limits,
):
    """Serve a defended VLM over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics).

    The --config policy is the floor of every request: a request's own flags (the `vlm_safety`
    field) are refused, or may only add defenses (`client_flags: add`); never remove or weaken
    the operator's. Images come as data: URIs (http(s) URLs only with --allow-image-urls).
    """
    import uvicorn

    from ..core.errors import ConfigError, VLMSafetyError
    from ..core.policy import load_policy
    from .app import ServerSettings, create_app
    from .images import ImageLimits
    from .protocol import APIError

    if (model_name is None) == (upstream is None):
        raise click.UsageError("give exactly one of --model (generate here) and --upstream (an engine that generates)")
    if tokenizer is not None and upstream is None:
        raise click.UsageError("--tokenizer is for --upstream (with --model, the model's own processor checks text)")
    try:  # cheap checks first, so a bad policy fails before a model loads
        policy = load_policy(config_path)
    except ConfigError as error:
        raise click.ClickException(f"invalid policy: {error}") from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        if upstream is not None:
            from ..gateway.engine import UpstreamEngine
            from ..gateway.upstream import Upstream

            engine = UpstreamEngine(
                Upstream(upstream, upstream_model, api_key=upstream_api_key),
                policy,
                model_id=served_model_name,
                concurrency=concurrency or 64,
                trust_remote_code=trust_remote_code,
                tokenizer=tokenizer,
            )
        else:
            from .engines.transformers_engine import TransformersEngine

            model, processor = load_model(model_name, seed)
            engine = TransformersEngine(
                model,
                processor,
                policy,
                model_id=served_model_name or model_name,
                concurrency=concurrency or 4,
                trust_remote_code=trust_remote_code,
            )
        engine.check_policy()
    except ConfigError as error:
        raise click.ClickException(f"the policy cannot run here: {error}") from None
    except (VLMSafetyError, APIError) as error:
        raise click.ClickException(str(error)) from None
    settings = ServerSettings(
        api_key=limits["api_key"] or None,
        images=ImageLimits(
            int(limits["max_image_mb"] * MIB),
            limits["max_image_pixels"],
            limits["max_images"],
            limits["allow_image_urls"],
        ),
        max_body_bytes=int(limits["max_body_mb"] * MIB),
        max_queue=limits["max_queue"],
        request_timeout_s=limits["request_timeout"],
        default_max_tokens=limits["default_max_tokens"],
        max_tokens_limit=limits["max_tokens_limit"],
    )
    defenses = ", ".join(policy.config.defenses) or "none"
    where = f"engine {engine.name}" + (f" at {upstream}" if upstream else "")
    click.echo(
        f"vlm-safety serve: {engine.model_id} on http://{host}:{port} ({where}); "
        f"policy {config_path}: defenses {defenses}, client_flags {policy.client_flags}",
        err=True,
    )
    if policy.client_flags == "any":
        click.echo("warning: client_flags: any lets requests replace the policy (development only)", err=True)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
