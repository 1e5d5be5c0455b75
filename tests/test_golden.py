"""Golden run: the first epochs of configs/tiny_cpu.yaml must give the numbers recorded in
tests/golden/, the way torchtitan pins its losses before a refactor.

Every move of code must reproduce them: rewards, advantages, losses and KL of each epoch, the
held-out evaluation, and a checksum of the trained LoRA. The run is one process with one thread
(so float reductions run in one order) and builds its own tiny model (so no model built under
another thread count is reused).

A trajectory reproduces on one kind of machine only: the reward is a JPEG file size, a whole
number of bytes, so a last-bit difference in a CPU's float kernels flips a byte, the group
advantages move, and so does everything after. Each recording is therefore kept per machine kind,
named by the fingerprint of its numerics (`numerics_fingerprint`): tiny_cpu.<fingerprint>.json.
tiny_cpu.json is the first recording, made before the house issue moved any code, on a machine
whose fingerprint was not taken. A machine with a recording of its own must match it exactly; any
other must match the first one, and where it does not, the test is skipped and names the
fingerprint to record, rather than failing on what no code changed.

Recording (on a new kind of machine; or when a change is MEANT to alter the trajectory, and say
why in the commit):
    python tests/test_golden.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, run_cli  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
FIRST = GOLDEN_DIR / "tiny_cpu.json"


def golden_file(fingerprint: str) -> Path:
    return GOLDEN_DIR / f"tiny_cpu.{fingerprint}.json"
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


def numerics_fingerprint() -> str:
    """A digest of what the golden numbers depend on besides the code, single-threaded: the
    float kernels of this machine and torch build (convolutions by batch and split batch, group
    and layer norm, a matmul, softmax, upsampling) and the JPEG encoder's output."""
    import hashlib
    import io

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, 24, 24, generator=generator)
        weight, bias = torch.randn(8, 8, 3, 3, generator=generator) / 8, torch.randn(8, generator=generator)
        with torch.no_grad():
            y = F.silu(F.group_norm(F.conv2d(x, weight, bias, padding=1), 4))
            split = torch.cat([F.conv2d(x[:2], weight, bias, padding=1), F.conv2d(x[2:], weight, bias, padding=1)])
            up = F.conv2d(F.interpolate(y, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
            tokens = torch.randn(37, 64, generator=generator)
            attention = torch.softmax(F.layer_norm(tokens, (64,)) @ torch.randn(64, 64, generator=generator) / 8, dim=-1)
        pixels = ((torch.tanh(up[0, :3]) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for tensor in (y, split, up, attention):
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    digest.update(buffer.getvalue())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= ATOL + RTOL * abs(b)


def differences(golden: dict, got: dict) -> list[str]:
    """Where `got` leaves the golden trajectory (empty: it reproduces it)."""
    if sorted(got["epochs"]) != sorted(golden["epochs"]):
        return ["a different set of epochs was logged"]
    wrong = [
        f"epoch {epoch} {key}: {got['epochs'][epoch].get(key)} != golden {value}"
        for epoch, expected in golden["epochs"].items()
        for key, value in expected.items()
        if not _close(got["epochs"][epoch].get(key), value)
    ]
    if sorted(got["lora"]) != sorted(golden["lora"]):
        return wrong + ["the trained LoRA has other tensors"]
    return wrong + [
        f"LoRA {name}: {got['lora'][name]} != golden {value}"
        for name, value in golden["lora"].items()
        if not all(_close(a, b) for a, b in zip(got["lora"][name], value))
    ]


@pytest.mark.slow
def test_tiny_cpu_reproduces_the_golden_run(tmp_path):
    fingerprint = numerics_fingerprint()
    own = golden_file(fingerprint)
    got = golden_run(tmp_path)
    if own.exists():
        wrong = differences(json.loads(own.read_text()), got)
        assert not wrong, f"the run left the golden trajectory of {own.name}:\n" + "\n".join(wrong[:20])
        return
    wrong = differences(json.loads(FIRST.read_text()), got)
    if wrong:
        pytest.skip(
            f"no golden recording for this machine's numerics ({fingerprint}) and it does not reproduce the first one "
            f"({wrong[0]}); if main reproduces it elsewhere, record this kind: python tests/test_golden.py --record"
        )


def test_numerics_fingerprint_tells_kernels_apart(monkeypatch):
    """The fingerprint is stable on one machine and changes with the float kernels it digests (here
    a last-bit change standing in for another CPU's): what keys the recordings."""
    import torch
    import torch.nn.functional as F

    first = numerics_fingerprint()
    assert numerics_fingerprint() == first and len(first) == 16
    conv = F.conv2d

    def perturbed(*args, **kwargs):
        out = conv(*args, **kwargs)
        # One element moved to the next float up: the smallest difference two CPUs can make.
        bumped = torch.nextafter(out[0, 0, 0, 0], torch.tensor(float("inf")))
        return out.index_put((torch.tensor([0]),) * 4, bumped.reshape(1))

    monkeypatch.setattr(F, "conv2d", perturbed)
    assert numerics_fingerprint() != first


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = golden_run(Path(tmp))
    path = golden_file(numerics_fingerprint())
    GOLDEN_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(ROOT)}: {len(result['epochs'])} evaluations/epochs, {len(result['lora'])} LoRA tensors")
