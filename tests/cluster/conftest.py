"""The emulated 2-node cluster (``scripts/cluster.sh``) and what the cluster tests share.

These tests start real daemons (sshd, munge, slurmctld, two slurmd) in network namespaces, so
they need root and run only when asked:

    sudo QGALORE_CLUSTER=1 python -m pytest -m cluster tests/cluster     # (or .ci/run)

The session fixture ``cluster`` brings the cluster up (installing its Debian packages on first
use) and takes it down again at the end, also after a failure; a cluster that was already up
when the session started is left up.  Every run goes through the unchanged ``launch/`` scripts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_harness import CLUSTER_SH, FORWARDED, HOW_TO_RUN, rank_env, run


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            if os.environ.get("QGALORE_CLUSTER") != "1":
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("QGALORE_CLUSTER=1 but not root: " + HOW_TO_RUN)
    was_up = run([CLUSTER_SH, "status"], timeout=60).returncode == 0
    try:
        up = run([CLUSTER_SH, "up"], timeout=1500)  # first use installs Debian packages
        assert up.returncode == 0, f"scripts/cluster.sh up failed:\n{up.stdout[-4000:]}"
        yield
    finally:
        if not was_up:
            down = run([CLUSTER_SH, "down"], timeout=120)
            print(down.stdout)


@pytest.fixture(scope="session")
def work(cluster, tmp_path_factory):
    """A directory both nodes see (one filesystem): fixture corpus, a 2-layer LLaMA, a bf16 ZeRO-2
    ds_config, the hostfiles and ``.deepspeed_env``."""
    from qgalore_dist.train.corpus import builtin_text

    root = tmp_path_factory.mktemp("cluster")
    docs = [d for d in builtin_text(max_chars=150_000).split("\n\n") if len(d) > 80]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "model.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                                                     "num_hidden_layers": 2, "max_position_embeddings": 64}))
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
        "optimizer": {"type": "QGaLoreAdamW8bit", "params": {"lr": 0.01, "rank": 16, "update_proj_gap": 5,
                                                              "scale": 0.25}}}))
    (root / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    env = rank_env()
    # pdsh's remote shells start with a bare environment: DeepSpeed exports these lines there.
    (root / ".deepspeed_env").write_text("".join(f"{k}={env[k]}\n" for k in FORWARDED))
    return root

