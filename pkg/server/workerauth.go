package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// Metadata of the worker API.
const (
	// leaderMD is the coordinator's claim to lead: its public address, the
	// value it campaigns with (CoordinatorOptions.Addr). Every call a
	// coordinator makes to a worker carries it.
	leaderMD = "qwenfleet-leader"
	// secretMD is the generation's Exchange secret a worker presents to
	// its peers when it opens an Exchange stream.
	secretMD = "qwenfleet-secret"
)

// WorkerAuth is what a worker checks of its callers (WorkerOptions.Auth; nil
// checks nothing, as in-process tests and a plaintext cluster need).
//
//   - Load, Warmup, Step, Release, SetExperts, Drain and Leave: a
//     coordinator certificate (RequireCerts) whose call claims (metadata
//     qwenfleet-leader) to be the leader this worker knows (Leader);
//   - Info, Health and ExpertLoad: any coordinator certificate;
//   - Exchange: a worker certificate presenting (metadata qwenfleet-secret)
//     the secret of the generation this worker holds.
//
// Everything else, and any call of a client certificate, is refused
// PERMISSION_DENIED. A refused leader claim says "not the leader": the
// coordinator takes it, on a step, for another leader's proof (it stands
// down when its own lease is unconfirmed) as it takes ABORTED.
type WorkerAuth struct {
	// RequireCerts checks the role of the caller's verified client
	// certificate (security.PeerRole): the server must serve TLS with
	// client certificates required (security.TLS.ServerConfig(true)).
	RequireCerts bool
	// Leader is the leader this worker knows (LeaderView); nil does not
	// check the leader claim.
	Leader *LeaderView
	// ModelRoot, when set, is the directory every model path must lie
	// under, once cleaned and its symbolic links resolved (--model-root).
	ModelRoot string
	// StoredOnly refuses a LoadRequest that carries its assignment: the
	// worker reads its assignments from the placement in etcd only, so no
	// RPC gives it a model path or peer addresses.
	StoredOnly bool
}

// LeaderView is the leader a worker knows: what WatchLeader last reported,
// or, when a coordinator claims to lead and the view says otherwise, what
// etcd says when asked again (at most once every leaderRefreshEvery for
// all callers together), so a leader just elected is not refused for the
// watch's lag. The newer of the two (by etcd revision) stands. Through an
// etcd outage it keeps the last leader it knew. Safe for concurrent use.
type LeaderView struct {
	refresh  func(ctx context.Context) (string, int64, error)
	interval time.Duration // least time between two refreshes
	timeout  time.Duration // bound of one refresh

	mu        sync.Mutex
	value     string
	rev       int64
	known     bool
	inflight  chan struct{} // closed when the refresh in flight ends
	lastStart time.Time     // the latest refresh's start
	doneStart time.Time     // the start of the latest refresh that ended
}

// Refreshes of a LeaderView.
const (
	leaderRefreshEvery   = 250 * time.Millisecond
	leaderRefreshTimeout = 2 * time.Second
)

// NewLeaderView makes a view that knows no leader yet; refresh reads the
// current leader ("" for none) and the etcd revision of the read
// (cluster.Store.LeaderAt); nil never refreshes.
func NewLeaderView(refresh func(ctx context.Context) (string, int64, error)) *LeaderView {
	return &LeaderView{refresh: refresh, interval: leaderRefreshEvery, timeout: leaderRefreshTimeout}
}

// Watch has the view follow store's election (cluster.Store.WatchLeader)
// until ctx ends, and refresh from it (cluster.Store.LeaderAt). A worker
// makes its view before it connects to etcd (its server serves first),
// and calls Watch once connected; until then it knows no leader.
func (v *LeaderView) Watch(ctx context.Context, store *cluster.Store) {
	v.mu.Lock()
	v.refresh = store.LeaderAt
	v.mu.Unlock()
	go store.WatchLeader(ctx, v.Observe)
}

// Observe records that value led at etcd revision rev (older news than
// what the view holds is ignored).
func (v *LeaderView) Observe(value string, rev int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.observeLocked(value, rev)
}

func (v *LeaderView) observeLocked(value string, rev int64) {
	if !v.known || rev >= v.rev {
		v.value, v.rev, v.known = value, rev, true
	}
}

// Leader is the leader the view knows ("" when none).
func (v *LeaderView) Leader() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.value
}

// is says whether claim is the leader. When the view says otherwise, it
// waits for a refresh that started after the call (rate-limited and shared
// with every caller), and answers with what it read; when etcd does not
// answer, the view stands.
func (v *LeaderView) is(ctx context.Context, claim string) bool {
	if claim == "" {
		return false
	}
	arrived := time.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	for {
		if v.known && v.value == claim {
			return true
		}
		if v.refresh == nil || !v.doneStart.Before(arrived) {
			return false // a refresh since the call arrived says otherwise
		}
		if ch := v.inflight; ch != nil {
			v.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				v.mu.Lock()
				return false
			}
			v.mu.Lock()
			continue
		}
		if wait := time.Until(v.lastStart.Add(v.interval)); wait > 0 {
			v.mu.Unlock()
			ok := sleepCtx(ctx, wait)
			v.mu.Lock()
			if !ok {
				return false
			}
			continue
		}
		ch, start, refresh := make(chan struct{}), time.Now(), v.refresh
		v.inflight, v.lastStart = ch, start
		v.mu.Unlock()
		// Not the caller's context: others wait for this refresh too.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), v.timeout)
		value, rev, err := refresh(rctx)
		cancel()
		v.mu.Lock()
		if err == nil {
			v.observeLocked(value, rev)
		}
		v.inflight, v.doneStart = nil, start
		close(ch)
	}
}

