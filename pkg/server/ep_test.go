package server_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// TestExpertParallel runs the MoE reference cases (8 experts top-2, and 64
// experts top-8) on clusters of real worker processes whose stages split
// the experts ep ways, with attention replicated (tp=1) or split (tp=2),
// and checks the reference's greedy ids and prompt logprobs and
// concurrent requests against one process.
func TestExpertParallel(t *testing.T) {
	for _, name := range []string{"moe-f32", "moe-64x8"} {
		dir := refDir(name)
		ref := loadRef(t, dir)
		prompts, want := wholeGreedy(t, dir, 4, ref.vocab)
		for _, l := range [][2]int{{2, 1}, {4, 1}, {8, 1}, {2, 2}, {4, 2}} {
			ep, tp := l[0], l[1]
			t.Run(fmt.Sprintf("%s/ep%d-tp%d", name, ep, tp), func(t *testing.T) {
				c := startCluster(t, dir, "--ep", fmt.Sprint(ep), "--tp", fmt.Sprint(tp), "--local-workers", fmt.Sprint(ep), "--worker-threads", "1")
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				info, err := c.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
				cancel()
				if err != nil {
					t.Fatal(err)
				}
				reps := info.Placement.GetReplicas()
				if len(reps) != 1 || reps[0].Ep != int32(ep) || reps[0].Tp != int32(tp) || len(reps[0].Workers) != ep {
					t.Fatalf("placement %v", info.Placement)
				}
				checkServed(t, c, ref, prompts, want)
			})
		}
	}
}
