package server

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// PublicAuth is the API-key authentication of the coordinator's public
// server (--api-keys FILE).
//
// With keys, every call but the standard health service's
// (grpc.health.v1.Health: load balancers and probes have no key) must carry
// "authorization: Bearer <key>" metadata naming a key of the file; one
// without it, or with a key the file does not list (unknown or revoked), is
// refused UNAUTHENTICATED. The key's role decides what it may call:
//
//   - user: Generate, Tokenize, GetModelInfo, HealthCheck, GetServerInfo
//     (a redacted view: see GeneratorService.GetServerInfo), Abort of its
//     own requests, and server reflection;
//   - admin: everything, also ExpertLoad (which re-places experts when
//     asked), Drain, Abort of any request and the full GetServerInfo.
//
// A method a user key may not call is refused PERMISSION_DENIED naming the
// method and the role it needs; any method not in the user list (a future
// one included) is admin-only. The caller (the key's name and role) is put
// in the call's context (CallerFrom).
//
// Per-key stream limits: a key may have at most its max_streams (or, when
// the file gives none, MaxStreamsPerKey; 0: no limit) Generate streams open
// at once on this coordinator; one more is refused RESOURCE_EXHAUSTED
// naming the limit. GeneratorService.Generate counts them (it knows which
// stream resumes one of the key's own, whose slot it takes over).
//
// Without keys (a nil PublicAuth or nil Keys) nothing is checked and every
// caller is an admin: the behaviour of a coordinator without --api-keys.
type PublicAuth struct {
	Keys *security.APIKeys
	// MaxStreamsPerKey is the limit of the keys without max_streams
	// (0: unlimited).
	MaxStreamsPerKey int
}

// Caller is the authenticated sender of a call to the public API.
type Caller struct {
	// Name is the API key's name (its entry in the keys file; never the
	// key itself).
	Name string
	// Role is security.APIRoleUser or security.APIRoleAdmin.
	Role string
	// MaxStreams is how many Generate streams the key may have open at
	// once (0: no limit).
	MaxStreams int
}

// Admin reports whether c holds an admin key.
func (c Caller) Admin() bool { return c.Role == security.APIRoleAdmin }

type callerKey struct{}

// WithCaller returns ctx carrying c (what the auth interceptors do; tests
// call handlers with it).
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// CallerFrom returns the caller the auth interceptors put in ctx. It gives
// false when the server has no API keys: every caller is then an admin.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// restricted returns the caller of ctx when it holds a user key: calls
// without auth (no keys configured) and admin calls are not restricted.
func restricted(ctx context.Context) (Caller, bool) {
	c, ok := CallerFrom(ctx)
	if !ok || c.Admin() {
		return Caller{}, false
	}
	return c, true
}

// Method access levels (methodAccess).
const (
	accessOpen  = iota // no key needed
	accessUser         // any key
	accessAdmin        // an admin key
)

// userMethods are the public API's methods a user key may call.
var userMethods = map[string]bool{
	pb.Generator_Generate_FullMethodName:      true,
	pb.Generator_Abort_FullMethodName:         true, // its own requests only (GeneratorService.Abort)
	pb.Generator_Tokenize_FullMethodName:      true,
	pb.Generator_GetModelInfo_FullMethodName:  true,
	pb.Generator_GetServerInfo_FullMethodName: true, // redacted (GeneratorService.GetServerInfo)
	pb.Generator_HealthCheck_FullMethodName:   true,
}

// methodAccess says who may call fullMethod ("/package.Service/Method").
func methodAccess(fullMethod string) int {
	switch {
	case strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/"):
		return accessOpen
	case userMethods[fullMethod],
		strings.HasPrefix(fullMethod, "/grpc.reflection.v1.ServerReflection/"),
		strings.HasPrefix(fullMethod, "/grpc.reflection.v1alpha.ServerReflection/"):
		return accessUser
	}
	return accessAdmin
}

// AdminOnly reports whether fullMethod needs an admin key when the server
// has API keys (the public API's ExpertLoad and Drain, and any method not
// open to users).
func AdminOnly(fullMethod string) bool { return methodAccess(fullMethod) == accessAdmin }

