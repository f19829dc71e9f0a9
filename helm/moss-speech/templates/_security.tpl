{{/* Names of the Secrets the orchestrator mounts read-only (security.* in values.yaml). */}}
{{- define "moss-speech.tlsSecretName" -}}
{{- .Values.security.tls.secretName | default (printf "%s-tls" (include "moss-speech.componentName" (dict "root" . "component" "orchestrator"))) -}}
{{- end -}}

{{- define "moss-speech.apiKeysSecretName" -}}
{{- .Values.security.apiKeys.secretName | default (printf "%s-api-keys" (include "moss-speech.componentName" (dict "root" . "component" "orchestrator"))) -}}
{{- end -}}
