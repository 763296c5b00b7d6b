package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/qwenfleet/qwenfleet/pkg/bench"
	"github.com/qwenfleet/qwenfleet/pkg/grpccode"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// httpBench sends bench's requests through the coordinator's
// OpenAI-compatible HTTP API (`qwenctl bench --http`): the same prompts as
// gRPC, as a streamed /v1/completions (token ids or text) or
// /v1/chat/completions (messages), with stream_options include_usage and
// continuous_usage_stats, so that every chunk says how many tokens it
// carried and the report is the gRPC run's, comparable line by line, and
// with return_token_ids, so that the records hold the generated ids as the
// gRPC run's do.
// Failures are recorded by the gRPC code name the error's code field (or,
// without one, the HTTP status) stands for.
type httpBench struct {
	client *http.Client
	base   string // scheme://host:port
	key    string
	model  string
}

func newHTTPBench(addr string, tlsCfg *tls.Config, key string, conns int) *httpBench {
	scheme := "http"
	if tlsCfg != nil {
		scheme = "https"
	}
	tr := &http.Transport{TLSClientConfig: tlsCfg, MaxIdleConns: conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: time.Minute}
	return &httpBench{client: &http.Client{Transport: tr}, base: scheme + "://" + addr, key: key}
}

// modelInfo reads /v1/models into what bench needs of GetModelInfo.
func (h *httpBench) modelInfo(ctx context.Context) (*pb.ModelInfo, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.base+"/v1/models", nil)
	if err != nil {
		return nil, err
	}
	h.auth(req)
	res, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if res.StatusCode != http.StatusOK {
		code, msg := httpFailure(res.StatusCode, b)
		return nil, fmt.Errorf("GET /v1/models: %d %s: %s", res.StatusCode, code, msg)
	}
	var list struct {
		Data []struct {
			ID           string  `json:"id"`
			MaxModelLen  int32   `json:"max_model_len"`
			VocabSize    int32   `json:"vocab_size"`
			EOSTokenIDs  []int32 `json:"eos_token_ids"`
			HasTokenizer bool    `json:"has_tokenizer"`
		} `json:"data"`
	}
	if err := json.Unmarshal(b, &list); err != nil || len(list.Data) == 0 {
		return nil, fmt.Errorf("GET /v1/models: no model in %.200s", b)
	}
	m := list.Data[0]
	if m.VocabSize == 0 {
		return nil, fmt.Errorf("GET /v1/models: %s has no vocab_size (not a qwenfleet coordinator?)", m.ID)
	}
	h.model = m.ID
	return &pb.ModelInfo{Name: m.ID, VocabSize: m.VocabSize, MaxContext: m.MaxModelLen, EosTokenIds: m.EOSTokenIDs, HasTokenizer: m.HasTokenizer}, nil
}

func (h *httpBench) auth(req *http.Request) {
	if h.key != "" {
		req.Header.Set("Authorization", "Bearer "+h.key)
	}
}

// sseChunk is what bench reads of a streamed chunk.
type sseChunk struct {
	Choices []struct {
		TokenIDs []int32 `json:"token_ids"` // return_token_ids
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *oaiErrorBody `json:"error"`
}

type oaiErrorBody struct {
	Message string `json:"message"`
	Code    any    `json:"code"`
}

// stream runs prompt p into rec (times are offsets from t0); it returns
// the gRPC code name of a failure, or "" once the stream's [DONE] came.
func (h *httpBench) stream(ctx context.Context, p bench.Prompt, temperature float32, ignoreEOS bool, t0 time.Time, rec *bench.Request) string {
	body := map[string]any{"model": h.model, "max_tokens": p.MaxTokens, "temperature": temperature, "ignore_eos": ignoreEOS, "stream": true,
		"stream_options": map[string]bool{"include_usage": true, "continuous_usage_stats": true}, "return_token_ids": true}
	path := "/v1/completions"
	switch {
	case p.TokenIDs != nil:
		body["prompt"] = p.TokenIDs
	case p.Messages != nil:
		path, body["messages"] = "/v1/chat/completions", p.Messages
	default:
		body["prompt"] = p.Text
	}
	raw, err := json.Marshal(body)
	if err != nil {
		return codes.Internal.String()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.base+path, bytes.NewReader(raw))
	if err != nil {
		return codes.Internal.String()
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	h.auth(req)
	fail := func(err error) string {
		rec.End = time.Since(t0)
		if ctx.Err() != nil || errors.Is(err, context.Canceled) {
			return codes.Canceled.String()
		}
		return codes.Unavailable.String() // no connection, or the stream broke before [DONE]
	}
	res, err := h.client.Do(req)
	if err != nil {
		return fail(err)
	}
	defer res.Body.Close()
	rec.ID = res.Header.Get("X-Request-Id")
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 1<<20))
		rec.End = time.Since(t0)
		code, _ := httpFailure(res.StatusCode, b)
		return code
	}
	rd := bufio.NewReaderSize(res.Body, 64<<10)
	seen := 0
	for {
		line, err := rd.ReadBytes('\n')
		if err != nil {
			return fail(err)
		}
		data, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte("data: "))
		if !ok {
			continue // blank lines between events, comments
		}
		now := time.Since(t0)
		rec.End = now
		if string(data) == "[DONE]" {
			return ""
		}
		var ck sseChunk
		if err := json.Unmarshal(data, &ck); err != nil {
			return codes.Internal.String()
		}
		if ck.Error != nil {
			return codeFromField(ck.Error.Code, codes.Internal)
		}
		for _, c := range ck.Choices { // one: bench asks for n = 1
			rec.OutputIDs = append(rec.OutputIDs, c.TokenIDs...)
		}
		if ck.Usage == nil {
			continue
		}
		if len(ck.Choices) == 0 { // the last chunk: the request's usage
			rec.PromptTokens, rec.OutputTokens = ck.Usage.PromptTokens, ck.Usage.CompletionTokens
			continue
		}
		if n := ck.Usage.CompletionTokens - seen; n > 0 {
			rec.Chunks = append(rec.Chunks, bench.Chunk{At: now, Tokens: n})
			seen = ck.Usage.CompletionTokens
			rec.OutputTokens = seen
		}
	}
}

// httpFailure is the gRPC code name and message of an HTTP error response.
func httpFailure(statusCode int, body []byte) (string, string) {
	var e struct {
		Error *oaiErrorBody `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error != nil {
		return codeFromField(e.Error.Code, grpccode.OfHTTPStatus(statusCode)), e.Error.Message
	}
	return grpccode.OfHTTPStatus(statusCode).String(), strings.TrimSpace(string(body))
}

// codeFromField reads the error's code field: the server's gRPC code in
// snake case (resource_exhausted), or OpenAI's codes it uses.
func codeFromField(v any, fallback codes.Code) string {
	s, _ := v.(string)
	switch s {
	case "model_not_found":
		return codes.NotFound.String()
	case "invalid_api_key":
		return codes.Unauthenticated.String()
	}
	if c, ok := grpccode.BySnake(s); ok {
		return c.String()
	}
	return fallback.String()
}
