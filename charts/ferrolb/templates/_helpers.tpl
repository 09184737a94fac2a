{{/* Names and labels shared by every template. */}}

{{- define "ferrolb.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferrolb.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ferrolb.controller.name" -}}
{{- printf "%s-controller" (include "ferrolb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferrolb.speaker.name" -}}
{{- printf "%s-speaker" (include "ferrolb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferrolb.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferrolb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ferrolb.memberlistSecretName" -}}
{{- if .Values.speaker.memberlist.existingSecret -}}
{{- .Values.speaker.memberlist.existingSecret -}}
{{- else -}}
{{- printf "%s-memberlist" (include "ferrolb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
