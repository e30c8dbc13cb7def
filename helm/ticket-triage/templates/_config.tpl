{{/*
Each service's config.toml. Only keys of the service's `Config` (deny_unknown_fields) appear
here; crates/triage-deploy-tests deserialises every rendered file into the real type. Secrets
never appear: they come from files under /etc/triage/secrets or TRIAGE_* variables.
*/}}

{{- define "tt.hasApiKeys" -}}
{{- if or .Values.auth.keys .Values.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "tt.config.ticket-publisher" -}}
{{- $v := .Values -}}
# ticket-publisher: the HTTP and gRPC ingress (the dispatch stage runs in ticket-dispatcher).
{{ include "tt.sharedConfig" . }}

{{ include "tt.topicProvisioning" (list . true) }}

[ingress]
enabled = true
http_listen = "0.0.0.0:8080"
grpc_listen = "0.0.0.0:50051"
delivery_timeout = {{ include "tt.str" $v.ticketPublisher.ingress.deliveryTimeout }}
rate_limit_per_second = {{ int $v.ticketPublisher.ingress.rateLimitPerSecond }}
rate_limit_burst = {{ int $v.ticketPublisher.ingress.rateLimitBurst }}
idempotency_ttl = {{ include "tt.str" $v.ticketPublisher.ingress.idempotencyTtl }}

[auth]
{{- if include "tt.hasApiKeys" . }}
keys_file = "/etc/triage/secrets/api-keys"
{{- end }}

[redis]
# url comes from TRIAGE_REDIS__URL (a Secret).
key_prefix = {{ include "tt.str" $v.ticketPublisher.redisKeyPrefix }}
{{- include "tt.tlsToml" (list "redis" $v.redis.tls "redis.tls") }}

[dispatch]
enabled = false
{{- end -}}

{{- define "tt.config.ticket-dispatcher" -}}
{{- $v := .Values -}}
{{- $d := $v.ticketDispatcher -}}
# ticket-dispatcher: the transactional events -> tasks stage of the ticket-publisher binary.
{{ include "tt.sharedConfig" . }}

{{ include "tt.topicProvisioning" (list . true) }}

[ingress]
enabled = false

[dispatch]
enabled = true
group_id = {{ include "tt.str" $d.groupId }}
transactional_id = {{ include "tt.str" $d.transactionalId }}
# replica_id unset: the pod name ($POD_NAME), stable in the StatefulSet, so a replacement pod
# fences its predecessor; the same name rejoins the group at once as a static member.
static_membership = true
lanes = {{ int $d.lanes }}
batch_max_records = {{ int $d.batchMaxRecords }}
batch_max_wait = {{ include "tt.str" $d.batchMaxWait }}

[dispatch.prompt]
version = {{ include "tt.str" $d.prompt.version }}
model = {{ include "tt.str" $d.prompt.model }}
{{- end -}}

{{- define "tt.config.inference-worker" -}}
{{- $w := .Values.inferenceWorker -}}
# inference-worker: calls the LLM for each task, never twice for the same ticket.
{{ include "tt.sharedConfig" . }}

[consumer]
group_id = {{ include "tt.str" $w.groupId }}
max_in_flight = {{ int $w.maxInFlight }}

[llm]
base_url = {{ include "tt.str" $w.llm.baseUrl }}
{{- with $w.llm.model }}
model = {{ include "tt.str" . }}
{{- end }}
{{- if or $w.llm.apiKey $w.llm.existingSecret }}
api_key_file = "/etc/triage/secrets/llm-api-key"
{{- end }}
{{- with $w.llm.azureApiVersion }}
azure_api_version = {{ include "tt.str" . }}
{{- end }}
structured_output = {{ $w.llm.structuredOutput }}
max_tokens = {{ int $w.llm.maxTokens }}
request_timeout = {{ include "tt.str" $w.llm.requestTimeout }}

[rate_limit]
requests_per_minute = {{ int $w.rateLimit.requestsPerMinute }}
tokens_per_minute = {{ int $w.rateLimit.tokensPerMinute }}

[retry]
deadline = {{ include "tt.str" $w.retryDeadline }}

[tenants]
call_window = {{ int $w.tenants.callWindow }}
reserved_calls = {{ int $w.tenants.reservedCalls }}
budget_reserve = {{ float64 $w.tenants.budgetReserve }}
default_weight = {{ int $w.tenants.defaultWeight }}
{{- if include "tt.hasApiKeys" . }}
keys_file = "/etc/triage/secrets/api-keys"
{{- end }}
{{- range $tenant, $t := $w.tenants.known }}

[tenants.known.{{ include "tt.str" $tenant }}]
weight = {{ int (default 1 $t.weight) }}
requests_per_minute = {{ int (default 0 $t.requestsPerMinute) }}
tokens_per_minute = {{ int (default 0 $t.tokensPerMinute) }}
{{- end }}

[cache]
# redis_url comes from TRIAGE_CACHE__REDIS_URL (a Secret).
key_prefix = {{ include "tt.str" $w.cacheKeyPrefix }}
on_unavailable = {{ include "tt.str" $w.onRedisUnavailable }}
{{- include "tt.tlsToml" (list "redis" .Values.redis.tls "cache.tls") }}
{{- end -}}

{{- define "tt.config.result-writer" -}}
{{- $r := .Values.resultWriter -}}
# result-writer: results into PostgreSQL, and the read API.
{{ include "tt.sharedConfig" . }}

[consumer]
group_id = {{ include "tt.str" $r.groupId }}

