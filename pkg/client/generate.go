package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/grpccode"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// Result is everything a Generate call received.
type Result struct {
	// RequestID is the request's id: the caller's, or the one Generate
	// chose.
	RequestID string
	// TokenIDs are all generated token ids, in order, each once (also
	// across resumes).
	TokenIDs []int32
	// Text is all the generated text.
	Text string
	// Logprobs are the chunks' logprobs (one per token when the request
	// asked for logprobs).
	Logprobs []*pb.TokenLogprob
	// Usage is the last usage received: the final message's once it came.
	Usage *pb.Usage
	// Complete is the final message; nil when the call failed.
	Complete *pb.GenerateComplete
	// Resumes counts the times the request was sent again with resume.
	Resumes int
	// Breaks are the stream's breaks, in order.
	Breaks []Break
}

// Break is one interruption of a Generate stream: from the failure that
// broke it to the first token that arrived after it.
type Break struct {
	At       time.Time // when the stream broke
	Err      error     // how it broke
	Received int       // generated tokens received before it
	// Retries counts the sends after the first one that failed as well
	// (finding the new leader takes some).
	Retries int
	// Resumed is when the first token after the break arrived; zero when
	// none did (the request ended without another token, or failed).
	Resumed time.Time
}

// Gap is the time from the break to the first token after it (0 when
// none came).
func (b Break) Gap() time.Duration {
	if b.Resumed.IsZero() {
		return 0
	}
	return b.Resumed.Sub(b.At)
}

// NewRequestID returns a random request id: 16 random bytes in hex.
func NewRequestID() string {
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// Generate sends req to the leader and streams its chunks to onChunk (nil:
// none), in order, as they arrive; it returns once the final message came.
// When the stream breaks it resumes the request (see the package doc), so
// onChunk sees every token and every byte of text once. An error from
// onChunk ends the call with that error.
//
// req is not modified: Generate sends a copy, with a request id from
// NewRequestID when req has none. req.Resume must be nil (Generate sets it).
//
// The Result is never nil: on an error it holds what was received.
func (c *Client) Generate(ctx context.Context, req *pb.GenerateRequest, onChunk func(*pb.GenerateChunk) error) (*Result, error) {
	req = proto.Clone(req).(*pb.GenerateRequest)
	if req.RequestId == "" {
		req.RequestId = NewRequestID()
	}
	g := &generation{res: &Result{RequestID: req.RequestId}, onChunk: onChunk, open: -1}
	if req.Resume != nil {
		return g.res, status.Error(codes.InvalidArgument, "resume: set by the client library itself on a retry; leave it empty")
	}
	r := c.newRetrier()
	g.r = r
	sent := false
	for {
		addr, err := c.Leader(ctx)
		if err == nil {
			if sent {
				req.Resume = &pb.Resume{TokenIds: slices.Clone(g.res.TokenIDs), TextBytes: proto.Int64(int64(g.text.Len()))}
				g.res.Resumes++
			}
			var stub pb.GeneratorClient
			if stub, err = c.Stub(addr); err == nil {
				sent = true
				var done bool
				done, err = g.stream(ctx, stub, req)
				switch {
				case done:
					return g.result(), nil
				case g.stop != nil:
					return g.result(), g.stop
				}
			}
			if !retryable(err) {
				return g.result(), c.ctxErr(ctx, err)
			}
			c.failed(addr, err)
			g.broke(err, sent)
		} else if !retryable(err) {
			return g.result(), c.ctxErr(ctx, err)
		}
		if err := r.next(ctx, err); err != nil {
			return g.result(), err
		}
	}
}

// generation is the state of one Generate call across its streams.
type generation struct {
	res     *Result
	text    strings.Builder
	onChunk func(*pb.GenerateChunk) error
	r       *retrier
	open    int   // index of the break not yet resumed, -1: none
	stop    error // onChunk's error
}

func (g *generation) result() *Result {
	g.res.Text = g.text.String()
	return g.res
}

// broke records a failed send: a new break, or another retry of the open
// one. Failures before the request was first sent are no break.
func (g *generation) broke(err error, sent bool) {
	switch {
	case !sent:
	case g.open >= 0:
		g.res.Breaks[g.open].Retries++
	default:
		g.open = len(g.res.Breaks)
		g.res.Breaks = append(g.res.Breaks, Break{At: time.Now(), Err: err, Received: len(g.res.TokenIDs)})
	}
}

// stream runs one send of req on stub. It returns true once the final
// message came; otherwise the failure (a broken stream is UNAVAILABLE),
// or g.stop is set.
func (g *generation) stream(ctx context.Context, stub pb.GeneratorClient, req *pb.GenerateRequest) (bool, error) {
	sctx, cancel := context.WithCancel(ctx) // ends the stream however this returns
	defer cancel()
	st, err := stub.Generate(sctx, req)
	if err != nil {
		return false, brokenStream(ctx, err)
	}
	for {
		if err := ctx.Err(); err != nil { // Recv may still return what was buffered
			return false, err
		}
		resp, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return false, status.Error(codes.Unknown, "client: the stream ended without a complete message")
		}
		if err != nil {
			return false, brokenStream(ctx, err)
		}
		switch m := resp.Response.(type) {
		case *pb.GenerateResponse_Chunk:
			ch := m.Chunk
			if len(ch.TokenIds) > 0 {
				g.res.TokenIDs = append(g.res.TokenIDs, ch.TokenIds...)
				if g.open >= 0 {
					g.res.Breaks[g.open].Resumed = time.Now()
					g.open = -1
				}
				g.r.progress()
			}
			g.text.WriteString(ch.Text)
			g.res.Logprobs = append(g.res.Logprobs, ch.Logprobs...)
			if ch.Usage != nil {
				g.res.Usage = ch.Usage
			}
			if g.onChunk != nil {
				if err := g.onChunk(ch); err != nil {
					g.stop = err
					return false, err
				}
			}
		case *pb.GenerateResponse_Error:
			return false, status.Error(codeOf(m.Error.Code), m.Error.Message)
		case *pb.GenerateResponse_Complete:
			g.res.Complete = m.Complete
			if m.Complete.Usage != nil {
				g.res.Usage = m.Complete.Usage
			}
			return true, nil
		}
	}
}

// brokenStream classifies a Generate call's or Recv's error: a transport
// that failed under the stream (CANCELED the caller did not cause, a
// truncated frame) is UNAVAILABLE like a coordinator that went away; the
// caller's ctx ending is its error; any other status is itself.
func brokenStream(ctx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case status.Code(err) == codes.Canceled, errors.Is(err, io.ErrUnexpectedEOF):
		return status.Errorf(codes.Unavailable, "client: stream broken: %s", describe(err))
	}
	return err
}

// codeOf is the code a GenerateError names ("Unavailable", ...); Unknown
// for a name that is none.
func codeOf(name string) codes.Code {
	if c, ok := grpccode.ByName(name); ok && c != codes.OK {
		return c
	}
	return codes.Unknown
}
