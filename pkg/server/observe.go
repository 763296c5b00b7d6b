package server

import (
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/qwenfleet/qwenfleet/pkg/control"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
)

// requestRecord follows one Generate call for the metrics and the
// completion log line.
type requestRecord struct {
	m       *metrics.Coordinator
	log     *slog.Logger
	r       *routing.Request
	arrived time.Time
	first   time.Time // first token sent
	last    time.Time // latest token sent
	tokens  int
	caching bool // prefix caching is on
}

func (c *Coordinator) record(r *routing.Request, arrived time.Time) *requestRecord {
	return &requestRecord{m: c.metrics, log: c.log, r: r, arrived: arrived, caching: !c.opts.Scheduler.NoPrefixCache}
}

// sent notes n tokens sent to the client now: the first opens the time to
// first token, every later one an inter-token interval (a chunk of k tokens
// counts as k tokens sharing the interval since the previous chunk).
func (rr *requestRecord) sent(n int) {
	if n == 0 {
		return
	}
	now := time.Now()
	if rr.first.IsZero() {
		rr.first = now // the rest of the first chunk came with it: no interval
		rr.m.TTFT.Observe(now.Sub(rr.arrived).Seconds())
	} else {
		gap := now.Sub(rr.last).Seconds() / float64(n)
		for range n {
			rr.m.ITL.Observe(gap)
		}
	}
	rr.tokens += n
	rr.last = now
}

// done records the request's end.
func (rr *requestRecord) done(finish string, ev routing.Event) {
	now := time.Now()
	m := rr.m
	m.RequestSuccess.With(prometheus.Labels{"finished_reason": finish}).Inc()
	m.PromptTokens.Add(float64(len(rr.r.Prompt)))
	m.GenerationTokens.Add(float64(rr.tokens))
	m.RequestPromptTokens.Observe(float64(len(rr.r.Prompt)))
	m.RequestGenerationTokens.Observe(float64(rr.tokens))
	m.RequestMaxTokens.Observe(float64(rr.r.MaxTokens))
	e2e := now.Sub(rr.arrived)
	m.E2E.Observe(e2e.Seconds())
	attrs := []any{"request_id", rr.r.ID, "finish_reason", finish, "prompt_tokens", len(rr.r.Prompt),
		"completion_tokens", rr.tokens, "e2e_ms", ms(e2e), "preemptions", ev.Preemptions}
	if rr.caching && !rr.r.PromptLogprobs && !ev.Scheduled.IsZero() {
		m.PrefixCacheQueries.Add(float64(len(rr.r.Prompt)))
		m.PrefixCacheHits.Add(float64(ev.CachedTokens))
		m.PrefixCacheQueryRequests.Inc()
		if ev.CachedTokens > 0 {
			m.PrefixCacheHitRequests.Inc()
		}
		attrs = append(attrs, "cached_tokens", ev.CachedTokens)
	}
	if ev.Route.Policy != "" {
		m.RouterDecisions.With(prometheus.Labels{"policy": ev.Route.Policy}).Inc()
		attrs = append(attrs, "replica", ev.Route.Replica, "route", ev.Route.Policy, "route_prefix_tokens", ev.Route.PrefixTokens)
	}
	if !ev.Scheduled.IsZero() {
		queue := ev.Scheduled.Sub(rr.arrived)
		m.QueueTime.Observe(queue.Seconds())
		m.InferenceTime.Observe(now.Sub(ev.Scheduled).Seconds())
		attrs = append(attrs, "queue_ms", ms(queue))
		if !rr.first.IsZero() {
			m.PrefillTime.Observe(rr.first.Sub(ev.Scheduled).Seconds())
		}
	}
	if !rr.first.IsZero() {
		m.DecodeTime.Observe(now.Sub(rr.first).Seconds())
		attrs = append(attrs, "ttft_ms", ms(rr.first.Sub(rr.arrived)))
		if rr.tokens > 1 {
			attrs = append(attrs, "tpot_ms", ms(rr.last.Sub(rr.first)/time.Duration(rr.tokens-1)))
		}
	}
	if ev.Err != nil {
		attrs = append(attrs, "err", ev.Err.Error())
	}
	rr.log.Info("request finished", attrs...)
}

