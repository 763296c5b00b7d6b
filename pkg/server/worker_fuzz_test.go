package server

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// loadSink is a Load stream that keeps nothing.
type loadSink struct {
	grpc.ServerStream
	ctx context.Context
}

func (s loadSink) Send(*workerv1.LoadProgress) error { return nil }
func (s loadSink) Context() context.Context          { return s.ctx }

var (
	fuzzWorkerOnce sync.Once
	fuzzWorker     *WorkerService
	fuzzWorkerErr  error
)

// Sizes of the fuzzed worker: the tiny dense-gqa-f32 model with its
// context cut to fuzzCtx tokens (a step costs little however long its
// sequences), and a KV pool of fuzzBlocks blocks of fuzzBlockSize.
const (
	fuzzCtx       = 64
	fuzzBlocks    = 8
	fuzzBlockSize = 4
)

// fuzzStepWorker is a worker that loaded (by its Load RPC, assignment
// version 1) and warmed up a whole tiny model on one CPU thread.
func fuzzStepWorker(t testing.TB) *WorkerService {
	fuzzWorkerOnce.Do(func() {
		src := fuzzRefDir("dense-gqa-f32")
		cfg, err := model.LoadConfig(filepath.Join(src, "config.json"))
		if err != nil {
			fuzzWorkerErr = err
			return
		}
		cfg.MaxPositionEmbeddings = fuzzCtx
		dir, err := os.MkdirTemp("", "qwenfleet-fuzz-worker")
		if err != nil {
			fuzzWorkerErr = err
			return
		}
		defer os.RemoveAll(dir) // the weights are read (not mapped) by Load
		weights, err := os.ReadFile(filepath.Join(src, "model.safetensors"))
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, "model.safetensors"), weights, 0o600)
		}
		if err == nil {
			err = model.WriteConfig(dir, cfg)
		}
		if err != nil {
			fuzzWorkerErr = err
			return
		}
		w := NewWorkerService(WorkerOptions{ID: "fuzz", Threads: 1})
		ctx := context.Background()
		if err := w.Load(&workerv1.LoadRequest{Assignment: &workerv1.Assignment{Version: 1, Model: dir}}, loadSink{ctx: ctx}); err != nil {
			fuzzWorkerErr = err
			return
		}
		_, fuzzWorkerErr = w.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: fuzzBlockSize, NumBlocks: fuzzBlocks})
		fuzzWorker = w
	})
	if fuzzWorkerErr != nil {
		t.Fatal(fuzzWorkerErr)
	}
	return fuzzWorker
}

