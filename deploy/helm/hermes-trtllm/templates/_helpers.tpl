{{- define "hermes.name" -}}{{ .Release.Name }}-triton{{- end -}}

{{- define "hermes.selectorLabels" -}}
app.kubernetes.io/name: hermes-trtllm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{- define "hermes.labels" -}}
{{ include "hermes.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "hermes.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end -}}
