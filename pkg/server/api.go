package server

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/control"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/tokenizer"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// Limits on request fields.
const (
	MaxStopStrings   = 16
	MaxStopLen       = 256
	MaxStopTokenIDs  = 64
	MaxLogprobs      = 20
	MaxRequestIDLen  = 256
	MaxChatMessages  = 1024
	DefaultMaxTokens = 16384
)

// Version is reported by GetServerInfo.
const Version = "0.4.0"

var requestIDs atomic.Uint64

// GeneratorService implements the public API over a Coordinator. With API
// keys (PublicAuth's interceptors put the caller in each call's context) it
// also remembers which key started each running request (see Abort) and
// counts each key's Generate streams.
type GeneratorService struct {
	pb.UnimplementedGeneratorServer
	c *Coordinator
	// aliasKey makes the opaque worker names of the redacted ServerInfo
	// (workerAlias): random per service, so stable while it lives.
	aliasKey [32]byte
	own      owners
}

// NewGeneratorService serves c.
func NewGeneratorService(c *Coordinator) *GeneratorService {
	s := &GeneratorService{c: c}
	rand.Read(s.aliasKey[:]) // never fails (crypto/rand)
	return s
}

func invalid(field, format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, "%s: %s", field, fmt.Sprintf(format, args...))
}

func (s *GeneratorService) serving() error {
	c := s.c
	if !c.IsLeader() {
		ctx, cancel := context.WithTimeout(context.Background(), etcdTimeout)
		defer cancel()
		leader, err := c.opts.Store.Leader(ctx)
		if err != nil {
			return status.Errorf(codes.Unavailable, "this coordinator is a standby and cannot tell the leader: %v", err)
		}
		return status.Errorf(codes.Unavailable, "this coordinator is a standby; the leader is at %q", leader)
	}
	return nil
}

// prompt turns the request's input into ids, and checks they leave room
// in the context (Generate and Tokenize alike). Text is checked against
// the context before it is tokenized: MaxInputBytes, and the most bytes
// the context's tokens could hold (tokenizer.MaxTextBytes; chat contents
// count together, the template only adds to them).
func (s *GeneratorService) prompt(req interface {
	GetText() string
	GetChat() *pb.ChatInput
}, ids []int32, hasIDs bool) ([]int32, error) {
	ids, err := s.tokens(req, ids, hasIDs)
	if err != nil {
		return nil, err
	}
	if ctxLen := s.c.cfg.MaxContext(); len(ids) >= ctxLen {
		return nil, invalid("prompt", "%d tokens leave no room in the context of %d", len(ids), ctxLen)
	}
	return ids, nil
}

// textFits refuses text (n bytes so far) that could not fit the context
// whatever it tokenizes to, naming field.
func (s *GeneratorService) textFits(field string, n int64) error {
	c := s.c
	if n > MaxInputBytes {
		return invalid(field, "%d bytes of text (at most %d)", n, MaxInputBytes)
	}
	if c.tok == nil {
		return nil
	}
	ctxLen := c.cfg.MaxContext()
	if limit := c.tok.MaxTextBytes(ctxLen - 1); n > limit {
		return invalid(field, "%d bytes of text cannot fit the context of %d tokens (at most %d bytes)", n, ctxLen, limit)
	}
	return nil
}

func (s *GeneratorService) tokens(req interface {
	GetText() string
	GetChat() *pb.ChatInput
}, ids []int32, hasIDs bool) ([]int32, error) {
	c := s.c
	switch {
	case hasIDs:
		if len(ids) == 0 {
			return nil, invalid("token_ids", "empty")
		}
		for i, id := range ids {
			if id < 0 || int(id) >= c.cfg.VocabSize {
				return nil, invalid(fmt.Sprintf("token_ids[%d]", i), "%d is not in the vocabulary of %d", id, c.cfg.VocabSize)
			}
		}
		return ids, nil
	case req.GetChat() != nil:
		if c.tok == nil {
			return nil, status.Error(codes.FailedPrecondition, "chat: the model has no tokenizer.json; send token_ids")
		}
		ch := req.GetChat()
		if len(ch.Messages) == 0 {
			return nil, invalid("chat.messages", "empty")
		}
		if len(ch.Messages) > MaxChatMessages {
			return nil, invalid("chat.messages", "%d messages (at most %d)", len(ch.Messages), MaxChatMessages)
		}
		msgs := make([]tokenizer.Message, len(ch.Messages))
		var n int64
		for i, m := range ch.Messages {
			n += int64(len(m.Content))
			if err := s.textFits(fmt.Sprintf("chat.messages[%d].content", i), n); err != nil {
				return nil, err
			}
			msgs[i] = tokenizer.Message{Role: m.Role, Content: m.Content}
		}
		out, err := c.tok.EncodeChat(msgs, ch.AddGenerationPrompt == nil || *ch.AddGenerationPrompt)
		if err != nil {
			return nil, invalid("chat.messages", "%v", err)
		}
		return out, nil
	default:
		text := req.GetText()
		if text == "" {
			return nil, invalid("input", "empty: give text, chat or token_ids")
		}
		if c.tok == nil {
			return nil, status.Error(codes.FailedPrecondition, "text: the model has no tokenizer.json; send token_ids")
		}
		if err := s.textFits("text", int64(len(text))); err != nil {
			return nil, err
		}
		return c.tok.Encode(text), nil
	}
}

