"""`edgepack targets` and `edgepack profile`: the devices we build for, and measuring variants here."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.device_options import measure_on_options, ssh_device
from edgepack.cli.rendering import print_json, stdout_console, table
from edgepack.core.artifacts import to_json_dict


@click.command()
@click.option("--profile", "profile_file", type=click.Path(path_type=Path), default=None,
              help="Validate and show a profile file of your own instead of listing.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
@click.option("--dump-probe", "dump_probe", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Instead of listing: detect this machine and write everything detection read (files, paths, "
                   "command outputs) to FILE (- for stdout), as a probe file the tests can replay.")
def targets(profile_file: Path | None, as_json: bool, dump_probe: str | None) -> None:
    """List the target device profiles (profiles/*.toml and host, detected from this machine)."""
    if dump_probe is not None:
        if profile_file is not None or as_json:
            raise click.UsageError("--dump-probe writes a probe file of its own: leave out --profile and --json")
        from edgepack.measure.hardware import capture

        text = capture().dumps()
        if dump_probe == "-":
            click.echo(text, nl=False)
            return
        Path(dump_probe).write_text(text)
        click.echo(f"wrote what detection read on this machine to {dump_probe}; check it before sharing "
                   "(/proc/cpuinfo on some boards carries a serial number)", err=True)
        return
    from edgepack.measure.targets import all_targets, load_profile

    profiles = [load_profile(profile_file)] if profile_file is not None else all_targets()
    if as_json:
        print_json({"targets": [to_json_dict(p) for p in profiles]})
        return
    stdout_console().print(table(
        "targets", ("name", "arch", "accelerator", "cores", "memory GiB", "budget GiB", "bandwidth GB/s", "engines",
                    "wheel platform"),
        [(p.name, p.arch, p.accelerator, str(p.cpu_cores), f"{p.memory_total_gib:g}", f"{p.memory_budget_gib:g}",
          f"{p.memory_bandwidth_gbps:g}" if p.memory_bandwidth_gbps else "to measure", ", ".join(p.engines),
          p.python_platform) for p in profiles]))


@click.command()
@click.argument("variants", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=None, help="Default: one per physical core.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs after one warm-up.")
@click.option("--context", type=int, default=None, help="Context to allocate (default: what the prompt and the new "
                                                           "tokens need).")
@measure_on_options
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON on stdout.")
def profile(variants: tuple[Path, ...], threads: int | None, prompt_tokens: int, new_tokens: int, runs: int,
            context: int | None, measure_on: str | None, ssh_config: Path | None, remote_python: str,
            as_json: bool) -> None:
    """Measure VARIANTs on this machine (or on a device over SSH with --measure-on), each in a fresh process: load,
    memory, TTFT, prefill and decode t/s."""
    from edgepack.measure.profiler import ProfileOptions, require_measured
    from edgepack.measure.profiler import profile as run_profile

    options = ProfileOptions(threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                             context=context)
    device = ssh_device(measure_on, ssh_config, remote_python, False)
    if device is not None:
        result = _profile_on_device(device, [Path(v) for v in variants], options)
    else:
        result = run_profile(list(variants), options)
    if as_json:
        print_json(to_json_dict(result))
        require_measured(result)
        return
    console = stdout_console()
    console.print(table(
        f"{result.device_description or 'this machine'}: memory bandwidth {result.memory_bandwidth_gbps:.1f} GB/s "
        "(measured, read kernel)",
        ("variant", "engine", "threads", "load s", "peak RSS MiB", "model MiB", "TTFT ms", "prefill t/s",
         "decode t/s", "decode min-max"),
        [(m.name, m.engine, str(m.threads), f"{m.load_s:.2f}", f"{m.peak_rss_mib:.0f}", f"{m.model_rss_mib:.0f}",
          f"{m.ttft_s * 1000:.0f}", f"{m.prefill_tps:.1f}", f"{m.decode_tps:.1f}",
          f"{m.decode_tps_min:.1f}-{m.decode_tps_max:.1f}") for m in result.variants]))
    for line in result.notes:
        console.print(f"note: {line}", highlight=False)
    for c in result.crashed:
        console.print(f"{c.name} CRASHED: {c.detail}", highlight=False)
    require_measured(result)


def _profile_on_device(device, paths: list[Path], options):
    """`edgepack profile --measure-on`: the files go to the device, and its measurements come back."""
    from edgepack.bundle.device_install import install_on_device
    from edgepack.core.artifacts import Variant
    from edgepack.core.errors import EdgepackError
    from edgepack.measure.remote import connect, measure_on_device
    from edgepack.pipeline.stage_cache import directory_fingerprint

    variants = []
    for path in paths:
        if not path.exists():
            raise EdgepackError(f"{path} does not exist; expected a .gguf file or an ONNX variant directory")
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        variants.append(Variant(kind=path.stem if path.is_file() else path.name, path=path,
                                files=tuple(p.name for p in files), bytes=sum(p.stat().st_size for p in files),
                                sha256=directory_fingerprint(path), converter="given on the command line"))
    engines = {"llamacpp" if p.is_file() else "onnxrt" for p in paths}
    return measure_on_device(connect(device, engines, options.threads, install=install_on_device), variants, options)
