package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/grpccode"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// The OpenAI-compatible HTTP API (--http-listen) is a thin adapter over
// GeneratorService: every choice of a completion is one Generate call of
// the service, through an in-process stream, so validation, API keys and
// request ownership, per-key stream limits, the queue, the metrics and the
// abort of a request whose client went away are the gRPC API's own. What
// is here turns OpenAI's JSON into a GenerateRequest (and refuses what it
// cannot honour, naming the field), and Generate's messages into OpenAI's
// shapes, streamed as server-sent events or collected into one body.

// DefaultHTTPListen is --http-listen's default: the no-flag demo serves
// the HTTP API there beside gRPC on 127.0.0.1:50051.
const DefaultHTTPListen = "127.0.0.1:8000"

// Limits of the HTTP API.
const (
	// MaxChoices bounds the generations of one HTTP request: prompts × n
	// (each is a Generate stream, counted against the key's stream limit).
	MaxChoices = 16
	// maxHTTPBody bounds a request body: 1 MiB of text (MaxInputBytes)
	// escaped into JSON, with room to spare.
	maxHTTPBody = 8 << 20
)

// httpMetricsMethod is the "method" /metrics is authorized as: it is no
// user method, so it needs an admin key (methodAccess).
const httpMetricsMethod = "GET /metrics"

// NewOpenAIHandler serves the OpenAI-compatible API of s: POST
// /v1/completions and /v1/chat/completions (streamed or not), GET
// /v1/models, GET /health (a one-token generation, as HealthCheck) and GET
// /metrics (the coordinator's Prometheus registry; an admin key when auth
// has keys). With auth's keys every path needs "Authorization: Bearer KEY",
// with the gRPC API's roles; a nil auth (or nil Keys) checks nothing.
func NewOpenAIHandler(s *GeneratorService, auth *PublicAuth) http.Handler {
	h := &openAIHandler{s: s, auth: auth}
	reg := s.c.Metrics().Registry
	h.metrics = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/completions", h.post(false))
	mux.HandleFunc("/v1/chat/completions", h.post(true))
	mux.HandleFunc("/v1/models", h.models)
	mux.HandleFunc("/v1/models/{id...}", h.models)
	mux.HandleFunc("/health", h.health)
	mux.HandleFunc("/metrics", h.serveMetrics)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeOAIError(w, http.StatusNotFound, oaiError{Message: fmt.Sprintf("no such path: %s %s", r.Method, r.URL.Path), Type: "invalid_request_error"})
	})
	return mux
}

type openAIHandler struct {
	s       *GeneratorService
	auth    *PublicAuth
	metrics http.Handler
}

// authorize checks r's API key for method (a gRPC full method name, or
// httpMetricsMethod) as the gRPC interceptors do; the context carries the
// caller (CallerFrom).
func (h *openAIHandler) authorize(r *http.Request, method string) (context.Context, error) {
	ctx := r.Context()
	if h.auth == nil || h.auth.Keys == nil {
		return ctx, nil
	}
	md := metadata.MD{}
	for _, v := range r.Header.Values("Authorization") {
		md.Append("authorization", v)
	}
	mctx := metadata.NewIncomingContext(ctx, md)
	actx, err := h.auth.authenticate(mctx, method)
	if _, ok, _ := bearerKey(mctx); err != nil && status.Code(err) == codes.Unauthenticated && !ok {
		// No key, or a malformed header: the same refusal in HTTP's words.
		return nil, status.Error(codes.Unauthenticated, `this server requires an API key: send exactly one "Authorization: Bearer <API key>" header`)
	}
	return actx, err
}

func (h *openAIHandler) method(w http.ResponseWriter, r *http.Request, want string) bool {
	if r.Method == want || want == http.MethodGet && r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", want)
	writeOAIError(w, http.StatusMethodNotAllowed, oaiError{Message: fmt.Sprintf("%s %s: use %s", r.Method, r.URL.Path, want), Type: "invalid_request_error"})
	return false
}

// oaiModel is an entry of /v1/models: OpenAI's fields, vLLM's
// max_model_len, and what a client needs to make token-id prompts.
type oaiModel struct {
	ID           string  `json:"id"`
	Object       string  `json:"object"`
	Created      int64   `json:"created"`
	OwnedBy      string  `json:"owned_by"`
	Root         string  `json:"root"`
	MaxModelLen  int     `json:"max_model_len"`
	VocabSize    int     `json:"vocab_size"`
	EOSTokenIDs  []int32 `json:"eos_token_ids"`
	HasTokenizer bool    `json:"has_tokenizer"`
}

func (h *openAIHandler) models(w http.ResponseWriter, r *http.Request) {
	if !h.method(w, r, http.MethodGet) {
		return
	}
	if _, err := h.authorize(r, pb.Generator_GetModelInfo_FullMethodName); err != nil {
		writeStatusError(w, err, nil)
		return
	}
	c := h.s.c
	m := oaiModel{ID: c.opts.ModelName, Object: "model", Created: c.started.Unix(), OwnedBy: "qwenfleet", Root: c.opts.ModelName,
		MaxModelLen: c.cfg.MaxContext(), VocabSize: c.cfg.VocabSize, EOSTokenIDs: []int32{}, HasTokenizer: c.tok != nil}
	for _, id := range c.eosIDs() {
		if !slices.Contains(m.EOSTokenIDs, id) {
			m.EOSTokenIDs = append(m.EOSTokenIDs, id)
		}
	}
	if id := r.PathValue("id"); id != "" {
		if id != c.opts.ModelName {
			writeOAIError(w, http.StatusNotFound, oaiError{Message: fmt.Sprintf("model: %q is not served here (this cluster serves %q)", id, c.opts.ModelName),
				Type: "invalid_request_error", Param: "model", Code: "model_not_found"})
			return
		}
		writeJSON(w, http.StatusOK, m)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []oaiModel{m}})
}

