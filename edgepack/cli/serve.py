"""`edgepack serve` and `edgepack route calibrate`: the local server and its hybrid routing."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import note, print_json
from edgepack.core.artifacts import to_json_dict
from edgepack.serve.router import POLICIES
from runtimes.base import DEVICES


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default=None, help="Address to listen on (default: the bundle's, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: the bundle's, else 8080).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1, /api and /metrics.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Read the API key from a file.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait for the engine; past this the answer is 503 with Retry-After.")
@click.option("--max-upstream", type=int, default=16, show_default=True,
              help="Requests routed upstream at once; past this the answer is 503 with Retry-After.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Also answer requests whose Host header is NAME (repeatable); on any address only loopback names "
                   "and IP addresses are answered otherwise (no DNS rebinding).")
@click.option("--allowed-origin", "allowed_origins", multiple=True,
              help="A web origin (https://app.example, http://localhost:3000) whose pages may send requests "
                   "(repeatable; * for any). Other pages' requests are refused, as Ollama's OLLAMA_ORIGINS does.")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True,
              help="Largest request body accepted; a larger one gets 413 before it is parsed.")
@click.option("--model-alias", "model_aliases", multiple=True,
              help="Another name for the local model in /v1/models (repeatable); a request naming any model but the "
                   "upstream one is answered by the local model.")
@click.option("--parallel", type=int, default=None,
              help="Generations at once on llama.cpp, batched together (default: the bundle's, else 4); each holds "
                   "its own context of KV cache.")
@click.option("--chat-template", default=None,
              help="FILE (Jinja) or NAME (chatml, llama2, plain) used instead of the model's (or the bundle's) "
                   "template; a model without one is served with chatml, and /health says which is in use.")
@click.option("--threads", type=int, default=None, help="Engine threads (default: the bundle's or physical cores).")
@click.option("--context", type=int, default=None, help="Context to allocate (default: the bundle's).")
@click.option("--device", type=click.Choice(DEVICES), default=None,
              help="Default: the bundle's (its target's GPU; the CPU where the engine cannot offload), else cpu.")
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="Routing: local only, always upstream, or auto (rules, then the local answer's confidence).")
@click.option("--upstream", "upstream_url", default=None, help="Upstream OpenAI-compatible base URL (…/v1).")
@click.option("--upstream-model", default=None, help="The upstream model's name.")
@click.option("--upstream-key-env", default=None,
              help="Environment variable holding the upstream API key (default EDGEPACK_UPSTREAM_API_KEY).")
@click.option("--allow-insecure-upstream", is_flag=True, default=None,
              help="Accept a plain http:// upstream on another machine (prompts and key travel unencrypted).")
@click.option("--upstream-timeout", type=float, default=None,
              help="Seconds an upstream call may take in all, streams included (30); past it upstream counts as down.")
@click.option("--upstream-max-tokens", type=int, default=None,
              help="max_tokens sent upstream at most (2048); a request asking more is capped.")
@click.option("--upstream-max-choices", type=int, default=None,
              help="n sent upstream at most (1); a request asking more is refused.")
@click.option("--min-mean-logprob", type=float, default=None, help="auto: below this mean logprob, go upstream.")
@click.option("--min-token-logprob", type=float, default=None, help="auto: a token below this, go upstream.")
@click.option("--route-pattern", "patterns", multiple=True,
              help="auto: a prompt matching this regex goes upstream (a match that takes over 0.25 s counts as none).")
@click.option("--router-config", type=click.Path(path_type=Path), default=None,
              help="Router settings file (from `edgepack route calibrate`); options above override it.")
def serve(path: Path, host: str | None, port: int | None, api_key: str | None, api_key_file: Path | None,
          max_queue: int, max_upstream: int, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...],
          max_body_mb: float,
          model_aliases: tuple[str, ...], parallel: int | None, chat_template: str | None, threads: int | None,
          context: int | None, device: str | None, policy: str | None, upstream_url: str | None,
          upstream_model: str | None, upstream_key_env: str | None, allow_insecure_upstream: bool | None,
          upstream_timeout: float | None, upstream_max_tokens: int | None, upstream_max_choices: int | None,
          min_mean_logprob: float | None, min_token_logprob: float | None,
          patterns: tuple[str, ...], router_config: Path | None) -> None:
    """Serve a bundle (verified first; one that fails is refused) or a variant over the OpenAI API, optionally
    routing hard requests to an upstream model."""
    from edgepack.serve.app import ServerConfig, read_api_key, serve_path
    from edgepack.serve.router import RouterConfig
    from edgepack.serve.session import defaults_for
    from runtimes.chat_templates import resolve_chat_template

    template = resolve_chat_template(chat_template) if chat_template else None  # before anything is loaded
    router = RouterConfig.from_options(router_config, policy=policy, upstream_url=upstream_url,
                                       upstream_model=upstream_model, key_env=upstream_key_env,
                                       timeout_s=upstream_timeout, min_mean_logprob=min_mean_logprob,
                                       min_token_logprob=min_token_logprob, patterns=patterns,
                                       allow_insecure_upstream=allow_insecure_upstream,
                                       upstream_max_tokens=upstream_max_tokens,
                                       upstream_max_choices=upstream_max_choices)
    key = read_api_key(api_key, api_key_file)
    defaults = defaults_for(path)
    config = ServerConfig(host=host or defaults.host, port=port if port is not None else defaults.port,
                          api_key=key, max_queue=max_queue, max_upstream=max_upstream, router=router,
                          max_body_bytes=int(max_body_mb * 2**20), allowed_hosts=allowed_hosts,
                          allowed_origins=allowed_origins,
                          model_aliases=model_aliases)
    note(f"serving {defaults.model_id} on http://{config.host}:{config.port}/v1 (loading the model; "
         "GET /health answers 200 once it is ready)")
    serve_path(defaults, config, threads=threads, context=context, device=device, parallel=parallel,
               chat_template=template)


@click.group()
def route() -> None:
    """Hybrid routing settings."""


@route.command("calibrate")
@click.argument("prompts_file", type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="The bundle or variant the server will run.")
@click.option("--local-share", type=float, default=0.7, show_default=True, help="Share of requests to keep local.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("router.json"),
              show_default=True, help="Router settings file to write the threshold to (created if absent).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens of each local answer scored.")
@click.option("--json", "as_json", is_flag=True)
def route_calibrate(prompts_file: Path, model_path: Path, local_share: float, config_path: Path, max_tokens: int,
                    as_json: bool) -> None:
    """Pick the confidence threshold (mean token log-probability) that keeps --local-share of PROMPTS_FILE
    (JSONL of {"prompt"} or {"messages"}) local, and write it to the router config."""
    from edgepack.serve.calibrate import calibrate_file

    calibration = calibrate_file(prompts_file, model_path, local_share, config_path, max_tokens)
    if as_json:
        print_json({**to_json_dict(calibration), "config": str(config_path)})
        return
    click.echo(f"threshold {calibration.threshold:.4f} (mean token log-probability) keeps "
               f"{calibration.local_share:.0%} of {calibration.prompts} prompts local (asked {local_share:.0%}); "
               f"written to {config_path}")