[database]
# url comes from TRIAGE_DATABASE__URL (a Secret).
{{- if $r.database.passwordSecret }}
password_file = "/etc/triage/secrets/database-password"
{{- end }}
schema = {{ include "tt.str" $r.database.schema }}
pool_size = {{ int $r.database.poolSize }}
{{- include "tt.tlsToml" (list "database" $r.database.tls "database.tls") }}

[batch]
max_rows = {{ int $r.batchMaxRows }}
max_delay = {{ include "tt.str" $r.batchMaxDelay }}

[api]
listen = "0.0.0.0:8081"

[auth]
{{- if include "tt.hasApiKeys" . }}
keys_file = "/etc/triage/secrets/api-keys"
{{- end }}

[console]
enabled = {{ $r.console.enabled }}
{{- if $r.console.traceUrl }}
trace_url = {{ include "tt.str" $r.console.traceUrl }}
{{- end }}
{{- if include "tt.dlqApi" . }}
dead_letters_url = {{ include "tt.str" (printf "http://%s:%d" (include "tt.name" (list . "dlq-alerter")) (int .Values.dlqAlerter.api.port)) }}
{{- end }}
{{- if .Values.lagAutoscaler.enabled }}
lag_url = {{ include "tt.str" (printf "http://%s:%d/api/v1/lag" (include "tt.name" (list . "lag-autoscaler")) (int .Values.admin.port)) }}
{{- end }}
upstream_timeout = {{ include "tt.str" $r.console.upstreamTimeout }}
{{- end -}}

{{- /* dlq-alerter's dead-letter API runs: enabled, and keys to guard it. */}}
{{- define "tt.dlqApi" -}}
{{- if and .Values.dlqAlerter.enabled .Values.dlqAlerter.api.enabled (include "tt.hasApiKeys" .) -}}true{{- end -}}
{{- end -}}

{{- define "tt.config.dlq-alerter" -}}
{{- $a := .Values.dlqAlerter -}}
# dlq-alerter: dead letters to Slack, folded per error class and window.
{{ include "tt.sharedConfig" . }}

{{ include "tt.topicProvisioning" (list . true) }}

[consumer]
group_id = {{ include "tt.str" $a.groupId }}

[slack]
{{- if or $a.slack.webhookUrl $a.slack.existingSecret }}
webhook_url_file = "/etc/triage/secrets/slack-webhook-url"
{{- end }}

[aggregation]
window = {{ include "tt.str" $a.aggregationWindow }}

[alerts]
replay_command = {{ include "tt.str" (default (printf "kubectl -n %s exec deploy/%s -- dlq-alerter replay" .Release.Namespace (include "tt.name" (list . "dlq-alerter"))) $a.replayCommand) }}

[api]
{{- if include "tt.dlqApi" . }}
listen = "0.0.0.0:{{ int $a.api.port }}"
{{- end }}
recent_per_partition = {{ int $a.api.recentPerPartition }}
max_items = {{ int $a.api.maxItems }}

[auth]
{{- if include "tt.hasApiKeys" . }}
keys_file = "/etc/triage/secrets/api-keys"
{{- end }}
{{- end -}}

{{- define "tt.config.lag-autoscaler" -}}
{{- $root := . -}}
{{- $v := .Values -}}
{{- $mode := $v.autoscaling.mode -}}
# lag-autoscaler: consumer lag as metrics, External Metrics API{{ if eq $mode "direct" }} and direct scaling{{ end }}.
{{ include "tt.sharedConfig" . }}

[lag]
interval = {{ include "tt.str" $v.lagAutoscaler.interval }}
{{- range (include "tt.consumers" . | fromYaml).consumers }}
{{- $autoscaling := (index $v .key).autoscaling }}

[[lag.groups]]
group = {{ include "tt.str" .group }}
topic = {{ include "tt.str" .topic }}
deployment = {{ include "tt.str" (include "tt.name" (list $root .component)) }}
kind = {{ include "tt.str" (include "tt.workloadKind" .component) }}
target_lag_per_replica = {{ int $autoscaling.targetLagPerReplica }}
min_replicas = {{ int $autoscaling.minReplicas }}
max_replicas = {{ include "tt.maxReplicas" (list $root .key) }}
{{- end }}

[external_metrics]
enabled = {{ eq $mode "external" }}
listen = "0.0.0.0:{{ int $v.lagAutoscaler.externalMetricsPort }}"
{{- if and (eq $mode "external") (eq $v.autoscaling.external.tls "generate") }}
tls_cert = "/etc/triage/tls/tls.crt"
tls_key = "/etc/triage/tls/tls.key"
{{- else }}
self_signed_names = [{{ include "tt.str" (include "tt.name" (list . "lag-autoscaler")) }}, {{ include "tt.str" (printf "%s.%s.svc" (include "tt.name" (list . "lag-autoscaler")) .Release.Namespace) }}]
{{- end }}

[direct]
enabled = {{ eq $mode "direct" }}
dry_run = {{ $v.autoscaling.direct.dryRun }}
namespace = {{ include "tt.str" .Release.Namespace }}
max_replicas = {{ int $v.topics.partitions }}
scale_up_stabilization = "{{ int $v.autoscaling.behavior.scaleUpStabilizationSeconds }}s"
scale_down_stabilization = "{{ int $v.autoscaling.behavior.scaleDownStabilizationSeconds }}s"
cooldown = {{ include "tt.str" $v.autoscaling.direct.cooldown }}
{{- end -}}