func (h *openAIHandler) health(w http.ResponseWriter, r *http.Request) {
	if !h.method(w, r, http.MethodGet) {
		return
	}
	ctx, err := h.authorize(r, pb.Generator_HealthCheck_FullMethodName)
	if err != nil {
		writeStatusError(w, err, nil)
		return
	}
	res, _ := h.s.HealthCheck(ctx, &pb.HealthCheckRequest{}) // never an error
	code := http.StatusOK
	if !res.Healthy {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, map[string]any{"healthy": res.Healthy, "message": res.Message, "latency_ms": res.LatencyMs})
}

func (h *openAIHandler) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if !h.method(w, r, http.MethodGet) {
		return
	}
	if _, err := h.authorize(r, httpMetricsMethod); err != nil {
		writeStatusError(w, err, nil)
		return
	}
	h.metrics.ServeHTTP(w, r)
}

// Requests.

type oaiStreamOptions struct {
	IncludeUsage bool `json:"include_usage"`
	// ContinuousUsageStats (vLLM's) puts the choice's running usage in
	// every chunk: how `qwenctl bench --http` counts tokens.
	ContinuousUsageStats bool `json:"continuous_usage_stats"`
}

// oaiCommon are the fields both endpoints take.
type oaiCommon struct {
	Model            string            `json:"model"`
	Temperature      *float64          `json:"temperature"`
	TopP             *float64          `json:"top_p"`
	MaxTokens        *int64            `json:"max_tokens"`
	Stop             json.RawMessage   `json:"stop"`
	Seed             *int64            `json:"seed"`
	N                *int64            `json:"n"`
	PresencePenalty  *float64          `json:"presence_penalty"`
	FrequencyPenalty *float64          `json:"frequency_penalty"`
	User             string            `json:"user"`
	Stream           bool              `json:"stream"`
	StreamOptions    *oaiStreamOptions `json:"stream_options"`
	LogitBias        json.RawMessage   `json:"logit_bias"`
	// vLLM's extras.
	TopK              *int64   `json:"top_k"`
	MinP              *float64 `json:"min_p"`
	RepetitionPenalty *float64 `json:"repetition_penalty"`
	IgnoreEOS         bool     `json:"ignore_eos"`
	StopTokenIDs      []int64  `json:"stop_token_ids"`
	MinTokens         *int64   `json:"min_tokens"`
	SkipSpecialTokens *bool    `json:"skip_special_tokens"`
	ReturnTokenIDs    bool     `json:"return_token_ids"`
}

type completionRequest struct {
	oaiCommon
	Prompt   json.RawMessage `json:"prompt"`
	Logprobs *int64          `json:"logprobs"`
	Echo     bool            `json:"echo"`
	BestOf   *int64          `json:"best_of"`
	Suffix   *string         `json:"suffix"`
}

type chatRequest struct {
	oaiCommon
	Messages            []chatMessageIn `json:"messages"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"`
	Logprobs            *bool           `json:"logprobs"`
	TopLogprobs         *int64          `json:"top_logprobs"`
	AddGenerationPrompt *bool           `json:"add_generation_prompt"`
	// What this server cannot honour: refused when given (not null,
	// not empty).
	Tools            json.RawMessage `json:"tools"`
	ToolChoice       json.RawMessage `json:"tool_choice"`
	Functions        json.RawMessage `json:"functions"`
	FunctionCall     json.RawMessage `json:"function_call"`
	ResponseFormat   json.RawMessage `json:"response_format"`
	Audio            json.RawMessage `json:"audio"`
	Modalities       json.RawMessage `json:"modalities"`
	Prediction       json.RawMessage `json:"prediction"`
	WebSearchOptions json.RawMessage `json:"web_search_options"`
	ReasoningEffort  json.RawMessage `json:"reasoning_effort"`
}

type chatMessageIn struct {
	Role         string          `json:"role"`
	Content      json.RawMessage `json:"content"`
	ToolCalls    json.RawMessage `json:"tool_calls"`
	FunctionCall json.RawMessage `json:"function_call"`
	Audio        json.RawMessage `json:"audio"`
}

// given says whether a JSON value was sent: present, not null, not an
// empty array or object.
func given(raw json.RawMessage) bool {
	s := string(bytes.TrimSpace(raw))
	return s != "" && s != "null" && s != "[]" && s != "{}"
}

// badField is an INVALID_ARGUMENT naming field, as request() makes them.
func badField(field, format string, args ...any) error { return invalid(field, format, args...) }

func int32Field(field string, v *int64) (*int32, error) {
	if v == nil {
		return nil, nil
	}
	if *v < math.MinInt32 || *v > math.MaxInt32 {
		return nil, badField(field, "%d is out of range", *v)
	}
	x := int32(*v)
	return &x, nil
}

func float32Field(v *float64) *float32 {
	if v == nil {
		return nil
	}
	x := float32(*v)
	return &x
}

// plan is an HTTP request made into Generate requests: one per prompt
// (prompts × n choices) and how to answer.
type plan struct {
	chat      bool
	prompts   []*pb.GenerateRequest
	n         int
	stream    bool
	usage     bool // include_usage
	contUsage bool // continuous_usage_stats
	logprobs  bool // report logprobs
	returnIDs bool
	// rename maps request()'s field names to this request's (OpenAI's).
	rename func(field string) string
}

