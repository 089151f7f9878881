"""The share of time the GPU was busy while a block of code ran (NVML's utilisation, sampled in a thread)."""

from __future__ import annotations

import statistics
import subprocess
import threading

import torch

__all__ = ["GpuBusySampler"]


class GpuBusySampler:
    """Samples NVML's GPU utilisation (the share of time a kernel was running, what nvidia-smi shows, in %)
    every 0.1 s in a thread while the block runs: through torch (needs the nvidia-ml-py package), else
    from ``nvidia-smi --loop-ms``; nothing on CPU, and the reason when neither works."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[int] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            torch.cuda.utilization(self.device)
        except Exception as err:  # no NVML bindings: ask nvidia-smi
            self._run_nvidia_smi(str(err).splitlines()[0])
            return
        while not self._stop.wait(0.1):
            self.samples.append(torch.cuda.utilization(self.device))

    def _run_nvidia_smi(self, nvml_error: str) -> None:
        try:
            # The GPU as nvidia-smi numbers it: by UUID, since CUDA_VISIBLE_DEVICES may renumber devices.
            gpu = f"GPU-{torch.cuda.get_device_properties(self.device).uuid}"
            command = ["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            smi = subprocess.Popen(
                [*command, "--loop-ms=100"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except Exception as err:
            self.error = f"no NVML bindings ({nvml_error}); nvidia-smi: {str(err).splitlines()[0]}"
            return
        with smi:
            for line in smi.stdout:
                if line.strip().isdigit():
                    self.samples.append(int(line))
                elif not self.samples:
                    self.error = f"nvidia-smi: {line.strip()}"
                if self._stop.is_set():
                    break
            smi.terminate()

    def __enter__(self) -> GpuBusySampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (before the block ends: the samples so far are the summary's)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> str:
        """Median and mean busy % of the samples after the first fifth, or ``n/a (why)``."""
        steady = self.samples[len(self.samples) // 5 :]  # the start (data writing, warm-up, compile) left out
        if not steady:
            return f"n/a ({self.error or 'no samples'})"
        return f"median {statistics.median(steady):.0f}%, mean {statistics.mean(steady):.0f}% of {len(steady)} samples"
