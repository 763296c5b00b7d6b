package server

import (
	"io"
	"os"
	"strings"
	"testing"
)

// stderrOf runs f with os.Stderr captured.
func stderrOf(t *testing.T, f func() int) (int, string) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	code := f()
	os.Stderr = old
	w.Close()
	out, _ := io.ReadAll(r)
	return code, string(out)
}

// Bad flags of both commands exit 2 with one line naming the flag, before
// anything starts.
func TestBadFlags(t *testing.T) {
	for _, c := range []struct {
		main func([]string) int
		args []string
		want string
	}{
		{CoordinatorMain, []string{"--step-timeout", "1ms"}, "--step-timeout"},
		{CoordinatorMain, []string{"--step-timeout-factor", "0.5"}, "--step-timeout-factor"},
		{CoordinatorMain, []string{"--queue-timeout", "0s"}, "--queue-timeout"},
		{CoordinatorMain, []string{"--drain-timeout", "-1s"}, "--drain-timeout"},
		{CoordinatorMain, []string{"--gossip-probe-interval", "1ms"}, "--gossip-probe-interval"},
		{CoordinatorMain, []string{"--gossip-probe-timeout", "1s"}, "--gossip-probe-timeout"},
		{CoordinatorMain, []string{"--gossip-suspicion-mult", "0"}, "--gossip-suspicion-mult"},
		{CoordinatorMain, []string{"--max-queue-wait", "-1s"}, "--max-queue-wait"},
		{CoordinatorMain, []string{"--max-queue-wait", "1ms"}, "--max-queue-wait"},
		{CoordinatorMain, []string{"--send-timeout", "0s"}, "--send-timeout"},
		{CoordinatorMain, []string{"--max-concurrent-streams", "0"}, "--max-concurrent-streams"},
		{CoordinatorMain, []string{"--leader-ttl", "1s"}, "--leader-ttl"},
		{WorkerMain, []string{"--drain-timeout", "0s"}, "--drain-timeout"},
		{WorkerMain, []string{"--id", "rack/7"}, "--id"},
		{WorkerMain, []string{"--peer-window", "1KiB"}, "--peer-window"},
		{WorkerMain, []string{"--peer-window", "lots"}, "--peer-window"},
	} {
		code, out := stderrOf(t, func() int { return c.main(c.args) })
		if code != 2 || !strings.Contains(out, c.want) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Errorf("%v: exit %d, %q; want 2 and one line naming %s", c.args, code, out, c.want)
		}
	}
}
