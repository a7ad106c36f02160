"""ONNX Runtime (CPU): open a file on a number of intra-op threads and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import TargetError
from .runtime import Runtime, Session

# ONNX element types as numpy dtypes, for casting feeds.
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
           "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


class OrtSession(Session):
    def __init__(self, path: Path, session):
        super().__init__(path, {i.name: list(i.shape) for i in session.get_inputs()},
                         {i.name: _DTYPES.get(i.type, np.float32) for i in session.get_inputs()},
                         [o.name for o in session.get_outputs()])
        self.session = session

    def invoke(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feeds)))


class OnnxRuntime(Runtime):
    name, format, display, distribution = "onnxruntime", "onnx", "ONNX Runtime", "onnxruntime"

    def open(self, path: Path, threads: int, *, signature: Optional[str] = None,
             sequential: bool = False) -> OrtSession:
        """A CPU session on `threads` intra-op threads. `sequential` sessions do not spin: each session owns a
        thread pool that spins after every run, and on a 2-core host the spinning pool of the segment just run
        starves the next one (measured: 6 segments of MiniLM 259 ms spinning, 64 ms not)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if sequential:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise TargetError(f"ONNX Runtime cannot load {Path(path).name}: {' '.join(str(e).split())[:300]}",
                              "re-export the file with `pocketformer export --to onnx`.") from None
        return OrtSession(path, session)