// common fills req from the shared fields.
func (c *oaiCommon) common(req *pb.GenerateRequest, p *plan) error {
	req.Model = c.Model
	req.Temperature = float32Field(c.Temperature)
	req.TopP = float32Field(c.TopP)
	req.MinP = float32Field(c.MinP)
	req.RepetitionPenalty = float32Field(c.RepetitionPenalty)
	req.PresencePenalty = float32Field(c.PresencePenalty)
	req.FrequencyPenalty = float32Field(c.FrequencyPenalty)
	req.Seed = c.Seed
	req.IgnoreEos = c.IgnoreEOS
	req.SkipSpecialTokens = c.SkipSpecialTokens
	var err error
	if req.MaxTokens, err = int32Field("max_tokens", c.MaxTokens); err != nil {
		return err
	}
	if req.TopK, err = int32Field("top_k", c.TopK); err != nil {
		return err
	}
	if req.MinTokens, err = int32Field("min_tokens", c.MinTokens); err != nil {
		return err
	}
	for i, id := range c.StopTokenIDs {
		v, err := int32Field(fmt.Sprintf("stop_token_ids[%d]", i), &id)
		if err != nil {
			return err
		}
		req.StopTokenIds = append(req.StopTokenIds, *v)
	}
	if given(c.Stop) {
		var one string
		if err := json.Unmarshal(c.Stop, &one); err == nil {
			req.Stop = []string{one}
		} else if err := json.Unmarshal(c.Stop, &req.Stop); err != nil {
			return badField("stop", "a string or an array of strings")
		}
	}
	if given(c.LogitBias) {
		return badField("logit_bias", "not supported by this server")
	}
	p.n = 1
	if c.N != nil {
		if *c.N < 1 || *c.N > MaxChoices {
			return badField("n", "%d is outside [1, %d]", *c.N, MaxChoices)
		}
		p.n = int(*c.N)
	}
	p.stream = c.Stream
	if c.StreamOptions != nil {
		if !c.Stream {
			return badField("stream_options", "only allowed with stream: true")
		}
		p.usage, p.contUsage = c.StreamOptions.IncludeUsage, c.StreamOptions.ContinuousUsageStats
	}
	p.returnIDs = c.ReturnTokenIDs
	return nil
}

// completionPlan checks a /v1/completions body.
func completionPlan(body []byte) (*plan, error) {
	var cr completionRequest
	if err := decodeBody(body, &cr); err != nil {
		return nil, err
	}
	p := &plan{}
	base := &pb.GenerateRequest{}
	if err := cr.common(base, p); err != nil {
		return nil, err
	}
	switch {
	case cr.Echo:
		return nil, badField("echo", "not supported by this server")
	case cr.Suffix != nil && *cr.Suffix != "":
		return nil, badField("suffix", "not supported by this server")
	case cr.BestOf != nil && *cr.BestOf != 1 && *cr.BestOf != int64(p.n):
		return nil, badField("best_of", "only best_of = n is supported (got %d with n = %d)", *cr.BestOf, p.n)
	}
	if cr.Logprobs != nil {
		v, err := int32Field("logprobs", cr.Logprobs)
		if err != nil {
			return nil, err
		}
		base.Logprobs, p.logprobs = v, true
	}
	prompts, err := parsePrompt(cr.Prompt)
	if err != nil {
		return nil, err
	}
	if len(prompts)*p.n > MaxChoices {
		return nil, badField("n", "%d prompts × n = %d make %d choices (at most %d)", len(prompts), p.n, len(prompts)*p.n, MaxChoices)
	}
	for _, in := range prompts {
		req := cloneReq(base)
		switch x := in.(type) {
		case string:
			req.Input = &pb.GenerateRequest_Text{Text: x}
		case []int32:
			req.Input = &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: x}}
		}
		p.prompts = append(p.prompts, req)
	}
	p.rename = func(f string) string {
		switch {
		case f == "text" || f == "input" || f == "prompt" || f == "token_ids":
			return "prompt"
		case strings.HasPrefix(f, "token_ids["):
			return "prompt" + strings.TrimPrefix(f, "token_ids")
		}
		return f
	}
	return p, nil
}

// parsePrompt reads a completion's prompt: a string, an array of strings,
// an array of token ids, or an array of arrays of token ids; each element
// is a string or an []int32.
func parsePrompt(raw json.RawMessage) ([]any, error) {
	if !given(raw) {
		if s := string(bytes.TrimSpace(raw)); s == "[]" {
			return nil, badField("prompt", "empty")
		}
		return nil, badField("prompt", "required: a string, an array of strings, or token ids")
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []any{one}, nil
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, badField("prompt", "a string, an array of strings, or token ids")
	}
	ids := func(v json.RawMessage) ([]int32, bool) {
		var xs []int64
		if json.Unmarshal(v, &xs) != nil {
			return nil, false
		}
		out := make([]int32, len(xs))
		for j, x := range xs {
			if x < math.MinInt32 || x > math.MaxInt32 {
				return nil, false
			}
			out[j] = int32(x)
		}
		return out, true
	}
	if x, ok := ids(raw); ok { // one prompt of token ids
		return []any{x}, nil
	}
	if len(items) > MaxChoices {
		return nil, badField("prompt", "%d prompts (at most %d)", len(items), MaxChoices)
	}
	out := make([]any, len(items))
	for i, it := range items {
		var s string
		if json.Unmarshal(it, &s) == nil {
			out[i] = s
			continue
		}
		x, ok := ids(it)
		if !ok {
			return nil, badField(fmt.Sprintf("prompt[%d]", i), "a string or an array of token ids")
		}
		out[i] = x
	}
	return out, nil
}