// request validates a GenerateRequest into a routing request.
func (s *GeneratorService) request(req *pb.GenerateRequest) (*routing.Request, error) {
	c := s.c
	if req.Model != "" && req.Model != c.opts.ModelName && req.Model != c.opts.ModelDir {
		return nil, status.Errorf(codes.NotFound, "model: %q is not loaded (this cluster serves %q)", req.Model, c.opts.ModelName)
	}
	if len(req.RequestId) > MaxRequestIDLen {
		return nil, invalid("request_id", "%d bytes (at most %d)", len(req.RequestId), MaxRequestIDLen)
	}
	ids, err := s.prompt(req, req.GetTokenIds().GetIds(), req.GetTokenIds() != nil)
	if err != nil {
		return nil, err
	}
	ctxLen := c.cfg.MaxContext()
	p := sampling.Params{Temperature: 1, TopP: 1, RepetitionPenalty: 1}
	if req.Temperature != nil {
		p.Temperature = *req.Temperature
	}
	if req.TopP != nil {
		p.TopP = *req.TopP
		if p.TopP == 0 {
			return nil, invalid("top_p", "0 is outside (0, 1]")
		}
	}
	if req.TopK != nil {
		p.TopK = int(*req.TopK)
	}
	if req.MinP != nil {
		p.MinP = *req.MinP
	}
	if req.RepetitionPenalty != nil {
		p.RepetitionPenalty = *req.RepetitionPenalty
		if p.RepetitionPenalty == 0 {
			return nil, invalid("repetition_penalty", "must be > 0, got 0")
		}
	}
	if req.PresencePenalty != nil {
		p.PresencePenalty = *req.PresencePenalty
	}
	if req.FrequencyPenalty != nil {
		p.FrequencyPenalty = *req.FrequencyPenalty
	}
	if req.Seed != nil {
		p.Seed, p.HasSeed = uint64(*req.Seed), true
	}
	p.Normalize()
	if err := p.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	room := ctxLen - len(ids)
	r := &routing.Request{ID: req.RequestId, Prompt: ids, Sampling: p, MaxTokens: min(room, DefaultMaxTokens), Logprobs: -1,
		PromptLogprobs: req.PromptLogprobs}
	// The default max_tokens is lowered to fit the KV cache by the engine
	// that takes the request (FitMaxTokens: the same bound wherever it
	// runs, resumed or moved). Whether the request fits the KV cache is
	// checked by the scheduler when it queues it (submitError names the
	// field).
	r.FitMaxTokens = req.MaxTokens == nil
	if req.MaxTokens != nil {
		n := int(*req.MaxTokens)
		if n < 1 {
			return nil, invalid("max_tokens", "must be >= 1, got %d", n)
		}
		if n > room {
			return nil, invalid("max_tokens", "%d + %d prompt tokens exceed the context of %d", n, len(ids), ctxLen)
		}
		r.MaxTokens = n
	}
	if req.MinTokens != nil {
		n := int(*req.MinTokens)
		if n < 0 || n > r.MaxTokens {
			return nil, invalid("min_tokens", "%d is outside [0, max_tokens=%d]", n, r.MaxTokens)
		}
		r.MinTokens = n
	}
	if len(req.Stop) > MaxStopStrings {
		return nil, invalid("stop", "%d stop strings (at most %d)", len(req.Stop), MaxStopStrings)
	}
	for i, st := range req.Stop {
		if st == "" || len(st) > MaxStopLen {
			return nil, invalid(fmt.Sprintf("stop[%d]", i), "must be 1 to %d bytes, got %d", MaxStopLen, len(st))
		}
	}
	if len(req.Stop) > 0 && c.tok == nil {
		return nil, status.Error(codes.FailedPrecondition, "stop: the model has no tokenizer.json to match stop strings with")
	}
	if len(req.StopTokenIds) > MaxStopTokenIDs {
		return nil, invalid("stop_token_ids", "%d ids (at most %d)", len(req.StopTokenIds), MaxStopTokenIDs)
	}
	for i, id := range req.StopTokenIds {
		if id < 0 || int(id) >= c.cfg.VocabSize {
			return nil, invalid(fmt.Sprintf("stop_token_ids[%d]", i), "%d is not in the vocabulary of %d", id, c.cfg.VocabSize)
		}
		r.StopIDs = append(r.StopIDs, id)
	}
	if !req.IgnoreEos {
		r.StopIDs = append(r.StopIDs, c.eosIDs()...)
	}
	if req.Logprobs != nil {
		n := int(*req.Logprobs)
		if n < 0 || n > MaxLogprobs {
			return nil, invalid("logprobs", "%d is outside [0, %d]", n, MaxLogprobs)
		}
		r.Logprobs = n
	}
	if rs := req.GetResume(); rs != nil {
		if req.RequestId == "" {
			return nil, invalid("request_id", "empty: a resumed request names the request it continues")
		}
		for i, id := range rs.TokenIds {
			if id < 0 || int(id) >= c.cfg.VocabSize {
				return nil, invalid(fmt.Sprintf("resume.token_ids[%d]", i), "%d is not in the vocabulary of %d", id, c.cfg.VocabSize)
			}
		}
		if n := len(rs.TokenIds); n > r.MaxTokens {
			return nil, invalid("resume.token_ids", "%d tokens received, more than max_tokens=%d", n, r.MaxTokens)
		}
		r.Resume = rs.TokenIds
	}
	if r.ID == "" {
		r.ID = fmt.Sprintf("req-%d-%d", time.Now().UnixNano(), requestIDs.Add(1))
	}
	return r, nil
}

