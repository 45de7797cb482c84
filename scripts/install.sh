#!/usr/bin/env bash
# Install kd and everything it needs into the active Python environment (PYTHON=... to choose one).
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

# Fashion-MNIST, for `make demo` and the tests, from Debian's package where apt can install it.
FASHION=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    echo "== installing Debian package dataset-fashion-mnist (into $FASHION)"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
      || echo "warning: could not install dataset-fashion-mnist; kd will download Fashion-MNIST into data/ instead"
  else
    echo "note: without root, skipping dataset-fashion-mnist; kd will download Fashion-MNIST into data/ instead"
  fi
fi

echo "== installing kd (editable) with $($PYTHON --version)"
"$PYTHON" -m pip install -e ".[dev]"

# torch and torchvision must come as a matching pair. A local torch build (a +cpu wheel from a
# find-links folder, say) may have no torchvision built against it: then `import torchvision`
# fails, and the pair is installed together from the package index instead.
if ! "$PYTHON" -c "import torchvision" >/dev/null 2>&1; then
  version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
  echo "== torchvision does not load with torch $version here; installing torch==$version with its torchvision from the index"
  "$PYTHON" -m pip uninstall -y torch torchvision
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip install "torch==$version" torchvision
fi

"$PYTHON" -c "import torch, torchvision, kd_cli; print(f'kd {kd_cli.__version__} installed: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
