{{/* The installation's name: prefixes every object (and the control plane's workspace pods). */}}
{{- define "warren.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "warren.labels" -}}
app.kubernetes.io/name: warren
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "warren.selector" -}}
app.kubernetes.io/name: warren
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "warren.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{- define "warren.workspaceNamespace" -}}
{{- default .Release.Namespace .Values.workspaces.namespace -}}
{{- end -}}

{{- define "warren.claim" -}}
{{- default (printf "%s-files" (include "warren.name" .)) .Values.storage.existingClaim -}}
{{- end -}}

{{- define "warren.databaseSecret" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- required "database: set cnpgCluster or existingSecret" .Values.database.cnpgCluster | printf "%s-app" -}}
{{- end -}}
{{- end -}}

{{- define "warren.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s-nats.%s.svc:4222" (include "warren.name" .) .Release.Namespace -}}
{{- else -}}
{{- required "nats.url is needed when nats.enabled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/* Where NATS is, as a NetworkPolicy peer: its pods, or anywhere (a NATS you run). */}}
{{- define "warren.natsPeer" -}}
{{- if .Values.nats.enabled }}
- podSelector:
    matchLabels:
      {{- include "warren.selector" (dict "root" . "component" "nats") | nindent 6 }}
{{- else }}
- ipBlock: {cidr: 0.0.0.0/0}
{{- end }}
{{- end -}}

{{/* What every Warren container runs with: Pod Security `restricted`, read-only root. */}}
{{- define "warren.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{- define "warren.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Telemetry settings, the same for the gateway and the control plane. */}}
{{- define "warren.telemetryEnv" -}}
- name: WARREN_LOG_FORMAT
  value: {{ .Values.telemetry.logFormat | quote }}
{{- with .Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: WARREN_DB_MAX_CONNECTIONS
  value: {{ .Values.database.maxConnections | quote }}
- name: DATABASE_URL_FILE
  value: /var/run/secrets/warren/database/{{ .Values.database.key }}
{{- end -}}

{{- define "warren.databaseVolume" -}}
- name: database
  secret:
    secretName: {{ include "warren.databaseSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.database.key }}
        path: {{ .Values.database.key }}
{{- end -}}

{{/* NATS's configuration (its ConfigMap, and the checksum that rolls the pods when it changes). */}}
{{- define "warren.natsConf" -}}
{{- $name := printf "%s-nats" (include "warren.name" .) }}
{{- $n := .Values.nats -}}
port: 4222
http_port: 8222
server_name: $SERVER_NAME
pid_file: /var/run/nats/nats.pid
jetstream {
  store_dir: /data/jetstream
  max_file_store: {{ $n.storage.maxFileStore }}
}
{{- if gt (int $n.replicas) 1 }}
cluster {
  name: {{ $name }}
  port: 6222
  routes: [
    {{- range $i := until (int $n.replicas) }}
    nats://{{ $name }}-{{ $i }}.{{ $name }}-headless:6222
    {{- end }}
  ]
}
{{- end }}
# The operator, the system account and Warren's account (JWTs; memory resolver).
include ./auth/auth.conf
{{- end -}}

{{/* NetworkPolicy peers (templates/networkpolicies.yaml). */}}
{{- define "warren.peerNamespace" -}}
{{- if . }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
{{- else }}
- namespaceSelector: {}
{{- end }}
{{- end }}
{{- define "warren.databasePeer" -}}
{{- if .Values.database.existingSecret }}
# Any PostgreSQL (database.existingSecret): narrow it with your own policy if you can.
- ipBlock: {cidr: 0.0.0.0/0}
{{- else }}
- podSelector:
    matchLabels:
      cnpg.io/cluster: {{ .Values.database.cnpgCluster }}
{{- end }}
{{- end }}
{{- define "warren.otlpEgress" -}}
{{- if .Values.telemetry.otlpEndpoint }}
- ports: [{port: 4317, protocol: TCP}, {port: 4318, protocol: TCP}]
{{- end }}
{{- end }}
