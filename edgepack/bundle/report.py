"""report.json and report.md: every variant's numbers and the decision, for a program and for a person."""

from __future__ import annotations

from typing import Any

from edgepack.measure.predict import ACHIEVABLE_SHARE_OF_SPEC


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}" if value < 10 * 2**20 else f"{value / 2**20:.0f}"


def _tps(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _interval(bounds: list[float] | tuple[float, float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _distillation_line(record: dict[str, Any]) -> str:
    before, after = record.get("before") or {}, record.get("after") or {}
    line = (f"- Distilled by edgepack from {record['teacher']['name']} ({record['settings']['mode']} mode, "
            f"{record['steps']} steps; student: {record['student']['initialisation']})")
    if before.get("kld_mean") is not None and after.get("kld_mean") is not None:
        line += (f"; mean KL divergence to the teacher on held-out text {before['kld_mean']:.4f} before, "
                 f"{after['kld_mean']:.4f} after")
    return line + ". The quality figures below compare each variant with this student, not with the teacher."


def render_markdown(report: dict[str, Any]) -> str:
    model, target, decision = report["model"], report["target"], report["decision"]
    quality, performance = report["quality"], {p["variant"]: p for p in report["performance"]}
    chosen = decision["chosen"]
    device = report.get("device_measurements")
    lines = [
        f"# {model['name']} for {target['name']}",
        "",
        f"**Chosen: `{chosen}`** — {decision['why']}.",
        "",
        f"- Model: {model['name']} ({model['architecture']}, {model['parameter_count']:,} parameters, context "
        f"{model['context_length']}); served with a context of {report['context']} tokens.",
        *([f"- Reference weights: {model['origin']}."] if model.get("origin") else []),
        *([_distillation_line(model["distillation"])] if model.get("distillation") else []),
        f"- Target: {target['name']} — {target['description']}. Memory budget {target['memory_budget_gib']:g} GiB "
        f"of {target['memory_total_gib']:g} GiB ({target['memory_budget_reason']}).",
        _where_line(target, report, device),
        f"- Quality gate: perplexity may rise at most {quality['gate']['max_ppl_increase']:.1%}, mean KL divergence at "
        f"most {quality['gate']['max_kld']:g}"
        + (f", KL divergence on the reference's answers at most {quality['gate']['max_answer_kld']:g}, and no "
           f"variant right on significantly fewer checkable prompts than the reference (McNemar's test, "
           f"α={quality['gate']['correctness_alpha']:g})" if quality.get("behaviour_prompts") else "")
        + (f", task accuracy at least {quality['gate']['min_task_accuracy']:.0%}"
           if quality['gate'].get('min_task_accuracy') is not None else "")
        + f"; judged on the upper ends of 95% intervals (a block bootstrap over the scored positions). Reference "
          f"perplexity {quality['reference_perplexity']:.3f} over {quality['positions_scored']} positions (the "
          f"second half of each {quality['window']}-token window, as llama.cpp's perplexity tool scores; a variant "
          "stops reading once its mean KL divergence is known to ±10% of itself and its perplexity ratio to ±0.5 "
          "points, after 8 windows, and is compared over the positions it read); the "
          f"reference's probability mass outside its stored top {quality['top_k_stored']}: "
          f"{quality['outside_top_k_mass']:.2%} on average.",
        "",
        "## Variants",
        "",
        "| variant | engine | MiB on disk | positions | PPL ratio [95%] | KLD mean [95%] | same top-1 | gate | "
        "memory MiB | decode t/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rejected = {r["name"]: r for r in decision["rejected"]}
    for q in quality["variants"]:
        p = performance[q["name"]]
        verdict = "**chosen**" if q["name"] == chosen else \
            f"{rejected[q['name']]['reason']}: {rejected[q['name']]['detail']}"
        lines.append(f"| {q['name']} | {p['engine']} | {_mib(report['variant_bytes'][q['name']])} | "
                     f"{q.get('positions_scored', '-')} | {q['ppl_ratio']:.4f} {_interval(q['ppl_ratio_ci'])} | "
                     f"{q['kld_mean']:.4f} {_interval(q['kld_mean_ci'])} | {q['same_top1']:.1%} | "
                     f"{'pass' if q['passed'] else 'FAIL'} | {_mib(p['memory_bytes'])} | {_decode_cell(p)} | "
                     f"{verdict} |")
    for c in quality.get("crashed", []):
        lines.append(f"| {c['name']} | - | {_mib(report['variant_bytes'][c['name']])} | - | - | - | - | - | - | - | "
                     f"crashed in the {c['stage']} stage: {c['cause']} |")
    for c in quality.get("crashed", []):
        lines += ["", f"`{c['name']}` was not shipped: {c['detail']}"]
    lines += behaviour_section(quality)
    lines += ["", "## How the memory and speed figures were obtained", ""]
    for q in quality["variants"]:
        lines.append(f"- `{q['name']}`: {performance[q['name']]['basis']}.")
    if device:
        lines += _device_section(device, [performance[q["name"]] for q in quality["variants"]], target)
    host = report["host_measurements"]
    lines += ["", f"## Measured on the build machine ({report['build_host']})", "",
              f"Read bandwidth {host['memory_bandwidth_gbps']:.1f} GB/s (measured).", "",
              "| variant | device | threads | context | load s | model RSS MiB | TTFT ms | prefill t/s | decode t/s | "
              "J/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in host["variants"]:
        joules = "-" if m.get("joules_per_token") is None else f"{m['joules_per_token']:.3f}"
        lines.append(f"| {m['name']} | {m.get('device', 'cpu')} | {m['threads']} | {m['context']} | "
                     f"{m['load_s']:.2f} | {m['model_rss_mib']:.0f} | {m['ttft_s'] * 1000:.0f} | "
                     f"{m['prefill_tps']:.0f} | {m['decode_tps']:.1f} | {joules} |")
    for note in host.get("notes", []):
        lines.append(f"\nNote: {note}")
    lines += ["", "## Running it", "",
              f"`./run.sh` (or `run.bat`) starts the OpenAI-compatible server on 127.0.0.1:{report['server']['port']} "
              f"with `{report['server']['engine']}` on {report['server']['device']} (the CPU where the installed "
              f"engine cannot offload) and {report['server']['threads']} threads, answering "
              f"{report['server'].get('parallel', 1)} request(s) at once (each with a "
              f"{report['server']['context']}-token context; the memory budget decides how many); a chat page is at "
              "`/` and Ollama's API at `/api/`; `deploy/` has a systemd "
              "unit, a launchd plist, a Dockerfile" + (" and an Ollama Modelfile" if chosen.startswith("gguf-") else "")
              + ". `edgepack verify .` checks every file against `edgepack.json`."]
    wheels = report.get("wheels")
    if wheels:
        lines += ["", "## Offline install (`wheels/`)", "",
                  f"`sh install.sh` installs into `.venv/` with no network: {len(wheels['files'])} files for "
                  f"{wheels['platform']}, Python {wheels['python_version']}."]
        for source in wheels["sources"]:
            lines.append(f"- `{source['file']}` has no wheel for {wheels['platform']}: install.sh builds it from "
                         f"source with `{source['build_command']}` (needs a C/C++ compiler and CMake on the device).")
    if target.get("notes"):
        lines += ["", f"Target notes: {target['notes']}"]
    return "\n".join(lines) + "\n"


def _where_line(target: dict[str, Any], report: dict[str, Any], device: dict[str, Any] | None) -> str:
    if device:
        return (f"- Speeds and memory are **measured on {device['device_description']}** over SSH "
                f"({device['measured_on']}); beside each, what the build machine ({report['build_host']}) "
                "predicted for it.")
    if target["source"] == "detected":
        return "- Speeds and memory are **measured on this machine**."
    return (f"- Speeds and memory are **predicted** for {target['name']} from measurements on the build machine "
            f"({report['build_host']}), with the error the same prediction model made on figures of the build "
            "machine it was not fitted on; each row's basis is below.")


def _decode_cell(p: dict[str, Any]) -> str:
    if p.get("predicted_memory_bytes") is not None:  # measured on the device
        return f"{_tps(p['decode_tps'])} (predicted {_tps(p.get('predicted_decode_tps'))})"
    if p.get("is_prediction") and p["decode_tps"] is not None and p.get("decode_error") is not None:
        return f"{_tps(p['decode_tps'])} ±{p['decode_error']:.0%}"
    return _tps(p["decode_tps"])


def _error(predicted: float | None, measured: float) -> str:
    return "-" if predicted is None or not measured else f"{predicted / measured - 1:+.0%}"


def _device_section(device: dict[str, Any], performance: list[dict[str, Any]], target: dict[str, Any]) -> list[str]:
    sheet = ""
    if target.get("memory_bandwidth_gbps") and not str(target.get("source", "")).startswith("ssh://"):
        share = device["memory_bandwidth_gbps"] / target["memory_bandwidth_gbps"]
        sheet = (f" That is {share:.2f} of the {target['memory_bandwidth_gbps']:g} GB/s data sheet figure of "
                 f"{target['name']}'s profile (predictions assume {ACHIEVABLE_SHARE_OF_SPEC}).")
    lines = ["", f"## Measured on the device: {device['device_description']} ({device['measured_on']})", "",
             f"Read bandwidth {device['memory_bandwidth_gbps']:.1f} GB/s (measured there with the same kernel as on "
             f"the build machine).{sheet} Prediction (from the build machine) against measurement (on the device):",
             "",
             "| variant | threads | decode t/s measured | predicted | error | memory MiB measured | predicted | "
             "error |", "|---|---|---|---|---|---|---|---|"]
    measured = {m["name"]: m for m in device["variants"]}
    for p in performance:
        m = measured.get(p["variant"])
        if m is None:
            continue
        predicted_decode, predicted_memory = p.get("predicted_decode_tps"), p.get("predicted_memory_bytes")
        lines.append(f"| {p['variant']} | {m['threads']} | {m['decode_tps']:.1f} | {_tps(predicted_decode)} | "
                     f"{_error(predicted_decode, m['decode_tps'])} | {_mib(p['memory_bytes'])} | "
                     f"{_mib(predicted_memory) if predicted_memory else '-'} | "
                     f"{_error(predicted_memory, p['memory_bytes'])} |")
    for note in device.get("notes", []):
        lines.append(f"\nNote: {note}")
    return lines


def _quoted(text: str, limit: int = 160) -> str:
    """An answer in a table cell: one line, pipes escaped, cut at `limit` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return (flat[:limit] + "…" if len(flat) > limit else flat) or "(nothing)"


def behaviour_section(quality: dict[str, Any]) -> list[str]:
    """The variants' answers to the behaviour prompts, and a few answers that differ, side by side."""
    rows = [(q["name"], q["behaviour"]) for q in quality["variants"] if q.get("behaviour")]
    if not rows:
        return []
    lines = ["", "## Answers to the behaviour prompts", "",
             f"The reference answered {quality['behaviour_prompts']} prompts greedily "
             f"({quality['behaviour_checkable']} with a checkable answer, {quality['reference_behaviour_correct']} "
             "of them right). Each variant was "
             "teacher-forced on those answers (KL divergence and same top-1 on the answer tokens) and answered anew "
             "where its most likely token first differed.", "",
             "| variant | same answer | right | lost / gained | McNemar p | answer KLD [95%] | answer top-1 |",
             "|---|---|---|---|---|---|---|"]
    for name, b in rows:
        lines.append(f"| {name} | {b['identical']}/{b['prompts']} | {b['correct']}/{b['checkable']} | "
                     f"{b['only_reference_correct']} / {b['only_variant_correct']} | {b['mcnemar_p']:.3g} | "
                     f"{b['answer_kld_mean']:.4f} {_interval(b['answer_kld_ci'])} | {b['answer_same_top1']:.1%} |")
    for name, b in rows:
        if not b["differences"]:
            continue
        lines += ["", f"Where `{name}` answers differently:", "", f"| prompt | reference | {name} |", "|---|---|---|"]
        for d in b["differences"]:
            lines.append(f"| {_quoted(d['prompt'], 100)} | {_quoted(d['reference'])} | {_quoted(d['variant'])} |")
    if quality.get("behaviour_skipped"):
        lines += ["", f"Left out: {'; '.join(quality['behaviour_skipped'])}."]
    return lines
