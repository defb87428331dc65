"""``hallo3 doctor``: what this machine has (Python, torch, devices and memory), which weights are
installed and in what state, free disk space, and whether the chosen settings fit the device.

    from hallo3_cli.doctor import doctor, format_doctor
    print(format_doctor(doctor("hallo3")))
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from hallo3_cli import store
from hallo3_cli.version import __version__
from hallo3_cli.formatting import human_size
from hallo3_cli.hub import pending_downloads, sources
from hallo3_cli.hub.install import existing_parent
from hallo3_cli.presets import get_preset

#: Parameter counts of the release networks: the DiTs from the official checkpoint manifest
#: (docs/model.md §1), T5-XXL encoder and VAE from their diffusers/transformers configurations.
RELEASE_PARAMETERS = {
    "transformer": 8_921_253_952,
    "reference": 5_625_284_160,
    "text_encoder": 4_762_310_656,
    "vae": 215_583_907,
}
_BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2}


def doctor(model: str = "hallo3", device: str = "auto", dtype: str = "auto") -> dict:
    """A report (plain dict, JSON-serialisable) of the environment, the weights of ``model`` and
    whether they fit ``device`` in ``dtype`` (``auto``: bfloat16 on CUDA, else float32)."""
    preset = get_preset(model)
    report: dict = {
        "hallo3_cli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        **_torch_info(),
        "model": preset.name,
        "random_weights": preset.is_random,
        "home": str(preset.home),
        "components": [],
        "unfinished_downloads": {},
        "disk": _disk(preset.home),
    }
    if not preset.is_random:
        for source in sources(preset):
            for folder in source.produces:
                state = store.component_state(preset.home, folder, source.name)
                report["components"].append(
                    {
                        "name": folder,
                        "state": state.state,
                        "size_on_disk": state.size_on_disk,
                        "revision": state.revision,
                        "optional": source.optional,
                        "detail": state.detail,
                        "path": str(state.path),
                    }
                )
        report["unfinished_downloads"] = pending_downloads(preset.home)
        needed = [c["name"] for c in report["components"] if c["state"] != "complete" and not c["optional"]]
        report["next_step"] = f"hallo3 download --model {preset.name}" if needed else None
    report["fit"] = _fit(preset, report, device, dtype)
    return report


def _torch_info() -> dict:
    info: dict = {"torch": None, "cuda": None, "devices": [cpu_device()]}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free = None
            try:
                free, _ = torch.cuda.mem_get_info(index)
            except RuntimeError:
                pass
            info["devices"].append(
                {"device": f"cuda:{index}", "name": props.name, "memory": int(props.total_memory), "free": free}
            )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        cpu = info["devices"][0]
        info["devices"].append(
            {"device": "mps", "name": "Apple GPU (unified memory)", "memory": cpu["memory"], "free": cpu["free"]}
        )
    return info


def cpu_device() -> dict:
    total = free = None
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        pass
    name = platform.processor() or platform.machine()
    return {"device": "cpu", "name": name, "memory": total, "free": free, "cores": os.cpu_count()}


def _disk(home: Path) -> dict:
    probe = existing_parent(home)
    usage = shutil.disk_usage(probe)
    return {"path": str(probe), "free": usage.free, "total": usage.total}


def _resolve(report: dict, device: str, dtype: str) -> tuple[str, str]:
    """The device and dtype a render would use (``runtime``'s resolution), named as in the report."""
    from hallo3_cli.runtime import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(device)
    if device == "cuda":
        device = "cuda:0"
    return device, dtype_name(resolve_dtype(dtype, device))


def _fit(preset, report: dict, device: str, dtype: str) -> dict:
    """Does a render fit ``device``? The memory mode ``--offload auto`` would choose there
    (:func:`hallo3_cli.plan.choose_memory_mode`: the fastest whose plan fits the free device memory)
    and its predicted peak (device memory on CUDA, RAM otherwise) against the device's memory. Falls
    back to the main DiT's weights alone if the plan cannot be computed."""
    from hallo3_cli.plan import DEVICE_RESERVE, choose_memory_mode
    from hallo3_cli.runtime import Runtime

    device, dtype = _resolve(report, device, dtype)
    entry = next((d for d in report["devices"] if d["device"] == device), None)
    available = entry.get("memory") if entry else None
    free = entry.get("free") if entry else None
    kind = "cuda" if device.startswith("cuda") else "cpu"
    fit = {"device": device, "dtype": dtype, "verdict": "unknown", "needed": None, "available": available, "note": ""}
    try:
        from hallo3_cli.plan import plan

        if kind == "cuda":
            chosen = choose_memory_mode(Runtime(device=device, dtype=dtype), preset, free=free if free is not None else available)
        else:
            chosen = Runtime(device=device, dtype=dtype, offload="none", reason="not CUDA: memory is shared, nothing moves")
        planned = plan(preset, offload=chosen.offload, vae_tiling=chosen.vae_tiling, device_kind=kind, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - the doctor must still answer
        return _fit_from_weights(preset, fit, dtype, f"memory plan failed ({type(err).__name__}: {err}); ")
    fit["memory_mode"] = {"offload": chosen.offload, "vae_tiling": chosen.vae_tiling, "reason": chosen.reason}
    needed = planned.peak_device_bytes if kind == "cuda" else planned.peak_host_bytes
    peak = planned.peak_device_step
    fit.update(needed=needed, source="plan", peak_step=peak, flops_per_clip=planned.flops_per_clip,
               peak_host=planned.peak_host_bytes)
    mode = f"--offload auto = {chosen.offload}{' + --vae-tiling' if chosen.vae_tiling else ''} ({chosen.reason})"
    if available is None:
        fit["note"] = f"needs {human_size(needed)} (peak at {peak}); device memory unknown; {mode}"
        return fit
    reserve = DEVICE_RESERVE if kind == "cuda" else 0
    if needed + reserve <= available:
        fit["verdict"] = "fits"
    else:
        fit["verdict"] = "tight" if needed <= available else "no"
    fit["note"] = f"needs {human_size(needed)} of {human_size(available)} (peak at {peak}); {mode}"
    return fit


def _fit_from_weights(preset, fit: dict, dtype: str, note: str) -> dict:
    if preset.is_random:
        return {**fit, "verdict": "fits", "note": note + "tiny random weights: fits any device"}
    available, width = fit["available"], _BYTES_PER_PARAMETER.get(dtype)
    if available is None or width is None:
        return {**fit, "note": note + "device memory or dtype unknown"}
    main = RELEASE_PARAMETERS["transformer"] * width
    fit = {**fit, "needed": main, "source": "weights"}
    if available < main:
        return {**fit, "verdict": "no", "note": note + f"the main DiT weights alone take {human_size(main)} in {dtype}"}
    return {**fit, "note": note + f"main DiT weights {human_size(main)}; activation memory not estimated"}


def format_doctor(report: dict) -> str:
    """The doctor report as a short, aligned text table."""
    lines = [f"hallo3-cli {report['hallo3_cli']}  Python {report['python']}  {report['platform']}"]
    cuda = f"CUDA {report['cuda']}" if report["cuda"] else "CUDA not available"
    lines.append(f"torch {report['torch'] or 'not installed'}  ({cuda})")
    lines.append("devices:")
    for d in report["devices"]:
        memory = human_size(d["memory"]) if d.get("memory") else "memory unknown"
        free = f" ({human_size(d['free'])} free)" if d.get("free") else ""
        lines.append(f"  {d['device']:<8} {d['name'] or '?'}  {memory}{free}")
    lines.append(f"weights: {report['model']} in {report['home']}")
    if report["random_weights"]:
        lines.append("  random weights generated in memory (output is noise); nothing to install")
    else:
        rows = [("component", "state", "size", "revision")]
        for c in report["components"]:
            state = c["state"] + (" (optional)" if c["optional"] and c["state"] != "complete" else "")
            size = human_size(c["size_on_disk"]) if c["size_on_disk"] else "-"
            rows.append((c["name"], state, size, (c["revision"] or "-")[:8]))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        for name, size in report["unfinished_downloads"].items():
            lines.append(f"  unfinished download: {name} {human_size(size)} (rerun 'hallo3 download' to resume)")
    disk = report["disk"]
    lines.append(f"disk: {human_size(disk['free'])} free of {human_size(disk['total'])} at {disk['path']}")
    fit = report["fit"]
    note = f" - {fit['note']}" if fit.get("note") else ""
    lines.append(f"fit ({fit['device']}, {fit['dtype']}): {fit['verdict']}{note}")
    if report.get("next_step"):
        lines.append(f"next: run {report['next_step']}")
    return "\n".join(lines)

