{{/* The release's full name, used for every object. */}}
{{- define "mso.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mso.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mso.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "mso.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mso.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mso.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The webhook's Service; the operator names its certificate Secret after it. */}}
{{- define "mso.webhookService" -}}
{{- printf "%s-webhook" (include "mso.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mso.webhookSecret" -}}
{{- printf "%s-tls" (include "mso.webhookService" .) -}}
{{- end -}}

{{- define "mso.redisName" -}}
{{- printf "%s-redis" (include "mso.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
