"""What a stage was computed from.

Whoever computes a stage (the runner, a notebook in JupyterLab, papermill called directly, the
stage function from Python) writes `<stage>/stage.json` last, atomically, after the outputs: the
stage key (prunestudy.graph: its parameters, the key of the stage before it, the code that
computes it), its parameters and the digest of each code file, a unique id of this computation,
the key and id of every input stage it read, and the size, modification time and SHA-256 digest of
every output file. A stage is complete only if its record says so *and* the files are still what it
recorded *and* its inputs are still the records it read: a notebook rerun of an earlier stage, a
deleted model or an edited file makes it stale, with a reason. Size and time are checked wherever a
stage's state is asked for (`problem`); the digests wherever a stage is used (`verify`: a stage found
up to date, a store entry linked), which an edit that restored both size and time does not pass.
Who may write a run folder (its lock): prunestudy.runlock.
"""

from __future__ import annotations

import hashlib
import html
import re
import time
import uuid
from pathlib import Path

from . import atomic, config, graph, paths

FORMAT = 3   # 2: the record holds the digests of the code that computed it; 3: of every output file too
DIGEST = "sha256"   # hashlib's (OpenSSL, SHA-NI): 0.26 s per 60 MiB on a loaded 2-core machine here (BLAKE2b 0.45 s)
_SKIP_SUFFIXES = (".tmp", ".building", ".link", ".claim")


def read(stage_folder: Path) -> dict | None:
    """A stage folder's record, or None when there is none (or it cannot be read)."""
    try:
        record = atomic.read_json(Path(stage_folder) / paths.STAGE_RECORD)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") else None


def recorded(stage_folder: Path, key: str) -> bool:
    """Whether the folder holds a record of `key` that is not marked stale: done as far as its record
    tells (its inputs unchecked: `problem` checks them before anything is skipped). Read once."""
    rec = read(stage_folder) or {}
    return rec.get("key") == key and not rec.get("stale")


