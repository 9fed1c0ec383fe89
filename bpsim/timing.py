"""Millisecond timers for one model's compute and for a round's wall time, on CPU or CUDA.

On CPU a torch operation has finished when its call returns, so ``time.perf_counter`` around
the calls measures the compute. On CUDA, kernels run asynchronously, so a model's compute is
measured with CUDA events recorded on the current stream. Reading such a time waits for the
end event, so read ``ms`` after any overlapped section, not inside it.
"""

from __future__ import annotations

import time

import torch


class ComputeTimer:
    """Timer of the work queued inside a ``with`` block on one device. Read the result from ``ms``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._start = self._end = None

    def __enter__(self) -> "ComputeTimer":
        # NOTE: the test suite runs on CPU only, so the CUDA branches here are not covered by it.
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._end = time.perf_counter()

    @property
    def ms(self) -> float:
        """Elapsed milliseconds. On CUDA, reading it waits until the block's kernels have run."""
        if self._end is None:
            raise RuntimeError("ComputeTimer.ms read before its with-block ended")
        if self._cuda:
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        return (self._end - self._start) * 1000.0


class WallTimer:
    """Timer of a ``with`` block in wall-clock milliseconds, which waits at the block's end for the device to finish."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._start = self._end = None

    def __enter__(self) -> "WallTimer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._end = time.perf_counter()

    @property
    def ms(self) -> float:
        if self._end is None:
            raise RuntimeError("WallTimer.ms read before its with-block ended")
        return (self._end - self._start) * 1000.0
