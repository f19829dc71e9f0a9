{{- define "moss-speech.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moss-speech.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects: <fullname>-<component>; component names are short, so trim the base. */}}
{{- define "moss-speech.componentName" -}}
{{- printf "%s-%s" (include "moss-speech.fullname" .root | trunc 40 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "moss-speech.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "moss-speech.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moss-speech
{{- end -}}

{{/* Selector labels of one component: dict "root" $ "component" "triton" */}}
{{- define "moss-speech.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moss-speech.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moss-speech.componentLabels" -}}
{{ include "moss-speech.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moss-speech.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moss-speech.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image: dict "root" $ "image" .Values.x.image */}}
{{- define "moss-speech.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The orchestrator's Triton target: with the headless Service, `dns:///` over every Triton pod (the service
balances requests itself, services/triton_pool.py: a ClusterIP Service would pin one connection to one pod). */}}
{{- define "moss-speech.tritonAddress" -}}
{{- $name := include "moss-speech.componentName" (dict "root" . "component" "triton") -}}
{{- if .Values.triton.service.headless -}}
{{- printf "dns:///%s-headless.%s.svc:%d" $name .Release.Namespace (int .Values.triton.ports.grpc) -}}
{{- else -}}
{{- printf "%s:%d" $name (int .Values.triton.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* A Deployment strategy: `rollingUpdate` only with type RollingUpdate (values merge would keep the default's). */}}
{{- define "moss-speech.strategy" -}}
type: {{ .type | default "RollingUpdate" }}
{{- if and (eq (.type | default "RollingUpdate") "RollingUpdate") .rollingUpdate }}
rollingUpdate:
  {{- toYaml .rollingUpdate | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "moss-speech.modelClaim" -}}
{{- $v := .Values.modelRepository.volume -}}
{{- if $v.existingClaim -}}
{{- $v.existingClaim -}}
{{- else if $v.create -}}
{{- include "moss-speech.componentName" (dict "root" . "component" "models") -}}
{{- else -}}
{{- fail "modelRepository.volume.enabled needs volume.existingClaim or volume.create=true" -}}
{{- end -}}
{{- end -}}

{{/*
An env value as text. Helm reads YAML numbers as float64, and a float64 such as 4194304 prints as 4.194304e+06,
which an int field cannot parse: whole numbers are printed as integers.
*/}}
{{- define "moss-speech.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* Orchestrator settings with the chart-derived triton_url filled in (unless set in values). */}}
{{- define "moss-speech.orchestratorSettings" -}}
{{- $s := deepCopy .Values.orchestrator.settings -}}
{{- if not (hasKey $s "triton_url") -}}
{{- $_ := set $s "triton_url" (include "moss-speech.tritonAddress" .) -}}
{{- end -}}
{{- /* The store: sessions.backend; redis_url never as plain env (the Deployment reads it from a Secret). */ -}}
{{- if not (hasKey $s "sessions_backend") -}}
{{- $_ := set $s "sessions_backend" .Values.sessions.backend -}}
{{- end -}}
{{- if $s.redis_url -}}
{{- fail "orchestrator.settings.redis_url would sit in plain env: put the URL into a Secret and set sessions.redis.external.secretName (and secretKey)" -}}
{{- end -}}
{{- $_ := unset $s "redis_url" -}}
{{- if not $s.health_port -}}
{{- $_ := set $s "health_port" (int .Values.orchestrator.healthPort) -}}
{{- end -}}
{{- if and .Values.tracing.enabled (not $s.otlp_endpoint) -}}
{{- $_ := set $s "otlp_endpoint" (required "tracing.otlpEndpoint is required when tracing.enabled" .Values.tracing.otlpEndpoint) -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* Pod metric names served by the prometheus-adapter rules (one place for the rules and the HPAs). */}}
{{- define "moss-speech.metric.tritonQueue" -}}moss_speech_triton_queue_us_per_request{{- end -}}

{{/* A model path (dict "root" $ "path" p): relative paths sit under modelRepository.volume.mountPath, so moving
the mount moves every build/model path; an absolute path is used as it is (a repository baked into the image). */}}
{{- define "moss-speech.modelPath" -}}
{{- if hasPrefix "/" .path -}}
{{- .path -}}
{{- else -}}
{{- printf "%s/%s" (trimSuffix "/" .root.Values.modelRepository.volume.mountPath) .path -}}
{{- end -}}
{{- end -}}

{{/* Files next to the repository on the volume: the build lock and the revision mark the build Job writes. */}}
{{- define "moss-speech.buildLock" -}}
{{- printf "%s.build.lock" (include "moss-speech.modelPath" (dict "root" . "path" .Values.modelRepository.path)) -}}
{{- end -}}
{{- define "moss-speech.buildMark" -}}
{{- printf "%s.built-revision" (include "moss-speech.modelPath" (dict "root" . "path" .Values.modelRepository.path)) -}}
{{- end -}}

{{/* "true" when triton.command is the project's launcher (`moss-speech triton ...`), which takes launcher flags
and passes the arguments after `--` to tritonserver; "" for plain tritonserver. */}}
{{- define "moss-speech.tritonLauncher" -}}
{{- $c := .Values.triton.command -}}
{{- if and (ge (len $c) 2) (eq (index $c 0) "moss-speech") (eq (index $c 1) "triton") -}}true{{- end -}}
{{- end -}}

{{/* Pod scheduling shared by the Triton pods and the build Job (same GPU kind, same node pool). */}}
{{- define "moss-speech.tritonScheduling" -}}
{{- $t := .Values.triton -}}
{{- with $t.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $t.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The session store's Redis URL Secret: the bundled Redis's own, or sessions.redis.external's. */}}
{{- define "moss-speech.redisUrlSecret" -}}
{{- $r := .Values.sessions.redis -}}
{{- if $r.bundled.enabled -}}
name: {{ include "moss-speech.componentName" (dict "root" . "component" "redis") }}
key: redis-url
{{- else -}}
name: {{ required "sessions.backend=redis needs sessions.redis.bundled.enabled or sessions.redis.external.secretName (a Secret holding the URL)" $r.external.secretName }}
key: {{ $r.external.secretKey }}
{{- end -}}
{{- end -}}

{{/* The label of the one Service per component that ServiceMonitors select (its pods' metrics port). */}}
{{- define "moss-speech.monitoredLabel" -}}
moss-speech.openmoss.io/metrics: "true"
{{- end -}}