def outputs(stage_folder: Path) -> dict[str, list[int]]:
    """Every output file of a stage folder (sub-folders included) -> [size, mtime_ns]; the
    record itself, checkpoints of a running stage and temporary files are not outputs."""
    folder, out = Path(stage_folder), {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.rglob("*")):
        name = path.name
        if (not path.is_file() or name in (paths.STAGE_RECORD, paths.CHECKPOINT) or name.startswith(".")
                or name.endswith(_SKIP_SUFFIXES)):
            continue
        st = path.stat()
        out[path.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def write(stage_folder: Path, stage: str, key: str, params: dict, inputs: dict, seconds: float,
          by: str, code: dict | None = None) -> dict:
    """The record of a finished computation, written last (the completion mark). `code`: the digest
    of each file that computed it (graph.code_files; the stage's own, by default)."""
    found = outputs(stage_folder)
    started = time.perf_counter()
    digests = {name: file_digest(Path(stage_folder) / name) for name in found}
    record = {"format": FORMAT, "stage": stage, "key": key, "id": uuid.uuid4().hex, "inputs": inputs,
              "params": params, "code": graph.code_files(stage) if code is None else code,
              "commit": config.git_commit(), "seconds": round(seconds, 2), "by": by,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outputs": found, "digests": digests,
              "digest_seconds": round(time.perf_counter() - started, 4)}
    atomic.write_json(Path(stage_folder) / paths.STAGE_RECORD, record)
    return record


def file_digest(path: Path) -> str:
    """"sha256:<hex>" of a file's bytes."""
    with open(path, "rb") as f:
        return f"{DIGEST}:{hashlib.file_digest(f, DIGEST).hexdigest()}"


_verified: set[tuple[str, str]] = set()   # (folder, record id) whose digests this process checked


def verify(stage_folder: Path) -> str | None:
    """Why a complete stage's files are not the bytes it recorded (None when they are, or when its
    record is of an earlier prunestudy, which kept no digests): every output hashed again, once per
    process and record. An edit in place that restored the file's size and time is found here."""
    rec = read(stage_folder)
    if rec is None or not rec.get("digests"):
        return None
    done = (str(Path(stage_folder).resolve()), rec.get("id", ""))
    if done in _verified:
        return None
    for name, digest in rec["digests"].items():
        path = Path(stage_folder) / name
        if not path.is_file():
            return f"output {name} is missing"
        if file_digest(path) != digest:
            return f"output {name} is not the bytes the stage wrote (its {DIGEST} digest differs)"
    _verified.add(done)
    return None


def clear(stage_folder: Path) -> None:
    """Forget that a stage finished (before it reruns, or when it is found stale)."""
    (Path(stage_folder) / paths.STAGE_RECORD).unlink(missing_ok=True)


def input_ids(stage_folders: dict[str, Path]) -> dict[str, dict]:
    """{stage: {key, id}} of the records a computation reads (None for a stage without a record)."""
    out = {}
    for stage, folder in stage_folders.items():
        rec = read(folder)
        out[stage] = {"key": rec["key"], "id": rec.get("id")} if rec else None
    return out


def problem(stage_folder: Path, key: str | None = None, inputs: dict[str, Path] | None = None,
            expect: tuple[dict, dict] | None = None) -> str | None:
    """Why the stage in this folder is not complete (None when it is): no record, another key (with
    `expect`, the (parameters, code files) of the key asked for: which of them differ), an input
    recomputed since, a missing or changed output file, marked stale."""
    rec = read(stage_folder)
    if rec is None:
        return "not computed yet (no stage record)"
    if rec.get("stale"):
        return f"stale: {rec['stale']}"
    if key is not None and rec["key"] != key:
        return key_change(rec, key, expect)
    for stage, folder in (inputs or {}).items():
        now, then = read(folder), (rec.get("inputs") or {}).get(stage)
        if now is None:
            return f"its input '{stage}' has no complete record"
        if then is None or then.get("key") != now["key"] or then.get("id") != now.get("id"):
            return f"its input '{stage}' was recomputed after it"
    recorded, found = rec.get("outputs") or {}, outputs(stage_folder)
    for name, (size, mtime) in recorded.items():
        if name not in found:
            return f"output {name} is missing"
        if found[name] != [size, mtime]:
            return f"output {name} changed after the stage finished"
    return None


def key_change(rec: dict, key: str, expect: tuple[dict, dict] | None = None) -> str:
    """Why a record's key is not the one asked for: the code files and parameters that differ, else
    the stage it follows (whose key its key holds)."""
    head = f"computed with another key ({rec['key']}, now {key})"
    if expect is None:
        return head
    params, code = expect
    if "code" not in rec:
        return f"{head}: computed by an earlier prunestudy, whose keys held no digest of the code"
    files, names = key_diff(rec, params, code)
    reasons = [f"code changed: {', '.join(files)}"] if files else []
    old = rec.get("params") or {}
    if names:
        shown = "; ".join(_change(n, old.get(n), params.get(n)) for n in names[:6])
        reasons.append(f"parameters changed: {shown}" + (f" (and {len(names) - 6} more)" if len(names) > 6 else ""))
    if not reasons:
        reasons.append("the stage it follows changed (another key before it)")
    return f"{head}: {'; '.join(reasons)}"


def _change(name: str, old, new) -> str:
    """'amount 0.2 -> 0.5'; for a mapping, its entries that differ ('machine.threads 2 -> 1')."""
    if isinstance(old, dict) and isinstance(new, dict):
        return "; ".join(_change(f"{name}.{k}", old.get(k), new.get(k)) for k in sorted({*old, *new})
                         if old.get(k) != new.get(k))
    return f"{name} {old!r} -> {new!r}"


def key_diff(rec: dict, params: dict, code: dict) -> tuple[list[str], list[str]]:
    """(code files, parameter names) whose digest or value differ between a record and these."""
    was, old = rec.get("code") or {}, rec.get("params") or {}
    files = sorted(f for f in {*was, *code} if was.get(f) != code.get(f)) if "code" in rec else []
    names = sorted(n for n in {*old, *params} if old.get(n) != params.get(n))
    return files, names


def mark_stale(stage_folder: Path, reason: str) -> bool:
    """Mark a finished stage stale (its record stays, for the record); True if it had one."""
    rec = read(stage_folder)
    if rec is None or rec.get("stale"):
        return False
    rec["stale"] = reason
    atomic.write_json(Path(stage_folder) / paths.STAGE_RECORD, rec)
    return True


STAMP_ID = "prunestudy-outdated"   # report.html's banner of stages recomputed since it was rendered


def mark_outdated(run_dir: Path, reason: str) -> bool:
    """A run folder's report and results.json, once one of its stages was recomputed outside the
    runner (a notebook, Python), say so at once: report.html gets a banner at the top of its first
    screen (each reason once), results.json an `outdated` list. The runner renders both again.
    True when there was a report to stamp."""
    run_dir = Path(run_dir)
    try:
        res = atomic.read_json(run_dir / paths.RESULTS)
        if reason not in res.setdefault("outdated", []):
            res["outdated"].append(reason)
            atomic.write_json(run_dir / paths.RESULTS, res)
    except (OSError, ValueError, AttributeError):
        pass
    page = run_dir / paths.REPORT
    try:
        text = page.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    found = re.search(rf'<div id="{STAMP_ID}".*?</div>\n', text, flags=re.S)
    reasons = re.findall(r"<li>(.*?)</li>", found[0]) if found else []
    reasons += [] if html.escape(reason) in reasons else [html.escape(reason)]
    banner = (f'<div id="{STAMP_ID}" role="alert" style="border:3px solid #b00020;background:#fff3f3;color:#000;'
              'padding:0.6em 1em;margin:0.5em;font:15px/1.4 sans-serif"><strong>This report is out of date.</strong> '
              "Stages of its run folder were computed again after it was rendered, so its figures are no longer "
              f"those of the folder:<ul>{''.join(f'<li>{r}</li>' for r in reasons)}</ul>"
              f"<code>{html.escape(paths.rerun_command(run_dir).strip('`'))}</code> renders it again for the "
              "folder's parameters (the stages computed in notebooks stay in the stage store; docs/notebooks.md)."
              "</div>\n")
    text = text.replace(found[0], "") if found else text
    body = re.search(r"<body[^>]*>\n?", text)
    if body is None:
        return False
    atomic.write_bytes(page, (text[:body.end()] + banner + text[body.end():]).encode())
    return True


def chain_problems(run_dir: Path) -> list[tuple[str, str]]:
    """(stage, why) for every stage of the run folder that is not consistent with the stages it
    was computed from (data -> train -> prune -> retrain): stale, recomputed inputs, changed or
    missing outputs. Stages never computed are left out; empty when the chain holds."""
    found = []
    for stage in graph.stage("analysis").reads:
        folder = paths.stage_dir(run_dir, stage)
        if read(folder) is None:
            if (folder / paths.marker(stage)).is_file():
                found.append((stage, "has outputs but no stage record (computed by an older version, or "
                                     "interrupted): its provenance cannot be checked"))
            continue
        why = problem(folder, None, {up: paths.stage_dir(run_dir, up) for up in graph.stage(stage).reads})
        if why:
            found.append((stage, why))
    return found
