#!/usr/bin/env bash
# Build and push the training image, print its reference (prefect.yaml's `build-image` step uses
# the printed line as the GPU deployments' `image`).
#
#   OPPEN_IMAGE_REPOSITORY=ghcr.io/acme/oppen-train infra/build-image.sh
#
# The tag is the git commit (plus -dirty for uncommitted changes), so a deployment always names
# the exact code it runs. OPPEN_SKIP_IMAGE_BUILD=1 builds nothing and prints $OPPEN_IMAGE (or the
# commit-tagged reference): for machines without a container engine, deploying an image that CI
# or another machine already pushed.
set -euo pipefail
cd "$(dirname "$0")/.."
repository=${OPPEN_IMAGE_REPOSITORY:-localhost:5000/oppen-train}
tag=$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then tag="$tag-dirty"; fi
image=${OPPEN_IMAGE:-$repository:$tag}
if [ "${OPPEN_SKIP_IMAGE_BUILD:-0}" = "1" ]; then
  echo "$image"
  exit 0
fi
engine=${OPPEN_CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}
if [ -z "$engine" ]; then
  echo "build-image: no docker or podman found; install one, or set OPPEN_SKIP_IMAGE_BUILD=1 and OPPEN_IMAGE to an image already pushed" >&2
  exit 1
fi
"$engine" build -f infra/Dockerfile -t "$image" . >&2
"$engine" push "$image" >&2
echo "$image"
