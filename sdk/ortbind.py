"""ONNX Runtime's IOBinding, with its one private fast path kept here and nowhere else.

onnxruntime's Python wrappers make a new device handle for every output of every step and wrap
every value twice; through the binding's own C++ object a step binds its values with handles made
once (a tenth of a tiny model's step). That object and those handles are private to onnxruntime,
so each call here checks for them once and falls back to the public calls where a version lays its
wrappers out differently: nothing else in nextoken touches onnxruntime's private names.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

__all__ = ["Binder"]


class Binder:
    """Binds step inputs and outputs for one device: ``fast`` when onnxruntime's private handles
    are there (else every call takes the public route)."""

    def __init__(self, device: str, device_id: int, fast: bool = True) -> None:
        self.device = device
        self.device_id = device_id
        self._handles = None
        if not fast:  # the public calls only
            return
        try:
            self._handles = (
                ort.OrtDevice.make("cpu", 0)._get_c_device(),
                ort.OrtDevice.make(device, device_id)._get_c_device(),
            )
        except Exception:
            self._handles = None

    @property
    def fast(self) -> bool:
        """Whether the private fast path is in use."""
        return self._handles is not None

    def logits_to_host(self, binding: ort.IOBinding, name: str) -> None:
        """Bind output ``name`` to host memory that ONNX Runtime allocates."""
        if self._handles is not None:
            binding._iobinding.bind_output(name, self._handles[0])
        else:
            binding.bind_output(name, "cpu")

    def value_in_out(self, binding: ort.IOBinding, past: str, present: str, value: ort.OrtValue) -> None:
        """Bind ``value`` as input ``past`` and let ``present`` be allocated on the device."""
        if self._handles is not None:
            raw = binding._iobinding
            raw.bind_ortvalue_input(past, value._ortvalue)
            raw.bind_output(present, self._handles[1])
        else:
            binding.bind_ortvalue_input(past, value)
            binding.bind_output(present, self.device, self.device_id)

    def host_input(self, binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
        """Bind a host array as input ``name``: the array stays referenced by the binding (the
        value reads its memory) until the name is bound again. The public call also checks for
        WebGPU graph capture, which nextoken never uses."""
        if self._handles is not None:
            refs = binding.__dict__.setdefault("nextoken_inputs", {})
            refs[name] = array
            binding._iobinding.bind_input(name, array)
        else:
            binding.bind_cpu_input(name, array)

    def host_output(self, binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
        """Bind output ``name`` to ``array`` (host memory the caller keeps alive): the step writes
        into it."""
        if self._handles is not None:
            binding._iobinding.bind_output(name, self._handles[0], array.dtype, list(array.shape), array.ctypes.data)
        else:
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def run(self, session: ort.InferenceSession, binding: ort.IOBinding) -> None:
        """Run the bound step (straight on the session's own object on the fast path, which skips the
        public wrapper's WebGPU capture bookkeeping)."""
        raw = getattr(session, "_sess", None) if self._handles is not None else None
        if raw is not None:
            raw.run_with_iobinding(binding._iobinding, None)
        else:
            session.run_with_iobinding(binding)

    def outputs(self, binding: ort.IOBinding) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """The first output as a host array, and the others as values."""
        if self._handles is not None:
            raw = binding._iobinding.get_outputs()
            return raw[0].numpy(), [ort.OrtValue(raw[i]) for i in range(1, len(raw))]
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])
