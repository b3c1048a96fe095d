#!/usr/bin/env bash
# Wheels of what the GPU machine's image lacks for bench/gpu.sh, into .whl/ (git-ignored; carry it to the device).
#
#   bash bench/gpu_wheels.sh        # here, with the package registry reachable: about 50 MB
#
# The image has torch, transformers, peft and accelerate; DeepSpeed, TRL and their dependencies that a plain image
# may miss come from here, at the versions this project is tested with. Binary wheels are built for this machine's
# Python (3.11); gpu.sh installs only what does not import already and says what it could not install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip wheel --no-deps -w .whl \
  deepspeed==0.19.8 hjson==3.1.0 ninja==1.13.2 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 psutil==7.2.2 \
  trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
du -sh .whl
