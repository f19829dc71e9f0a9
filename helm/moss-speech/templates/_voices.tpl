{{/* The voice store (created voices): its claim name, and the env, mount and volume of every Triton pod. */}}
{{- define "moss-speech.voiceClaim" -}}
{{- $v := .Values.voiceStore -}}
{{- if $v.existingClaim -}}
{{- $v.existingClaim -}}
{{- else if $v.create -}}
{{- include "moss-speech.componentName" (dict "root" . "component" "voices") -}}
{{- else -}}
{{- fail "voiceStore.enabled needs voiceStore.existingClaim or voiceStore.create=true" -}}
{{- end -}}
{{- end -}}

{{- define "moss-speech.voiceEnv" -}}
{{- $v := .Values.voiceStore }}
- name: MOSS_SPEECH_VOICE_STORE
  value: {{ $v.mountPath | quote }}
- name: MOSS_SPEECH_MAX_VOICES_PER_KEY
  value: {{ $v.maxPerKey | quote }}
- name: MOSS_SPEECH_VOICE_PROMPT_TOKENS
  value: {{ $v.promptTokens | quote }}
{{- end -}}

{{- define "moss-speech.voiceMount" -}}
- name: voices
  mountPath: {{ .Values.voiceStore.mountPath }}
{{- end -}}

{{- define "moss-speech.voiceVolume" -}}
- name: voices
{{- if .Values.voiceStore.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "moss-speech.voiceClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}