// bearerKey is the key of the call's "authorization: Bearer <key>"
// metadata; ok is false when there is none, malformed says the metadata
// is there but not a bearer key.
func bearerKey(ctx context.Context) (key string, ok, malformed bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 {
		return "", false, false
	}
	if len(vals) > 1 {
		return "", false, true
	}
	scheme, key, found := strings.Cut(strings.TrimSpace(vals[0]), " ")
	key = strings.TrimSpace(key)
	if !found || !strings.EqualFold(scheme, "Bearer") || key == "" {
		return "", false, true
	}
	return key, true, false
}

// authenticate checks the call's key and the method's access; it returns
// ctx with the caller (unchanged for an open method).
func (a *PublicAuth) authenticate(ctx context.Context, fullMethod string) (context.Context, error) {
	access := methodAccess(fullMethod)
	if access == accessOpen {
		return ctx, nil
	}
	key, ok, malformed := bearerKey(ctx)
	switch {
	case malformed:
		return nil, status.Error(codes.Unauthenticated, `malformed "authorization" metadata: send exactly one "authorization: Bearer <API key>" (qwenctl: --api-key or QWENFLEET_API_KEY)`)
	case !ok:
		return nil, status.Error(codes.Unauthenticated, `this coordinator requires an API key: send it as "authorization: Bearer <API key>" metadata (qwenctl: --api-key or QWENFLEET_API_KEY)`)
	}
	k, found := a.Keys.Lookup(key)
	if !found {
		return nil, status.Error(codes.Unauthenticated, "the API key is not valid (unknown or revoked)")
	}
	if access == accessAdmin && k.Role != security.APIRoleAdmin {
		return nil, status.Errorf(codes.PermissionDenied, "%s needs an admin API key (the key %q has role %s)", fullMethod, k.Name, k.Role)
	}
	c := Caller{Name: k.Name, Role: k.Role, MaxStreams: k.MaxStreams}
	if c.MaxStreams <= 0 {
		c.MaxStreams = max(a.MaxStreamsPerKey, 0)
	}
	return WithCaller(ctx, c), nil
}

// AuthServerOptions are the interceptors (unary and stream) that
// authenticate and authorize the public server's calls as PublicAuth says.
// A nil a or a nil a.Keys gives none: no authentication.
func AuthServerOptions(a *PublicAuth) []grpc.ServerOption {
	if a == nil || a.Keys == nil {
		return nil
	}
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, err := a.authenticate(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, err := a.authenticate(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		return handler(srv, &callerStream{ServerStream: ss, ctx: ctx})
	}
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}

// callerStream is a ServerStream whose context carries the caller.
type callerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *callerStream) Context() context.Context { return s.ctx }

// PublicServerOptionsWith are PublicServerOptions(l) and, with keys, the
// authentication interceptors (AuthServerOptions(a)).
func PublicServerOptionsWith(l Limits, a *PublicAuth) []grpc.ServerOption {
	return append(PublicServerOptions(l), AuthServerOptions(a)...)
}

// owners remembers, with API keys, which key started each request a
// Generate of this coordinator runs, and how many Generate streams each key
// has open. Requests of a coordinator without keys are not tracked.
type owners struct {
	mu      sync.Mutex
	reqs    map[string]*owned // by request id
	streams map[string]int    // by key name
}

// owned is the key that started a running request, and how many Generate
// calls hold the id (a resume runs while the stream it replaces ends).
type owned struct {
	key   string
	calls int
}

