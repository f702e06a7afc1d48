"""Provenance: what made this run (parameters, commit, platform, versions, seeds, data, timings)
and links to every stage's executed notebook, the repeats' and the curve points' too."""

from __future__ import annotations

import json
from pathlib import Path

from .. import config, graph, paths, states
from .style import md_escape


def _pages(run_dir: str, stages: tuple[str, ...]) -> str:
    """Markdown links to the HTML pages of `stages`' executed notebooks, relative to report.html."""
    return " · ".join(f"[{Path(paths.NOTEBOOK_OF[s]).stem}]"
                      f"({paths.executed_notebook(run_dir, s).with_suffix('.html').as_posix()})" for s in stages)


def _device(m: dict) -> str | None:
    """A stage's device, with its GPU model and the GPUs its process was given, or the instruction
    set of PyTorch's CPU kernels (and a variable that restricted it), when recorded."""
    if not m.get("device"):
        return None
    given = m.get("cuda_visible_devices")
    kernels = f"{m['cpu_capability']} kernels" if m.get("cpu_capability") and m["device"] == "cpu" else ""
    forced = ", ".join(f"{k}={v}" for k, v in (m.get("cpu_dispatch") or {}).items())
    extra = ", ".join(x for x in (m.get("gpu"), kernels, forced) if x)
    return m["device"] + (f" ({extra})" if extra else "") + \
        (f", CUDA_VISIBLE_DEVICES={given}" if given is not None else "")


def _processor(prov: dict) -> str | None:
    """'AMD EPYC (x86_64), PyTorch's CPU kernels: AVX512': the same code computes other floats with
    other instructions, so a rerun elsewhere can differ in the last digits (docs/results.md)."""
    parts = [p for p in (prov.get("cpu"), prov.get("processor")) if p]
    text = f"{parts[0]} ({parts[1]})" if len(parts) == 2 and parts[0] != parts[1] else (parts[0] if parts else None)
    if prov.get("cpu_capability"):
        text = f"{text or 'CPU'}, PyTorch's CPU kernels: {prov['cpu_capability']}"
    return text


def _computed(c: dict) -> str:
    """'key ..., code ..., commit ... (2026-12-07T17:40:01+0000, prunestudy run)': what computed a stage."""
    commit = c.get("commit") or "no git checkout"
    when = ", ".join(x for x in (c.get("finished"), c.get("by")) if x)
    return f"key {c['key']}, code {c.get('code') or '—'}, commit {commit}" + (f" ({when})" if when else "")


def _per_split(value) -> str | None:
    """{split: hash} as 'train: ..., test: ...' (a value of another form as it is)."""
    if isinstance(value, dict):
        return ", ".join(f"{split}: {v}" for split, v in value.items()) or None
    return value


def provenance_markdown(results: dict) -> str:
    """Parameter hash, commit, platform, device, seeds, the data's manifest hash and class counts,
    versions, stage timings and keys, and every parameter, as a Markdown table; then links to
    every stage's executed notebook (the repeats' and the curve points' too)."""
    prov = results.get("provenance") or {}
    rows = [("parameters hash", results.get("params_hash")), ("git commit", prov.get("git_commit")),
            ("python", prov.get("python")), ("platform", prov.get("platform")),
            ("processor", _processor(prov)), ("cuda", prov.get("cuda"))]
    train = states.metrics(results, "trained")
    params = results.get("params") or {}
    seeds = [params.get("seed"), *[r["seed"] for r in results.get("repeats") or []]]
    rows += [("device (training)", _device(train)),
             ("seeds", ", ".join(str(s) for s in seeds if s is not None) or None),
             ("data manifest sha256", _per_split((results.get("data") or {}).get("manifest_sha256")))]
    counts = (results.get("data") or {}).get("counts") or {}
    for split, by_class in counts.items():
        rows.append((f"{split} crops per class", ", ".join(f"{c}: {n}" for c, n in by_class.items())))
    rows += [(pkg, v) for pkg, v in (prov.get("versions") or {}).items()]
    rows += [(f"time: {stage}", f"{s:.1f} s") for stage, s in (results.get("timings_s") or {}).items()]
    done = results.get("computed") or {}
    rows += [(f"stage: {stage}", _computed(done[stage]) if stage in done else f"key {key}")
             for stage, key in (results.get("stage_keys") or {}).items()]
    rows += [(f"parameter: {k}", json.dumps(v)) for k, v in config.flatten(params).items()]
    lines = ["| item | value |", "|---|---|"] + [f"| {md_escape(k)} | {md_escape(v if v is not None else '—')} |"
                                                 for k, v in rows]
    lines += ["", f"Each stage's executed notebook, with its code and outputs: {_pages('.', graph.CHAIN)}."]
    for r in results.get("repeats") or []:
        seed = int(r["seed"])   # an int (config checks it): safe in a link
        folder = paths.repeat_name(seed)
        lines.append(f"Repeat with seed {seed} (folder {folder}): {_pages(folder, graph.REPEAT)}.")
    for e in results.get("curve") or []:   # folder names from the method registry and a float: safe in a link
        lines.append(f"Curve point {md_escape(e['name'])} (folder {md_escape(e['dir'])}): "
                     f"{_pages(e['dir'], graph.POINT)}.")
    return "\n".join(lines)
