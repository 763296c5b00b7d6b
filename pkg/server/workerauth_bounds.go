package server

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// The bounds a worker holds its callers to, beyond its authorization
// (WorkerAuth): a step's size and id, and (comm.go) its mailbox.

// stepIDWindow is how far a step id may be from the highest one a worker
// took since its warm-up: the coordinator numbers a replica's steps from
// 1 and has at most its pipeline's depth (its stages) in flight, so a
// worker sees ids within a few of each other.
const stepIDWindow = 256

// stepWindow is what a worker knows of the step ids it took since its
// warm-up: the highest, and the last stepIDWindow taken (by id modulo the
// window), so an id is taken once.
type stepWindow struct {
	hi   uint64
	seen [stepIDWindow]uint64
}

// take admits step id: not 0, within (hi-stepIDWindow, hi+stepIDWindow],
// and not taken before. It records it.
func (s *stepWindow) take(id uint64) error {
	if id > s.hi+stepIDWindow || s.hi >= stepIDWindow && id <= s.hi-stepIDWindow {
		lo := uint64(1)
		if s.hi >= stepIDWindow {
			lo = s.hi - stepIDWindow + 1
		}
		return status.Errorf(codes.InvalidArgument, "step_id: %d is outside [%d, %d], the ids this worker expects after step %d",
			id, lo, s.hi+stepIDWindow, s.hi)
	}
	slot := &s.seen[id%stepIDWindow]
	if *slot == id {
		return status.Errorf(codes.InvalidArgument, "step_id: step %d ran here already", id)
	}
	*slot = id
	s.hi = max(s.hi, id)
	return nil
}

// admitStep checks a step against what the warm-up sized (w.mu is held):
// at most w.stepTokens tokens and sequences, block tables no longer than
// the pool, and a numbered step's id within the window of expected ids.
func (w *WorkerService) admitStep(req *workerv1.StepRequest) error {
	if w.stepTokens > 0 {
		if len(req.Seqs) > w.stepTokens {
			return status.Errorf(codes.InvalidArgument, "seqs: %d sequences in one step; this worker takes at most %d", len(req.Seqs), w.stepTokens)
		}
		tokens := 0
		for i, s := range req.Seqs {
			tokens += len(s.Tokens)
			if int64(len(s.BlockTable)) > w.poolBlocks {
				return status.Errorf(codes.InvalidArgument, "seqs[%d].block_table: %d blocks; the KV pool holds %d", i, len(s.BlockTable), w.poolBlocks)
			}
		}
		if tokens > w.stepTokens {
			return status.Errorf(codes.InvalidArgument, "seqs: %d tokens in one step; this worker takes at most %d (its warm-up)", tokens, w.stepTokens)
		}
	}
	if req.StepId != 0 {
		return w.steps.take(req.StepId)
	}
	return nil
}

// checkFromRank checks that an Exchange message's sender is one this
// worker's assignment has: hidden states come from the same rank of the
// previous stage, all-reduce and all-to-all parts from another rank of
// the stage.
func checkFromRank(a *workerv1.Assignment, req *workerv1.ExchangeRequest) error {
	rank, ranks := a.TpRank, int32(len(a.TpPeers))
	if a.EpSize > 1 {
		rank = a.EpRank
	}
	switch req.Kind {
	case kindHidden:
		if a.Stage == 0 || req.FromRank != rank {
			return status.Errorf(codes.InvalidArgument, "from_rank: hidden states from rank %d; this worker (stage %d, rank %d) takes its previous stage's rank %d only",
				req.FromRank, a.Stage, rank, rank)
		}
	default:
		if req.FromRank < 0 || req.FromRank >= ranks || req.FromRank == rank {
			return status.Errorf(codes.InvalidArgument, "from_rank: %s from rank %d; this worker is rank %d of %d", kindName(req.Kind), req.FromRank, rank, max(ranks, 1))
		}
	}
	return nil
}
