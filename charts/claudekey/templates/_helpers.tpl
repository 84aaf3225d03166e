{{/*
Names, labels, images and pod hardening shared by every template.
The command-line flags of each role live in _args.tpl, in one place.
*/}}

{{- define "claudekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, or "<release>-claudekey". Truncated so suffixes fit. */}}
{{- define "claudekey.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "claudekey.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "claudekey.labels" -}}
helm.sh/chart: {{ include "claudekey.chart" . }}
app.kubernetes.io/name: {{ include "claudekey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: claudekey
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "claudekey.selectorLabels" -}}
app.kubernetes.io/name: {{ include "claudekey.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "claudekey.componentLabels" -}}
{{ include "claudekey.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* ServiceAccount name of one component. Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "claudekey.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "claudekey.fullname" .ctx) .component) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "ctx" $) for the chart image, or (dict "ctx" $ "override"
.Values.sidecar.image) where empty fields fall back to the chart image.
*/}}
{{- define "claudekey.image" -}}
{{- $repo := .ctx.Values.image.repository }}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag }}
{{- $digest := .ctx.Values.image.digest }}
{{- with .override }}
{{- /* Another repository is another image: it inherits neither the chart's tag nor digest. */}}
{{- if .repository }}
{{- $repo = .repository }}
{{- $tag = default $.ctx.Chart.AppVersion .tag }}
{{- $digest = .digest }}
{{- else }}
{{- if .tag }}{{ $tag = .tag }}{{ $digest = "" }}{{ end }}
{{- if .digest }}{{ $digest = .digest }}{{ end }}
{{- end }}
{{- end }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{- define "claudekey.webhookServiceName" -}}
{{- printf "%s-webhook" (include "claudekey.fullname" .) }}
{{- end }}

{{- define "claudekey.webhookTLSSecretName" -}}
{{- printf "%s-webhook-tls" (include "claudekey.fullname" .) }}
{{- end }}

{{- define "claudekey.gatewayServiceName" -}}
{{- printf "%s-gateway" (include "claudekey.fullname" .) }}
{{- end }}

{{- define "claudekey.gatewayTLSSecretName" -}}
{{- printf "%s-gateway-tls" (include "claudekey.fullname" .) }}
{{- end }}

{{/* The gateway's https URL for <name>-client Secrets; empty when there is no gateway. */}}
{{- define "claudekey.gatewayURL" -}}
{{- if .Values.controller.gatewayURL }}
{{- .Values.controller.gatewayURL }}
{{- else if .Values.gateway.enabled }}
{{- printf "https://%s.%s.svc:%d" (include "claudekey.gatewayServiceName" .) .Release.Namespace (int .Values.gateway.port) }}
{{- end }}
{{- end }}

{{/* DNS names of a chart Service's serving certificate. Call with (dict "ctx" $ "svc" name). */}}
{{- define "claudekey.serviceDNSNames" -}}
{{- $ns := .ctx.Release.Namespace }}
{{- toYaml (list .svc (printf "%s.%s" .svc $ns) (printf "%s.%s.svc" .svc $ns) (printf "%s.%s.svc.cluster.local" .svc $ns)) }}
{{- end }}

