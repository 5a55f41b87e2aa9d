"""The environment stage: versions, device, and whether mango's kernels are validated there."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _distribution_version(name: str):
    """The installed version of a distribution (the carried wheels included), or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(log, cuda: bool) -> dict:
    import torch

    from mango_kernels.validated import VALIDATED

    rec = {
        "status": "ok",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pytest": _version("pytest"),
        "matplotlib": _version("matplotlib"),
        "peers": {d: _distribution_version(d) for d in ("heavyball", "muon-optimizer", "emerging-optimizers", "gram-newton-schulz")},
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "validated_architectures": {f"sm_{a}{b}": v for (a, b), v in VALIDATED.items()},
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        rec["device"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": f"{p.major}.{p.minor}",
            "memory_bytes": p.total_memory,
            "sm_count": p.multi_processor_count,
            "count": torch.cuda.device_count(),
            "validated": (p.major, p.minor) in VALIDATED,
        }
        if shutil.which("nvidia-smi"):
            try:
                q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
                r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
                rec["nvidia_smi"] = r.stdout.strip()
            except Exception as e:
                rec["nvidia_smi"] = f"failed: {e}"
    else:
        rec["device"] = {"name": f"CPU ({platform.processor() or platform.machine()}), dry run", "capability": None}
    for k in ("python", "torch", "triton", "cuda_runtime", "numpy", "pytest", "matplotlib"):
        log.write(f"[env] {k}: {rec[k]}")
    log.write(f"[env] peers: {rec['peers']}")
    log.write(f"[env] device: {rec['device']}")
    if rec.get("nvidia_smi"):
        log.write(f"[env] nvidia-smi: {rec['nvidia_smi']}")
    return rec