// admit registers the Generate of request id by caller, or refuses it: a
// resume (or a new request) of an id another key's request holds, unless
// the caller is an admin resuming it (it then owns the request); and a
// stream over the key's limit, unless it resumes one of the key's own
// running requests (that stream is ending: the resume takes its slot).
// release undoes it when the Generate returns.
func (o *owners) admit(caller Caller, id string, resume bool) (release func(), err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.reqs == nil {
		o.reqs, o.streams = map[string]*owned{}, map[string]int{}
	}
	cur := o.reqs[id]
	switch {
	case cur == nil || cur.key == caller.Name:
	case !resume:
		return nil, status.Errorf(codes.AlreadyExists, "request_id: %q is already running", id)
	case !caller.Admin():
		return nil, status.Errorf(codes.PermissionDenied, "request_id: %q was started by another API key: a user key may resume only its own requests", id)
	}
	takesSlot := resume && cur != nil && cur.key == caller.Name
	if n := o.streams[caller.Name]; caller.MaxStreams > 0 && n >= caller.MaxStreams && !takesSlot {
		return nil, status.Errorf(codes.ResourceExhausted, "the API key %q has %d Generate streams open, its limit (max_streams %d): wait for one to end",
			caller.Name, n, caller.MaxStreams)
	}
	o.streams[caller.Name]++
	if cur == nil {
		cur = &owned{}
		o.reqs[id] = cur
	}
	cur.key = caller.Name
	cur.calls++
	return func() {
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.streams[caller.Name]--; o.streams[caller.Name] <= 0 {
			delete(o.streams, caller.Name)
		}
		if cur.calls--; cur.calls <= 0 && o.reqs[id] == cur {
			delete(o.reqs, id)
		}
	}, nil
}

// abortOwn aborts request id (with abort) for a user caller: only when
// caller's key started it; another key's request is PERMISSION_DENIED, an
// id no Generate holds is not found.
func (o *owners) abortOwn(caller Caller, id string, abort func(string) bool) (bool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	cur := o.reqs[id]
	switch {
	case cur == nil:
		return false, nil
	case cur.key != caller.Name:
		return false, status.Errorf(codes.PermissionDenied, "request_id: %q was started by another API key: a user key may abort only its own requests", id)
	}
	// Under o.mu: the id cannot pass to another key's request meanwhile.
	return abort(id), nil
}

// workerAlias is the opaque name of worker id in a redacted ServerInfo:
// "w-" and 8 hex digits of an HMAC of the id under the service's random
// key, so the same worker has the same name in every answer (and in the
// workers and the placement) while revealing nothing of the id, which by
// default is the worker's host name and pid.
func (s *GeneratorService) workerAlias(id string) string {
	if id == "" {
		return ""
	}
	m := hmac.New(sha256.New, s.aliasKey[:])
	m.Write([]byte(id))
	return "w-" + hex.EncodeToString(m.Sum(nil)[:4])
}

// redactServerInfo makes info the view of a user key: it keeps the
// version, leadership, readiness, the workers' states, backends, memory and
// GPU names, the placement's shape (replicas, layers, tp/pp/ep) and the
// scheduler's counters, and removes what says where things are or runs:
// worker addresses, metrics addresses, pids and hosts, the model's path
// (placement.model becomes the served model name), the etcd endpoints;
// worker ids (by default "<host>-<pid>") become workerAlias names. The
// coordinator id and the leader's address stay: they name public
// endpoints (the clients follow leader_address to the leader).
func (s *GeneratorService) redactServerInfo(info *pb.ServerInfo) {
	info.EtcdEndpoints = nil
	for _, w := range info.Workers {
		w.Id = s.workerAlias(w.Id)
		w.Address, w.MetricsAddress, w.Pid, w.Host = "", "", 0, ""
		w.State = stateWord(w.State)
	}
	if p := info.Placement; p != nil {
		p.Model = s.c.opts.ModelName
		// New slices: Replica.Workers may share the coordinator's.
		alias := func(ids []string) []string {
			out := make([]string, len(ids))
			for i, id := range ids {
				out[i] = s.workerAlias(id)
			}
			return out
		}
		for _, r := range p.Replicas {
			r.Workers = alias(r.Workers)
			for _, st := range r.Stages {
				st.Workers = alias(st.Workers)
			}
		}
	}
}

// stateWord is a worker state without its reason ("failed (load failed:
// ...)" → "failed"): reasons quote ids, paths and addresses.
func stateWord(state string) string {
	if i := strings.IndexAny(state, " (:"); i >= 0 {
		return state[:i]
	}
	return state
}