// chatPlan checks a /v1/chat/completions body.
func chatPlan(body []byte) (*plan, error) {
	var cr chatRequest
	if err := decodeBody(body, &cr); err != nil {
		return nil, err
	}
	p := &plan{chat: true}
	req := &pb.GenerateRequest{}
	if err := cr.common(req, p); err != nil {
		return nil, err
	}
	for _, f := range []struct {
		name string
		raw  json.RawMessage
	}{{"tools", cr.Tools}, {"functions", cr.Functions}, {"function_call", cr.FunctionCall}, {"audio", cr.Audio},
		{"prediction", cr.Prediction}, {"web_search_options", cr.WebSearchOptions}, {"reasoning_effort", cr.ReasoningEffort}} {
		if given(f.raw) {
			return nil, badField(f.name, "not supported by this server")
		}
	}
	if given(cr.ToolChoice) {
		var s string
		if json.Unmarshal(cr.ToolChoice, &s) != nil || s != "none" {
			return nil, badField("tool_choice", "not supported by this server (tools are not)")
		}
	}
	if given(cr.ResponseFormat) {
		var rf struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(cr.ResponseFormat, &rf) != nil || rf.Type != "text" {
			return nil, badField("response_format", "only {\"type\": \"text\"} is supported")
		}
	}
	if given(cr.Modalities) {
		var ms []string
		if json.Unmarshal(cr.Modalities, &ms) != nil || len(ms) != 1 || ms[0] != "text" {
			return nil, badField("modalities", "only [\"text\"] is supported")
		}
	}
	maxName := "max_tokens"
	if cr.MaxCompletionTokens != nil {
		v, err := int32Field("max_completion_tokens", cr.MaxCompletionTokens)
		if err != nil {
			return nil, err
		}
		req.MaxTokens, maxName = v, "max_completion_tokens"
	}
	switch {
	case cr.Logprobs != nil && *cr.Logprobs:
		req.Logprobs, p.logprobs = new(int32), true
		if cr.TopLogprobs != nil {
			if *cr.TopLogprobs < 0 || *cr.TopLogprobs > MaxLogprobs {
				return nil, badField("top_logprobs", "%d is outside [0, %d]", *cr.TopLogprobs, MaxLogprobs)
			}
			*req.Logprobs = int32(*cr.TopLogprobs)
		}
	case cr.TopLogprobs != nil:
		return nil, badField("top_logprobs", "needs logprobs: true")
	}
	if len(cr.Messages) == 0 {
		return nil, badField("messages", "required, and not empty")
	}
	if len(cr.Messages) > MaxChatMessages {
		return nil, badField("messages", "%d messages (at most %d)", len(cr.Messages), MaxChatMessages)
	}
	chat := &pb.ChatInput{AddGenerationPrompt: cr.AddGenerationPrompt}
	for i, m := range cr.Messages {
		field := fmt.Sprintf("messages[%d]", i)
		role := m.Role
		switch role {
		case "developer": // OpenAI's newer name for the system message
			role = "system"
		case "system", "user", "assistant":
		default:
			return nil, badField(field+".role", "%q is not system, user or assistant (tool and function messages are not supported)", m.Role)
		}
		for _, f := range []struct {
			name string
			raw  json.RawMessage
		}{{"tool_calls", m.ToolCalls}, {"function_call", m.FunctionCall}, {"audio", m.Audio}} {
			if given(f.raw) {
				return nil, badField(field+"."+f.name, "not supported by this server")
			}
		}
		content, err := messageContent(field+".content", m.Content)
		if err != nil {
			return nil, err
		}
		chat.Messages = append(chat.Messages, &pb.ChatMessage{Role: role, Content: content})
	}
	req.Input = &pb.GenerateRequest_Chat{Chat: chat}
	p.prompts = []*pb.GenerateRequest{req}
	p.rename = func(f string) string {
		switch {
		case f == "chat.messages" || f == "chat" || f == "prompt" || f == "input" || f == "text":
			return "messages"
		case strings.HasPrefix(f, "chat.messages["):
			return strings.TrimPrefix(f, "chat.")
		case f == "logprobs":
			return "top_logprobs"
		case f == "max_tokens":
			return maxName
		}
		return f
	}
	return p, nil
}

// messageContent is a message's text: a string, or an array of text
// parts (joined with newlines, as vLLM does); other parts are refused.
func messageContent(field string, raw json.RawMessage) (string, error) {
	if s := string(bytes.TrimSpace(raw)); s == "" || s == "null" {
		return "", badField(field, "required")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string  `json:"type"`
		Text *string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", badField(field, "a string or an array of text parts")
	}
	texts := make([]string, len(parts))
	for j, pt := range parts {
		if pt.Type != "text" || pt.Text == nil {
			return "", badField(fmt.Sprintf("%s[%d].type", field, j), "%q: only text parts are supported", pt.Type)
		}
		texts[j] = *pt.Text
	}
	return strings.Join(texts, "\n"), nil
}

// decodeBody reads OpenAI's JSON: unknown fields are ignored (as OpenAI
// does); a field of the wrong type is refused naming it.
func decodeBody(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			field := strings.TrimPrefix(te.Field, "oaiCommon.") // the embedded struct's name is no field
			return badField(field, "expected %s, got a JSON %s", te.Type, te.Value)
		}
		return badField("body", "not a JSON object: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return badField("body", "more than one JSON value")
	}
	return nil
}

func cloneReq(r *pb.GenerateRequest) *pb.GenerateRequest { return proto.Clone(r).(*pb.GenerateRequest) }

