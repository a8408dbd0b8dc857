{{- define "keyward.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "keyward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- /* The verifier's objects: `<fullname>-verifier` (within 63 characters). */}}
{{- define "keyward.verifier.fullname" -}}
{{ printf "%s-verifier" (include "keyward.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end -}}
{{- define "keyward.labels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- /*
Selector of the controller's pods. It is the selector of chart 0.1's single Deployment,
kept as it was because a Deployment's selector is immutable: `helm upgrade` from 0.1
then rolls the old two-container pods over to controller-only pods instead of failing
with "field is immutable". The verifier's pods carry another app.kubernetes.io/name, so
this selector never matches them (two Deployments must not select each other's pods).
Services and NetworkPolicies select with "keyward.controller.podSelector", which adds
the component label.
*/}}
{{- define "keyward.controller.selector" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "keyward.controller.podSelector" -}}
{{ include "keyward.controller.selector" . }}
app.kubernetes.io/component: controller
{{- end -}}
{{- /* Selector of one shard's pods (controller.shards): its own name, never matched by
the selector of "<fullname>". */}}
{{- define "keyward.shard.selector" -}}
app.kubernetes.io/name: {{ include "keyward.name" .root }}-shard
app.kubernetes.io/instance: {{ .root.Release.Name }}
keyward.dev/shard: {{ .shard }}
{{- end -}}
{{- /* Every controller pod, shards included (the metrics Service, the NetworkPolicy). */}}
{{- define "keyward.controller.allPods" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}
{{- /* Selector of the verifier's pods (a new Deployment in 0.2, so a fresh selector). */}}
{{- define "keyward.verifier.selector" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}-verifier
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: verifier
{{- end -}}
{{- define "keyward.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "keyward.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- define "keyward.verifier.serviceAccount" -}}
{{- if .Values.verifier.serviceAccount.create -}}{{ default (include "keyward.verifier.fullname" .) .Values.verifier.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.verifier.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- define "keyward.image" -}}{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}{{- end -}}
{{- /* The restricted Pod Security Standard, for every pod and container of the chart. */}}
{{- define "keyward.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile: {type: RuntimeDefault}
{{- end -}}
{{- define "keyward.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}
