"""Golden run: the first epochs of configs/tiny_cpu.yaml must give the numbers recorded in
tests/golden/tiny_cpu.json, the way torchtitan pins its losses before a refactor.

The file was recorded before the house issue moved any code (rooms, config split, one epoch
function), and every move since must reproduce it: rewards, advantages, losses and KL of each
epoch, the held-out evaluation, and a checksum of the trained LoRA. The run is one process with
one thread (so float reductions run in one order) and builds its own tiny model (so no model built
under another thread count is reused).

Recording (only when a change is MEANT to alter the trajectory, and say why in the commit):
    python tests/test_golden.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, run_cli  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_cpu.json"
NUM_EPOCHS = 3
# Everything that depends on the samples, the rewards and the update; times are left out.
KEYS = (
    "reward/mean", "reward/std", "reward/jpeg_compressibility/mean", "reward/jpeg_incompressibility/mean",
    "train/advantage_abs_mean", "train/trained_fraction", "train/zero_std_ratio",
    "train/policy_loss", "train/kl", "train/approx_kl", "train/clipfrac", "train/grad_norm", "train/lr",
    "train/global_step", "eval/reward", "eval/jpeg_compressibility", "eval/jpeg_incompressibility",
    "eval/reward/change",
)
# The same single-threaded program reproduces these bit for bit on one machine; the tolerance only
# absorbs a different CPU's vector kernels. A changed trajectory moves them by far more.
RTOL, ATOL = 1e-5, 1e-9


def golden_run(tmp_path: Path) -> dict:
    """Run the first NUM_EPOCHS epochs of tiny_cpu.yaml and return what the golden file pins."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    run_cli([
        "configs/tiny_cpu.yaml", f"run_dir={run_dir}", f"model.pretrained={tmp_path / 'tiny-sd3-warm'}",
        f"num_epochs={NUM_EPOCHS}", "eval.every=2", "log.save_every=0", "log.image_every=0", "log.progress=false",
    ], env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = {str(row["epoch"]): {k: row[k] for k in KEYS if k in row} for row in rows}
    checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    lora = load_file(run_dir / "checkpoints" / checkpoint / "trainable" / "pytorch_lora_weights.safetensors")
    checksum = {
        name: [float(t.double().sum()), float(t.double().abs().sum()), float(t.double().square().sum())]
        for name, t in sorted(lora.items())
    }
    return {"epochs": epochs, "lora": checksum}


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= ATOL + RTOL * abs(b)


@pytest.mark.slow
def test_tiny_cpu_reproduces_the_golden_run(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = golden_run(tmp_path)
    assert sorted(got["epochs"]) == sorted(golden["epochs"]), "a different set of epochs was logged"
    wrong = [
        f"epoch {epoch} {key}: {got['epochs'][epoch].get(key)} != golden {value}"
        for epoch, expected in golden["epochs"].items()
        for key, value in expected.items()
        if not _close(got["epochs"][epoch].get(key), value)
    ]
    assert not wrong, "the run left the golden trajectory:\n" + "\n".join(wrong)
    assert sorted(got["lora"]) == sorted(golden["lora"]), "the trained LoRA has other tensors"
    moved = [
        f"{name}: {got['lora'][name]} != golden {value}"
        for name, value in golden["lora"].items()
        if not all(_close(a, b) for a, b in zip(got["lora"][name], value))
    ]
    assert not moved, "the trained LoRA differs from the golden run:\n" + "\n".join(moved[:10])


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = golden_run(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {len(result['epochs'])} evaluations/epochs, {len(result['lora'])} LoRA tensors")
