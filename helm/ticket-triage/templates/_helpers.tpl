{{/*
Prefix of every resource name: fullnameOverride, else the release name. At most 34 characters:
the dispatcher's StatefulSet, <prefix>-ticket-dispatcher, must stay within 52 (its pods carry a
controller-revision-hash label <name>-<10-character hash>, and a label value has 63 at most).
*/}}
{{- define "tt.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 34 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of one component's resources: (list $ "inference-worker"). */}}
{{- define "tt.name" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "tt.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tt.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ default $root.Chart.Name $root.Values.nameOverride }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tt.labels" -}}
{{- $root := index . 0 -}}
{{ include "tt.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version }}
{{- end -}}

{{- define "tt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tt.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The chart's own Secret (secret values given in values). */}}
{{- define "tt.secretName" -}}
{{- printf "%s-secrets" (include "tt.fullname" .) -}}
{{- end -}}

{{/*
The consumer services: component, values key, consumer group, topic consumed.
Returned as YAML; read with fromYaml.
*/}}
{{- define "tt.consumers" -}}
consumers:
{{- if .Values.ticketDispatcher.enabled }}
  - {component: ticket-dispatcher, key: ticketDispatcher, group: {{ .Values.ticketDispatcher.groupId | quote }}, topic: {{ .Values.topics.ticketsCreated | quote }}}
{{- end }}
{{- if .Values.inferenceWorker.enabled }}
  - {component: inference-worker, key: inferenceWorker, group: {{ .Values.inferenceWorker.groupId | quote }}, topic: {{ .Values.topics.inferenceTasks | quote }}}
{{- end }}
{{- if .Values.resultWriter.enabled }}
  - {component: result-writer, key: resultWriter, group: {{ .Values.resultWriter.groupId | quote }}, topic: {{ .Values.topics.results | quote }}}
{{- end }}
{{- if .Values.dlqAlerter.enabled }}
  - {component: dlq-alerter, key: dlqAlerter, group: {{ .Values.dlqAlerter.groupId | quote }}, topic: {{ .Values.topics.deadLetters | quote }}}
{{- end }}
{{- end -}}

{{/* A consumer's replica ceiling: its autoscaling.maxReplicas, else the partition count. */}}
{{- define "tt.maxReplicas" -}}
{{- $root := index . 0 -}}
{{- $autoscaling := (index $root.Values (index . 1)).autoscaling -}}
{{- if gt (int $autoscaling.maxReplicas) 0 -}}
{{- int $autoscaling.maxReplicas -}}
{{- else -}}
{{- int $root.Values.topics.partitions -}}
{{- end -}}
{{- end -}}

{{/* A TOML string: JSON's string escapes are valid TOML basic-string escapes. */}}
{{- define "tt.str" -}}
{{- toJson (toString .) -}}
{{- end -}}

{{/* The [kafka] [topics] [telemetry] [admin] sections every service shares. */}}
{{- define "tt.sharedConfig" -}}
{{- $v := .Values -}}
[kafka]
bootstrap_servers = {{ include "tt.str" $v.kafka.bootstrapServers }}
client_id = {{ include "tt.str" $v.kafka.clientId }}
security_protocol = {{ include "tt.str" $v.kafka.securityProtocol }}
{{- if hasPrefix "sasl" $v.kafka.securityProtocol }}
sasl_mechanism = {{ include "tt.str" $v.kafka.sasl.mechanism }}
sasl_username = {{ include "tt.str" $v.kafka.sasl.username }}
sasl_password_file = "/etc/triage/secrets/kafka-sasl-password"
{{- end }}
{{- if and (hasSuffix "ssl" $v.kafka.securityProtocol) $v.kafka.tls.caSecret }}
ssl_ca_location = "/etc/triage/kafka-ca/{{ $v.kafka.tls.caSecretKey }}"
{{- end }}
{{- if and (hasSuffix "ssl" $v.kafka.securityProtocol) $v.kafka.tls.clientSecret }}
ssl_certificate_location = "/etc/triage/kafka-client/{{ $v.kafka.tls.clientCertKey }}"
ssl_key_location = "/etc/triage/kafka-client/{{ $v.kafka.tls.clientKeyKey }}"
{{- end }}
{{- if $v.kafka.extra }}

[kafka.extra]
{{- range $key, $value := $v.kafka.extra }}
{{ include "tt.str" $key }} = {{ include "tt.str" $value }}
{{- end }}
{{- end }}

[topics]
tickets_created = {{ include "tt.str" $v.topics.ticketsCreated }}
inference_tasks = {{ include "tt.str" $v.topics.inferenceTasks }}
results = {{ include "tt.str" $v.topics.results }}
dead_letters = {{ include "tt.str" $v.topics.deadLetters }}

[telemetry]
log_format = {{ include "tt.str" $v.telemetry.logFormat }}
log_level = {{ include "tt.str" $v.telemetry.logLevel }}
trace_sample_ratio = {{ printf "%.4f" (float64 $v.telemetry.traceSampleRatio) }}
{{- if $v.telemetry.otlpEndpoint }}
otlp_endpoint = {{ include "tt.str" $v.telemetry.otlpEndpoint }}
{{- end }}

[admin]
listen = "0.0.0.0:{{ int $v.admin.port }}"
drain_timeout = {{ include "tt.str" $v.admin.drainTimeout }}
{{- end -}}

{{/* [topic_provisioning] of the services that can create topics; (list $ enabled). */}}
{{- define "tt.topicProvisioning" -}}
{{- $v := (index . 0).Values -}}
[topic_provisioning]
enabled = {{ and (eq $v.topics.provisioning "service") (index . 1) }}
partitions = {{ int $v.topics.partitions }}
replication_factor = {{ int $v.topics.replicationFactor }}
min_insync_replicas = {{ int $v.topics.minInsyncReplicas }}
retention = {{ include "tt.str" $v.topics.retention }}
dead_letter_retention = {{ include "tt.str" $v.topics.deadLetterRetention }}
{{- end -}}

{{/*
Environment every container gets: the pod name (replica ids). The Kafka SASL password is a
mounted file (kafka.sasl_password_file), not a variable: variables are inherited by child
processes and land in `env` dumps and crash reports.
*/}}
{{- define "tt.sharedEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- end -}}

{{/* The projected-secret file of the Kafka SASL password, (list secretName key path), or "". */}}
{{- define "tt.kafkaSaslFile" -}}
{{- if hasPrefix "sasl" .Values.kafka.securityProtocol -}}
{{- toJson (list (default (include "tt.secretName" .) .Values.kafka.sasl.existingSecret) .Values.kafka.sasl.existingSecretKey "kafka-sasl-password") -}}
{{- end -}}
{{- end -}}

{{/*
TLS towards PostgreSQL or Redis (a TlsConfig of the services): (list tls valuesPath). Fails
the render for what the service would refuse at start: TLS enabled without a CA.
*/}}
{{- define "tt.checkTls" -}}
{{- $tls := index . 0 -}}
{{- if and $tls.enabled (not $tls.caSecret) -}}
{{- fail (printf "%s.enabled needs %s.caSecret: with TLS on, the services trust only that CA" (index . 1) (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* The CA and client-certificate volumes of a dependency's TLS: (list name tls). */}}
{{- define "tt.tlsVolumes" -}}
{{- $name := index . 0 -}}
{{- $tls := index . 1 -}}
{{- if $tls.enabled }}
- name: {{ $name }}-ca
  secret:
    secretName: {{ $tls.caSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $tls.caSecretKey }}, path: {{ $tls.caSecretKey }}}
{{- if $tls.clientSecret }}
- name: {{ $name }}-client
  secret:
    secretName: {{ $tls.clientSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $tls.clientCertKey }}, path: {{ $tls.clientCertKey }}}
      - {key: {{ $tls.clientKeyKey }}, path: {{ $tls.clientKeyKey }}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "tt.tlsMounts" -}}
{{- $name := index . 0 -}}
{{- $tls := index . 1 -}}
{{- if $tls.enabled }}
- {name: {{ $name }}-ca, mountPath: /etc/triage/{{ $name }}-ca, readOnly: true}
{{- if $tls.clientSecret }}
- {name: {{ $name }}-client, mountPath: /etc/triage/{{ $name }}-client, readOnly: true}
{{- end }}
{{- end }}
{{- end -}}

{{/* A TlsConfig table of a service's config.toml: (list name tls tableName); empty when off. */}}
{{- define "tt.tlsToml" -}}
{{- $name := index . 0 -}}
{{- $tls := index . 1 -}}
{{- if $tls.enabled }}

[{{ index . 2 }}]
enabled = true
ca_file = "/etc/triage/{{ $name }}-ca/{{ $tls.caSecretKey }}"
{{- if $tls.clientSecret }}
cert_file = "/etc/triage/{{ $name }}-client/{{ $tls.clientCertKey }}"
key_file = "/etc/triage/{{ $name }}-client/{{ $tls.clientKeyKey }}"
{{- end }}
{{- end }}
{{- end -}}

{{/* The Redis URL as an env var named (list $ "TRIAGE_REDIS__URL"). */}}
{{- define "tt.redisEnv" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ default (include "tt.secretName" $root) $root.Values.redis.existingSecret }}
      key: {{ $root.Values.redis.existingSecretKey }}
{{- end -}}

{{/* Volumes every pod has: its config, /tmp, and the Kafka CA when set. (list $ component). */}}
{{- define "tt.sharedVolumes" -}}
{{- $root := index . 0 -}}
- name: config
  configMap:
    name: {{ include "tt.name" . }}
- name: tmp
  emptyDir: {sizeLimit: 64Mi}
{{- if and (hasSuffix "ssl" $root.Values.kafka.securityProtocol) $root.Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $root.Values.kafka.tls.caSecret }}
    items:
      - {key: {{ $root.Values.kafka.tls.caSecretKey }}, path: {{ $root.Values.kafka.tls.caSecretKey }}}
{{- end }}
{{- if and (hasSuffix "ssl" $root.Values.kafka.securityProtocol) $root.Values.kafka.tls.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ $root.Values.kafka.tls.clientSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $root.Values.kafka.tls.clientCertKey }}, path: {{ $root.Values.kafka.tls.clientCertKey }}}
      - {key: {{ $root.Values.kafka.tls.clientKeyKey }}, path: {{ $root.Values.kafka.tls.clientKeyKey }}}
{{- end }}
{{- end -}}

{{- define "tt.sharedVolumeMounts" -}}
- {name: config, mountPath: /etc/triage/config, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- if and (hasSuffix "ssl" .Values.kafka.securityProtocol) .Values.kafka.tls.caSecret }}
- {name: kafka-ca, mountPath: /etc/triage/kafka-ca, readOnly: true}
{{- end }}
{{- if and (hasSuffix "ssl" .Values.kafka.securityProtocol) .Values.kafka.tls.clientSecret }}
- {name: kafka-client, mountPath: /etc/triage/kafka-client, readOnly: true}
{{- end }}
{{- end -}}

{{/*
The pod template's common parts. Arguments (dict):
  root, component, binary, values (the service's values), extraEnv, extraVolumes, extraMounts,
  ports (YAML list of container ports), annotations (extra pod annotations).
*/}}
{{- define "tt.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "tt.selectorLabels" (list $root .component) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ .configChecksum }}
    {{- with .annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ default (include "tt.serviceAccountName" $root) .serviceAccount }}
  automountServiceAccountToken: {{ default false .automountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  # Longer than the drain deadline, so that in-flight work finishes before SIGKILL.
  terminationGracePeriodSeconds: {{ add (div (include "tt.durationSeconds" $v.admin.drainTimeout | int) 1) (int $v.admin.terminationGraceMarginSeconds) }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .component }}
      image: {{ include "tt.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: [{{ printf "/usr/local/bin/%s" .binary | quote }}]
      args: ["--config", "/etc/triage/config/config.toml"]
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      ports:
        - {name: admin, containerPort: {{ int $v.admin.port }}, protocol: TCP}
        {{- with .ports }}
        {{- . | nindent 8 }}
        {{- end }}
      env:
        {{- include "tt.sharedEnv" $root | nindent 8 }}
        {{- with .extraEnv }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      livenessProbe:
        httpGet: {path: /healthz, port: admin}
        periodSeconds: 10
        timeoutSeconds: 3
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /readyz, port: admin}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 3
      startupProbe:
        httpGet: {path: /healthz, port: admin}
        periodSeconds: 2
        failureThreshold: 60
      resources:
        {{- toYaml .values.resources | nindent 8 }}
      volumeMounts:
        {{- include "tt.sharedVolumeMounts" $root | nindent 8 }}
        {{- with .extraMounts }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    {{- include "tt.sharedVolumes" (list $root .component) | nindent 4 }}
    {{- with .extraVolumes }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Seconds of a humantime duration of the forms the chart documents ("20s", "1m", "2m30s", "7days"),
rounded up; the services accept more forms, the grace period and retention.ms need only these.
*/}}
{{- define "tt.durationSeconds" -}}
{{- $total := 0 -}}
{{- range (regexFindAll "[0-9]+ *(ms|days|day|d|h|m|s)" . -1) -}}
{{- $n := regexFind "[0-9]+" . | int -}}
{{- if hasSuffix "ms" . -}}{{- $total = add $total (div (add $n 999) 1000) -}}
{{- else if or (hasSuffix "d" .) (hasSuffix "day" .) (hasSuffix "days" .) -}}{{- $total = add $total (mul $n 86400) -}}
{{- else if hasSuffix "s" . -}}{{- $total = add $total $n -}}
{{- else if hasSuffix "m" . -}}{{- $total = add $total (mul $n 60) -}}
{{- else if hasSuffix "h" . -}}{{- $total = add $total (mul $n 3600) -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Values key of a component: ticket-publisher → ticketPublisher. */}}
{{- define "tt.valuesKey" -}}
{{- $parts := splitList "-" . -}}
{{- first $parts -}}{{- range rest $parts -}}{{- title . -}}{{- end -}}
{{- end -}}

{{/* Workload kind of a component: the transactional dispatcher needs stable pod names. */}}
{{- define "tt.workloadKind" -}}
{{- if eq . "ticket-dispatcher" -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}

{{/* Binary of a component: the dispatch stage is the ticket-publisher binary. */}}
{{- define "tt.binary" -}}
{{- if eq . "ticket-dispatcher" -}}ticket-publisher{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* A projected volume of secret files: (list $ (list (list secretName key path) ...)). */}}
{{- define "tt.secretFiles" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
    {{- range index . 1 }}
      - secret:
          name: {{ index . 0 }}
          items:
            - {key: {{ index . 1 }}, path: {{ index . 2 }}}
    {{- end }}
{{- end -}}

{{/*
lag-autoscaler's serving certificate and its CA (base64 PEM: ca, crt, key): the one already in
the cluster when there is one, else a new CA and certificate for the Service's DNS names. Made
once per render and kept in .Values, so the Secret, the APIService's caBundle and the pod's
checksum all see the same certificate.
*/}}
{{- define "tt.autoscalerTls" -}}
{{- if not (hasKey .Values "ttAutoscalerTls") -}}
{{- $name := include "tt.name" (list . "lag-autoscaler") -}}
{{- $namespace := .Release.Namespace -}}
{{- $existing := lookup "v1" "Secret" $namespace (include "tt.name" (list . "lag-autoscaler-tls")) -}}
{{- $tls := dict -}}
{{- if and $existing $existing.data (hasKey $existing.data "ca.crt") -}}
{{- $tls = dict "ca" (index $existing.data "ca.crt") "crt" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key") -}}
{{- else -}}
{{- $days := int .Values.autoscaling.external.certValidityDays -}}
{{- $ca := genCA (printf "%s-ca" $name) $days -}}
{{- $dnsNames := list $name (printf "%s.%s" $name $namespace) (printf "%s.%s.svc" $name $namespace) (printf "%s.%s.svc.cluster.local" $name $namespace) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $name $namespace) nil $dnsNames $days $ca -}}
{{- $tls = dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Values "ttAutoscalerTls" $tls -}}
{{- end -}}
{{- toYaml (index .Values "ttAutoscalerTls") -}}
{{- end -}}