// resumedEnd says whether a resumed request ended with the tokens the
// client has (its stream broke before the final message): it had all its
// tokens (max_tokens, or a default one that filled the KV cache of
// capTokens), or the last one stops it (the engine allows a stop once
// min_tokens were generated before it).
func resumedEnd(r *routing.Request, capTokens int) (finish string, matched int32, done bool) {
	n := len(r.Resume)
	switch {
	case n == 0:
		return "", -1, false
	case n >= r.MaxTokens || r.FitMaxTokens && capTokens > 0 && len(r.Prompt)+n >= capTokens:
		return "length", -1, true
	case n > r.MinTokens && slices.Contains(r.StopIDs, r.Resume[n-1]):
		return "stop", r.Resume[n-1], true
	}
	return "", -1, false
}

func (c *Coordinator) eosIDs() []int32 {
	var out []int32
	for _, id := range c.cfg.EosTokenIDs {
		if id >= 0 && id < c.cfg.VocabSize {
			out = append(out, int32(id))
		}
	}
	if c.tok != nil {
		for _, id := range c.tok.StopIDs() {
			if int(id) < c.cfg.VocabSize {
				out = append(out, id)
			}
		}
	}
	return out
}

func submitError(err error) error {
	var long *routing.TooLongError
	switch {
	case errors.As(err, &long) && long.Prompt >= long.Capacity:
		return invalid("prompt", "%d tokens do not fit the KV cache of %d tokens", long.Prompt, long.Capacity)
	case errors.As(err, &long):
		return invalid("max_tokens", "%d + %d prompt tokens do not fit the KV cache of %d tokens (ask for fewer tokens)", long.MaxLen-long.Prompt, long.Prompt, long.Capacity)
	case errors.Is(err, routing.ErrQueueFull):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, routing.ErrOverloaded):
		return overloaded(err)
	case errors.Is(err, routing.ErrDuplicate):
		return status.Errorf(codes.AlreadyExists, "request_id: %v", err)
	case errors.Is(err, routing.ErrNoReplica), errors.Is(err, routing.ErrClosed):
		return status.Error(codes.Unavailable, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func (c *Coordinator) sendTimeout() time.Duration {
	if c.opts.SendTimeout > 0 {
		return c.opts.SendTimeout
	}
	return DefaultSendTimeout
}

// sendError is the status of a Send that failed: the client's own
// (it went away) or one that did not read in time.
func (c *Coordinator) sendError(err error) error {
	if errors.Is(err, errSendTimeout) {
		return status.Errorf(codes.DeadlineExceeded, "the client did not read the response for --send-timeout (%v): request aborted", c.sendTimeout())
	}
	return err
}

// overloaded is the status of a request refused, or ended before its
// first token, for the max queue wait.
func overloaded(err error) error {
	return status.Errorf(codes.ResourceExhausted, "%v (the coordinator's --max-queue-wait)", err)
}

// Generate streams one request.
func (s *GeneratorService) Generate(req *pb.GenerateRequest, out pb.Generator_GenerateServer) error {
	arrived := time.Now()
	if err := s.serving(); err != nil {
		return err
	}
	r, err := s.request(req)
	if err != nil {
		return err
	}
	if caller, ok := CallerFrom(out.Context()); ok {
		release, err := s.own.admit(caller, r.ID, req.Resume != nil)
		if err != nil {
			return err
		}
		defer release()
	}
	g := newGenState(s.c, r, req)
	// Every Send is bounded by the send timeout: a client that stops
	// reading holds one message and the transport's windows, and its
	// request is aborted after the timeout. The engine never waits for a
	// reader (a routing.Stream merges undelivered events), so a slow
	// client delays no step, and its KV cache is freed when it is aborted.
	snd := newBoundedSender(out.Send, s.c.sendTimeout())
	defer snd.Close()
	if req.Resume != nil {
		// The run it continues may still be here (its client went away
		// without this server seeing it yet): end it.
		s.c.router.Abort(r.ID)
		if err := g.resume(r.Resume, req.Resume.TextBytes); err != nil {
			return err
		}
		finish, matched, done := resumedEnd(r, s.c.router.Capacity())
		if g.finish != "" || done {
			// Nothing to generate: send what text was held back, and the end.
			ev := routing.Event{Done: true, Finish: finish, MatchedStop: matched}
			var chunk *pb.GenerateChunk
			if g.finish != "" { // a stop string: the text ends before it
				if t := g.text.String()[g.sent:]; t != "" {
					chunk = &pb.GenerateChunk{Text: t, Usage: g.usage()}
				}
			} else {
				chunk, _ = g.add(ev)
			}
			if chunk != nil {
				if err := snd.Send(&pb.GenerateResponse{RequestId: r.ID, Response: &pb.GenerateResponse_Chunk{Chunk: chunk}}); err != nil {
					return s.c.sendError(err)
				}
			}
			return s.c.sendError(snd.Send(&pb.GenerateResponse{RequestId: r.ID, Response: &pb.GenerateResponse_Complete{Complete: g.complete(ev)}}))
		}
	}
	stream, err := s.c.router.Submit(r)
	if err != nil {
		return submitError(err)
	}
	ctx := out.Context()
	rec := s.c.record(r, arrived)
	finish, final := "abort", routing.Event{} // a client gone is an abort
	defer func() { rec.done(finish, final) }()
	for {
		ev, err := stream.Recv(ctx)
		if err != nil {
			// The client went away (or its deadline passed): free at once.
			s.c.router.AbortStream(stream)
			return status.FromContextError(err).Err()
		}
		stopped := g.finish != "" // by a stop string, before this event
		chunk, done := g.add(ev)
		if done && !ev.Done {
			// A stop string matched: end the request and wait for its
			// final event (prompt logprobs, preemptions).
			s.c.router.AbortStream(stream)
			for !ev.Done {
				if ev, err = stream.Recv(ctx); err != nil {
					return status.FromContextError(err).Err()
				}
			}
			g.plp, g.preempt, g.cached = ev.PromptLogprobs, ev.Preemptions, ev.CachedTokens
		}
		if chunk != nil {
			if err := snd.Send(&pb.GenerateResponse{RequestId: r.ID, Response: &pb.GenerateResponse_Chunk{Chunk: chunk}}); err != nil {
				s.c.router.AbortStream(stream)
				return s.c.sendError(err)
			}
			rec.sent(len(chunk.TokenIds))
		}
		if done || ev.Done {
			final = ev
			if ev.Err != nil && !stopped {
				finish = "error"
				code := codes.Internal
				if errors.Is(ev.Err, routing.ErrOverloaded) {
					// It waited --max-queue-wait and was never scheduled:
					// no token was computed.
					code = codes.ResourceExhausted
					if rec.tokens == 0 {
						return overloaded(ev.Err)
					}
				}
				if errors.Is(ev.Err, routing.ErrNoReplica) {
					// It waited --queue-timeout for a replica. Before any
					// token, the call's status says so (clients retry
					// UNAVAILABLE); after some, the stream's error does.
					code = codes.Unavailable
					if rec.tokens == 0 {
						return status.Error(code, ev.Err.Error())
					}
				}
				return s.c.sendError(snd.Send(&pb.GenerateResponse{RequestId: r.ID, Response: &pb.GenerateResponse_Error{Error: &pb.GenerateError{
					Code: code.String(), Message: ev.Err.Error()}}}))
			}
			c := g.complete(ev)
			finish = c.FinishReason
			return s.c.sendError(snd.Send(&pb.GenerateResponse{RequestId: r.ID, Response: &pb.GenerateResponse_Complete{Complete: c}}))
		}
	}
}

// genState turns engine events into chunks: detokenizes, matches stop
// strings (holding back text that could start one), counts usage. Stops on
// a token are the engine's alone (request puts stop_token_ids and, unless
// ignore_eos, eosIDs in routing.Request.StopIDs; the engine suppresses them
// before min_tokens and ends the sequence on one); genState decides only
// stop strings, which need the detokenized text.
type genState struct {
	c        *Coordinator
	r        *routing.Request
	detok    *tokenizer.Detokenizer
	stops    []string
	holdBack int
	text     strings.Builder // all text so far
	sent     int             // bytes of text sent
	n        int             // tokens generated
	finish   string
	matched  string
	plp      []float32
	preempt  int
	cached   int // prompt tokens found in the prefix cache
}

func newGenState(c *Coordinator, r *routing.Request, req *pb.GenerateRequest) *genState {
	g := &genState{c: c, r: r, stops: req.Stop}
	if c.tok != nil {
		g.detok = c.tok.NewDetokenizer(req.SkipSpecialTokens == nil || *req.SkipSpecialTokens)
	}
	for _, st := range g.stops {
		g.holdBack = max(g.holdBack, len(st)-1)
	}
	return g
}

func (g *genState) add(ev routing.Event) (*pb.GenerateChunk, bool) {
	ch := &pb.GenerateChunk{}
	stopped := false
	for i, id := range ev.Tokens {
		g.n++
		ch.TokenIds = append(ch.TokenIds, id)
		if i < len(ev.Logprobs) {
			ch.Logprobs = append(ch.Logprobs, g.logprob(ev.Logprobs[i]))
		}
		if g.detok != nil {
			piece, _ := g.detok.Add(id)
			g.text.WriteString(piece)
		}
		if len(g.stops) > 0 {
			if at, st := g.findStop(); at >= 0 {
				g.finish, g.matched, stopped = "stop", st, true
				full := g.text.String()[:at]
				g.text.Reset()
				g.text.WriteString(full)
				break
			}
		}
	}
	if ev.Done && !stopped && g.detok != nil {
		g.text.WriteString(g.detok.Flush())
	}
	full := g.text.String()
	end := len(full)
	if !ev.Done && !stopped {
		end = max(g.sent, len(full)-g.holdBack)
		for end > g.sent && end < len(full) && !utf8Start(full[end]) {
			end--
		}
	}
	ch.Text = full[g.sent:end]
	g.sent = end
	ch.Usage = g.usage()
	if ev.Done {
		g.plp, g.preempt, g.cached = ev.PromptLogprobs, ev.Preemptions, ev.CachedTokens
		if g.finish == "" {
			g.finish = ev.Finish
			if ev.MatchedStop >= 0 {
				g.matched = strconv.Itoa(int(ev.MatchedStop))
			}
		}
	}
	if len(ch.TokenIds) == 0 && ch.Text == "" {
		ch = nil
	}
	return ch, stopped
}

// resume takes the tokens a client received before its stream broke, and
// how much of their text (nil: all of it): the text sent next follows it,
// and stop strings are matched across it. A stop string already in that
// text ends the request (finish "stop").
func (g *genState) resume(ids []int32, textBytes *int64) error {
	g.n = len(ids)
	if g.detok != nil {
		for _, id := range ids {
			piece, _ := g.detok.Add(id)
			g.text.WriteString(piece)
		}
	}
	full := g.text.String()
	g.sent = len(full)
	if textBytes != nil {
		if *textBytes < 0 || *textBytes > int64(len(full)) {
			return invalid("resume.text_bytes", "%d is outside [0, %d], the text of resume.token_ids", *textBytes, len(full))
		}
		g.sent = int(*textBytes)
	}
	if len(g.stops) > 0 {
		if at, st := g.findStop(); at >= 0 {
			g.finish, g.matched = "stop", st
			g.text.Reset()
			g.text.WriteString(full[:max(at, g.sent)])
		}
	}
	return nil
}

func utf8Start(b byte) bool { return b&0xC0 != 0x80 }

// findStop looks for a stop string in the text not yet sent (a match may
// begin up to holdBack bytes before it).
func (g *genState) findStop() (int, string) {
	full := g.text.String()
	from := max(0, g.sent-g.holdBack)
	best, bestStop := -1, ""
	for _, st := range g.stops {
		if i := strings.Index(full[from:], st); i >= 0 && (best < 0 || from+i < best) {
			best, bestStop = from+i, st
		}
	}
	return best, bestStop
}

func (g *genState) logprob(lp routing.TokenLogprob) *pb.TokenLogprob {
	out := &pb.TokenLogprob{TokenId: lp.ID, Logprob: lp.Logprob}
	for _, t := range lp.Top {
		tl := &pb.TopLogprob{TokenId: t.ID, Logprob: t.Logprob}
		if g.c.tok != nil {
			tl.Token, _ = g.c.tok.Decode([]int32{t.ID}, false)
		}
		out.Top = append(out.Top, tl)
	}
	return out
}

func (g *genState) usage() *pb.Usage {
	p := int32(len(g.r.Prompt))
	return &pb.Usage{PromptTokens: p, CompletionTokens: int32(g.n), TotalTokens: p + int32(g.n), CachedTokens: int32(g.cached)}
}

func (g *genState) complete(ev routing.Event) *pb.GenerateComplete {
	c := &pb.GenerateComplete{FinishReason: g.finish, Usage: g.usage(), MatchedStop: g.matched, Preemptions: int32(g.preempt)}
	if g.r.PromptLogprobs {
		for i, id := range g.r.Prompt {
			pl := &pb.PromptLogprob{TokenId: id}
			if i > 0 && i < len(g.plp) && !math.IsNaN(float64(g.plp[i])) {
				v := g.plp[i]
				pl.Logprob = &v
			}
			c.PromptLogprobs = append(c.PromptLogprobs, pl)
		}
	}
	return c
}

// Abort ends a request by id. A caller with a user API key may abort only
// the requests its key started: another key's running request is refused
// PERMISSION_DENIED, and an id no Generate of this coordinator runs (one
// that ended, or never was) is not found. Admin keys (and every caller of
// a coordinator without API keys) may abort any request.
func (s *GeneratorService) Abort(ctx context.Context, req *pb.AbortRequest) (*pb.AbortResponse, error) {
	if req.RequestId == "" {
		return nil, invalid("request_id", "empty")
	}
	if caller, ok := restricted(ctx); ok {
		found, err := s.own.abortOwn(caller, req.RequestId, s.c.router.Abort)
		if err != nil {
			return nil, err
		}
		return &pb.AbortResponse{Found: found}, nil
	}
	return &pb.AbortResponse{Found: s.c.router.Abort(req.RequestId)}, nil
}

// Tokenize encodes text or chat.
func (s *GeneratorService) Tokenize(ctx context.Context, req *pb.TokenizeRequest) (*pb.TokenizeResponse, error) {
	ids, err := s.prompt(req, nil, false)
	if err != nil {
		return nil, err
	}
	out := &pb.TokenizeResponse{Ids: ids}
	for _, id := range ids {
		t, _ := s.c.tok.Decode([]int32{id}, false)
		out.Tokens = append(out.Tokens, t)
	}
	return out, nil
}

// GetModelInfo describes the served model.
func (s *GeneratorService) GetModelInfo(ctx context.Context, _ *pb.GetModelInfoRequest) (*pb.ModelInfo, error) {
	cfg := s.c.cfg
	return &pb.ModelInfo{Name: s.c.opts.ModelName, ModelType: cfg.ModelType, VocabSize: int32(cfg.VocabSize),
		MaxContext: int32(min(cfg.MaxContext(), math.MaxInt32)), HiddenSize: int32(cfg.HiddenSize), NumLayers: int32(cfg.NumHiddenLayers),
		NumAttentionHeads: int32(cfg.NumAttentionHeads), NumKeyValueHeads: int32(cfg.NumKeyValueHeads), NumExperts: int32(cfg.NumExperts),
		NumParameters: model.NumParams(cfg), Dtype: cfg.TorchDtype, HasTokenizer: s.c.tok != nil, EosTokenIds: s.c.eosIDs()}, nil
}

// GetServerInfo reports workers, placement, leadership and scheduler
// state. A caller with a user API key gets the view redactServerInfo
// makes: nothing that says where the cluster's parts are.
func (s *GeneratorService) GetServerInfo(ctx context.Context, _ *pb.GetServerInfoRequest) (*pb.ServerInfo, error) {
	info, err := s.serverInfo(ctx)
	if _, user := restricted(ctx); user {
		if err != nil {
			// etcd's error may name its endpoints.
			return nil, status.Error(status.Code(err), "this coordinator is a standby and cannot reach etcd")
		}
		s.redactServerInfo(info)
	}
	return info, err
}

func (s *GeneratorService) serverInfo(ctx context.Context) (*pb.ServerInfo, error) {
	c := s.c
	info := &pb.ServerInfo{Version: Version, CoordinatorId: c.opts.ID, Leader: c.IsLeader(),
		UptimeSeconds: time.Since(c.started).Seconds(), EtcdEndpoints: c.opts.EtcdEndpoints, Security: c.opts.Security}
	var ws []cluster.WorkerInfo
	if info.Leader {
		// The leader answers from its own view (its etcd watch), at once,
		// also while etcd is away (it serves on then, and says so).
		info.LeaderAddress, ws = c.opts.Addr, c.knownWorkers()
		if away := c.etcdSilence(); away > 0 {
			info.EtcdError = fmt.Sprintf("etcd has not answered this leader for %v: it serves on with the placement it has, and writes nothing until etcd is back", away.Round(100*time.Millisecond))
		}
	} else {
		lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		info.LeaderAddress, _ = c.opts.Store.Leader(lctx)
		var err error
		ws, err = c.opts.Store.ListWorkers(lctx)
		cancel()
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "etcd: %v", err)
		}
	}
	c.mu.Lock()
	for _, w := range ws {
		state := w.State
		if st, ok := c.status.Workers[w.ID]; ok && info.Leader {
			state = st
		}
		info.Workers = append(info.Workers, &pb.WorkerStatus{Id: w.ID, Address: w.Addr, Pid: int32(w.PID), State: state, MetricsAddress: w.MetricsAddr,
			Backend: w.Backend, MemoryBytes: w.MemoryBytes, Host: w.Host, DeviceName: w.DeviceName})
	}
	p := c.placement
	c.mu.Unlock()
	info.Placement = &pb.Placement{Version: p.Version, Model: p.Model}
	for _, r := range p.Replicas {
		pr := &pb.Placement_Replica{Index: int32(r.Index), Workers: r.Workers,
			LayersBegin: int32(r.LayersBegin), LayersEnd: int32(r.LayersEnd), Tp: int32(r.TP), Pp: int32(r.PP), Ep: int32(max(r.EP, 1))}
		for _, st := range r.Stages {
			ps := &pb.Placement_Replica_Stage{Index: int32(st.Index), LayersBegin: int32(st.LayersBegin), LayersEnd: int32(st.LayersEnd)}
			for _, rk := range st.Ranks {
				ps.Workers = append(ps.Workers, rk.Worker)
			}
			pr.Stages = append(pr.Stages, ps)
		}
		info.Placement.Replicas = append(info.Placement.Replicas, pr)
	}
	st := c.router.Stats()
	info.Scheduler = &pb.SchedulerStats{Running: int32(st.Running), Waiting: int32(st.Waiting), KvBlocksTotal: int32(st.BlocksTotal),
		KvBlocksFree: int32(st.BlocksFree), KvBlockSize: int32(st.BlockSize), Preemptions: st.Preemptions, Steps: st.Steps, GeneratedTokens: st.Tokens,
		StepSeconds: st.StepTime.Seconds(), CommSeconds: st.Comm.Seconds(),
		ExchangeBytes: st.SentBytes, StepTokens: st.StepTokens}
	switch {
	case !info.Leader:
		info.NotReadyReason = "standby coordinator (leader: " + info.LeaderAddress + ")"
	case len(c.router.Replicas()) == 0:
		info.NotReadyReason = fmt.Sprintf("no replica ready (%d workers registered)", len(ws))
	default:
		info.Ready = true
	}
	return info, nil
}

