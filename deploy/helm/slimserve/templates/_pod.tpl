{{/*
Pod template shared by the API pool and the GPU pools. Argument: a dict with
  root, component (api | gpu-serving | gpu-worker), pool, image, command (list, optional),
  serving (bool: ports + probes), jobWorkers (serving pods), preStopSleepSeconds, resources,
  nodeSelector, tolerations, affinity, topologySpreadConstraints, runtimeClassName,
  terminationGracePeriodSeconds, podAnnotations, podLabels, persistent (bool: the data volume may be the PVC)
*/}}
{{- define "slimserve.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "slimserve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    slimserve.io/pool: {{ .pool }}
    {{- if .serving }}
    slimserve.io/serving: "true"
    {{- end }}
    {{- with .podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with .podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "slimserve.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    {{- if .topologySpreadConstraints }}
    {{- toYaml .topologySpreadConstraints | nindent 4 }}
    {{- else }}
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "slimserve.selectorLabels" $root | nindent 10 }}
          app.kubernetes.io/component: {{ .component }}
          slimserve.io/pool: {{ .pool }}
    {{- end }}
  containers:
    - name: slimserve
      image: {{ .image | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- else }}
      args: ["serve"]
      {{- end }}
      {{- if .serving }}
      ports:
        {{- include "slimserve.containerPorts" $root | nindent 8 }}
      startupProbe:
        {{- include "slimserve.probeHandler" (dict "root" $root "path" "/v2/health/live") | nindent 8 }}
        {{- toYaml $root.Values.probes.startup | nindent 8 }}
      livenessProbe:
        {{- include "slimserve.probeHandler" (dict "root" $root "path" "/v2/health/live") | nindent 8 }}
        {{- toYaml $root.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        {{- include "slimserve.probeHandler" (dict "root" $root "path" "/v2/health/ready") | nindent 8 }}
        {{- toYaml $root.Values.probes.readiness | nindent 8 }}
      {{- end }}
      {{- if .preStopSleepSeconds }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ .preStopSleepSeconds }}"]
      {{- end }}
      env:
        {{- include "slimserve.env" $root | nindent 8 }}
        {{- if .serving }}
        - name: SLIMSERVE_JOB_WORKERS
          value: {{ .jobWorkers | quote }}
        {{- end }}
      envFrom:
        {{- include "slimserve.envFrom" $root | nindent 8 }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "slimserve.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "slimserve.volumes" (list $root .persistent) | nindent 4 }}
{{- end }}
