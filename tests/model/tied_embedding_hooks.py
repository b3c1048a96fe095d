"""`dpo-scale` for tests/model/test_tied_embedding.py, chosen by environment variables; run in place of the entry point
(tests/launch.py).

DPO_SCALE_TEST_DENSE_TIED_GRADIENT=1   a tied embedding's gradient takes torch's own dense route, as before
                                       model.wrapper.tied_input_embedding existed: the plain path to compare with
DPO_SCALE_TEST_BACKWARD_PEAK=PATH      write the most bytes each backward held at once (torch's profiler) in
                                       tensors of DPO_SCALE_TEST_TENSOR_BYTES bytes each, one backward a line, to
                                       PATH.rankN, N the process's rank
"""

import os
import sys
from pathlib import Path

from dpo_scale import distributed
from dpo_scale.model import wrapper
from dpo_scale.cli import main
from test_logps import peak_allocated_bytes  # beside this script, in tests/model/


def _dense_route() -> None:
    wrapper.tied_input_embedding = lambda causal_lm: None


def _record_backward_peak(path: str, tensor_bytes: int) -> None:
    backward, peaks = distributed.backward, []

    def profiled(engine, loss):
        peaks.append(peak_allocated_bytes(lambda: backward(engine, loss), tensor_bytes))
        Path(f"{path}.rank{os.environ['RANK']}").write_text("".join(f"{peak}\n" for peak in peaks))

    distributed.backward = profiled


if __name__ == "__main__":
    if os.environ.get("DPO_SCALE_TEST_DENSE_TIED_GRADIENT"):
        _dense_route()
    peak_file = os.environ.get("DPO_SCALE_TEST_BACKWARD_PEAK")
    if peak_file:
        _record_backward_peak(peak_file, int(os.environ["DPO_SCALE_TEST_TENSOR_BYTES"]))
    sys.exit(main(sys.argv[1:]))
