"""What a device says about itself, as one JSON line on stdout: edgepack's version, Python's, the detected device and
its memory bandwidth (the same read kernel as on the build machine) at the given thread counts.

    python -m edgepack.measure.device_report [THREADS ...]

`--measure-on ssh://…` runs this on the device before measuring any variant there.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from edgepack.measure.hardware import CudaGpu, DeviceInfo


def device_from_dict(data: dict[str, Any]) -> DeviceInfo:
    """The inverse of dataclasses.asdict for a DeviceInfo that travelled as JSON; fields it does not know (a newer
    edgepack on the device) are left out."""
    known = {f.name for f in dataclasses.fields(DeviceInfo)}
    values = {key: value for key, value in data.items() if key in known}
    values["isa_features"] = tuple(values.get("isa_features") or ())
    values["notes"] = tuple(values.get("notes") or ())
    values["cuda_gpus"] = tuple(CudaGpu(**gpu) for gpu in values.get("cuda_gpus") or ())
    return DeviceInfo(**values)


def describe(device: DeviceInfo) -> str:
    """One line naming a device, as reports show it."""
    parts = [device.board or device.apple_chip or device.cpu_model or "unknown CPU"]
    if device.cpu_model and device.cpu_model not in parts[0]:
        parts.append(device.cpu_model)
    parts.append(f"{device.physical_cores} cores")
    if device.ram_total_bytes:
        parts.append(f"{device.ram_total_bytes / 2**30:.0f} GiB")
    parts += [gpu.name for gpu in device.cuda_gpus]
    return ", ".join(parts)


def main(argv: list[str]) -> None:
    from edgepack.core.versions import EDGEPACK_VERSION
    from edgepack.measure.bandwidth import measure_bandwidth_gbps
    from edgepack.measure.hardware import detect
    from runtimes.registry import engine_supports_device, runtime_names

    device = detect()
    threads = [int(t) for t in argv] or [device.physical_cores or 1]
    engines = {name: [d for d in ("cpu", "cuda", "metal") if engine_supports_device(name, d)]
               for name in runtime_names()}
    print(json.dumps({"edgepack": EDGEPACK_VERSION, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
                      "device": dataclasses.asdict(device), "engines": engines,
                      "bandwidth_gbps": {str(t): measure_bandwidth_gbps(t) for t in threads}}))


if __name__ == "__main__":
    main(sys.argv[1:])
