package control

import (
	"fmt"
	"slices"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
)

// rebalance modes of an expert operation.
type expertMode int

const (
	reportOnly        expertMode = iota
	rebalanceAlways              // asked for
	rebalanceIfRouted            // the periodic balancer: only with tokens since the last placement
)

// expertOp is one replica's part of a request (or a periodic rebalance:
// req 0): gather counts, maybe load a new table, switch to it.
type expertOp struct {
	req       int64
	mode      expertMode
	redundant int
	// after the counts came, while the new table loads:
	next    *expertparallel.Table
	counts  [][]int64
	version int64
	report  ExpertReplica
}

// expertRequest collects the replicas' reports of a RebalanceRequested.
type expertRequest struct {
	gens    []int64
	reports map[int64]ExpertReplica
	errs    []string
}

func (m *Machine) onRebalance(e RebalanceRequested) {
	fail := func(bad bool, format string, args ...any) {
		m.emit(ExpertReport{Req: e.Req, Err: fmt.Sprintf(format, args...), BadRequest: bad})
	}
	redundant := e.Redundant
	if redundant < 0 {
		redundant = m.cfg.RedundantExperts
	}
	switch {
	case !m.leader:
		fail(false, "not the leader")
		return
	case m.cfg.Model.NumExperts == 0:
		fail(true, "the model has no experts")
		return
	case redundant > m.cfg.RedundantExperts:
		fail(true, "%d redundant experts per rank exceed the %d the placement counted memory for (--redundant-experts)",
			redundant, m.cfg.RedundantExperts)
		return
	}
	mode := reportOnly
	if e.Rebalance {
		mode = rebalanceAlways
	}
	req := &expertRequest{reports: map[int64]ExpertReplica{}}
	for _, gen := range sortedKeys(m.replicas) {
		if r := m.replicas[gen]; r.ep > 1 && r.state == Ready {
			req.gens = append(req.gens, gen)
		}
	}
	if len(req.gens) == 0 {
		m.emit(ExpertReport{Req: e.Req})
		return
	}
	m.requests[e.Req] = req
	for _, gen := range req.gens {
		m.queueOp(m.replicas[gen], &expertOp{req: e.Req, mode: mode, redundant: redundant})
	}
}

// balanceExperts queues a periodic rebalance on every ready
// expert-parallel replica that has no operation pending.
func (m *Machine) balanceExperts() {
	for _, gen := range sortedKeys(m.replicas) {
		if r := m.replicas[gen]; r.ep > 1 && r.state == Ready && len(r.expOps) == 0 {
			m.queueOp(r, &expertOp{mode: rebalanceIfRouted, redundant: m.cfg.RedundantExperts})
		}
	}
}

// queueOp runs operations on a replica one at a time: the first in the
// queue is the one in progress.
func (m *Machine) queueOp(r *replica, op *expertOp) {
	r.expOps = append(r.expOps, op)
	if len(r.expOps) == 1 {
		m.emit(GatherExperts{Gen: r.gen})
	}
}

func (m *Machine) currentOp(gen int64) (*replica, *expertOp) {
	r := m.replicas[gen]
	if r == nil || len(r.expOps) == 0 {
		return nil, nil
	}
	return r, r.expOps[0]
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

func (m *Machine) onExpertCounts(e ExpertCounts) {
	r, op := m.currentOp(e.Gen)
	if op == nil || op.next != nil {
		return
	}
	if e.Err != "" {
		m.endOp(r, nil, "expert counts: "+e.Err)
		return
	}
	L, E := m.cfg.Model.NumHiddenLayers, m.cfg.Model.NumExperts
	if len(e.Counts) != L {
		m.endOp(r, nil, fmt.Sprintf("expert counts of %d layers, the model has %d", len(e.Counts), L))
		return
	}
	for l, row := range e.Counts {
		if len(row) != E {
			m.endOp(r, nil, fmt.Sprintf("expert counts of layer %d: %d experts, the model has %d", l, len(row), E))
			return
		}
	}
	window := since(e.Counts, r.base)
	rep := ExpertReplica{Gen: r.gen, EP: r.ep, Imbalance: r.table.Imbalance(window), ExpertsVersion: r.expVersion,
		RankTokens: make([]float64, r.ep), Slots: r.table.Slots()}
	for l, row := range r.table.RankLoad(window) {
		for rk, v := range row {
			rep.RankTokens[rk] += v
		}
		for _, n := range window[l] {
			rep.Tokens += n
		}
	}
	if op.mode == reportOnly || op.mode == rebalanceIfRouted && rep.Tokens == 0 {
		m.endOp(r, &rep, "")
		return
	}
	slots := min((E+r.ep-1)/r.ep+op.redundant, E)
	next, err := expertparallel.Rebalance(window, r.ep, slots)
	if err != nil {
		m.endOp(r, nil, err.Error())
		return
	}
	op.next, op.counts, op.version, op.report = next, e.Counts, r.expVersion+1, rep
	op.report.Slots = slots
	m.emit(LoadExperts{Gen: r.gen, Version: op.version, Experts: next.Flat(), Slots: slots})
}

func (m *Machine) onExpertsLoaded(e ExpertsLoaded) {
	r, op := m.currentOp(e.Gen)
	if op == nil || op.next == nil || op.version != e.Version {
		return
	}
	if e.Err != "" {
		// The old table stays in use; workers that loaded the new one free
		// what only it needed.
		m.emit(CancelExperts{Gen: r.gen, Version: op.version})
		m.endOp(r, nil, "loading the new expert placement: "+e.Err)
		return
	}
	m.emit(SwitchExperts{Gen: r.gen, Version: op.version})
	window := since(op.counts, r.base)
	r.table, r.base, r.expVersion = op.next, op.counts, op.version
	m.lastTable = op.next
	m.dirty = true
	rep := op.report
	rep.ImbalanceAfter = op.next.Imbalance(window)
	rep.ExpertsVersion = op.version
	rep.Loaded = slices.Clone(e.Loaded)
	m.note("experts of %s re-placed: v%d, imbalance %.3f -> %.3f", Key(r.gen), op.version, rep.Imbalance, rep.ImbalanceAfter)
	m.endOp(r, &rep, "")
}

// endOp finishes the replica's current operation and starts the next.
func (m *Machine) endOp(r *replica, rep *ExpertReplica, err string) {
	op := r.expOps[0]
	r.expOps = r.expOps[1:]
	m.finishOp(r, op, rep, err)
	if len(r.expOps) > 0 {
		m.emit(GatherExperts{Gen: r.gen})
	}
}

// finishOp files an operation's outcome with its request, and answers the
// request once every replica has.
func (m *Machine) finishOp(r *replica, op *expertOp, rep *ExpertReplica, err string) {
	if op.req == 0 {
		if err != "" {
			m.note("periodic expert rebalance of %s: %s", Key(r.gen), err)
		}
		return
	}
	req := m.requests[op.req]
	if req == nil {
		return
	}
	if err != "" {
		req.errs = append(req.errs, Key(r.gen)+": "+err)
	} else {
		req.reports[r.gen] = *rep
	}
	if len(req.reports)+len(req.errs) < len(req.gens) {
		return
	}
	delete(m.requests, op.req)
	out := ExpertReport{Req: op.req}
	for _, gen := range req.gens {
		if rp, ok := req.reports[gen]; ok {
			out.Replicas = append(out.Replicas, rp)
		}
	}
	if len(req.errs) > 0 {
		out.Err = req.errs[0]
		for _, e := range req.errs[1:] {
			out.Err += "; " + e
		}
	}
	m.emit(out)
}
