package metrics

import (
	"slices"
	"strings"
	"testing"
)

func TestTokenBuckets(t *testing.T) {
	if got := tokenBuckets(600); !slices.Equal(got, []float64{1, 2, 5, 10, 20, 50, 100, 200, 500}) {
		t.Fatalf("tokenBuckets(600) = %v", got)
	}
}

// TestNames: every instrument is named with the prefix and vLLM's name, and
// the registries gather without conflicts.
func TestNames(t *testing.T) {
	c := NewCoordinator("m", 4096, nil)
	c.RequestSuccess.WithLabelValues("stop").Inc()
	c.TTFT.Observe(0.1)
	mfs, err := c.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	for _, want := range []string{"qwenfleet:request_success_total", "qwenfleet:time_to_first_token_seconds",
		"qwenfleet:e2e_request_latency_seconds", "qwenfleet:num_preemptions_total"} {
		if !slices.Contains(names, want) {
			t.Errorf("%s not gathered (have %v)", want, names)
		}
	}
	w := NewWorker("w0", nil)
	w.AllReduce.Observe(0.001)
	mfs, err = w.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), Prefix) && !strings.HasPrefix(mf.GetName(), "go_") && !strings.HasPrefix(mf.GetName(), "process_") {
			t.Errorf("metric %s lacks the prefix", mf.GetName())
		}
	}
}