// ExpertLoad reports (and, when asked, evens out) the expert load of the
// expert-parallel replicas.
func (s *GeneratorService) ExpertLoad(ctx context.Context, req *pb.ExpertLoadRequest) (*pb.ExpertLoadResponse, error) {
	if err := s.serving(); err != nil {
		return nil, err
	}
	c := s.c
	if !c.cfg.IsMoE() {
		return nil, status.Errorf(codes.FailedPrecondition, "the model (%s) has no experts", c.cfg.ModelType)
	}
	redundant := -1
	if req.RedundantExperts != nil {
		redundant = int(*req.RedundantExperts)
		if redundant < 0 || redundant > c.cfg.NumExperts {
			return nil, invalid("redundant_experts", "%d is outside [0, %d]", redundant, c.cfg.NumExperts)
		}
	}
	reps, err := c.ExpertLoad(ctx, req.Rebalance, redundant)
	switch {
	case errors.Is(err, errBadRequest):
		return nil, invalid("redundant_experts", "%v", err)
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "expert load: %v", err)
	}
	return &pb.ExpertLoadResponse{Replicas: reps}, nil
}

// HealthCheck runs a one-token greedy generation end to end.
func (s *GeneratorService) HealthCheck(ctx context.Context, _ *pb.HealthCheckRequest) (*pb.HealthCheckResponse, error) {
	if err := s.serving(); err != nil {
		return &pb.HealthCheckResponse{Healthy: false, Message: status.Convert(err).Message()}, nil
	}
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r := &routing.Request{ID: fmt.Sprintf("health-%d", requestIDs.Add(1)), Prompt: []int32{0}, MaxTokens: 1, Logprobs: -1,
		Sampling: sampling.Params{TopP: 1, RepetitionPenalty: 1}}
	stream, err := s.c.router.Submit(r)
	if err != nil {
		return &pb.HealthCheckResponse{Healthy: false, Message: err.Error()}, nil
	}
	for {
		ev, err := stream.Recv(ctx)
		if err != nil {
			s.c.router.AbortStream(stream)
			return &pb.HealthCheckResponse{Healthy: false, Message: "generation did not finish: " + err.Error()}, nil
		}
		if ev.Done {
			ms := float64(time.Since(t0).Microseconds()) / 1000
			if ev.Err != nil || ev.Finish != "length" {
				return &pb.HealthCheckResponse{Healthy: false, Message: fmt.Sprintf("generation ended with %s: %v", ev.Finish, ev.Err), LatencyMs: ms}, nil
			}
			return &pb.HealthCheckResponse{Healthy: true, Message: "generated one token", LatencyMs: ms}, nil
		}
	}
}

