"""`edgepack run`: generate from any variant."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import note, print_json
from edgepack.core.artifacts import to_json_dict
from runtimes.base import DEVICES
from runtimes.registry import runtime_names


@click.command()
@click.argument("variant", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--engine", type=click.Choice(runtime_names()), default=None,
              help="Default: chosen from the path (.gguf, ONNX directory, HF directory).")
@click.option("--threads", type=int, default=None, help="Default: one per physical core.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--context", "context_length", type=int, default=None, help="Context length to allocate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def run(variant: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
        top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...], stream: bool, engine: str | None,
        threads: int | None, device: str, context_length: int | None, as_json: bool) -> None:
    """Generate from VARIANT (a .gguf file, an ONNX variant directory or a Hugging Face directory)."""
    from edgepack.serve.generate import run_prompt
    from runtimes.base import GenerationOptions, LoadOptions

    on_text = (lambda text: click.echo(text, nl=False)) if stream and not as_json else None
    report = run_prompt(variant, prompt, chat=chat, system=system,
                        generation=GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                     top_k=top_k, seed=seed, stop=stop),
                        load=LoadOptions(threads=threads, context_length=context_length, device=device),  # type: ignore[arg-type]
                        engine=engine, on_text=on_text)
    if as_json:
        print_json(to_json_dict(report))
        return
    if on_text is None:
        click.echo(report.text, nl=False)
    click.echo()
    speed = report.completion_tokens / report.seconds if report.seconds > 0 else 0.0
    note(f"[{report.engine}] {report.completion_tokens} tokens, {speed:.1f} tokens/s, "
         f"finished: {report.finish_reason}")