// authorize checks a coordinator's call to method: a coordinator
// certificate, and with leaderOnly the claim to lead.
func (w *WorkerService) authorize(ctx context.Context, method string, leaderOnly bool) error {
	a := w.opts.Auth
	if a == nil {
		return nil
	}
	if a.RequireCerts {
		if role, ok := security.PeerRole(ctx); !ok || role != security.RoleCoordinator {
			return status.Errorf(codes.PermissionDenied, "%s needs a coordinator certificate (the caller presents %s)", method, roleName(role, ok))
		}
	}
	if !leaderOnly || a.Leader == nil {
		return nil
	}
	claim := firstMD(ctx, leaderMD)
	if claim == "" {
		return status.Errorf(codes.PermissionDenied, "not the leader: the %s call claims no leadership (metadata %s)", method, leaderMD)
	}
	if !a.Leader.is(ctx, claim) {
		leader := a.Leader.Leader()
		if leader == "" {
			leader = "none"
		}
		return status.Errorf(codes.PermissionDenied, "not the leader: %s is refused to %s; this worker's leader is %s", method, claim, leader)
	}
	return nil
}

// authorizePeer checks an Exchange stream: a worker certificate and the
// secret of the generation this worker holds, which it returns.
func (w *WorkerService) authorizePeer(ctx context.Context) (int64, error) {
	a := w.opts.Auth
	if a.RequireCerts {
		if role, ok := security.PeerRole(ctx); !ok || role != security.RoleWorker {
			return 0, status.Errorf(codes.PermissionDenied, "Exchange needs a worker certificate (the caller presents %s)", roleName(role, ok))
		}
	}
	w.mu.Lock()
	as := w.assign
	w.mu.Unlock()
	if as == nil || as.Secret == "" {
		return 0, status.Error(codes.PermissionDenied, "Exchange: this worker holds no assignment with a secret")
	}
	got := firstMD(ctx, secretMD)
	if subtle.ConstantTimeCompare([]byte(got), []byte(as.Secret)) != 1 {
		return 0, status.Errorf(codes.PermissionDenied, "Exchange: the stream does not present the secret of generation %d (metadata %s)", as.Version, secretMD)
	}
	return as.Version, nil
}

func roleName(r security.Role, ok bool) string {
	if !ok {
		return "no verified certificate"
	}
	return "a " + string(r) + " certificate"
}

// firstMD is the first value of key in ctx's incoming metadata ("" when
// none).
func firstMD(ctx context.Context, key string) string {
	if v := metadata.ValueFromIncomingContext(ctx, key); len(v) > 0 {
		return v[0]
	}
	return ""
}

// errNotUnderRoot is the one answer to a model path outside --model-root,
// whether the path exists or not.
var errNotUnderRoot = errors.New("not a path under this worker's --model-root")

// modelUnder resolves dir (absolute, cleaned, its symbolic links followed)
// and checks that it lies under root (resolved the same way): the path to
// load from. A path that does not resolve (it does not exist, or cannot
// be read) is refused as one outside the root, so the answer does not
// tell whether it exists.
func modelUnder(root, dir string) (string, error) {
	r, err := filepath.Abs(root)
	if err == nil {
		r, err = filepath.EvalSymlinks(r)
	}
	if err != nil {
		return "", fmt.Errorf("this worker's --model-root: %v", err)
	}
	p, err := filepath.Abs(dir)
	if err == nil {
		p, err = filepath.EvalSymlinks(p)
	}
	if err != nil {
		return "", errNotUnderRoot
	}
	rel, err := filepath.Rel(r, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return "", errNotUnderRoot
	}
	return p, nil
}

// newSecret is a generation's Exchange secret: 32 random bytes, in hex.
func newSecret() string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil { // crypto/rand does not fail (Go 1.24+)
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

// leaderInterceptors put the coordinator's claim to lead (its public
// address) on every call it makes to a worker.
func leaderInterceptors(addr string) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, leaderMD, addr), method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return streamer(metadata.AppendToOutgoingContext(ctx, leaderMD, addr), desc, cc, method, opts...)
		}),
	}
}

// notTheLeader says whether err is a worker's refusal of a call for its
// leader claim (another coordinator leads, as the worker knows).
func notTheLeader(err error) bool {
	return status.Code(err) == codes.PermissionDenied && strings.Contains(err.Error(), "not the leader:")
}
