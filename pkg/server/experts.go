package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/control"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// errBadRequest marks ExpertLoad errors about its arguments.
var errBadRequest = errors.New("bad request")

// expertCallTimeout bounds a worker's answer to an expert call (loading a
// table reads its experts from disk).
const expertCallTimeout = 5 * time.Minute

// expertCounts gathers the cumulative routed-token counts of every layer of
// an expert-parallel replica from rank 0 of each stage (the rank that
// counts), [layer][expert].
func (c *Coordinator) expertCounts(rt *replicaRT) ([][]int64, error) {
	ctx, cancel := context.WithTimeout(rt.ctx, expertCallTimeout)
	defer cancel()
	L, E := c.cfg.NumHiddenLayers, c.cfg.NumExperts
	counts := make([][]int64, L)
	for l := range counts {
		counts[l] = make([]int64, E)
	}
	var mu sync.Mutex
	var firsts []*member
	for _, m := range rt.members {
		if m.rank == 0 {
			firsts = append(firsts, m)
		}
	}
	err := forEach(firsts, func(m *member) error {
		resp, err := m.client.ExpertLoad(ctx, &workerv1.ExpertLoadRequest{})
		if err != nil {
			return fmt.Errorf("worker %s: %w", m.id, err)
		}
		b, n := int(resp.LayersBegin), int(resp.Layers)
		if int(resp.Experts) != E || b < 0 || b+n > L || len(resp.Counts) != n*E {
			return fmt.Errorf("worker %s: counts of %d values for layers [%d, %d) of %d experts", m.id, len(resp.Counts), b, b+n, resp.Experts)
		}
		mu.Lock()
		defer mu.Unlock()
		for l := 0; l < n; l++ {
			copy(counts[b+l], resp.Counts[l*E:(l+1)*E])
		}
		return nil
	})
	return counts, err
}

// loadExperts has every worker of a replica load a new expert table next
// to the one in use.
func (c *Coordinator) loadExperts(rt *replicaRT, a control.LoadExperts) control.Event {
	ctx, cancel := context.WithTimeout(rt.ctx, expertCallTimeout)
	defer cancel()
	loaded := make([]int32, len(rt.members))
	t0 := time.Now()
	err := forEachIndex(rt.members, func(i int, m *member) error {
		resp, err := m.client.SetExperts(ctx, &workerv1.SetExpertsRequest{AssignmentVersion: rt.gen, ExpertsVersion: a.Version, Experts: a.Experts})
		if err != nil {
			return fmt.Errorf("worker %s: %w", m.id, err)
		}
		loaded[i] = resp.Loaded
		return nil
	})
	ev := control.ExpertsLoaded{Gen: rt.gen, Version: a.Version, Loaded: loaded}
	if err != nil {
		ev.Err = err.Error()
	}
	c.log.Info("expert placement loaded", "replica", control.Key(rt.gen), "experts_version", a.Version, "loaded", loaded,
		"ms", ms(time.Since(t0)), "err", err)
	return ev
}

// cancelExperts has every worker of a replica forget a table it may have
// loaded (freeing what only it needed).
func (c *Coordinator) cancelExperts(rt *replicaRT, v int64) {
	ctx, cancel := context.WithTimeout(rt.ctx, 30*time.Second)
	defer cancel()
	forEach(rt.members, func(m *member) error {
		_, err := m.client.SetExperts(ctx, &workerv1.SetExpertsRequest{AssignmentVersion: rt.gen, ExpertsVersion: v, Cancel: true})
		return err
	})
}

// ExpertLoad reports, for each ready expert-parallel replica, how its
// routed tokens fell on its ranks since its placement was made and, with
// rebalance, re-places its experts from those counts (pkg/control decides;
// see control.RebalanceRequested). Running requests go on; no worker
// restarts. redundant < 0 takes --redundant-experts.
func (c *Coordinator) ExpertLoad(ctx context.Context, rebalance bool, redundant int) ([]*pb.ExpertLoadResponse_Replica, error) {
	a, err := c.ask(ctx, func(req int64) control.Event {
		return control.RebalanceRequested{Req: req, Rebalance: rebalance, Redundant: redundant}
	})
	if err != nil {
		return nil, err
	}
	rep := a.(control.ExpertReport)
	if rep.BadRequest {
		return nil, fmt.Errorf("%w: %s", errBadRequest, rep.Err)
	}
	var out []*pb.ExpertLoadResponse_Replica
	for i, r := range rep.Replicas {
		out = append(out, &pb.ExpertLoadResponse_Replica{Index: int32(i), Ep: int32(r.EP), Imbalance: r.Imbalance, ImbalanceAfter: r.ImbalanceAfter,
			ExpertsVersion: r.ExpertsVersion, RankTokens: r.RankTokens, Tokens: r.Tokens, Slots: int32(r.Slots), Loaded: r.Loaded})
	}
	if rep.Err != "" {
		return out, errors.New(rep.Err)
	}
	return out, nil
}
