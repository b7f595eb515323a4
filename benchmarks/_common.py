"""Helpers shared by the benchmark scripts: model configs, machine/version metadata, output."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "models"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TESTS_DIR = REPO / "tests"
# The measurement harnesses (spawned gloo ranks, counted collectives, metered steps) live in tests/
# (``*_harness.py``, ``dist_harness.py``), where the tests that check the closed forms use them;
# benchmarks import them by name, as the tests do.
if str(TESTS_DIR) not in sys.path:
    sys.path.append(str(TESTS_DIR))


def load_config(name: str, **overrides: Any):
    """``transformers.LlamaConfig`` from ``configs/models/<name>.json`` with attribute overrides."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_json_file(str(CONFIG_DIR / f"{name}.json"))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def meta_model(config) -> Any:
    """``LlamaForCausalLM(config)`` on the meta device (shapes and buffers only, no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def source_digest() -> str:
    """sha256 (first 16 hex) of every ``qgalore_dist/**/*.py``: identifies the code that was measured
    (the package is not committed yet, so there is no git revision to quote)."""
    h = hashlib.sha256()
    for path in sorted((REPO / "qgalore_dist").rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def git_revision() -> str:
    """``HEAD`` commit, with ``+dirty`` when qgalore_dist/ has uncommitted changes."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "qgalore_dist") else "")


def _relative(path: str) -> str:
    """``path`` relative to the repository root when inside it (results name no machine's paths)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix() or "."
    except ValueError:
        return path


def command_line() -> str:
    """This run's command as typed from the repository root: ``python`` and repo-relative paths."""
    args = [_relative(a) if os.path.isabs(a) else a for a in sys.argv]
    return " ".join(shlex.quote(a) for a in ["python", *args])


def environment() -> dict[str, Any]:
    """Machine, library versions, exact command and date of this run."""
    import bitsandbytes
    import torch
    import transformers

    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
        },
        "command": command_line(),
        "cwd": _relative(os.getcwd()),
        "git_revision": git_revision(),
        "qgalore_dist_source_sha256": source_digest(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def environment_md(env: dict[str, Any]) -> str:
    """The environment block as markdown lines."""
    m, v = env["machine"], env["versions"]
    return "\n".join([
        f"- date: {env['date_utc']}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs (torch threads {m['torch_threads']})",
        f"- versions: python {v['python']}, torch {v['torch']}, bitsandbytes {v['bitsandbytes']}, "
        f"transformers {v['transformers']}",
        f"- command (from the repository root): `{env['command']}`",
        f"- code: git `{env['git_revision']}`, qgalore_dist source sha256 (first 16 hex) "
        f"`{env['qgalore_dist_source_sha256']}`",
    ])


def write_outputs(stem: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    # Paths inside the repository are written relative to its root: results name no machine's paths.
    root = REPO.as_posix() + "/"
    json_path.write_text(json.dumps(payload, indent=2).replace(root, "") + "\n")
    md_path.write_text(markdown.rstrip().replace(root, "") + "\n")
    return json_path, md_path