// DefaultDrainTimeout is a Drain's timeout when the request names none.
const DefaultDrainTimeout = 120 * time.Second

// Drain takes a worker out gracefully (pkg/control decides; see
// control.DrainRequested).
func (s *GeneratorService) Drain(ctx context.Context, req *pb.DrainRequest) (*pb.DrainResponse, error) {
	if err := s.serving(); err != nil {
		return nil, err
	}
	if req.WorkerId == "" {
		return nil, invalid("worker_id", "empty")
	}
	timeout := DefaultDrainTimeout
	if req.TimeoutSeconds != nil {
		t := *req.TimeoutSeconds
		if math.IsNaN(t) || t <= 0 || t > 7*24*3600 {
			return nil, invalid("timeout_seconds", "%v is outside (0, 604800]", t)
		}
		timeout = time.Duration(t * float64(time.Second))
	}
	a, err := s.c.Drain(ctx, req.WorkerId, timeout, req.Force)
	switch {
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "drain: %v", err)
	case a.NotFound:
		return nil, status.Errorf(codes.NotFound, "worker_id: %s", a.Err)
	case a.Err != "":
		return nil, status.Errorf(codes.FailedPrecondition, "drain refused: %s", a.Err)
	}
	out := &pb.DrainResponse{State: "draining", ReplicaWorkers: a.Workers}
	if a.Gen != 0 {
		out.Replica = control.Key(a.Gen)
	} else {
		out.State = "drained"
	}
	return out, nil
}
