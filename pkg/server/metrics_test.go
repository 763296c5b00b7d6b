package server_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// scrape reads a /metrics page into series → value ("name{labels}" as
// printed, labels in the exporter's order).
func scrape(t testing.TB, addr string) map[string]float64 {
	t.Helper()
	cl, url := metricsClient(t, addr)
	resp, err := cl.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// sum adds the series of a metric whose labels contain every given
// `key="value"`.
func sum(m map[string]float64, name string, labels ...string) float64 {
	var s float64
	for k, v := range m {
		n, rest, _ := strings.Cut(k, "{")
		if n != name {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(rest, l)
		}
		if ok {
			s += v
		}
	}
	return s
}

// TestMetrics scrapes the coordinator and its two tensor-parallel workers
// before and after N requests: request, token and latency counts move by
// exactly what the requests did, the gauges describe the cluster, and each
// worker counts the all-reduces of the steps it ran.
func TestMetrics(t *testing.T) {
	needE2E(t)
	maddr := freeAddr(t)
	c := startCluster(t, refDir("dense-gqa-f32"), "--tp", "2", "--local-workers", "2", "--worker-threads", "1", "--metrics-listen", maddr)
	info, err := c.client.GetServerInfo(context.Background(), &pb.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Workers) != 2 {
		t.Fatalf("%d workers", len(info.Workers))
	}
	for _, w := range info.Workers {
		if w.MetricsAddress == "" {
			t.Fatalf("worker %s reports no metrics address", w.Id)
		}
	}
	const N, gen = 5, 8
	prompt := []int32{3, 1, 4, 1, 5, 9, 2, 6}
	before := scrape(t, maddr)
	wbefore := []map[string]float64{scrape(t, info.Workers[0].MetricsAddress), scrape(t, info.Workers[1].MetricsAddress)}
	for range N {
		mustGenerate(t, c.client, idsReq(prompt, gen))
	}
	after := scrape(t, maddr)
	delta := func(name string, labels ...string) float64 {
		return sum(after, name, labels...) - sum(before, name, labels...)
	}
	for _, x := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"qwenfleet:request_success_total", []string{`finished_reason="length"`}, N},
		{"qwenfleet:prompt_tokens_total", nil, N * float64(len(prompt))},
		{"qwenfleet:generation_tokens_total", nil, N * gen},
		{"qwenfleet:time_to_first_token_seconds_count", nil, N},
		{"qwenfleet:e2e_request_latency_seconds_count", nil, N},
		{"qwenfleet:request_queue_time_seconds_count", nil, N},
		{"qwenfleet:request_prefill_time_seconds_count", nil, N},
		{"qwenfleet:request_decode_time_seconds_count", nil, N},
		{"qwenfleet:request_generation_tokens_sum", nil, N * gen},
		{"qwenfleet:request_prompt_tokens_count", nil, N},
	} {
		if got := delta(x.name, x.labels...); got != x.want {
			t.Errorf("%s%v moved by %v, want %v", x.name, x.labels, got, x.want)
		}
	}
	// One interval per token after the first, unless the first chunk
	// carried two tokens (the stream merges events a slow reader missed).
	if got := delta("qwenfleet:inter_token_latency_seconds_count"); got > N*(gen-1) || got < N*(gen-2) {
		t.Errorf("inter-token latency count moved by %v, want about %d", got, N*(gen-1))
	}
	steps := delta("qwenfleet:step_duration_seconds_count")
	if steps < gen || delta("qwenfleet:iteration_tokens_total_sum") != N*float64(len(prompt)+gen-1) {
		t.Errorf("steps moved by %v, iteration tokens by %v", steps, delta("qwenfleet:iteration_tokens_total_sum"))
	}
	for _, g := range []string{"qwenfleet:num_requests_running", "qwenfleet:num_requests_waiting", "qwenfleet:kv_cache_usage_perc"} {
		if _, ok := after[g+`{model_name="dense-gqa-f32"}`]; !ok {
			t.Errorf("gauge %s missing", g)
		}
	}
	if sum(after, "qwenfleet:worker_up") != 2 || sum(after, "qwenfleet:placement_version") < 1 ||
		sum(after, "qwenfleet:replicas", `state="ready"`) != 1 || sum(after, "qwenfleet:kv_cache_blocks", `state="free"`) < 1 {
		t.Errorf("cluster gauges: up %v placement %v replicas %v free blocks %v", sum(after, "qwenfleet:worker_up"),
			sum(after, "qwenfleet:placement_version"), sum(after, "qwenfleet:replicas", `state="ready"`),
			sum(after, "qwenfleet:kv_cache_blocks", `state="free"`))
	}
	// Every metric the Grafana dashboard queries exists (per-expert
	// counts only for a mixture-of-experts model).
	names := map[string]bool{}
	for _, m := range []map[string]float64{after, scrape(t, info.Workers[0].MetricsAddress)} {
		for k := range m {
			n, _, _ := strings.Cut(k, "{")
			names[n] = true
		}
	}
	dash, err := os.ReadFile(filepath.Join(repoRoot(), "deploy", "grafana", "qwenfleet-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range regexp.MustCompile(`qwenfleet:[a-z0-9_:]+`).FindAllString(string(dash), -1) {
		if !names[n] && n != "qwenfleet:expert_tokens_total" {
			t.Errorf("the dashboard queries %s, which no server exports", n)
		}
	}
	// Each worker ran every step; each step of a tp=2 model of 3 layers
	// all-reduces 2 per layer and once for the embedding.
	for i, w := range info.Workers {
		wa := scrape(t, w.MetricsAddress)
		d := func(name string) float64 { return sum(wa, name) - sum(wbefore[i], name) }
		ws := d("qwenfleet:worker_steps_total")
		if ws != steps || d("qwenfleet:worker_step_duration_seconds_count") != ws {
			t.Errorf("worker %s: %v steps (histogram %v), the coordinator ran %v", w.Id, ws, d("qwenfleet:worker_step_duration_seconds_count"), steps)
		}
		if got := d("qwenfleet:allreduce_duration_seconds_count"); got != 7*ws {
			t.Errorf("worker %s: %v all-reduces in %v steps, want 7 a step", w.Id, got, ws)
		}
		if got := d("qwenfleet:worker_tokens_total"); got != N*float64(len(prompt)+gen-1) {
			t.Errorf("worker %s computed %v tokens", w.Id, got)
		}
		if sum(wa, "qwenfleet:worker_assignment", `tp_size="2"`, `state="ready"`) != 1 {
			t.Errorf("worker %s assignment: %v", w.Id, fmt.Sprint(wa))
		}
	}
	// Prefix caching: a 40-token prompt twice; the second finds its two
	// full blocks of 16 cached, with the same output, and says so in its
	// usage and the metrics.
	long := make([]int32, 40)
	for i := range long {
		long[i] = int32(i*7+3) % 100
	}
	before = scrape(t, maddr)
	first, second := mustGenerate(t, c.client, idsReq(long, 4)), mustGenerate(t, c.client, idsReq(long, 4))
	if !slices.Equal(first.ids, second.ids) || first.usage.CachedTokens != 0 || second.usage.CachedTokens != 32 {
		t.Errorf("repeated prompt: %v then %v, cached tokens %d then %d (want 0, 32)", first.ids, second.ids, first.usage.CachedTokens, second.usage.CachedTokens)
	}
	after = scrape(t, maddr)
	for _, x := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"qwenfleet:prefix_cache_queries_total", nil, 80},
		{"qwenfleet:prefix_cache_hits_total", nil, 32},
		{"qwenfleet:prefix_cache_query_requests_total", nil, 2},
		{"qwenfleet:prefix_cache_hit_requests_total", nil, 1},
		{"qwenfleet:router_decisions_total", []string{`policy="room"`}, 1},   // nothing cached yet
		{"qwenfleet:router_decisions_total", []string{`policy="prefix"`}, 1}, // the replica caching the prompt
	} {
		if got := delta(x.name, x.labels...); got != x.want {
			t.Errorf("%s%v moved by %v, want %v", x.name, x.labels, got, x.want)
		}
	}
}
