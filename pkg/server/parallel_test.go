package server_test

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// TestParallelLayouts runs the f32 reference case on clusters of real
// worker processes split tp × pp, and checks for each layout: the greedy
// ids and prompt logprobs of the reference (within its tolerance), the
// placement the coordinator reports, and concurrent requests of different
// lengths (several micro-batches in flight through the pipeline) giving
// the tokens one process gives.
func TestParallelLayouts(t *testing.T) {
	needE2E(t)
	dir := refDir("dense-gqa-f32") // 4 query heads, 2 KV heads, 3 layers
	ref := loadRef(t, dir)
	prompts, want := wholeGreedy(t, dir, 6, ref.vocab)
	for _, l := range [][2]int{{2, 1}, {4, 1}, {1, 2}, {1, 3}, {2, 2}} {
		tp, pp := l[0], l[1]
		t.Run(fmt.Sprintf("tp%d-pp%d", tp, pp), func(t *testing.T) {
			c := startCluster(t, dir, "--tp", fmt.Sprint(tp), "--pp", fmt.Sprint(pp), "--local-workers", fmt.Sprint(tp*pp), "--worker-threads", "1")
			info := serverInfo(t, c.client)
			reps := info.Placement.GetReplicas()
			if len(reps) != 1 || reps[0].Tp != int32(tp) || reps[0].Pp != int32(pp) || len(reps[0].Stages) != pp || len(reps[0].Workers) != tp*pp {
				t.Fatalf("placement %v", info.Placement)
			}
			for s, st := range reps[0].Stages {
				if len(st.Workers) != tp || st.LayersEnd-st.LayersBegin < 1 || (s == 0) != (st.LayersBegin == 0) {
					t.Fatalf("stage %d: %v", s, st)
				}
			}
			checkServed(t, c, ref, prompts, want)
		})
	}
}

// wholeGreedy makes n test prompts and their greedy tokens (10, 11, ...)
// from one process.
func wholeGreedy(t *testing.T, dir string, n, vocab int) (prompts, want [][]int32) {
	t.Helper()
	prompts = testPrompts(n, vocab)
	want = make([][]int32, len(prompts))
	b, err := cpu.New(cpu.Config{Threads: 1, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	m, err := model.Load(dir, b, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i, p := range prompts {
		if want[i], err = m.Greedy(p, 10+i, nil); err != nil {
			t.Fatal(err)
		}
	}
	return prompts, want
}

// checkServed checks cluster c against the reference (greedy ids, prompt
// logprobs within its tolerance) and concurrent requests of prompts
// against want, the tokens of one process.
func checkServed(t *testing.T, c *clusterT, ref *reference, prompts, want [][]int32) {
	t.Helper()
	req := idsReq(ref.PromptIDs, len(ref.GreedyIDs))
	req.PromptLogprobs = true
	r := mustGenerate(t, c.client, req)
	if !slices.Equal(r.ids, ref.GreedyIDs) {
		t.Fatalf("ids %v, want %v", r.ids, ref.GreedyIDs)
	}
	tol := 1e-4 * math.Max(1, ref.MaxAbsLogit)
	worst := 0.0
	for i := 1; i < len(ref.PromptIDs); i++ {
		row := ref.logits[(i-1)*ref.vocab : i*ref.vocab]
		d := math.Abs(float64(*r.plp[i].Logprob) - logSoftmaxAt(row, int(ref.PromptIDs[i])))
		worst = math.Max(worst, d)
	}
	if worst > tol {
		t.Fatalf("prompt logprobs differ from the reference by %g (tolerance %g)", worst, tol)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(prompts))
	for i, p := range prompts {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			got, err := generate(ctx, c.client, idsReq(p, len(want[i])))
			switch {
			case err != nil:
				errs[i] = err
			case !slices.Equal(got.ids, want[i]):
				errs[i] = fmt.Errorf("request %d: %v, want %v", i, got.ids, want[i])
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("prompt logprobs within %.2g of the reference", worst)
}

// TestParallelWorkerDeath: a worker of a tp=2 × pp=2 replica is killed
// mid-generation. The replica is dropped, its requests wait, the worker is
// restarted, the replica is formed again and every request completes with
// the tokens it produces undisturbed.
func TestParallelWorkerDeath(t *testing.T) {
	needE2E(t)
	c := startCluster(t, refDir("dense-gqa-f32"), "--tp", "2", "--pp", "2", "--local-workers", "4", "--worker-threads", "1")
	ps := testPrompts(4, 512)
	alone := make([][]int32, len(ps))
	for i, p := range ps {
		alone[i] = mustGenerate(t, c.client, idsReq(p, 300)).ids
	}
	before := readyWorkers(t, c.client)
	if len(before) != 4 {
		t.Fatalf("%d workers ready", len(before))
	}
	victim := before[3]
	got := generateAround(t, c.client, ps, 300, func() {
		running := schedulerStats(t, c.client).Running
		if err := syscall.Kill(int(victim.Pid), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if running < 2 {
			t.Fatalf("only %d requests running when the worker was killed", running)
		}
	})
	for i := range ps {
		if !slices.Equal(got[i], alone[i]) {
			t.Fatalf("request %d after the worker died: %v, alone %v", i, got[i], alone[i])
		}
	}
	waitFormedAgain(t, c, 4, victim.Pid)
}

// waitFormedAgain waits until n workers are ready again, none of them the
// process pid (a killed worker's replacement has another).
func waitFormedAgain(t *testing.T, c *clusterT, n int, pid int32) {
	t.Helper()
	waitFor(t, 60*time.Second, fmt.Sprintf("%d ready workers again, none of them the killed %d", n, pid), func() error {
		ws := readyWorkers(t, c.client)
		if len(ws) != n || slices.ContainsFunc(ws, func(w *pb.WorkerStatus) bool { return w.Pid == pid }) {
			return fmt.Errorf("ready: %v", ws)
		}
		return nil
	})
}