// FuzzStepRequest sends a worker's Step protobuf-encoded requests: it
// never panics; a refusal is INVALID_ARGUMENT, FAILED_PRECONDITION or
// ABORTED (a whole model on one worker has no other failures); a step it
// runs returns one result per sequence, with candidates from the
// vocabulary, at most the number asked for, and one prompt logprob per
// token when asked. Step ids are cleared: a step numbered past the next
// one waits for those before it (the coordinator's order), which is not
// validation. The sequences are released after each step, so every input
// runs on the same worker state.
func FuzzStepRequest(f *testing.F) {
	seq := func(id uint64, start int32, tokens, blocks []int32) *workerv1.SeqStep {
		return &workerv1.SeqStep{SeqId: id, Start: start, Tokens: tokens, BlockTable: blocks, Sample: true, TopN: 3}
	}
	seeds := []*workerv1.StepRequest{
		{AssignmentVersion: 1, Seqs: []*workerv1.SeqStep{seq(1, 0, []int32{1, 2, 3, 4, 5}, []int32{0, 1})}},
		{Seqs: []*workerv1.SeqStep{seq(1, 0, []int32{1}, []int32{0}), seq(2, 0, []int32{7, 8}, []int32{1})}},
		{Seqs: []*workerv1.SeqStep{{SeqId: 3, Tokens: []int32{1, 2}, BlockTable: []int32{2}, PromptTargets: []int32{2, -1}, Sample: true, TopN: 1, FullRow: true, WantLogsumexp: true}}},
		{Seqs: []*workerv1.SeqStep{{SeqId: 3, Tokens: []int32{1, 2}, BlockTable: []int32{2}, PromptTargets: []int32{2}}}},
		{Seqs: []*workerv1.SeqStep{{SeqId: 3, Tokens: []int32{1}, BlockTable: []int32{2}, PromptTargets: []int32{512}}}},
		{Seqs: []*workerv1.SeqStep{seq(4, 4, []int32{1}, []int32{0, 1})}},
		{Seqs: []*workerv1.SeqStep{seq(4, -1, []int32{1}, []int32{0})}},
		{Seqs: []*workerv1.SeqStep{seq(5, 0, []int32{1, 2, 3, 4, 5}, []int32{0})}},
		{Seqs: []*workerv1.SeqStep{seq(5, 0, []int32{1}, []int32{8})}},
		{Seqs: []*workerv1.SeqStep{seq(5, 0, []int32{1}, []int32{-1})}},
		{Seqs: []*workerv1.SeqStep{seq(5, 0, []int32{512}, []int32{0})}},
		{Seqs: []*workerv1.SeqStep{seq(5, 0, nil, []int32{0})}},
		{Seqs: []*workerv1.SeqStep{{SeqId: 6, Tokens: []int32{1}, BlockTable: []int32{0}, Sample: true, TopN: 0}}},
		{Seqs: []*workerv1.SeqStep{{SeqId: 6, Tokens: []int32{1}, BlockTable: []int32{0}, Sample: true, TopN: 5000}}},
		{Seqs: []*workerv1.SeqStep{seq(7, 0, make([]int32, fuzzCtx+1), make([]int32, fuzzBlocks))}},
		{},
		{AssignmentVersion: 2, Seqs: []*workerv1.SeqStep{seq(1, 0, []int32{1}, []int32{0})}},
		{AssignmentVersion: -5},
		{ExpertsVersion: 3, Seqs: []*workerv1.SeqStep{seq(1, 0, []int32{1}, []int32{0})}},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	w := fuzzStepWorker(f)
	vocab := int32(w.exec.Model().Config().VocabSize)
	f.Fuzz(func(t *testing.T, raw []byte) {
		req := &workerv1.StepRequest{}
		if proto.Unmarshal(raw, req) != nil {
			return
		}
		req.StepId = 0
		ids := make([]uint64, len(req.Seqs))
		for i, s := range req.Seqs {
			ids[i] = s.SeqId
		}
		defer w.exec.Release(ids)
		res, err := w.Step(context.Background(), req)
		if err != nil {
			if res != nil {
				t.Fatal("a response with an error")
			}
			switch status.Code(err) {
			case codes.InvalidArgument, codes.FailedPrecondition, codes.Aborted:
			default:
				t.Fatalf("refused with %v", err)
			}
			return
		}
		if len(res.Results) != len(req.Seqs) {
			t.Fatalf("%d results for %d sequences", len(res.Results), len(req.Seqs))
		}
		for i, r := range res.Results {
			s := req.Seqs[i]
			if r.SeqId != s.SeqId {
				t.Fatalf("result %d is of sequence %d, not %d", i, r.SeqId, s.SeqId)
			}
			if s.Sample && (len(r.Candidates) < 1 || len(r.Candidates) > int(s.TopN)) {
				t.Fatalf("sequence %d: %d candidates for top %d", s.SeqId, len(r.Candidates), s.TopN)
			}
			for _, c := range r.Candidates {
				if c.Id < 0 || c.Id >= vocab {
					t.Fatalf("candidate %d outside the vocabulary", c.Id)
				}
			}
			if s.PromptTargets != nil && len(r.PromptLogprobs) != len(s.Tokens) {
				t.Fatalf("%d prompt logprobs for %d tokens", len(r.PromptLogprobs), len(s.Tokens))
			}
			if s.Sample && s.FullRow && len(r.Row) != int(vocab) {
				t.Fatalf("a row of %d logits", len(r.Row))
			}
		}
	})
}
