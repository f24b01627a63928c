{{/* Names and labels shared by every template. */}}

{{- define "sandfork.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, unless it already says "sandfork". */}}
{{- define "sandfork.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sandfork.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandfork.labels" -}}
helm.sh/chart: {{ include "sandfork.chart" . }}
app.kubernetes.io/name: {{ include "sandfork.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sandfork
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "sandfork.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandfork.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sandfork.operator.fullname" -}}
{{- printf "%s-operator" (include "sandfork.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandfork.agent.fullname" -}}
{{- printf "%s-agent" (include "sandfork.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandfork.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "sandfork.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sandfork.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "sandfork.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secrets holding each side's certificate, key and the CA. */}}
{{- define "sandfork.operator.tlsSecretName" -}}
{{- if .Values.tls.generate }}
{{- printf "%s-tls" (include "sandfork.operator.fullname" .) }}
{{- else }}
{{- required "tls.operatorSecretName is required when tls.generate is false" .Values.tls.operatorSecretName }}
{{- end }}
{{- end }}

{{- define "sandfork.agent.tlsSecretName" -}}
{{- if .Values.tls.generate }}
{{- printf "%s-tls" (include "sandfork.agent.fullname" .) }}
{{- else }}
{{- required "tls.agentSecretName is required when tls.generate is false" .Values.tls.agentSecretName }}
{{- end }}
{{- end }}

{{/* image: include with (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "sandfork.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}
