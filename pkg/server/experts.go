package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// errBadRequest marks ExpertLoad errors about its arguments.
var errBadRequest = errors.New("bad request")

// expertCounts gathers the cumulative routed-token counts of every layer of
// an expert-parallel replica from rank 0 of each stage (the rank that
// counts), [layer][expert].
func (c *Coordinator) expertCounts(ctx context.Context, r *replica) ([][]int64, error) {
	L, E := c.cfg.NumHiddenLayers, c.cfg.NumExperts
	counts := make([][]int64, L)
	for l := range counts {
		counts[l] = make([]int64, E)
	}
	var mu sync.Mutex
	var firsts []*member
	for _, m := range r.members {
		if m.rank == 0 {
			firsts = append(firsts, m)
		}
	}
	err := forEach(firsts, func(m *member) error {
		resp, err := m.client.ExpertLoad(ctx, &workerv1.ExpertLoadRequest{})
		if err != nil {
			return fmt.Errorf("worker %s: %w", m.info.ID, err)
		}
		b, n := int(resp.LayersBegin), int(resp.Layers)
		if int(resp.Experts) != E || b < 0 || b+n > L || len(resp.Counts) != n*E {
			return fmt.Errorf("worker %s: counts of %d values for layers [%d, %d) of %d experts", m.info.ID, len(resp.Counts), b, b+n, resp.Experts)
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

// since subtracts base (nil: zeros) from counts.
func since(counts, base [][]int64) [][]int64 {
	out := make([][]int64, len(counts))
	for l, row := range counts {
		out[l] = slices.Clone(row)
		if l < len(base) {
			for e := range row {
				out[l][e] -= base[l][e]
			}
		}
	}
	return out
}

// ExpertLoad reports, for each ready expert-parallel replica, how its
// routed tokens fell on its ranks since its placement was made and, with
// rebalance, re-places its experts from those counts: every worker reads
// the experts the new placement gives it, then steps after the switch use
// it and the workers free the experts they gave up. Running requests go
// on; no worker restarts. redundant < 0 takes --redundant-experts.
func (c *Coordinator) ExpertLoad(ctx context.Context, rebalance bool, redundant int) ([]*pb.ExpertLoadResponse_Replica, error) {
	if redundant < 0 {
		redundant = c.opts.RedundantExperts
	}
	if redundant > c.opts.RedundantExperts {
		return nil, fmt.Errorf("%w: %d redundant experts per rank exceed the %d the placement counted memory for (--redundant-experts)",
			errBadRequest, redundant, c.opts.RedundantExperts)
	}
	mode := reportOnly
	if rebalance {
		mode = rebalanceAlways
	}
	var out []*pb.ExpertLoadResponse_Replica
	for i, r := range c.epReplicas() {
		rep, err := c.replicaExperts(ctx, r, mode, redundant)
		if err != nil {
			return out, fmt.Errorf("replica %s: %w", r.key, err)
		}
		rep.Index = int32(i)
		out = append(out, rep)
	}
	return out, nil
}

// epReplicas are the ready expert-parallel replicas, oldest first.
func (c *Coordinator) epReplicas() []*replica {
	c.mu.Lock()
	var rs []*replica
	for _, r := range c.replicas {
		if r.ep > 1 && r.state == "ready" && r.exec != nil {
			rs = append(rs, r)
		}
	}
	c.mu.Unlock()
	sort.Slice(rs, func(i, j int) bool { return rs[i].gen < rs[j].gen })
	return rs
}

// rebalanceMode says whether replicaExperts re-places the experts.
type rebalanceMode int

const (
	reportOnly        rebalanceMode = iota
	rebalanceAlways                 // asked for
	rebalanceIfRouted               // the periodic balancer: only with tokens since the last placement
)

func (c *Coordinator) replicaExperts(ctx context.Context, r *replica, mode rebalanceMode, redundant int) (*pb.ExpertLoadResponse_Replica, error) {
	r.rebalMu.Lock()
	defer r.rebalMu.Unlock()
	counts, err := c.expertCounts(ctx, r)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	table, base, version := r.table, r.base, r.expVersion
	c.mu.Unlock()
	window := since(counts, base)
	rep := &pb.ExpertLoadResponse_Replica{Ep: int32(r.ep), Imbalance: table.Imbalance(window), ExpertsVersion: version,
		RankTokens: make([]float64, r.ep), Slots: int32(table.Slots())}
	for l, row := range table.RankLoad(window) {
		for rk, v := range row {
			rep.RankTokens[rk] += v
		}
		for _, n := range window[l] {
			rep.Tokens += n
		}
	}
	if mode == reportOnly || mode == rebalanceIfRouted && rep.Tokens == 0 {
		return rep, nil
	}
	E := c.cfg.NumExperts
	slots := min((E+r.ep-1)/r.ep+redundant, E)
	next, err := expertparallel.Rebalance(window, r.ep, slots)
	if err != nil {
		return nil, err
	}
	v := version + 1
	flat := next.Flat()
	loaded := make([]int32, len(r.members))
	t0 := time.Now()
	if err := forEachIndex(r.members, func(i int, m *member) error {
		resp, err := m.client.SetExperts(ctx, &workerv1.SetExpertsRequest{AssignmentVersion: r.gen, ExpertsVersion: v, Experts: flat})
		if err != nil {
			return fmt.Errorf("worker %s: %w", m.info.ID, err)
		}
		loaded[i] = resp.Loaded
		return nil
	}); err != nil {
		// The old placement stays in use; the workers that loaded the new
		// one free what only it needed.
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		forEach(r.members, func(m *member) error {
			_, cerr := m.client.SetExperts(cctx, &workerv1.SetExpertsRequest{AssignmentVersion: r.gen, ExpertsVersion: v, Cancel: true})
			return cerr
		})
		return nil, err
	}
	r.exec.switchExperts(v)
	c.mu.Lock()
	r.table, r.base, r.expVersion = next, counts, v
	c.lastTable = next
	c.mu.Unlock()
	if err := c.writePlacement(ctx); err != nil {
		c.log.Warn("placement not written after the expert rebalance", "err", err)
	}
	rep.ImbalanceAfter = next.Imbalance(window)
	rep.ExpertsVersion, rep.Slots = v, int32(slots)
	rep.Loaded = loaded
	c.log.Info("experts re-placed", "replica", r.key, "experts_version", v, "imbalance_before", rep.Imbalance,
		"imbalance_after", rep.ImbalanceAfter, "slots", slots, "loaded", loaded, "ms", ms(time.Since(t0)))
	return rep, nil
}

// balanceExperts re-places the experts of every expert-parallel replica
// every interval (when they routed tokens since).
func (c *Coordinator) balanceExperts(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, r := range c.epReplicas() {
			if _, err := c.replicaExperts(ctx, r, rebalanceIfRouted, c.opts.RedundantExperts); err != nil {
				c.log.Warn("expert rebalance", "replica", r.key, "err", err)
			}
		}
	}
}
