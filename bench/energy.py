"""The energy a CUDA card has used, from NVML's counter: joules per step, where time misleads.

At its power limit a card lowers its clock until it draws no more than the limit, so a step's
time there follows the energy it needs. A kernel made shorter but not cheaper in joules then
leaves the step's time as it was, and the step's time also moves with the host's CPU. The
energy a step takes moves with neither, so the benches print both.

``Meter(device)`` reads ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver
loaded; Volta and later) through ``ctypes`` from the driver's ``libnvidia-ml.so.1``, for the
card with the device's UUID. Where NVML or the counter is missing (a CPU, an older card, a
container without the library), ``Meter.available`` is False and ``joules()`` returns None:
the benches then print no energy, and measure the rest as before. The counter counts
millijoules, but its readings are coarser in time: on an H200, windows of about 1.5 s varied by
about 4%, windows of about 6 s by about 1% (docs/performance.md). Read it over many
steps, not one.
"""

from __future__ import annotations

import ctypes


class Meter:
    """Joules used by one CUDA card since the meter was made; None where NVML cannot say."""

    def __init__(self, device=None):
        self._lib = self._handle = None
        self.why = None
        self.available = False
        self._start = None
        try:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            props = torch.cuda.get_device_properties(torch.device("cuda", torch.cuda.current_device())
                                                     if device is None else device)
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                raise RuntimeError("nvmlInit failed")
            handle = ctypes.c_void_p()
            uuid = f"GPU-{props.uuid}".encode()
            if lib.nvmlDeviceGetHandleByUUID(ctypes.c_char_p(uuid), ctypes.byref(handle)) != 0:
                raise RuntimeError(f"NVML does not know {uuid.decode()}")
            self._lib, self._handle = lib, handle
            self._start = self._millijoules()
            self.available = True
        except (OSError, RuntimeError, AttributeError) as exc:
            self.why = str(exc)

    def _millijoules(self) -> int:
        value = ctypes.c_ulonglong()
        status = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value))
        if status != 0:
            raise RuntimeError(f"nvmlDeviceGetTotalEnergyConsumption returned {status}")
        return value.value

    def joules(self) -> float | None:
        """Joules since the meter was made (None without NVML); take differences between reads."""
        if not self.available:
            return None
        try:
            return (self._millijoules() - self._start) / 1e3
        except RuntimeError as exc:
            self.available, self.why = False, str(exc)
            return None
