# shellcheck shell=bash
# A real Kubernetes API server for Warren's tests and for `./scripts/up --backend kubernetes`:
# kube-apiserver and etcd built from Go modules (testenv/kube), on loopback, with RBAC and
# Pod Security admission. Sourced after services.sh.
#
#   ensure_kube    builds the binaries when their inputs changed, starts etcd and the API
#                  server when they are not running, and sets KUBECONFIG (the admin's) and
#                  WARREN_KUBECONFIG_CONTROL_PLANE (the control plane's identity, bound to
#                  deploy/helm/warren/files/control-plane-role.yaml and nothing else).

WARREN_KUBE_DIR="${WARREN_KUBE_DIR:-$WARREN_STATE_DIR/kube}"
WARREN_KUBE_PORT="${WARREN_KUBE_PORT:-56443}"
WARREN_ETCD_PORT="${WARREN_ETCD_PORT:-52379}"

# The release the binaries report (Go builds from modules carry no version otherwise, and
# clients such as kubectl refuse "v0.0.0-master").
KUBE_VERSION_LDFLAGS="-X k8s.io/component-base/version.gitVersion=v1.34.4 \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
-X k8s.io/client-go/pkg/version.gitVersion=v1.34.4"

# The build is cached: rebuilt only when testenv/kube's go.mod, go.sum, sources or flags
# change.
kube_build() {
    local src="$WARREN_ROOT/testenv/kube" bin="$WARREN_KUBE_DIR/bin" stamp key
    key=$( (cat "$src/go.mod" "$src/go.sum" "$src"/*/main.go; echo "$KUBE_VERSION_LDFLAGS") \
        | sha256sum | cut -c1-16)
    stamp="$bin/.built-$key"
    if [ -x "$bin/apiserver" ] && [ -x "$bin/etcd" ] && [ -f "$stamp" ]; then
        return 0
    fi
    say "Kubernetes: building kube-apiserver and etcd from Go modules (once per change; minutes)"
    mkdir -p "$bin"
    (cd "$src" && go build -ldflags "$KUBE_VERSION_LDFLAGS" -o "$bin/" ./apiserver ./etcd) \
        || die "building the test API server failed"
    rm -f "$bin"/.built-*
    touch "$stamp"
}

kube_ready() {
    curl -fsSk --max-time 2 -H "Authorization: Bearer $(cat "$WARREN_KUBE_DIR/admin.token")" \
        "https://127.0.0.1:$WARREN_KUBE_PORT/readyz" >/dev/null 2>&1
}

kube_write_kubeconfig() {
    local file=$1 user=$2 token=$3
    cat >"$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: warren-test
  cluster:
    server: https://127.0.0.1:$WARREN_KUBE_PORT
    certificate-authority: $WARREN_KUBE_DIR/certs/apiserver.crt
users:
- name: $user
  user:
    token: $token
contexts:
- name: warren-test
  context: {cluster: warren-test, user: $user, namespace: workspaces}
current-context: warren-test
KUBECONFIG
    chmod 600 "$file"
}

# A namespace that enforces Pod Security `restricted`, with its default ServiceAccount (no
# controller manager runs here to make it, and the ServiceAccount admission wants it).
kube_restricted_namespace() {
    kubectl apply -f - >/dev/null <<YAML || die "could not create namespace $1"
apiVersion: v1
kind: Namespace
metadata:
  name: $1
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: default
  namespace: $1
automountServiceAccountToken: false
YAML
}

ensure_kube() {
    command -v go >/dev/null || die "Go is needed to build the test API server"
    kube_build
    local dir="$WARREN_KUBE_DIR"
    mkdir -p "$dir/certs" "$dir/etcd"
    if [ ! -f "$dir/admin.token" ]; then
        (umask 077
         od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$dir/admin.token"
         od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$dir/control-plane.token"
         printf '%s,admin,admin,"system:masters"\n%s,warren-control-plane,warren-control-plane,""\n' \
             "$(cat "$dir/admin.token")" "$(cat "$dir/control-plane.token")" >"$dir/tokens.csv")
    fi
    [ -f "$dir/sa.key" ] || (umask 077; openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null) \
        || die "openssl is needed for the service-account key"
    if ! kube_ready; then
        if [ -f "$dir/etcd.pid" ] && kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then :; else
            say "Kubernetes: starting etcd on 127.0.0.1:$WARREN_ETCD_PORT"
            nohup "$dir/bin/etcd" "$dir/etcd" "http://127.0.0.1:$WARREN_ETCD_PORT" \
                "http://127.0.0.1:$((WARREN_ETCD_PORT + 1))" >"$dir/etcd.log" 2>&1 &
            echo $! >"$dir/etcd.pid"
        fi
        if [ -f "$dir/apiserver.pid" ] && kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
            kill "$(cat "$dir/apiserver.pid")"
            while kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; do sleep 0.1; done
        fi
        say "Kubernetes: starting kube-apiserver on 127.0.0.1:$WARREN_KUBE_PORT (RBAC, Pod Security)"
        nohup "$dir/bin/apiserver" \
            --bind-address=127.0.0.1 --secure-port="$WARREN_KUBE_PORT" \
            --advertise-address=127.0.0.1 \
            --cert-dir="$dir/certs" \
            --etcd-servers="http://127.0.0.1:$WARREN_ETCD_PORT" \
            --token-auth-file="$dir/tokens.csv" \
            --authorization-mode=RBAC \
            --service-cluster-ip-range=10.96.0.0/16 \
            --service-account-issuer=https://kubernetes.default.svc \
            --service-account-key-file="$dir/sa.key" \
            --service-account-signing-key-file="$dir/sa.key" \
            >"$dir/apiserver.log" 2>&1 &
        echo $! >"$dir/apiserver.pid"
        local i
        for i in $(seq 1 300); do
            kube_ready && break
            kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || die "kube-apiserver exited; see $dir/apiserver.log"
            sleep 0.2
        done
        kube_ready || die "kube-apiserver did not become ready; see $dir/apiserver.log"
    fi
    kube_write_kubeconfig "$dir/admin.kubeconfig" admin "$(cat "$dir/admin.token")"
    kube_write_kubeconfig "$dir/control-plane.kubeconfig" warren-control-plane \
        "$(cat "$dir/control-plane.token")"
    export KUBECONFIG="$dir/admin.kubeconfig"
    export WARREN_KUBECONFIG_CONTROL_PLANE="$dir/control-plane.kubeconfig"
    # The namespace workspaces run in: the server itself refuses a pod that is not hardened.
    kube_restricted_namespace workspaces
    # The control plane's identity gets exactly the Role deploy/ ships.
    kubectl apply -n workspaces -f "$WARREN_ROOT/deploy/helm/warren/files/control-plane-role.yaml" \
        >/dev/null || die "could not apply the control plane's Role"
    kubectl apply -f - >/dev/null <<'YAML' || die "could not bind the control plane's Role"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: warren-control-plane
  namespace: workspaces
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: warren-control-plane}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: warren-control-plane}
YAML
    say "Kubernetes: API server ready (KUBECONFIG=$KUBECONFIG)"
}