// seenFor is how long a worker that left stays in worker_up (as 0).
const seenFor = 15 * time.Minute

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// observeStep feeds a replica's step into the metrics.
func (c *Coordinator) observeStep(s routing.StepInfo) {
	m := c.metrics
	m.StepDuration.Observe(s.Took.Seconds())
	if s.Comm > 0 { // a replica split across workers
		m.StepComm.Observe(s.Comm.Seconds())
	}
	m.IterationTokens.Observe(float64(s.Tokens))
	m.Preemptions.Add(float64(s.Preempted))
}

// stateCollector reads the coordinator's state at scrape time: requests
// running and waiting, KV blocks, workers, placement.
type stateCollector struct {
	c                                           *Coordinator
	running, waiting, kvUsage, kvBlocks, worker *prometheus.Desc
	draining, stepTimeout                       *prometheus.Desc
	placement, replicas                         *prometheus.Desc
}

func newStateCollector(c *Coordinator, model string) *stateCollector {
	l := prometheus.Labels{"model_name": model}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(metrics.Prefix+name, help, labels, l)
	}
	return &stateCollector{c: c,
		running:     d("num_requests_running", "Requests in a replica's running set."),
		waiting:     d("num_requests_waiting", "Requests queued (in replicas, or waiting for one)."),
		kvUsage:     d("kv_cache_usage_perc", "Fraction of the KV cache blocks in use (1 = full), over all replicas."),
		kvBlocks:    d("kv_cache_blocks", "KV cache blocks over all replicas, by state (used, free).", "state"),
		worker:      d("worker_up", "1 for a worker serving in a ready replica, 0 for one registered but not serving.", "worker"),
		draining:    d("worker_draining", "1 for a registered worker being drained (its replica finishes its requests, then it leaves), else 0.", "worker"),
		stepTimeout: d("step_timeout_seconds", "The longest timeout a replica gives a typical step now (max(--step-timeout, factor × its median step))."),
		placement:   d("placement_version", "Version of the placement in etcd (0: none written)."),
		replicas:    d("replicas", "Replicas, by state (loading, ready).", "state"),
	}
}

func (s *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.running, s.waiting, s.kvUsage, s.kvBlocks, s.worker, s.draining, s.stepTimeout, s.placement, s.replicas} {
		ch <- d
	}
}

func (s *stateCollector) Collect(ch chan<- prometheus.Metric) {
	c := s.c
	st := c.router.Stats()
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	g(s.running, float64(st.Running))
	g(s.waiting, float64(st.Waiting))
	used := st.BlocksTotal - st.BlocksFree
	usage := 0.0
	if st.BlocksTotal > 0 {
		usage = float64(used) / float64(st.BlocksTotal)
	}
	g(s.kvUsage, usage)
	g(s.kvBlocks, float64(used), "used")
	g(s.kvBlocks, float64(st.BlocksFree), "free")
	g(s.stepTimeout, st.StepTimeout.Seconds())
	c.mu.Lock()
	defer c.mu.Unlock()
	// Workers seen in the last seenFor stay listed (0) after they leave, so
	// "down" is a value, not a vanished series.
	for id, at := range c.seen {
		up := 0.0
		if st := c.status.Workers[id]; at.IsZero() && (st == string(control.Ready) || st == string(control.Draining)) {
			up = 1
		}
		if !at.IsZero() && time.Since(at) > seenFor {
			delete(c.seen, id)
			continue
		}
		g(s.worker, up, id)
		if at.IsZero() {
			drain := 0.0
			if c.status.Workers[id] == string(control.Draining) {
				drain = 1
			}
			g(s.draining, drain, id)
		}
	}
	g(s.placement, float64(c.placement.Version))
	byState := map[string]int{"loading": 0, "ready": 0}
	for _, r := range c.status.Replicas {
		switch r.State {
		case control.Ready, control.Draining:
			byState["ready"]++
		default:
			byState["loading"]++
		}
	}
	for _, k := range []string{"loading", "ready"} {
		g(s.replicas, float64(byState[k]), k)
	}
}