// post serves /v1/completions (chat false) and /v1/chat/completions.
func (h *openAIHandler) post(chat bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !h.method(w, r, http.MethodPost) {
			return
		}
		ctx, err := h.authorize(r, pb.Generator_Generate_FullMethodName)
		if err != nil {
			writeStatusError(w, err, nil)
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxHTTPBody))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				writeOAIError(w, http.StatusRequestEntityTooLarge, oaiError{Message: fmt.Sprintf("body: more than %d bytes", maxHTTPBody), Type: "invalid_request_error"})
				return
			}
			writeOAIError(w, http.StatusBadRequest, oaiError{Message: "body: " + err.Error(), Type: "invalid_request_error"})
			return
		}
		var p *plan
		if chat {
			p, err = chatPlan(body)
		} else {
			p, err = completionPlan(body)
		}
		if err != nil {
			writeStatusError(w, err, nil)
			return
		}
		h.run(ctx, w, p)
	}
}

// A run: the choices of one HTTP request, each a Generate call.

type oaiChoice struct {
	index  int
	prompt int
	req    *pb.GenerateRequest
	begun  bool // its first message arrived (it was admitted)
	text   strings.Builder
	ids    []int32
	lps    []*pb.TokenLogprob
	finish string
	usage  *pb.Usage
	offset int // text offset of the next token (completion logprobs)
	err    error
}

type oaiRun struct {
	h       *openAIHandler
	p       *plan
	w       http.ResponseWriter
	rc      *http.ResponseController
	id      string
	created int64
	model   string
	cancel  context.CancelFunc
	timeout time.Duration

	mu       sync.Mutex
	choices  []*oaiChoice
	waiting  int      // choices not yet begun
	buffered [][]byte // events held until every choice began
	started  bool     // the 200 and the event stream's headers were written
	closed   bool     // the handler took the writer back
	werr     error    // a write failed: the client is gone or does not read
}

var errRunClosed = errors.New("the HTTP response is closed")

func (h *openAIHandler) run(ctx context.Context, w http.ResponseWriter, p *plan) {
	c := h.s.c
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	prefix := "cmpl-"
	if p.chat {
		prefix = "chatcmpl-"
	}
	run := &oaiRun{h: h, p: p, w: w, rc: http.NewResponseController(w), id: prefix + randomHex(12), created: time.Now().Unix(),
		model: c.opts.ModelName, cancel: cancel, timeout: c.sendTimeout()}
	w.Header().Set("X-Request-Id", run.id)
	for pi, base := range p.prompts {
		for j := range p.n {
			req := cloneReq(base)
			req.RequestId = run.id
			if len(p.prompts)*p.n > 1 {
				req.RequestId = fmt.Sprintf("%s-%d", run.id, len(run.choices))
			}
			if j > 0 && req.Seed != nil { // each choice its own draw, reproducibly
				s := *req.Seed + int64(j)
				req.Seed = &s
			}
			run.choices = append(run.choices, &oaiChoice{index: len(run.choices), prompt: pi, req: req})
		}
	}
	run.waiting = len(run.choices)
	var wg sync.WaitGroup
	for _, ch := range run.choices {
		wg.Go(func() {
			err := h.s.Generate(ch.req, &choiceStream{ctx: ctx, run: run, ch: ch})
			run.mu.Lock()
			if err != nil && ch.err == nil {
				ch.err = err
			}
			if ch.err != nil && !ch.begun {
				cancel() // refused: the whole request is, and the others stop
			}
			run.mu.Unlock()
		})
	}
	wg.Wait()
	run.mu.Lock()
	defer run.mu.Unlock()
	run.closed = true
	defer run.rc.SetWriteDeadline(time.Time{}) // the connection may serve more requests
	if !run.started {
		// Refused before any byte went out: the first refusal is the answer.
		for _, ch := range run.choices {
			if ch.err != nil && status.Code(ch.err) != codes.Canceled {
				writeStatusError(w, ch.err, p.rename)
				return
			}
		}
		for _, ch := range run.choices {
			if ch.err != nil {
				writeStatusError(w, ch.err, p.rename)
				return
			}
		}
		if p.stream { // every choice began, but nothing was written: an empty stream
			if err := run.begin(); err != nil {
				return
			}
		} else {
			run.setDeadline()
			writeJSON(w, http.StatusOK, run.final())
			return
		}
	}
	if run.werr != nil {
		return
	}
	// The end of the event stream: errors of choices that failed after
	// they began, the usage, [DONE].
	var tail [][]byte
	for _, ch := range run.choices {
		if ch.err != nil && status.Code(ch.err) != codes.Canceled {
			e, _ := oaiErrorOf(ch.err, p.rename)
			tail = append(tail, sse(map[string]any{"error": e}))
		}
	}
	if p.usage {
		u := run.totalUsage()
		tail = append(tail, sse(run.chunk(nil, &u)))
	}
	tail = append(tail, []byte("data: [DONE]\n\n"))
	run.write(tail)
}

// choiceStream is the in-process stream one choice's Generate sends to.
type choiceStream struct {
	ctx context.Context
	run *oaiRun
	ch  *oaiChoice
}

func (s *choiceStream) Send(m *pb.GenerateResponse) error { return s.run.deliver(s.ch, m) }
func (s *choiceStream) Context() context.Context          { return s.ctx }
func (s *choiceStream) SetHeader(metadata.MD) error       { return nil }
func (s *choiceStream) SendHeader(metadata.MD) error      { return nil }
func (s *choiceStream) SetTrailer(metadata.MD)            {}
func (s *choiceStream) SendMsg(m any) error {
	r, ok := m.(*pb.GenerateResponse)
	if !ok {
		return fmt.Errorf("choiceStream: cannot send %T", m)
	}
	return s.Send(r)
}
func (s *choiceStream) RecvMsg(any) error { return io.EOF }

