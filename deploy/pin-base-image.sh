#!/bin/sh
# Resolve the digest of the base image tag that deploy/Dockerfile.* name (ARG PYTHON_IMAGE) and
# write it to deploy/base-image.digest, which the image builds pass as --build-arg PYTHON_DIGEST.
# Needs registry access and docker buildx (or crane). Review and commit the result; rerun to take
# a rebuilt base image (security fixes) deliberately.
set -eu
here=$(dirname "$0")
image=$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$here/Dockerfile.worker")
[ "$image" = "$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$here/Dockerfile.server")" ] || { echo "Dockerfiles name different base images" >&2; exit 1; }
if command -v crane >/dev/null 2>&1; then
  digest=$(crane digest "$image")
else
  digest=$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}' | tr -d '"')
fi
case "$digest" in
  sha256:*) [ ${#digest} -eq 71 ] || { echo "unexpected digest '$digest' for $image" >&2; exit 1; } ;;
  *) echo "no digest for $image: '$digest'" >&2; exit 1 ;;
esac
echo "$digest" > "$here/base-image.digest"
echo "$image@$digest"
