package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// Defaults of Config.
const (
	DefaultRetryTimeout  = 60 * time.Second
	DefaultInfoTimeout   = 2 * time.Second
	DefaultMinBackoff    = 100 * time.Millisecond
	DefaultMaxBackoff    = time.Second
	DefaultKeepaliveTime = 20 * time.Second
	// MinKeepaliveTime is the most often a client may ping: what the
	// servers' keepalive enforcement permits.
	MinKeepaliveTime = 20 * time.Second
)

// ErrGaveUp is wrapped by the error of a call that kept failing with
// UNAVAILABLE for Config.RetryTimeout.
var ErrGaveUp = errors.New("client: gave up")

// Config configures a Client. The zero value of every field but Addrs and
// EtcdEndpoints means its default.
type Config struct {
	// Addrs are coordinator addresses (host:port), tried in this order
	// when looking for the leader. At least one of Addrs and
	// EtcdEndpoints is required.
	Addrs []string
	// EtcdEndpoints, when given, are the cluster's etcd endpoints: when
	// no known coordinator says it leads, the election key names the
	// leader.
	EtcdEndpoints []string
	// EtcdTLS secures the etcd connection (https:// endpoints): the
	// cluster CA and a certificate it signed that etcd takes (the
	// cluster's etcd takes coordinators' and workers' only), e.g.
	// security.NewTLS(dir, security.RoleWorker).ClientConfig("").
	// Nil: plaintext.
	EtcdTLS *tls.Config
	// Prefix is the etcd key prefix of the cluster (the servers'
	// --prefix); "" means pkg/cluster's default, "/qwenfleet/".
	Prefix string
	// TLS, when not nil, secures every coordinator connection with it
	// (TLSConfigFromCA makes one that trusts the cluster CA); nil means
	// plaintext. Leave its ServerName empty: each connection checks the
	// host it dials (a leader address learned later too).
	TLS *tls.Config
	// APIKey, when set, is sent with every call as "authorization: Bearer
	// <key>" metadata (coordinators with --api-keys require it). Without
	// TLS it crosses the network in the clear.
	APIKey string
	// DialOptions are added to every coordinator connection's options
	// (after the transport credentials and keepalive, so they can
	// override them).
	DialOptions []grpc.DialOption
	// RetryTimeout is how long one call keeps retrying a failure with
	// UNAVAILABLE, from its start (default 60 s). Longer rides out a
	// slower failover (an etcd lease must expire before a standby takes
	// over); shorter fails sooner when no cluster is there.
	RetryTimeout time.Duration
	// InfoTimeout bounds each GetServerInfo sent to find the leader
	// (default 2 s): a coordinator that does not answer within it is
	// passed over.
	InfoTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait between retries: it
	// starts at MinBackoff (default 100 ms) and doubles up to MaxBackoff
	// (default 1 s).
	MinBackoff, MaxBackoff time.Duration
	// KeepaliveTime is how long a connection with a stream but nothing
	// to read waits before it pings the server (default 20 s; at least
	// MinKeepaliveTime, what the servers permit). Negative turns
	// client-side keepalive off.
	KeepaliveTime time.Duration
}

