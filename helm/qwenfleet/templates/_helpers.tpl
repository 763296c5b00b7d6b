{{/* Names */}}
{{- define "qwenfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-qwenfleet, or the release name when it holds the chart's name. At most 40
characters: "-coordinator" and a pod's suffix must fit a 63-character DNS label. */}}
{{- define "qwenfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "qwenfleet.coordinator" -}}{{ include "qwenfleet.fullname" . }}-coordinator{{- end -}}
{{- define "qwenfleet.worker" -}}{{ include "qwenfleet.fullname" . }}-worker{{- end -}}
{{- define "qwenfleet.etcd" -}}{{ include "qwenfleet.fullname" . }}-etcd{{- end -}}

{{- define "qwenfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qwenfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels */}}
{{- define "qwenfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwenfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "qwenfleet.labels" -}}
{{ include "qwenfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: qwenfleet
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Every pod of the release (the default-deny policy's selector). */}}
{{- define "qwenfleet.releaseSelector" -}}
app.kubernetes.io/name: {{ include "qwenfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image: (dict "root" $ "repository" "qwenfleet/worker") */}}
{{- define "qwenfleet.image" -}}
{{- printf "%s%s:%s" .root.Values.image.registry .repository (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{/* DNS */}}
{{- define "qwenfleet.svcDomain" -}}{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}{{- end -}}

{{/* A worker's peer name: $(POD_NAME).<headless>.<ns>.svc.<domain> */}}
{{- define "qwenfleet.workerPeerDomain" -}}{{ include "qwenfleet.worker" . }}.{{ include "qwenfleet.svcDomain" . }}{{- end -}}
{{- define "qwenfleet.etcdPeerDomain" -}}{{ include "qwenfleet.etcd" . }}.{{ include "qwenfleet.svcDomain" . }}{{- end -}}

{{/* The gossip port of every coordinator and worker (a fixed one: the NetworkPolicy opens it alone). */}}
{{- define "qwenfleet.gossipPort" -}}
{{- $p := int .Values.gossipPort -}}
{{- if or (lt $p 1) (gt $p 65535) -}}
{{- fail (printf "gossipPort: %v is not a port in [1, 65535] (every coordinator and worker binds it; the NetworkPolicy opens it)" .Values.gossipPort) -}}
{{- end -}}
{{- $p -}}
{{- end -}}

{{/* etcd endpoints, comma separated */}}
{{- define "qwenfleet.etcdEndpoints" -}}
{{- if .Values.etcd.bundled -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "https://%s-%d.%s:%d" (include "qwenfleet.etcd" $) $i (include "qwenfleet.etcdPeerDomain" $) (int $.Values.etcd.clientPort)) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.bundled is false: etcd.external.endpoints must name the etcd endpoints" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* The names every certificate lists: the coordinators' Service, the workers' and etcd
members' peer names (wildcards of their headless Services), and tls.extraHosts. */}}
{{- define "qwenfleet.certHosts" -}}
{{- $c := include "qwenfleet.coordinator" . -}}
{{- $ns := .Release.Namespace -}}
{{- $d := include "qwenfleet.svcDomain" . -}}
{{- $hosts := list $c (printf "%s.%s" $c $ns) (printf "%s.%s.svc" $c $ns) (printf "%s.%s" $c $d) -}}
{{- $hosts = append $hosts (printf "*.%s" (include "qwenfleet.workerPeerDomain" .)) -}}
{{- $hosts = append $hosts (printf "*.%s" (include "qwenfleet.worker" .)) -}}
{{- if .Values.etcd.bundled -}}
{{- $hosts = append $hosts (printf "*.%s" (include "qwenfleet.etcdPeerDomain" .)) -}}
{{- $hosts = append $hosts (printf "*.%s" (include "qwenfleet.etcd" .)) -}}
{{- end -}}
{{- range .Values.tls.extraHosts -}}
{{- $hosts = append $hosts . -}}
{{- end -}}
{{- join "," $hosts -}}
{{- end -}}

{{/* Secrets */}}
{{- define "qwenfleet.tlsSecretName" -}}{{ default (printf "%s-tls" (include "qwenfleet.fullname" .)) .Values.tls.secretName }}{{- end -}}
{{- define "qwenfleet.gossipSecretName" -}}{{ default (printf "%s-gossip" (include "qwenfleet.fullname" .)) .Values.tls.gossipSecretName }}{{- end -}}
{{- define "qwenfleet.apiKeysSecretName" -}}{{ default (printf "%s-api-keys" (include "qwenfleet.fullname" .)) .Values.apiKeys.secretName }}{{- end -}}
{{- define "qwenfleet.certManagerSecretName" -}}{{ include "qwenfleet.fullname" .root }}-{{ .role }}-tls{{- end -}}

{{- define "qwenfleet.checkTLS" -}}
{{- if not (has .Values.tls.source (list "secret" "files" "certManager")) -}}
{{- fail (printf "tls.source: %q is not secret, files or certManager" .Values.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.tls.source "certManager") (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.source certManager needs tls.certManager.issuerRef.name (a CA issuer)" -}}
{{- end -}}
{{- end -}}

{{/* The TLS directory of a role, as a projected volume named "tls": ca.pem, <role>.pem,
<role>-key.pem and (gossip true) gossip.key. (dict "root" $ "role" "worker" "gossip" true) */}}
{{- define "qwenfleet.tlsVolume" -}}
{{- $root := .root -}}
- name: tls
  projected:
    defaultMode: 0440
    sources:
{{- if eq $root.Values.tls.source "certManager" }}
      - secret:
          name: {{ include "qwenfleet.certManagerSecretName" (dict "root" $root "role" .role) }}
          items:
            - {key: ca.crt, path: ca.pem}
            - {key: tls.crt, path: {{ .role }}.pem}
            - {key: tls.key, path: {{ .role }}-key.pem}
{{- if .gossip }}
      - secret:
          name: {{ include "qwenfleet.gossipSecretName" $root }}
          items:
            - {key: gossip.key, path: gossip.key}
{{- end }}
{{- else }}
      - secret:
          name: {{ include "qwenfleet.tlsSecretName" $root }}
          items:
            - {key: ca.pem, path: ca.pem}
            - {key: {{ .role }}.pem, path: {{ .role }}.pem}
            - {key: {{ .role }}-key.pem, path: {{ .role }}-key.pem}
{{- if .gossip }}
            - {key: gossip.key, path: gossip.key}
{{- end }}
{{- end }}
{{- end -}}

{{/* Flags for an external etcd's own credentials (empty with the bundled etcd). */}}
{{- define "qwenfleet.etcdClientArgs" -}}
{{- if not .Values.etcd.bundled -}}
{{- with .Values.etcd.external.tlsSecretName }}
- --etcd-cacert=/etc/qwenfleet/etcd-client/ca.crt
- --etcd-cert=/etc/qwenfleet/etcd-client/tls.crt
- --etcd-key=/etc/qwenfleet/etcd-client/tls.key
{{- end }}
{{- with .Values.etcd.external.username }}
- --etcd-username={{ . }}
{{- end }}
{{- if .Values.etcd.external.passwordSecret.name }}
- --etcd-password-file=/etc/qwenfleet/etcd-password/password
{{- end }}
{{- end -}}
{{- end -}}

{{- define "qwenfleet.etcdClientVolumes" -}}
{{- if not .Values.etcd.bundled -}}
{{- with .Values.etcd.external.tlsSecretName }}
- name: etcd-client
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- if .Values.etcd.external.passwordSecret.name }}
- name: etcd-password
  secret:
    secretName: {{ .Values.etcd.external.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.etcd.external.passwordSecret.key }}
        path: password
{{- end }}
{{- end -}}
{{- end -}}

{{- define "qwenfleet.etcdClientMounts" -}}
{{- if not .Values.etcd.bundled -}}
{{- if .Values.etcd.external.tlsSecretName }}
- {name: etcd-client, mountPath: /etc/qwenfleet/etcd-client, readOnly: true}
{{- end }}
{{- if .Values.etcd.external.passwordSecret.name }}
- {name: etcd-password, mountPath: /etc/qwenfleet/etcd-password, readOnly: true}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The model */}}
{{- define "qwenfleet.modelDir" -}}{{ trimSuffix "/" .Values.model.mountPath }}/{{ .Values.model.path }}{{- end -}}
{{- define "qwenfleet.modelClaim" -}}{{ default (printf "%s-model" (include "qwenfleet.fullname" .)) .Values.model.volume.pvc.existingClaim }}{{- end -}}

{{- define "qwenfleet.modelVolume" -}}
{{- $v := .Values.model.volume -}}
- name: model
{{- if eq $v.kind "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "qwenfleet.modelClaim" . }}
    readOnly: true
{{- else if eq $v.kind "hostPath" }}
  hostPath:
    path: {{ $v.hostPath.path }}
    type: {{ $v.hostPath.type }}
{{- else if eq $v.kind "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $v.emptyDir.sizeLimit }}
{{- else }}
{{- fail (printf "model.volume.kind: %q is not pvc, hostPath or emptyDir" $v.kind) }}
{{- end }}
{{- end -}}

{{/* The model mount of a main container: read-only. */}}
{{- define "qwenfleet.modelMount" -}}
- {name: model, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
{{- end -}}

{{/* The init container that writes the demo model (model.mkmodel). */}}
{{- define "qwenfleet.mkmodelInit" -}}
{{- if .Values.model.mkmodel.enabled }}
{{- if ne .Values.model.volume.kind "emptyDir" }}
{{- fail "model.mkmodel writes into the pod's own volume: it needs model.volume.kind emptyDir" }}
{{- end }}
- name: mkmodel
  image: {{ include "qwenfleet.image" (dict "root" . "repository" .Values.qwenctl.image.repository) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # --if-missing: an init container runs again when the pod's sandbox is remade, over the
  # emptyDir it filled (the model is moved into place config.json last: one is whole).
  args:
    - mkmodel
    - --if-missing
    - --preset={{ .Values.model.mkmodel.preset }}
    - --seed={{ .Values.model.mkmodel.seed }}
    - --out={{ include "qwenfleet.modelDir" . }}
{{- range .Values.model.mkmodel.extraArgs }}
    - {{ . | quote }}
{{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {memory: 1Gi}
  volumeMounts:
    - {name: model, mountPath: {{ .Values.model.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}

{{/* Spread over nodes (the default topologySpreadConstraints of a component). */}}
{{- define "qwenfleet.spread" -}}
{{- $spread := .values.topologySpreadConstraints -}}
{{- if $spread }}
{{- toYaml $spread }}
{{- else }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "qwenfleet.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* A NetworkPolicy egress rule to etcd's client port. */}}
{{- define "qwenfleet.etcdEgress" -}}
{{- if .Values.etcd.bundled -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "qwenfleet.selectorLabels" (dict "root" . "component" "etcd") | nindent 10 }}
  ports:
    - {protocol: TCP, port: {{ .Values.etcd.clientPort }}}
{{- else -}}
- ports:
    - {protocol: TCP, port: {{ .Values.etcd.external.port }}}
  {{- with .Values.etcd.external.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- end -}}
