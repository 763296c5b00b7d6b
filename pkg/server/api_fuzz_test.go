package server

import (
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	qwenfleet "github.com/qwenfleet/qwenfleet"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

var (
	fuzzCoordOnce sync.Once
	fuzzCoords    [2]*Coordinator // [0]: token ids only; [1]: with the Qwen2 tokenizer
	fuzzCoordErr  error
)

// fuzzCoordinators makes two coordinators that start nothing (NewCoordinator
// only reads the model's config and tokenizer): the tiny dense-gqa-f32
// model (vocabulary of 512, no tokenizer.json, a context of 32768), and
// the same config with Qwen2's vocabulary, its tokenizer.json and a
// context of 256.
func fuzzCoordinators(t testing.TB) [2]*Coordinator {
	fuzzCoordOnce.Do(func() {
		fuzzCoords[0], fuzzCoordErr = NewCoordinator(CoordinatorOptions{ModelDir: fuzzRefDir("dense-gqa-f32")})
		if fuzzCoordErr != nil {
			return
		}
		var cfg *model.Config
		if cfg, fuzzCoordErr = model.LoadConfig(filepath.Join(fuzzRefDir("dense-gqa-f32"), "config.json")); fuzzCoordErr != nil {
			return
		}
		cfg.VocabSize, cfg.MaxPositionEmbeddings = 151936, 256
		eos := 151643
		cfg.BosTokenID, cfg.EosTokenIDs = &eos, model.IntSet{eos}
		dir, err := os.MkdirTemp("", "qwenfleet-fuzz-model")
		if err != nil {
			fuzzCoordErr = err
			return
		}
		defer os.RemoveAll(dir) // read by NewCoordinator, not after
		tok, err := qwenfleet.Qwen2TokenizerJSON()
		if err == nil {
			err = model.WriteConfig(dir, cfg)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, "tokenizer.json"), tok, 0o600)
		}
		if err == nil {
			fuzzCoords[1], err = NewCoordinator(CoordinatorOptions{ModelDir: dir, ModelName: "fuzz"})
		}
		fuzzCoordErr = err
	})
	if fuzzCoordErr != nil {
		t.Fatal(fuzzCoordErr)
	}
	return fuzzCoords
}

// fuzzRefDir is a model of testdata/qwen2-ref.
func fuzzRefDir(name string) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "testdata", "qwen2-ref", name)
}

// fieldError is the start of every refusal's message: the field it names.
var fieldError = regexp.MustCompile(`^[a-z_]+(\[[0-9]+\])?(\.[a-z_]+(\[[0-9]+\])?)*: `)

// FuzzGenerateRequest checks the validation of a GenerateRequest
// ((*GeneratorService).request) on protobuf-encoded requests: it never
// panics; what it accepts satisfies the bounds the engine relies on (a
// prompt of valid ids that leaves room in the context, 1 <= max_tokens
// within it, min_tokens <= max_tokens, valid sampling, stop ids and
// resumed tokens in the vocabulary); and a refusal is INVALID_ARGUMENT,
// NOT_FOUND or FAILED_PRECONDITION naming the field.
func FuzzGenerateRequest(f *testing.F) {
	p := func(v int32) *int32 { return &v }
	fl := func(v float32) *float32 { return &v }
	yes := true
	seeds := []*pb.GenerateRequest{
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{1, 2, 3}}}, MaxTokens: p(8)},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{}}},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{-1, 600}}}},
		{Input: &pb.GenerateRequest_Text{Text: "Hello, world!"}, MaxTokens: p(16), MinTokens: p(4), Stop: []string{"\n"},
			StopTokenIds: []int32{151645}, Logprobs: p(5), Temperature: fl(0.7), TopP: fl(0.9), TopK: p(40), Seed: new(int64)},
		{Input: &pb.GenerateRequest_Text{Text: ""}},
		{Input: &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{Messages: []*pb.ChatMessage{{Role: "user", Content: "hi"}}, AddGenerationPrompt: &yes}}},
		{Input: &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{Messages: []*pb.ChatMessage{{Role: "robot", Content: "hi"}}}}},
		{Input: &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{}}},
		{Model: "other", Input: &pb.GenerateRequest_Text{Text: "x"}},
		{RequestId: "r1", Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, MaxTokens: p(4),
			Resume: &pb.Resume{TokenIds: []int32{7, 8}}},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, Resume: &pb.Resume{TokenIds: []int32{7}}},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, MaxTokens: p(0), MinTokens: p(-1)},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, MaxTokens: p(1 << 30)},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, TopP: fl(0), RepetitionPenalty: fl(0)},
		{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{5}}}, Stop: []string{""}, Logprobs: p(99)},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	cs := fuzzCoordinators(f)
	f.Fuzz(func(t *testing.T, raw []byte, tok bool) {
		req := &pb.GenerateRequest{}
		if proto.Unmarshal(raw, req) != nil {
			return
		}
		c := cs[0]
		if tok {
			c = cs[1]
		}
		s := &GeneratorService{c: c}
		r, err := s.request(req)
		if err != nil {
			if r != nil {
				t.Fatal("request returned with an error")
			}
			st, _ := status.FromError(err)
			switch st.Code() {
			case codes.InvalidArgument, codes.NotFound, codes.FailedPrecondition:
			default:
				t.Fatalf("refused with %v", err)
			}
			if !fieldError.MatchString(st.Message()) {
				t.Fatalf("the refusal names no field: %q", st.Message())
			}
			return
		}
		ctxLen, vocab := c.cfg.MaxContext(), c.cfg.VocabSize
		inVocab := func(what string, ids []int32) {
			for _, id := range ids {
				if id < 0 || int(id) >= vocab {
					t.Fatalf("%s: id %d outside the vocabulary of %d", what, id, vocab)
				}
			}
		}
		if len(r.Prompt) == 0 || len(r.Prompt) >= ctxLen {
			t.Fatalf("a prompt of %d tokens accepted (context %d)", len(r.Prompt), ctxLen)
		}
		inVocab("prompt", r.Prompt)
		if r.MaxTokens < 1 || len(r.Prompt)+r.MaxTokens > ctxLen || r.MaxTokens > DefaultMaxTokens && req.MaxTokens == nil {
			t.Fatalf("max_tokens %d for a prompt of %d (context %d)", r.MaxTokens, len(r.Prompt), ctxLen)
		}
		if r.FitMaxTokens != (req.MaxTokens == nil) {
			t.Fatalf("FitMaxTokens %v with max_tokens %v", r.FitMaxTokens, req.MaxTokens)
		}
		if r.MinTokens < 0 || r.MinTokens > r.MaxTokens {
			t.Fatalf("min_tokens %d, max_tokens %d", r.MinTokens, r.MaxTokens)
		}
		if r.Logprobs < -1 || r.Logprobs > MaxLogprobs {
			t.Fatalf("logprobs %d", r.Logprobs)
		}
		if err := r.Sampling.Validate(); err != nil {
			t.Fatalf("sampling: %v", err)
		}
		inVocab("stop ids", r.StopIDs)
		inVocab("resume", r.Resume)
		if len(r.Resume) > r.MaxTokens {
			t.Fatalf("%d resumed tokens for max_tokens %d", len(r.Resume), r.MaxTokens)
		}
		if r.ID == "" || len(r.ID) > MaxRequestIDLen {
			t.Fatalf("request id %q", r.ID)
		}
		if len(req.Stop) > 0 && c.tok == nil {
			t.Fatal("stop strings accepted without a tokenizer")
		}
	})
}
