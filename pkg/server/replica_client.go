package server

import (
	"context"
	"fmt"
	"sync"
	"time"

	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// The coordinator's client of one replica's workers: it sends every step to
// all of them and merges the last stage's vocabulary slices.

// replicaExecutor runs a replica's steps on its workers: every worker gets
// the step (same id), stages pass hidden states among themselves, and the
// last stage's ranks answer; their vocabulary slices are merged here.
type replicaExecutor struct {
	members   []*member // stage by stage, rank by rank
	gen       int64
	ranks, pp int // ranks per stage, stages

	// Expert placement of steps: expVersion at first, then each switch's
	// version for the steps numbered after it (workers run steps in id
	// order, so none sees an older placement after a newer one). maxID is
	// the highest step id sent.
	expMu      sync.Mutex
	expVersion int64
	switches   []expertSwitch
	maxID      uint64
}

type expertSwitch struct {
	after   uint64 // steps with higher ids use version
	version int64
}

// switchExperts has the steps after those already sent use version v.
func (g *replicaExecutor) switchExperts(v int64) {
	g.expMu.Lock()
	defer g.expMu.Unlock()
	g.switches = append(g.switches, expertSwitch{g.maxID, v})
	if len(g.switches) > 16 { // steps that old are long done
		g.expVersion = g.switches[0].version
		g.switches = g.switches[1:]
	}
}

func (g *replicaExecutor) expertsFor(id uint64) int64 {
	g.expMu.Lock()
	defer g.expMu.Unlock()
	g.maxID = max(g.maxID, id)
	v := g.expVersion
	for _, s := range g.switches {
		if id > s.after {
			v = s.version
		}
	}
	return v
}

func (g *replicaExecutor) Release(ctx context.Context, ids []uint64) error {
	return forEach(g.members, func(m *member) error {
		_, err := m.client.Release(ctx, &workerv1.ReleaseRequest{SeqIds: ids})
		return err
	})
}

func (g *replicaExecutor) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	req := &workerv1.StepRequest{AssignmentVersion: g.gen, Seqs: make([]*workerv1.SeqStep, len(b.Seqs))}
	if len(g.members) > 1 {
		// Workers run numbered steps strictly in order; a lone worker
		// runs one step at a time anyway and must not wait for a step
		// that never reached it.
		req.StepId = b.ID
		req.ExpertsVersion = g.expertsFor(b.ID)
	}
	for _, c := range b.Copies {
		req.Copies = append(req.Copies, &workerv1.BlockCopy{Src: c.Src, Dst: c.Dst})
	}
	for i, s := range b.Seqs {
		req.Seqs[i] = &workerv1.SeqStep{SeqId: s.ID, Tokens: s.Tokens, Start: int32(s.Start), BlockTable: s.Blocks,
			Sample: s.Sample, TopN: int32(s.TopN), FullRow: s.FullRow, PromptTargets: s.PromptTargets, WantLogsumexp: s.WantLogSumExp,
			RequestId: s.RequestID}
	}
	// One failed worker fails the step; the others' waits are cancelled.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	resps := make([]*workerv1.StepResponse, len(g.members))
	errs := make([]error, len(g.members))
	var wg sync.WaitGroup
	for i, m := range g.members {
		wg.Go(func() {
			resps[i], errs[i] = m.client.Step(sctx, req)
			if errs[i] != nil {
				cancel()
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil && status.Code(err) != codes.Canceled {
			return nil, fmt.Errorf("worker %s: %w", g.members[i].id, err)
		}
	}
	for i, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("worker %s: %w", g.members[i].id, err)
		}
	}
	last := resps[len(resps)-g.ranks:]
	for _, r := range last {
		if len(r.Results) != len(b.Seqs) {
			return nil, fmt.Errorf("worker returned %d results for %d sequences", len(r.Results), len(b.Seqs))
		}
	}
	var comm float64
	var sent int64
	for _, r := range resps {
		comm = max(comm, r.CommMs)
		sent += r.SentBytes
	}
	out := &steps.Result{Seqs: make([]steps.SeqResult, len(b.Seqs)), Forward: time.Duration(last[0].ForwardMs * float64(time.Millisecond)),
		Comm: time.Duration(comm * float64(time.Millisecond)), SentBytes: sent}
	parts := make([]steps.SeqResult, len(last))
	for i, s := range b.Seqs {
		for j, r := range last {
			parts[j] = seqResult(r.Results[i])
		}
		var err error
		if out.Seqs[i], err = shard.Merge(parts, s.TopN, s.WantLogSumExp); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func seqResult(r *workerv1.SeqResult) steps.SeqResult {
	sr := steps.SeqResult{LogSumExp: r.Logsumexp, Row: r.Row, PromptLogprobs: r.PromptLogprobs, PromptLSE: r.PromptLse,
		VocabBegin: int(r.VocabBegin), VocabEnd: int(r.VocabEnd), Candidates: make([]steps.Candidate, len(r.Candidates))}
	for j, c := range r.Candidates {
		sr.Candidates[j] = steps.Candidate{ID: c.Id, Logit: c.Logit}
	}
	return sr
}
