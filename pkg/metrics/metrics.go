// Package metrics defines the Prometheus instruments of the coordinator and
// the workers. Names follow vLLM's (`vllm:time_to_first_token_seconds`
// becomes `qwenfleet:time_to_first_token_seconds`, with the same
// `model_name` label and the same buckets), so a vLLM dashboard ports by
// renaming the prefix; what vLLM has no name for (pipeline and tensor
// parallel communication, workers, placement) uses the same style.
//
// The instruments are plain values the servers update; gauges that mirror
// state (running requests, KV blocks, workers up) are read at scrape time
// by collectors the servers provide.
package metrics

import (
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// Prefix starts every metric name.
const Prefix = "qwenfleet:"

// Buckets, as vLLM's.
var (
	ttftBuckets    = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	itlBuckets     = []float64{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}
	latencyBuckets = []float64{0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680}
	// stepBuckets cover a step or a collective, from 100 µs to a minute.
	stepBuckets = prometheus.ExponentialBucketsRange(0.0001, 60, 24)
)

// tokenBuckets is vLLM's 1-2-5 series up to maxLen.
func tokenBuckets(maxLen int) []float64 {
	var out []float64
	for m := 1; ; m *= 10 {
		for _, f := range []int{1, 2, 5} {
			if f*m > maxLen {
				return out
			}
			out = append(out, float64(f*m))
		}
	}
}

// Coordinator holds the coordinator's instruments.
type Coordinator struct {
	Registry *prometheus.Registry

	RequestSuccess   *prometheus.CounterVec // by finished_reason: stop, length, abort, error
	PromptTokens     prometheus.Counter
	GenerationTokens prometheus.Counter
	Preemptions      prometheus.Counter

	// Prefix caching, as vLLM's prefix_cache_queries and _hits (in
	// tokens: a finished request's prompt tokens looked up, and those
	// found cached), and the same in requests; routing decisions by the
	// policy that decided (prefix, load, wait).
	PrefixCacheQueries, PrefixCacheHits              prometheus.Counter
	PrefixCacheQueryRequests, PrefixCacheHitRequests prometheus.Counter
	RouterDecisions                                  *prometheus.CounterVec

	TTFT          prometheus.Histogram
	ITL           prometheus.Histogram // per generated token after the first
	E2E           prometheus.Histogram
	QueueTime     prometheus.Histogram
	PrefillTime   prometheus.Histogram
	DecodeTime    prometheus.Histogram
	InferenceTime prometheus.Histogram

	RequestPromptTokens     prometheus.Histogram
	RequestGenerationTokens prometheus.Histogram
	RequestMaxTokens        prometheus.Histogram

	IterationTokens prometheus.Histogram // tokens computed per step
	StepDuration    prometheus.Histogram // a replica's step, coordinator to workers and back
	StepComm        prometheus.Histogram // of it, workers' all-reduces and stage transfers
}

// NewCoordinator makes the coordinator's instruments for a served model of
// maxLen tokens of context, registering them and state (a collector of the
// gauges read at scrape time; may be nil) with Go and process collectors.
func NewCoordinator(model string, maxLen int, state prometheus.Collector) *Coordinator {
	l := prometheus.Labels{"model_name": model}
	h := func(name, help string, b []float64) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Name: Prefix + name, Help: help, Buckets: b, ConstLabels: l})
	}
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: Prefix + name, Help: help, ConstLabels: l})
	}
	m := &Coordinator{
		Registry: prometheus.NewRegistry(),
		RequestSuccess: prometheus.NewCounterVec(prometheus.CounterOpts{Name: Prefix + "request_success_total",
			Help: "Finished requests, by finish reason (stop, length, abort, error).", ConstLabels: l}, []string{"finished_reason"}),
		PromptTokens:     c("prompt_tokens_total", "Prompt tokens of finished requests."),
		GenerationTokens: c("generation_tokens_total", "Generated tokens."),
		Preemptions:      c("num_preemptions_total", "Sequences preempted (to be recomputed) for KV space."),

		PrefixCacheQueries:       c("prefix_cache_queries_total", "Prefix cache queries, in prompt tokens looked up (finished requests that looked up the cache)."),
		PrefixCacheHits:          c("prefix_cache_hits_total", "Prefix cache hits, in prompt tokens found cached."),
		PrefixCacheQueryRequests: c("prefix_cache_query_requests_total", "Finished requests that looked up the prefix cache."),
		PrefixCacheHitRequests:   c("prefix_cache_hit_requests_total", "Finished requests that found part of their prompt in the prefix cache."),
		RouterDecisions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: Prefix + "router_decisions_total",
			Help: "Finished requests by what chose their replica: prefix (the longest cached prefix), room (cached nowhere: the replica caching the least), load (the least loaded), wait (the shortest queue wait).", ConstLabels: l}, []string{"policy"}),

		TTFT:          h("time_to_first_token_seconds", "Time from the request's arrival to its first token.", ttftBuckets),
		ITL:           h("inter_token_latency_seconds", "Time between a request's consecutive tokens.", itlBuckets),
		E2E:           h("e2e_request_latency_seconds", "Time from the request's arrival to its end.", latencyBuckets),
		QueueTime:     h("request_queue_time_seconds", "Time a request waited before its first step.", latencyBuckets),
		PrefillTime:   h("request_prefill_time_seconds", "Time from the request's first step to its first token.", latencyBuckets),
		DecodeTime:    h("request_decode_time_seconds", "Time from the request's first token to its end.", latencyBuckets),
		InferenceTime: h("request_inference_time_seconds", "Time from the request's first step to its end.", latencyBuckets),

		RequestPromptTokens:     h("request_prompt_tokens", "Prompt tokens per finished request.", tokenBuckets(maxLen)),
		RequestGenerationTokens: h("request_generation_tokens", "Generated tokens per finished request.", tokenBuckets(maxLen)),
		RequestMaxTokens:        h("request_params_max_tokens", "The max_tokens of finished requests.", tokenBuckets(maxLen)),

		IterationTokens: h("iteration_tokens_total", "Tokens computed per step.", tokenBuckets(max(maxLen, 8192))),
		StepDuration:    h("step_duration_seconds", "A replica's step, from the coordinator's call to every worker's answer.", stepBuckets),
		StepComm:        h("step_communication_seconds", "Of a step, the time workers spent in all-reduces and stage transfers (the slowest worker's).", stepBuckets),
	}
	m.Registry.MustRegister(m.RequestSuccess, m.PromptTokens, m.GenerationTokens, m.Preemptions,
		m.PrefixCacheQueries, m.PrefixCacheHits, m.PrefixCacheQueryRequests, m.PrefixCacheHitRequests, m.RouterDecisions,
		m.TTFT, m.ITL, m.E2E, m.QueueTime, m.PrefillTime, m.DecodeTime, m.InferenceTime,
		m.RequestPromptTokens, m.RequestGenerationTokens, m.RequestMaxTokens, m.IterationTokens, m.StepDuration, m.StepComm,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if state != nil {
		m.Registry.MustRegister(state)
	}
	return m
}

