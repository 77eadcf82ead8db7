#!/usr/bin/env bash
# Every device measurement in one prepared run (benchmarks/device.py says what and why):
#   benchmarks/device.sh            on a machine with a CUDA GPU and JAX for it (under 12 minutes)
#   benchmarks/device.sh --tiny     any machine, this CPU included, in seconds (what the test runs)
# Writes one JSON record with the device name into benchmarks/results/ (or --out PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
for a in "$@"; do [[ "$a" == "--tiny" ]] && tiny=1; done
if [[ $tiny == 0 ]]; then
  # the GPU, not the host: fail early where JAX has no CUDA backend rather than time a CPU
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  python -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()" \
    || { echo "device.sh: no CUDA device visible to JAX (JAX_PLATFORMS=$JAX_PLATFORMS); use --tiny on a CPU" >&2; exit 2; }
  # XLA's default preallocation (75% of the GPU) is kept: it is what a user gets
fi
exec python benchmarks/device.py "$@"