// Validate fills in defaults and rejects bad values, naming the field.
func (c *Config) Validate() error {
	if strings.TrimSpace(c.APIKey) != c.APIKey || strings.ContainsAny(c.APIKey, " \t\r\n") {
		return errors.New("client: Config.APIKey: contains white space (a key is one word)") // never the key itself
	}
	if len(c.Addrs) == 0 && len(c.EtcdEndpoints) == 0 {
		return errors.New("client: Config.Addrs: no coordinator address (and no Config.EtcdEndpoints)")
	}
	for i, a := range c.Addrs {
		if strings.TrimSpace(a) == "" {
			return fmt.Errorf("client: Config.Addrs[%d]: empty address", i)
		}
	}
	for i, e := range c.EtcdEndpoints {
		if strings.TrimSpace(e) == "" {
			return fmt.Errorf("client: Config.EtcdEndpoints[%d]: empty endpoint", i)
		}
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"RetryTimeout", &c.RetryTimeout, DefaultRetryTimeout},
		{"InfoTimeout", &c.InfoTimeout, DefaultInfoTimeout},
		{"MinBackoff", &c.MinBackoff, DefaultMinBackoff},
		{"MaxBackoff", &c.MaxBackoff, DefaultMaxBackoff},
	} {
		if *d.v < 0 {
			return fmt.Errorf("client: Config.%s: %v is negative", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if c.MaxBackoff < c.MinBackoff {
		return fmt.Errorf("client: Config.MaxBackoff: %v is less than MinBackoff %v", c.MaxBackoff, c.MinBackoff)
	}
	switch {
	case c.KeepaliveTime == 0:
		c.KeepaliveTime = DefaultKeepaliveTime
	case c.KeepaliveTime > 0 && c.KeepaliveTime < MinKeepaliveTime:
		return fmt.Errorf("client: Config.KeepaliveTime: %v is more often than servers permit (at least %v)", c.KeepaliveTime, MinKeepaliveTime)
	}
	return nil
}

// Dial opens a plaintext connection to the coordinator at addr: DialWith
// without TLS or API key.
func Dial(addr string, keepaliveTime time.Duration, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return DialWith(addr, nil, "", keepaliveTime, opts...)
}

// DialWith opens a connection to the coordinator at addr. It is the one
// place that decides the transport (TLS with tlsCfg, plaintext when it is
// nil), the API key sent with every call (apiKey, as "authorization:
// Bearer <key>"; "" sends none) and the client-side keepalive
// (keepaliveTime; <= 0: none); opts are added last. It does not block: the
// connection is made by the first call.
func DialWith(addr string, tlsCfg *tls.Config, apiKey string, keepaliveTime time.Duration, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		creds = credentials.NewTLS(tlsCfg) // clones it; the ServerName is set per connection when empty
	}
	o := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// Reconnect within a second of a coordinator coming back (grpc's
		// default backoff grows to 2 minutes, during which every call to
		// it fails at once).
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}, MinConnectTimeout: 5 * time.Second}),
	}
	if keepaliveTime > 0 {
		o = append(o, grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, Timeout: 20 * time.Second, PermitWithoutStream: false}))
	}
	if apiKey != "" {
		o = append(o, grpc.WithPerRPCCredentials(bearerKey{key: apiKey, tls: tlsCfg != nil}))
	}
	conn, err := grpc.NewClient(addr, append(o, opts...)...)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", addr, err)
	}
	return conn, nil
}

// bearerKey is the per-call credentials of an API key.
type bearerKey struct {
	key string
	tls bool // the connection is TLS: grpc then refuses to send it on any other
}

func (b bearerKey) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.key}, nil
}

// RequireTransportSecurity is true over TLS; a key given without TLS is
// sent in the clear, as asked (a coordinator serving plaintext on
// loopback).
func (b bearerKey) RequireTransportSecurity() bool { return b.tls }

