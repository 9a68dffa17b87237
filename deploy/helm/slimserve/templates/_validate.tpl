{{/* Refuse configurations that cannot work; called from the API Deployment. */}}
{{- define "slimserve.validate" -}}
{{- $v := .Values -}}
{{- $gpuServing := false -}}
{{- if and $v.gpu.enabled $v.gpu.serving.enabled -}}
{{- range $v.gpu.products -}}
{{- if gt (int (default 0 .servingReplicas)) 0 -}}{{- $gpuServing = true -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $gpuWorker := false -}}
{{- if and $v.gpu.enabled $v.gpu.worker.enabled -}}
{{- range $v.gpu.products -}}
{{- if gt (int (default 0 .workerReplicas)) 0 -}}{{- $gpuWorker = true -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $multi := or (gt (int $v.api.replicas) 1) $v.api.autoscaling.enabled $gpuServing $gpuWorker -}}
{{- $sharedDb := or $v.database.url $v.database.existingSecret -}}
{{- if and $multi (not (and $sharedDb $v.s3.bucket)) -}}
{{- fail "more than one slimserve pod (api.replicas > 1, api.autoscaling or GPU pools) needs a shared catalogue and blob store: set database.url or database.existingSecret (PostgreSQL) and s3.bucket" -}}
{{- end -}}
{{- if and $v.persistence.enabled $multi -}}
{{- fail "persistence.enabled mounts one ReadWriteOnce volume: use it with a single API replica, no autoscaling and no GPU pools" -}}
{{- end -}}
{{- range $v.gpu.products -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$" (toString .name)) -}}
{{- fail (printf "gpu.products[].name %q: use 1-20 lowercase letters, digits or '-'" (toString .name)) -}}
{{- end -}}
{{- if not .product -}}
{{- fail (printf "gpu.products[%s].product: the nvidia.com/gpu.product node label value is required" .name) -}}
{{- end -}}
{{- if and .computeCapability (not (regexMatch "^[0-9]{1,2}[.][0-9]$" (toString .computeCapability))) -}}
{{- fail (printf "gpu.products[%s].computeCapability %q: write it as a quoted string, e.g. \"9.0\"" .name (toString .computeCapability)) -}}
{{- end -}}
{{- end -}}
{{- if le (int $v.api.terminationGracePeriodSeconds) (add (int $v.config.shutdownTimeoutS) (int $v.api.preStopSleepSeconds)) -}}
{{- fail "api.terminationGracePeriodSeconds must exceed config.shutdownTimeoutS + api.preStopSleepSeconds, or the kubelet kills requests that are still draining" -}}
{{- end -}}
{{- if not (has $v.api.autoscaling.metric (list "inflight" "queueTime")) -}}
{{- fail "api.autoscaling.metric must be inflight or queueTime" -}}
{{- end -}}
{{- end -}}
