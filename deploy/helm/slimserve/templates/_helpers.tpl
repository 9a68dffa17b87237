{{/* Names */}}
{{- define "slimserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slimserve.fullname" -}}
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

{{- define "slimserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slimserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slimserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slimserve.labels" -}}
helm.sh/chart: {{ include "slimserve.chart" . }}
{{ include "slimserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: slimserve
{{- end }}

{{- define "slimserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slimserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images */}}
{{- define "slimserve.cpuImage" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "slimserve.gpuImage" -}}
{{- $repo := default .Values.image.repository .Values.gpuImage.repository }}
{{- if .Values.gpuImage.digest }}
{{- printf "%s@%s" $repo .Values.gpuImage.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (printf "%s-gpu" .Chart.AppVersion) .Values.gpuImage.tag) }}
{{- end }}
{{- end }}

{{/* Auth */}}
{{- define "slimserve.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if or .Values.auth.adminToken .Values.auth.inferenceToken }}
{{- printf "%s-auth" (include "slimserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "slimserve.inferenceTokenEnabled" -}}
{{- if and (include "slimserve.authSecretName" .) (or .Values.auth.inferenceTokenEnabled .Values.auth.inferenceToken) }}true{{- end }}
{{- end }}

{{- define "slimserve.adminTokenEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.adminToken }}true{{- end }}
{{- end }}

{{/* A probe on a health path; the health routes answer on every port and need no token */}}
{{- define "slimserve.probeHandler" -}}
{{- if and (eq .root.Values.probes.handler "grpc") (gt (int .root.Values.ports.grpc) 0) }}
grpc:
  port: {{ .root.Values.ports.grpc }}
  service: ""
{{- else }}
httpGet:
  path: {{ .path }}
  port: inference
{{- end }}
{{- end }}

{{/* Container ports: one per distinct number */}}
{{- define "slimserve.containerPorts" -}}
- name: inference
  containerPort: {{ .Values.ports.inference }}
  protocol: TCP
{{- if ne (int .Values.ports.management) (int .Values.ports.inference) }}
- name: management
  containerPort: {{ .Values.ports.management }}
  protocol: TCP
{{- end }}
{{- if and (ne (int .Values.ports.metrics) (int .Values.ports.inference)) (ne (int .Values.ports.metrics) (int .Values.ports.management)) }}
- name: metrics
  containerPort: {{ .Values.ports.metrics }}
  protocol: TCP
{{- end }}
{{- if gt (int .Values.ports.grpc) 0 }}
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Environment shared by every slimserve container */}}
{{- define "slimserve.env" -}}
- name: HOME
  value: /tmp
{{- if include "slimserve.adminTokenEnabled" . }}
- name: SLIMSERVE_ADMIN_TOKEN_FILE
  value: /var/run/secrets/slimserve/admin-token
{{- end }}
{{- if include "slimserve.inferenceTokenEnabled" . }}
- name: SLIMSERVE_INFERENCE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "slimserve.authSecretName" . }}
      key: inference-token
{{- end }}
{{- if .Values.database.existingSecret }}
- name: SLIMSERVE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.existingSecretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "slimserve.envFrom" -}}
- configMapRef:
    name: {{ include "slimserve.fullname" . }}-config
{{- if .Values.s3.credentialsSecret }}
- secretRef:
    name: {{ .Values.s3.credentialsSecret }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "slimserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ .Values.dataDir }}
{{- if include "slimserve.adminTokenEnabled" . }}
- name: auth
  mountPath: /var/run/secrets/slimserve
  readOnly: true
{{- end }}
{{- end }}

{{/* $root, then "data" volume source (a dict) */}}
{{- define "slimserve.volumes" -}}
{{- $root := index . 0 -}}
{{- $persistent := index . 1 -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $root.Values.tmpSizeLimit }}
- name: data
{{- if and $persistent $root.Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "slimserve.fullname" $root)) $root.Values.persistence.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $root.Values.dataSizeLimit }}
{{- end }}
{{- if include "slimserve.adminTokenEnabled" $root }}
- name: auth
  secret:
    secretName: {{ include "slimserve.authSecretName" $root }}
    defaultMode: 0440
    items:
      - key: admin-token
        path: admin-token
{{- end }}
{{- end }}