// TLSConfigFromCA is a client TLS configuration that accepts a server whose
// certificate a CA of caFile (PEM; the cluster's ca.pem, which may hold
// several CAs during a rotation) signed for server authentication, valid
// for the host dialled (a DNS name or an IP address: the cluster CA signs
// coordinator certificates with IP SANs too). A certificate naming a
// cluster role (a qwenfleet://role/ URI SAN) must name the coordinator's.
// No client certificate is presented: the public API authenticates
// clients by API key. Its errors name the file.
func TLSConfigFromCA(caFile string) (*tls.Config, error) {
	pool, err := security.LoadCAPool(caFile)
	if err != nil {
		return nil, fmt.Errorf("client: CA file: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, VerifyConnection: coordinatorRole}, nil
}

// coordinatorRole refuses a verified server certificate that names a
// cluster role other than the coordinator's (a worker's certificate, which
// every worker host holds, is also for server authentication).
func coordinatorRole(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("client: the server presented no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if r, ok := security.RoleOf(leaf); ok && r != security.RoleCoordinator {
		return fmt.Errorf("client: the server's certificate %q is a %s's, not a coordinator's", leaf.Subject.CommonName, r)
	}
	return nil
}

// Client talks to a cluster's coordinators. It is safe for concurrent use.
type Client struct {
	cfg Config

	mu     sync.Mutex
	addrs  []string // known coordinators: the configured ones, then learned ones
	conns  map[string]*grpc.ClientConn
	leader string // cached leader, "" when unknown
	closed bool

	discoverMu sync.Mutex // one discovery at a time; the others wait for its answer

	etcdMu sync.Mutex
	store  *cluster.Store // connected on first use
}

// New validates cfg and returns a Client. It does not connect: the first
// call does.
func New(cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Client{cfg: cfg, conns: map[string]*grpc.ClientConn{}}
	for _, a := range cfg.Addrs {
		if _, err := c.add(strings.TrimSpace(a)); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// Close closes every connection (and the etcd client). Calls in flight
// fail; calls after Close fail.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	conns := c.conns
	c.conns = map[string]*grpc.ClientConn{}
	c.mu.Unlock()
	var errs []error
	for _, conn := range conns {
		errs = append(errs, conn.Close())
	}
	c.etcdMu.Lock()
	if c.store != nil {
		errs = append(errs, c.store.Close())
		c.store = nil
	}
	c.etcdMu.Unlock()
	return errors.Join(errs...)
}

// Coordinators returns the known coordinator addresses: the configured
// ones first, then those learned from the cluster.
func (c *Client) Coordinators() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.addrs)
}

// Stub returns a Generator stub on the connection to addr (added to the
// known coordinators when new), for the RPCs this package does not wrap.
// Its calls are not retried.
func (c *Client) Stub(addr string) (pb.GeneratorClient, error) {
	conn, err := c.add(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewGeneratorClient(conn), nil
}

// add returns the connection to addr, dialing it first when addr is new.
func (c *Client) add(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, status.Error(codes.Canceled, "client: closed")
	}
	if conn, ok := c.conns[addr]; ok {
		return conn, nil
	}
	conn, err := DialWith(addr, c.cfg.TLS, c.cfg.APIKey, c.cfg.KeepaliveTime, c.cfg.DialOptions...)
	if err != nil {
		return nil, err
	}
	c.conns[addr] = conn
	c.addrs = append(c.addrs, addr)
	return conn, nil
}

// forget drops the cached leader when it is addr (another call may have
// found a new one meanwhile).
func (c *Client) forget(addr string) {
	c.mu.Lock()
	if c.leader == addr {
		c.leader = ""
	}
	c.mu.Unlock()
}

func (c *Client) cachedLeader() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader
}

// Leader returns the leader's address: the cached one, or the one found by
// asking the coordinators (and etcd). It does not retry; its error is
// UNAVAILABLE when no coordinator says it leads.
func (c *Client) Leader(ctx context.Context) (string, error) {
	if l := c.cachedLeader(); l != "" {
		return l, nil
	}
	c.discoverMu.Lock()
	defer c.discoverMu.Unlock()
	if l := c.cachedLeader(); l != "" { // found while this call waited
		return l, nil
	}
	l, err := c.discover(ctx)
	if err != nil {
		return "", err
	}
	c.mu.Lock()
	c.leader = l
	c.mu.Unlock()
	return l, nil
}

// answer is one coordinator's answer to GetServerInfo.
type answer struct {
	addr string
	info *pb.ServerInfo
	err  error
}

// ask sends GetServerInfo to every address at once, each bounded by
// InfoTimeout, and returns the answers in the order of addrs.
func (c *Client) ask(ctx context.Context, addrs []string) []answer {
	out := make([]answer, len(addrs))
	var wg sync.WaitGroup
	for i, a := range addrs {
		out[i].addr = a
		wg.Go(func() {
			stub, err := c.Stub(a)
			if err != nil {
				out[i].err = err
				return
			}
			actx, cancel := context.WithTimeout(ctx, c.cfg.InfoTimeout)
			defer cancel()
			out[i].info, out[i].err = stub.GetServerInfo(actx, &pb.GetServerInfoRequest{})
		})
	}
	wg.Wait()
	return out
}