var _ grpc.ServerStreamingServer[pb.GenerateResponse] = (*choiceStream)(nil)

// deliver takes one Generate message of ch: it adds it to the choice, and,
// streaming, writes its events (held back until every choice began, so
// that a refusal of any is still the response's status).
func (r *oaiRun) deliver(ch *oaiChoice, m *pb.GenerateResponse) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errRunClosed
	}
	if r.werr != nil {
		return r.werr
	}
	first := !ch.begun
	if first {
		ch.begun = true
		r.waiting--
	}
	var events [][]byte
	if first && r.p.stream && r.p.chat {
		events = append(events, sse(r.chunk([]oaiChunkChoice{{Index: ch.index, Delta: &oaiDelta{Role: "assistant", Content: new(string)}}}, nil)))
	}
	switch x := m.Response.(type) {
	case *pb.GenerateResponse_Chunk:
		c := x.Chunk
		start := len(ch.lps)
		ch.text.WriteString(c.Text)
		ch.ids = append(ch.ids, c.TokenIds...)
		ch.lps = append(ch.lps, c.Logprobs...)
		if c.Usage != nil {
			ch.usage = c.Usage
		}
		if r.p.stream && (c.Text != "" || len(c.TokenIds) > 0 && (r.p.logprobs || r.p.contUsage || r.p.returnIDs)) {
			cc := oaiChunkChoice{Index: ch.index}
			if r.p.chat {
				cc.Delta = &oaiDelta{Content: &c.Text}
				if r.p.logprobs {
					cc.Logprobs = r.chatLogprobs(ch.lps[start:])
				}
			} else {
				cc.Text = &c.Text
				if r.p.logprobs {
					cc.Logprobs = r.completionLogprobs(ch, ch.lps[start:])
				}
			}
			if r.p.returnIDs {
				cc.TokenIDs = c.TokenIds
			}
			events = append(events, sse(r.chunk([]oaiChunkChoice{cc}, r.runningUsage(ch))))
		}
	case *pb.GenerateResponse_Complete:
		ch.finish = x.Complete.FinishReason
		if x.Complete.Usage != nil {
			ch.usage = x.Complete.Usage
		}
		if r.p.stream {
			cc := oaiChunkChoice{Index: ch.index, FinishReason: &ch.finish}
			if r.p.chat {
				cc.Delta = &oaiDelta{}
			} else {
				cc.Text = new(string)
			}
			events = append(events, sse(r.chunk([]oaiChunkChoice{cc}, r.runningUsage(ch))))
		}
	case *pb.GenerateResponse_Error:
		ch.err = status.Error(codeOf(x.Error.Code), x.Error.Message)
	}
	if !r.p.stream {
		return nil
	}
	if !r.started {
		r.buffered = append(r.buffered, events...)
		if r.waiting > 0 {
			return nil
		}
		if err := r.begin(); err != nil {
			return err
		}
		events, r.buffered = r.buffered, nil
	}
	return r.write(events)
}

// begin writes the event stream's headers.
func (r *oaiRun) begin() error {
	r.started = true
	hd := r.w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-cache")
	hd.Set("X-Accel-Buffering", "no")
	r.w.WriteHeader(http.StatusOK)
	return r.write(nil)
}

func (r *oaiRun) setDeadline() {
	r.rc.SetWriteDeadline(time.Now().Add(r.timeout)) // not every writer supports it
}

// write writes events and flushes them, within the send timeout (a client
// that does not read has its requests aborted, as on gRPC).
func (r *oaiRun) write(events [][]byte) error {
	if r.werr != nil {
		return r.werr
	}
	r.setDeadline()
	for _, e := range events {
		if _, err := r.w.Write(e); err != nil {
			r.werr = err
			r.cancel()
			return err
		}
	}
	if err := r.rc.Flush(); err != nil {
		r.werr = err
		r.cancel()
		return err
	}
	return nil
}

func sse(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil { // every value here marshals
		b, _ = json.Marshal(map[string]any{"error": oaiError{Message: err.Error(), Type: "server_error"}})
	}
	out := make([]byte, 0, len(b)+8)
	out = append(out, "data: "...)
	out = append(out, b...)
	return append(out, '\n', '\n')
}

// Responses.

type oaiUsage struct {
	PromptTokens        int               `json:"prompt_tokens"`
	CompletionTokens    int               `json:"completion_tokens"`
	TotalTokens         int               `json:"total_tokens"`
	PromptTokensDetails *oaiPromptDetails `json:"prompt_tokens_details,omitempty"`
}

// oaiPromptDetails is OpenAI's usage.prompt_tokens_details: the prompt
// tokens served from the prefix cache.
type oaiPromptDetails struct {
	CachedTokens int `json:"cached_tokens"`
}

type oaiDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type oaiChunkChoice struct {
	Index        int       `json:"index"`
	Text         *string   `json:"text,omitempty"`  // completions
	Delta        *oaiDelta `json:"delta,omitempty"` // chat
	Logprobs     any       `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
	TokenIDs     []int32   `json:"token_ids,omitempty"`
}

type oaiMessage struct {
	Role    string  `json:"role"`
	Content string  `json:"content"`
	Refusal *string `json:"refusal"`
}

type oaiChoiceOut struct {
	Index        int         `json:"index"`
	Text         *string     `json:"text,omitempty"`
	Message      *oaiMessage `json:"message,omitempty"`
	Logprobs     any         `json:"logprobs"`
	FinishReason string      `json:"finish_reason"`
	TokenIDs     []int32     `json:"token_ids,omitempty"`
}

type oaiResponse struct {
	ID      string         `json:"id"`
	Object  string         `json:"object"`
	Created int64          `json:"created"`
	Model   string         `json:"model"`
	Choices []oaiChoiceOut `json:"choices"`
	Usage   oaiUsage       `json:"usage"`
}

type oaiChunk struct {
	ID      string           `json:"id"`
	Object  string           `json:"object"`
	Created int64            `json:"created"`
	Model   string           `json:"model"`
	Choices []oaiChunkChoice `json:"choices"`
	Usage   *oaiUsage        `json:"usage,omitempty"`
}

// chunkWithNullUsage is a chunk with "usage": null, as OpenAI sends every
// chunk but the last when include_usage is set.
type chunkWithNullUsage struct {
	ID      string           `json:"id"`
	Object  string           `json:"object"`
	Created int64            `json:"created"`
	Model   string           `json:"model"`
	Choices []oaiChunkChoice `json:"choices"`
	Usage   *oaiUsage        `json:"usage"`
}

func (r *oaiRun) chunk(choices []oaiChunkChoice, u *oaiUsage) any {
	obj := "text_completion"
	if r.p.chat {
		obj = "chat.completion.chunk"
	}
	if choices == nil {
		choices = []oaiChunkChoice{}
	}
	if r.p.usage || r.p.contUsage {
		return chunkWithNullUsage{ID: r.id, Object: obj, Created: r.created, Model: r.model, Choices: choices, Usage: u}
	}
	return oaiChunk{ID: r.id, Object: obj, Created: r.created, Model: r.model, Choices: choices}
}

func usageOf(u *pb.Usage) oaiUsage {
	if u == nil {
		return oaiUsage{}
	}
	ou := oaiUsage{PromptTokens: int(u.PromptTokens), CompletionTokens: int(u.CompletionTokens), TotalTokens: int(u.TotalTokens)}
	if u.CachedTokens > 0 {
		ou.PromptTokensDetails = &oaiPromptDetails{CachedTokens: int(u.CachedTokens)}
	}
	return ou
}

// runningUsage is ch's usage so far, for continuous_usage_stats.
func (r *oaiRun) runningUsage(ch *oaiChoice) *oaiUsage {
	if !r.p.contUsage {
		return nil
	}
	u := usageOf(ch.usage)
	return &u
}

// totalUsage adds the choices up: each prompt's tokens once, every
// choice's completion tokens.
func (r *oaiRun) totalUsage() oaiUsage {
	var u oaiUsage
	seen := map[int]bool{}
	for _, ch := range r.choices {
		cu := usageOf(ch.usage)
		if !seen[ch.prompt] {
			seen[ch.prompt] = true
			u.PromptTokens += cu.PromptTokens
		}
		u.CompletionTokens += cu.CompletionTokens
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	return u
}

// final is the body of a request that did not stream.
func (r *oaiRun) final() oaiResponse {
	out := oaiResponse{ID: r.id, Object: "text_completion", Created: r.created, Model: r.model, Usage: r.totalUsage()}
	if r.p.chat {
		out.Object = "chat.completion"
	}
	for _, ch := range r.choices {
		c := oaiChoiceOut{Index: ch.index, FinishReason: ch.finish}
		text := ch.text.String()
		if r.p.chat {
			c.Message = &oaiMessage{Role: "assistant", Content: text}
			if r.p.logprobs {
				c.Logprobs = r.chatLogprobs(ch.lps)
			}
		} else {
			c.Text = &text
			if r.p.logprobs {
				ch.offset = 0
				c.Logprobs = r.completionLogprobs(ch, ch.lps)
			}
		}
		if r.p.returnIDs {
			c.TokenIDs = ch.ids
			if c.TokenIDs == nil {
				c.TokenIDs = []int32{}
			}
		}
		out.Choices = append(out.Choices, c)
	}
	sort.Slice(out.Choices, func(i, j int) bool { return out.Choices[i].Index < out.Choices[j].Index })
	return out
}

// Logprobs.

type oaiTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

type oaiTokenLogprob struct {
	Token       string          `json:"token"`
	Logprob     float64         `json:"logprob"`
	Bytes       []int           `json:"bytes"`
	TopLogprobs []oaiTopLogprob `json:"top_logprobs"`
}

type oaiChatLogprobs struct {
	Content []oaiTokenLogprob `json:"content"`
	Refusal *string           `json:"refusal"`
}

type oaiCompletionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []float64            `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// lpValue is a logprob JSON can carry (-Inf becomes vLLM's -9999).
func lpValue(v float32) float64 {
	if math.IsInf(float64(v), -1) || math.IsNaN(float64(v)) {
		return -9999
	}
	return float64(v)
}

// token is the text of one token (a model without a tokenizer:
// "token_id:N", as vLLM writes ids) and its bytes.
func (r *oaiRun) token(id int32) (string, []int) {
	tok := r.h.s.c.tok
	if tok == nil {
		return fmt.Sprintf("token_id:%d", id), []int{}
	}
	s, _ := tok.Decode([]int32{id}, false)
	raw := tok.TokenBytes(id)
	b := make([]int, len(raw))
	for i, x := range raw {
		b[i] = int(x)
	}
	return s, b
}

func (r *oaiRun) chatLogprobs(lps []*pb.TokenLogprob) *oaiChatLogprobs {
	out := &oaiChatLogprobs{Content: []oaiTokenLogprob{}}
	for _, lp := range lps {
		s, b := r.token(lp.TokenId)
		t := oaiTokenLogprob{Token: s, Logprob: lpValue(lp.Logprob), Bytes: b, TopLogprobs: []oaiTopLogprob{}}
		for _, top := range lp.Top {
			ts, tb := r.token(top.TokenId)
			t.TopLogprobs = append(t.TopLogprobs, oaiTopLogprob{Token: ts, Logprob: lpValue(top.Logprob), Bytes: tb})
		}
		out.Content = append(out.Content, t)
	}
	return out
}

func (r *oaiRun) completionLogprobs(ch *oaiChoice, lps []*pb.TokenLogprob) *oaiCompletionLogprobs {
	out := &oaiCompletionLogprobs{Tokens: []string{}, TokenLogprobs: []float64{}, TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
	for _, lp := range lps {
		s, _ := r.token(lp.TokenId)
		out.Tokens = append(out.Tokens, s)
		out.TokenLogprobs = append(out.TokenLogprobs, lpValue(lp.Logprob))
		top := map[string]float64{s: lpValue(lp.Logprob)} // the sampled token, as vLLM adds it
		for _, t := range lp.Top {
			ts, _ := r.token(t.TokenId)
			top[ts] = lpValue(t.Logprob)
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
		out.TextOffset = append(out.TextOffset, ch.offset)
		ch.offset += len(s)
	}
	return out
}

// Errors.

// oaiError is OpenAI's error object.
type oaiError struct {
	Message string `json:"message"`
	Type    string `json:"type"`
	Param   any    `json:"param"` // the field's name, or null
	Code    any    `json:"code"`  // a string, or null
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code = http.StatusInternalServerError
		b, _ = json.Marshal(map[string]any{"error": oaiError{Message: err.Error(), Type: "server_error"}})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

func writeOAIError(w http.ResponseWriter, code int, e oaiError) {
	writeJSON(w, code, map[string]any{"error": e})
}

// writeStatusError answers err (a gRPC status) with its HTTP status and
// OpenAI's error body; rename maps the field the message starts with to
// the request's own name for it.
func writeStatusError(w http.ResponseWriter, err error, rename func(string) string) {
	e, code := oaiErrorOf(err, rename)
	if code == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="qwenfleet"`)
	}
	writeOAIError(w, code, e)
}

// leadingField matches a message that starts with a field's name, as
// every INVALID_ARGUMENT of the service does.
var leadingField = regexp.MustCompile(`^([a-z_]+(?:\[[0-9]+\])?(?:\.[a-z_]+(?:\[[0-9]+\])?)*): `)

// oaiErrorOf is err's OpenAI error object and HTTP status. The code field
// is the gRPC code's name in lower case (model_not_found for an unknown
// model, invalid_api_key for a refused key), which `qwenctl bench --http`
// reads back.
func oaiErrorOf(err error, rename func(string) string) (oaiError, int) {
	st := status.Convert(err)
	code := grpccode.HTTPStatus(st.Code())
	msg := st.Message()
	e := oaiError{Message: msg, Code: grpccode.Snake(st.Code())}
	if m := leadingField.FindStringSubmatch(msg); m != nil {
		field := m[1]
		if rename != nil {
			field = rename(field)
		}
		e.Param, e.Message = field, field+": "+strings.TrimPrefix(msg, m[0])
	}
	switch code {
	case http.StatusBadRequest, http.StatusNotFound, http.StatusConflict, http.StatusRequestEntityTooLarge:
		e.Type = "invalid_request_error"
	case http.StatusUnauthorized:
		e.Type, e.Code = "authentication_error", "invalid_api_key"
	case http.StatusForbidden:
		e.Type = "permission_error"
	case http.StatusTooManyRequests:
		e.Type = "rate_limit_error"
	case http.StatusServiceUnavailable:
		e.Type = "service_unavailable_error"
	default:
		e.Type = "server_error"
	}
	if st.Code() == codes.NotFound && e.Param == "model" {
		e.Code = "model_not_found"
	}
	return e, code
}

// codeOf is the code named name (its String(), as Generate writes a
// stream's error), Internal for none.
func codeOf(name string) codes.Code {
	if c, ok := grpccode.ByName(name); ok {
		return c
	}
	return codes.Internal
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// The listener.

// serveOpenAI serves svc's HTTP API (NewOpenAIHandler with auth) on addr:
// HTTPS with the process's pair when it has TLS (no client certificate:
// API keys authenticate), its refused handshakes logged as listener
// "http"; plain HTTP without. When the address is only the default
// (optional) and cannot be bound (a port another process holds: a second
// coordinator on the machine, a test), it warns and serves nothing; an
// address asked for that cannot be bound is an error.
func (p *processTLS) serveOpenAI(addr string, optional bool, svc *GeneratorService, auth *PublicAuth) (stop func(), err error) {
	return p.serveHTTPAPI(addr, optional, NewOpenAIHandler(svc, auth), auth == nil || auth.Keys == nil)
}

func (p *processTLS) serveHTTPAPI(addr string, optional bool, h http.Handler, noKeys bool) (stop func(), err error) {
	if noKeys && !security.IsLoopback(addr) {
		p.log.Warn("no --api-keys: any client that reaches the HTTP API is an admin (it may read /metrics and run any request)", "http_listen", addr)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		if optional {
			p.log.Warn("the OpenAI-compatible HTTP API is off: its default address cannot be bound (give --http-listen ADDR to serve it elsewhere, or --http-listen '' to silence this)",
				"addr", addr, "err", err)
			return func() {}, nil
		}
		return nil, fmt.Errorf("--http-listen: %w", err)
	}
	scheme := "http"
	if p.own != nil {
		lis = security.TLSListener(lis, p.own.ServerConfig(false), "http", p.refusals)
		scheme = "https"
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)}
	go srv.Serve(lis)
	p.log.Info("OpenAI-compatible HTTP API", "url", scheme+"://"+lis.Addr().String()+"/v1")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if srv.Shutdown(ctx) != nil {
			srv.Close()
		}
	}, nil
}
