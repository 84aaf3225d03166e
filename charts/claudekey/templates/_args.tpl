{{/*
THE ONE PLACE where the chart spells the binary's command-line flags (each flag also has an env
twin in the binary; the chart uses flags so `kubectl describe pod` shows the whole configuration).
If a role's flags change, change them here only. Mount paths used by the flags are defined here too.
*/}}

{{- define "claudekey.paths.tls" -}}/etc/claudekey/tls{{- end }}
{{- define "claudekey.paths.vaultToken" -}}/etc/claudekey/vault-token{{- end }}
{{- define "claudekey.paths.vaultCA" -}}/etc/claudekey/vault-ca{{- end }}
{{- define "claudekey.paths.gatewayTLS" -}}/etc/claudekey/gateway-tls{{- end }}
{{- define "claudekey.paths.gatewayCA" -}}/etc/claudekey/gateway-ca{{- end }}

{{/* claudekey controller */}}
{{- define "claudekey.controller.args" -}}
- --log-format={{ .Values.logFormat }}
- controller
- --namespace={{ .Release.Namespace }}
{{- with include "claudekey.gatewayURL" . }}
- --gateway-url={{ . }}
{{- end }}
{{- if .Values.gateway.enabled }}
- --gateway-ca-file={{ include "claudekey.paths.gatewayCA" . }}/ca.crt
{{- end }}
{{- with .Values.rbac.namespaces }}
- --watch-namespace={{ first . }}
{{- end }}
- --metrics-listen=0.0.0.0:{{ .Values.controller.metricsPort }}
- --leader-election
- --lease-name={{ .Values.controller.leaderElection.leaseName }}
- --anthropic-url={{ .Values.controller.anthropicAdmin.url }}
- --usage-interval={{ .Values.controller.anthropicAdmin.usageInterval }}
- --max-concurrent-reconciles={{ .Values.controller.maxConcurrentReconciles }}
{{- with .Values.backends.aws }}
{{- if .enabled }}
- --aws-enabled
{{- with .region }}
- --aws-region={{ . }}
{{- end }}
{{- with .endpoint }}
- --aws-endpoint-url={{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.backends.vault }}
{{- if .address }}
- --vault-addr={{ .address }}
{{- if eq .auth.method "token" }}
- --vault-token-file={{ include "claudekey.paths.vaultToken" $ }}/{{ .auth.tokenSecret.key }}
{{- else }}
- --vault-auth-role={{ .auth.kubernetes.role }}
- --vault-auth-mount={{ .auth.kubernetes.mount }}
{{- end }}
{{- if .caSecret.name }}
- --vault-ca-cert={{ include "claudekey.paths.vaultCA" $ }}/{{ .caSecret.key }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "claudekey.redisSidecars" . }}
- --redis-password-file={{ include "claudekey.paths.redis" . }}/password
{{- end }}
{{- range .Values.controller.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* claudekey webhook */}}
{{- define "claudekey.webhook.args" -}}
- --log-format={{ .Values.logFormat }}
- webhook
- --listen=0.0.0.0:{{ .Values.webhook.port }}
- --tls-cert-file={{ include "claudekey.paths.tls" . }}/tls.crt
- --tls-key-file={{ include "claudekey.paths.tls" . }}/tls.key
- --mode={{ .Values.webhook.mode }}
- --proxy-image={{ include "claudekey.image" (dict "ctx" . "override" .Values.sidecar.image) }}
- --proxy-port={{ .Values.sidecar.port }}
- --proxy-metrics-port={{ .Values.sidecar.metricsPort }}
- --proxy-upstream={{ .Values.upstreamURL }}
{{- with .Values.sidecar.resources.requests }}
{{- with .cpu }}
- --sidecar-cpu-request={{ . }}
{{- end }}
{{- with .memory }}
- --sidecar-memory-request={{ . }}
{{- end }}
{{- end }}
{{- with .Values.sidecar.resources.limits }}
{{- with .cpu }}
- --sidecar-cpu-limit={{ . }}
{{- end }}
{{- with .memory }}
- --sidecar-memory-limit={{ . }}
{{- end }}
{{- end }}
- --metrics-listen=0.0.0.0:{{ .Values.webhook.metricsPort }}
{{- if include "claudekey.redisSidecars" . }}
- --sidecar-redis-url={{ include "claudekey.redisURL" . }}
{{- end }}
{{- range .Values.webhook.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* claudekey proxy in gateway mode: every config Secret of the release namespace, over TLS */}}
{{- define "claudekey.gateway.args" -}}
- --log-format={{ .Values.logFormat }}
- proxy
- --mode=gateway
- --config-secrets={{ .Release.Namespace }}
- --listen=0.0.0.0:{{ .Values.gateway.port }}
- --tls-cert={{ include "claudekey.paths.gatewayTLS" . }}/tls.crt
- --tls-key={{ include "claudekey.paths.gatewayTLS" . }}/tls.key
- --upstream={{ .Values.upstreamURL }}
- --audit-log=-
- --metrics-listen=0.0.0.0:{{ .Values.gateway.metricsPort }}
{{- if include "claudekey.redisURL" . }}
- --redis-timeout={{ .Values.redis.timeout }}
- --redis-fallback-share={{ include "claudekey.redisFallbackShare" . }}
{{- if .Values.redis.existingSecret }}
- --redis-password-file={{ include "claudekey.paths.redis" . }}/password
{{- end }}
{{- end }}
{{- if .Values.prices }}
- --price-table={{ include "claudekey.paths.prices" . }}/prices.yaml
{{- end }}
- --identity-service-account={{ .Release.Namespace }}/{{ include "claudekey.serviceAccountName" (dict "ctx" . "component" "gateway") }}
{{- range .Values.gateway.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