// discover finds the leader: the first known coordinator that says it
// leads, following the leader addresses the others name; then etcd's
// election key.
func (c *Client) discover(ctx context.Context) (string, error) {
	asked := map[string]bool{}
	var fails []string
	var refused error // a coordinator's UNAUTHENTICATED: no retry makes the key good
	consider := func(ans []answer) string {
		for _, a := range ans {
			asked[a.addr] = true
			switch {
			case a.err != nil:
				fails = append(fails, a.addr+": "+describe(a.err))
				if refused == nil && status.Code(a.err) == codes.Unauthenticated {
					refused = status.Errorf(codes.Unauthenticated, "client: %s: %s", a.addr, status.Convert(a.err).Message())
				}
			case a.info.Leader:
				return a.addr
			case a.info.LeaderAddress != "":
				fails = append(fails, a.addr+": standby (leader at "+a.info.LeaderAddress+")")
				c.add(a.info.LeaderAddress)
			default:
				fails = append(fails, a.addr+": standby (leader unknown)")
			}
		}
		return ""
	}
	for ctx.Err() == nil {
		var next []string
		for _, a := range c.Coordinators() {
			if !asked[a] {
				next = append(next, a)
			}
		}
		if len(next) == 0 {
			break
		}
		if l := consider(c.ask(ctx, next)); l != "" {
			return l, nil
		}
	}
	if refused != nil {
		return "", refused
	}
	if len(c.cfg.EtcdEndpoints) > 0 && ctx.Err() == nil {
		l, err := c.etcdLeader(ctx)
		switch {
		case err != nil:
			fails = append(fails, "etcd: "+err.Error())
		case asked[l]:
			fails = append(fails, "etcd names "+l)
		default:
			c.add(l)
			if l := consider(c.ask(ctx, []string{l})); l != "" {
				return l, nil
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	return "", status.Errorf(codes.Unavailable, "client: no leader: %s", strings.Join(fails, "; "))
}

// etcdLeader reads the election key, connecting to etcd on first use
// (each bounded by InfoTimeout, so that an etcd that is down costs a retry
// no more than a coordinator that does not answer).
func (c *Client) etcdLeader(ctx context.Context) (string, error) {
	c.etcdMu.Lock()
	defer c.etcdMu.Unlock()
	if c.store == nil {
		cctx, cancel := context.WithTimeout(ctx, c.cfg.InfoTimeout)
		s, err := cluster.ConnectWith(cctx, c.cfg.EtcdEndpoints, c.cfg.Prefix, cluster.ConnectConfig{TLS: c.cfg.EtcdTLS})
		cancel()
		if err != nil {
			return "", err
		}
		c.store = s
	}
	ectx, cancel := context.WithTimeout(ctx, c.cfg.InfoTimeout)
	defer cancel()
	return c.store.Leader(ectx)
}

// leaderHint is how a standby's UNAVAILABLE names the leader.
var leaderHint = regexp.MustCompile(`the leader is at "([^"]+)"`)

// failed handles a call to addr that failed with a retryable err: the
// leader is forgotten, and a leader that err names is added to the known
// coordinators.
func (c *Client) failed(addr string, err error) {
	c.forget(addr)
	if m := leaderHint.FindStringSubmatch(status.Convert(err).Message()); m != nil {
		c.add(m[1])
	}
}

// retryable says whether a call's error is worth another try: UNAVAILABLE.
func retryable(err error) bool { return status.Code(err) == codes.Unavailable }

// describe is an error as one line: "Code: message" for a status.
func describe(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Code().String() + ": " + s.Message()
	}
	return err.Error()
}

// GaveUpError is the error of a call that failed with UNAVAILABLE until
// its RetryTimeout passed. It wraps ErrGaveUp and Last, so status.Code of
// it is Last's code.
type GaveUpError struct {
	After    time.Duration // from the first failure to the last
	Attempts int           // tries that failed (sends, or searches for the leader)
	Last     error         // the last failure
}

func (e *GaveUpError) Error() string {
	return fmt.Sprintf("client: gave up after %v (%d attempts): %s", e.After.Round(time.Millisecond), e.Attempts, describe(e.Last))
}

func (e *GaveUpError) Unwrap() []error { return []error{ErrGaveUp, e.Last} }

// GRPCStatus is the last failure's status with this error's message.
func (e *GaveUpError) GRPCStatus() *status.Status {
	return status.New(status.Code(e.Last), e.Error())
}

// retrier paces the retries of one call. Its clock starts at the first
// failure, and again at the first failure after progress (a Generate
// stream that received tokens since).
type retrier struct {
	c        *Client
	first    time.Time // the first failure since the start or the last progress
	wait     time.Duration
	attempts int
}

func (c *Client) newRetrier() *retrier { return &retrier{c: c, wait: c.cfg.MinBackoff} }

// progress restarts the retry clock and the backoff.
func (r *retrier) progress() { r.first, r.wait = time.Time{}, r.c.cfg.MinBackoff }

// next waits before the next try after the failure last. It returns nil
// to go on, ctx's error when ctx ended, or a GaveUpError once the next try
// would start after RetryTimeout (from the first failure) or after ctx's
// deadline.
func (r *retrier) next(ctx context.Context, last error) error {
	r.attempts++
	if err := ctx.Err(); err != nil {
		return err
	}
	now := time.Now()
	if r.first.IsZero() {
		r.first = now
	}
	at := now.Add(r.wait)
	if d, ok := ctx.Deadline(); at.After(r.first.Add(r.c.cfg.RetryTimeout)) || ok && at.After(d) {
		return &GaveUpError{After: now.Sub(r.first), Attempts: r.attempts, Last: last}
	}
	t := time.NewTimer(r.wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	r.wait = min(2*r.wait, r.c.cfg.MaxBackoff)
	return nil
}

// call runs fn on the leader's stub, retrying an UNAVAILABLE failure (of
// finding the leader or of fn) as the package doc says.
func (c *Client) call(ctx context.Context, fn func(ctx context.Context, stub pb.GeneratorClient) error) error {
	return c.callOr(ctx, fn, nil)
}

// callOr is call where, when no leader is found, noLeader (when not nil)
// may answer instead (it reports whether it did).
func (c *Client) callOr(ctx context.Context, fn func(ctx context.Context, stub pb.GeneratorClient) error, noLeader func(ctx context.Context) bool) error {
	r := c.newRetrier()
	for {
		addr, err := c.Leader(ctx)
		if err == nil {
			var stub pb.GeneratorClient
			if stub, err = c.Stub(addr); err == nil {
				err = fn(ctx, stub)
			}
			if err == nil || !retryable(err) {
				return c.ctxErr(ctx, err)
			}
			c.failed(addr, err)
		} else if noLeader != nil && ctx.Err() == nil && noLeader(ctx) {
			return nil
		} else if !retryable(err) {
			return c.ctxErr(ctx, err)
		}
		if err := r.next(ctx, err); err != nil {
			return err
		}
	}
}

// ctxErr is ctx's error when ctx ended (the call's own error is then a
// consequence), else err.
func (c *Client) ctxErr(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// ServerInfo returns the leader's GetServerInfo, or when no coordinator
// leads (the cluster is between leaders, or starting) the answer of the
// first known coordinator that answers. It retries while none answers.
func (c *Client) ServerInfo(ctx context.Context) (*pb.ServerInfo, error) {
	var info *pb.ServerInfo
	err := c.callOr(ctx, func(ctx context.Context, stub pb.GeneratorClient) (err error) {
		info, err = stub.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		return err
	}, func(ctx context.Context) bool {
		for _, a := range c.ask(ctx, c.Coordinators()) {
			if a.err == nil {
				info = a.info
				return true
			}
		}
		return false
	})
	if err != nil {
		return nil, err
	}
	return info, nil
}

// ModelInfo returns the served model's description (GetModelInfo on the
// leader).
func (c *Client) ModelInfo(ctx context.Context) (*pb.ModelInfo, error) {
	var out *pb.ModelInfo
	err := c.call(ctx, func(ctx context.Context, stub pb.GeneratorClient) (err error) {
		out, err = stub.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
		return err
	})
	return out, err
}

// Tokenize tokenizes req's input on the leader.
func (c *Client) Tokenize(ctx context.Context, req *pb.TokenizeRequest) (*pb.TokenizeResponse, error) {
	var out *pb.TokenizeResponse
	err := c.call(ctx, func(ctx context.Context, stub pb.GeneratorClient) (err error) {
		out, err = stub.Tokenize(ctx, req)
		return err
	})
	return out, err
}