{{/*
metadata.annotations: commonAnnotations plus the resource's own (which win). Renders nothing
when both are empty. Call with (dict "ctx" $ "extra" (dict ...)).
*/}}
{{- define "claudekey.annotations" -}}
{{- $a := merge (deepCopy (default dict .extra)) (deepCopy (default dict .ctx.Values.commonAnnotations)) }}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* extraVolumes / extraVolumeMounts of one component. Call with (dict "ctx" $ "component" c). */}}
{{- define "claudekey.extraVolumes" -}}
{{- with (index .ctx.Values .component).extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- define "claudekey.extraVolumeMounts" -}}
{{- with (index .ctx.Values .component).extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Namespaces the webhooks never cover: kube-system, the release namespace, and any extra. */}}
{{- define "claudekey.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace }}
{{- range .Values.webhook.excludeNamespaces }}
{{- $ns = append $ns . }}
{{- end }}
{{- toYaml (uniq $ns) }}
{{- end }}

{{/*
namespaceSelector of both webhooks: the exclusions above, ANDed with the optional opt-in selector.
*/}}
{{- define "claudekey.namespaceSelector" -}}
{{- $sel := deepCopy .Values.webhook.namespaceSelector }}
{{- $exclude := dict "key" "kubernetes.io/metadata.name" "operator" "NotIn" "values" (include "claudekey.excludedNamespaces" . | fromYamlArray) }}
{{- $_ := set $sel "matchExpressions" (prepend (default (list) $sel.matchExpressions) $exclude) }}
{{- toYaml $sel }}
{{- end }}

{{/* Pod-level hardening: non-root (distroless nonroot uid), RuntimeDefault seccomp. */}}
{{- define "claudekey.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level hardening. */}}
{{- define "claudekey.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Env every role gets: the log level, and its identity (downward API) for leader election,
audit lines and Events. */}}
{{- define "claudekey.podEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/*
Scheduling of one component: user affinity, or a preferred anti-affinity spreading replicas over
nodes. Call with (dict "ctx" $ "component" "controller").
*/}}
{{- define "claudekey.scheduling" -}}
{{- $v := index .ctx.Values .component }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
affinity:
{{- if $v.affinity }}
  {{- toYaml $v.affinity | nindent 2 }}
{{- else }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "claudekey.selectorLabels" . | nindent 14 }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget of one component. Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "claudekey.pdb" -}}
{{- $v := index .ctx.Values .component }}
{{- if $v.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "claudekey.fullname" .ctx }}-{{ .component }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "claudekey.componentLabels" . | nindent 4 }}
  {{- include "claudekey.annotations" (dict "ctx" .ctx) | nindent 2 }}
spec:
  maxUnavailable: {{ $v.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "claudekey.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
The Redis URL of the shared limits (docs/limits.md): redis.url, or the chart's own Redis with
redis.deploy; empty: in-memory limits. Never carries a password (redis.existingSecret does).
*/}}
{{- define "claudekey.redisURL" -}}
{{- if .Values.redis.url -}}
{{- if and .Values.redis.tls (not (hasPrefix "rediss://" .Values.redis.url)) -}}
{{- fail "redis.tls: true needs a rediss:// redis.url" -}}
{{- end -}}
{{- .Values.redis.url -}}
{{- else if .Values.redis.deploy -}}
{{- if .Values.redis.tls -}}
{{- fail "redis.deploy runs Redis without TLS: give a rediss:// redis.url for TLS" -}}
{{- end -}}
redis://{{ include "claudekey.fullname" . }}-redis.{{ .Release.Namespace }}.svc:6379/0
{{- end -}}
{{- end }}

{{/*
"true" when namespace-placement sidecars share limits through Redis too (redis.sidecars): each
namespace through a Redis user of its own, which the controller defines with the admin password
of redis.existingSecret. Refused without a Redis or without that password: a Redis the sidecars
of every namespace reach must not let them in as its admin.
*/}}
{{- define "claudekey.redisSidecars" -}}
{{- if .Values.redis.sidecars -}}
{{- if not (include "claudekey.redisURL" .) -}}
{{- fail "redis.sidecars needs a Redis: set redis.url or redis.deploy" -}}
{{- end -}}
{{- if not .Values.redis.existingSecret -}}
{{- fail "redis.sidecars needs redis.existingSecret: the sidecars of every namespace reach this Redis, so it must require a password, which only the controller and the gateway hold" -}}
{{- end -}}
true
{{- end -}}
{{- end }}

{{/* Share of each limit a gateway replica enforces alone during a Redis outage. */}}
{{- define "claudekey.redisFallbackShare" -}}
{{- if ne (toString .Values.redis.fallbackShare) "" -}}
{{- .Values.redis.fallbackShare -}}
{{- else -}}
{{- divf 1 (max 1 (int .Values.gateway.replicas)) -}}
{{- end -}}
{{- end }}

{{- define "claudekey.paths.redis" -}}/etc/claudekey/redis{{- end }}
{{- define "claudekey.paths.prices" -}}/etc/claudekey/prices{{- end }}