// Worker holds a worker's instruments.
type Worker struct {
	Registry *prometheus.Registry

	Steps         prometheus.Counter
	Tokens        prometheus.Counter
	StepDuration  prometheus.Histogram // a step on this worker, request to answer
	Forward       prometheus.Histogram // of it, the forward pass (collectives included)
	AllReduce     prometheus.Histogram // one tensor-parallel all-reduce
	StageTransfer prometheus.Histogram // sending hidden states to the next stage
	StageWait     prometheus.Histogram // waiting for the previous stage's hidden states
}

// NewWorker makes a worker's instruments (labels: worker id), registering
// them and state (gauges read at scrape time; may be nil).
func NewWorker(id string, state prometheus.Collector) *Worker {
	l := prometheus.Labels{"worker": id}
	h := func(name, help string) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Name: Prefix + name, Help: help, Buckets: stepBuckets, ConstLabels: l})
	}
	w := &Worker{
		Registry:      prometheus.NewRegistry(),
		Steps:         prometheus.NewCounter(prometheus.CounterOpts{Name: Prefix + "worker_steps_total", Help: "Steps run.", ConstLabels: l}),
		Tokens:        prometheus.NewCounter(prometheus.CounterOpts{Name: Prefix + "worker_tokens_total", Help: "Tokens computed.", ConstLabels: l}),
		StepDuration:  h("worker_step_duration_seconds", "A step on this worker (its pipeline stage), request to answer: waits for earlier steps and for the previous stage included."),
		Forward:       h("worker_forward_seconds", "Of a step, the forward pass."),
		AllReduce:     h("allreduce_duration_seconds", "One tensor-parallel all-reduce, this rank's part sent to every rank's received."),
		StageTransfer: h("stage_transfer_duration_seconds", "Sending a step's hidden states to the next pipeline stage."),
		StageWait:     h("stage_wait_seconds", "Waiting for the previous pipeline stage's hidden states."),
	}
	w.Registry.MustRegister(w.Steps, w.Tokens, w.StepDuration, w.Forward, w.AllReduce, w.StageTransfer, w.StageWait,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if state != nil {
		w.Registry.MustRegister(state)
	}
	return w
}

// Serve serves reg's /metrics on addr ("host:port"; port 0 picks one)
// until the returned stop is called. It returns the address it listens on.
func Serve(addr string, reg *prometheus.Registry) (string, func(), error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	return serve(lis, reg)
}

// ServeTLS is Serve over TLS with cfg: with a configuration from
// security.TLS.ServerConfig(true) a scraper must present a certificate of
// the cluster CA (any role; client.pem is the scrapers'). Each connection's
// handshake is done off the accept loop with a deadline, and a failed one
// (plaintext, no certificate, another CA) is reported to r as a refusal of
// listener "metrics" (r may be nil).
func ServeTLS(addr string, reg *prometheus.Registry, cfg *tls.Config, r *security.Refusals) (string, func(), error) {
	if cfg == nil {
		return "", nil, errors.New("metrics: ServeTLS without a TLS configuration")
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	return serve(security.TLSListener(lis, cfg, "metrics", r), reg)
}

func serve(lis net.Listener, reg *prometheus.Registry) (string, func(), error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(lis)
	return lis.Addr().String(), func() { srv.Close() }, nil
}
