package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
)

// Limits of a Refusals.
const (
	// refusalHostsMax bounds the (listener, host) pairs remembered; past
	// it the ones refused longest ago are forgotten (and logged again if
	// they come back).
	refusalHostsMax = 10000
	// refusalSummaryEvery is the least time between two lines about the
	// same (listener, host).
	refusalSummaryEvery = time.Hour
	// refusalLinesPerMinute bounds the first-refusal lines of new hosts a
	// minute, so that a flood from many addresses cannot flood the log;
	// those past it are counted and said in one line.
	refusalLinesPerMinute = 100
	// handshakeTimeout bounds a TLSListener's handshake.
	handshakeTimeout = 10 * time.Second
)

// Refusals logs the connections that listeners refuse (plaintext, no
// client certificate, a certificate of another CA, a gossip packet under an
// unknown key): the first refusal of each (listener, remote host) at Warn
// with the listener, the remote address and the reason; later ones from the
// same host are only counted, and said again in one line at most once an
// hour while they go on. It remembers at most 10,000 (listener, host)
// pairs, forgetting the ones refused longest ago, and logs the first
// refusals of at most 100 new hosts a minute (the rest are counted and said
// in one line). It is the one part of this package that logs, and it logs
// no certificate or key material: the reason is the handshake's error.
//
// A nil *Refusals is valid and does nothing. It is safe for concurrent use.
type Refusals struct {
	log *slog.Logger
	now func() time.Time // time.Now; tests replace it

	mu       sync.Mutex
	hosts    map[refusalKey]*refusalState
	window   time.Time // start of the minute the line budget counts in
	lines    int       // first-refusal lines logged in that minute
	unlogged int       // new hosts refused but not logged (over the budget)
}

type refusalKey struct{ listener, host string }

type refusalState struct {
	last     time.Time // latest refusal
	lastLine time.Time // latest line logged about this pair
	since    int64     // refusals since that line
	total    int64
}

// NewRefusals returns a Refusals that logs into log (nil: nowhere).
func NewRefusals(log *slog.Logger) *Refusals {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Refusals{log: log, now: time.Now, hosts: map[refusalKey]*refusalState{}}
}

// Refuse records a connection that listener refused: remote is the peer's
// address ("host:port", or a host), reason why it was refused (it must
// hold no secret). The first refusal of the (listener, host) pair is
// logged; see Refusals.
func (r *Refusals) Refuse(listener, remote, reason string) {
	if r == nil {
		return
	}
	host := remote
	if h, _, err := net.SplitHostPort(remote); err == nil {
		host = h
	}
	key := refusalKey{listener, host}

	type line struct {
		msg   string
		attrs []any
	}
	var out []line
	r.mu.Lock()
	now := r.now()
	if now.Sub(r.window) >= time.Minute {
		if r.unlogged > 0 {
			out = append(out, line{"refused connections of more new hosts than are logged a minute", []any{
				"hosts_not_logged", r.unlogged, "limit_per_minute", refusalLinesPerMinute}})
		}
		r.window, r.lines, r.unlogged = now, 0, 0
	}
	st, ok := r.hosts[key]
	switch {
	case !ok:
		if len(r.hosts) >= refusalHostsMax {
			r.forget()
		}
		st = &refusalState{lastLine: now}
		r.hosts[key] = st
		if r.lines < refusalLinesPerMinute {
			r.lines++
			out = append(out, line{"refused a connection", []any{
				"listener", listener, "remote", remote, "reason", reason}})
		} else {
			r.unlogged++
			st.since = 1 // said in the pair's next summary
		}
	case now.Sub(st.lastLine) >= refusalSummaryEvery:
		out = append(out, line{"still refusing connections", []any{
			"listener", listener, "remote", remote, "refused", st.since + 1,
			"since", st.lastLine.Format(time.RFC3339), "reason", reason}})
		st.lastLine, st.since = now, 0
	default:
		st.since++
	}
	st.last = now
	st.total++
	r.mu.Unlock()

	for _, l := range out {
		r.log.Warn(l.msg, l.attrs...)
	}
}

// forget drops the pairs not refused for an hour and, when that is not
// enough, the quarter refused longest ago. r.mu is held.
func (r *Refusals) forget() {
	now := r.now()
	for k, st := range r.hosts {
		if now.Sub(st.last) >= refusalSummaryEvery {
			delete(r.hosts, k)
		}
	}
	if len(r.hosts) < refusalHostsMax*3/4 {
		return
	}
	// The refusal times of all pairs, to find the quarter's boundary.
	times := make([]time.Time, 0, len(r.hosts))
	for _, st := range r.hosts {
		times = append(times, st.last)
	}
	slices.SortFunc(times, time.Time.Compare)
	cut := times[len(times)/4]
	for k, st := range r.hosts {
		if !st.last.After(cut) {
			delete(r.hosts, k)
		}
	}
}

// refused reports a failed server handshake with remote; a peer that
// closed before saying anything (a TCP health check, a port scan) is not
// reported.
func (r *Refusals) refused(listener string, remote net.Addr, err error) {
	if r == nil || err == nil || errors.Is(err, io.EOF) {
		return
	}
	addr := "unknown"
	if remote != nil {
		addr = remote.String()
	}
	r.Refuse(listener, addr, HandshakeReason(err))
}

// HandshakeReason describes why a server's TLS handshake failed, for a
// refusal's log line: a plaintext client, no client certificate, a
// certificate of another CA, and so on, with the error (which holds no key
// material).
func HandshakeReason(err error) string {
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	msg := err.Error()
	switch {
	case errors.As(err, &rh):
		return "not TLS (a plaintext client?)"
	case errors.As(err, &unknown):
		return "a certificate not signed by the cluster CA: " + msg
	case errors.As(err, &cv):
		return "a certificate that does not verify: " + msg
	case strings.Contains(msg, "didn't provide a certificate"):
		return "no client certificate: " + msg
	case strings.Contains(msg, "remote error"):
		return "the client refused this server's certificate: " + msg
	case errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded):
		return "the handshake timed out"
	}
	return msg
}

// ServerCredentials is credentials.NewTLS(cfg) for a gRPC server whose
// failed handshakes (a plaintext client, no client certificate, a
// certificate of another CA) are reported to r as refusals of listener.
// It is otherwise the same: its AuthInfo is credentials.TLSInfo, so
// PeerRole works on its calls.
func ServerCredentials(cfg *tls.Config, listener string, r *Refusals) credentials.TransportCredentials {
	return &refusingCreds{TransportCredentials: credentials.NewTLS(cfg), listener: listener, r: r}
}

// ClientCredentials is credentials.NewTLS(cfg), for a gRPC client with a
// configuration from TLS.ClientConfig.
func ClientCredentials(cfg *tls.Config) credentials.TransportCredentials {
	return credentials.NewTLS(cfg)
}

type refusingCreds struct {
	credentials.TransportCredentials
	listener string
	r        *Refusals
}

func (c *refusingCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		c.r.refused(c.listener, raw.RemoteAddr(), err)
	}
	return conn, ai, err
}

func (c *refusingCreds) Clone() credentials.TransportCredentials {
	return &refusingCreds{TransportCredentials: c.TransportCredentials.Clone(), listener: c.listener, r: c.r}
}

// TLSListener serves TLS with cfg on the connections inner accepts, for an
// HTTP server (http.Server.Serve): each connection's handshake is done
// before Accept returns it, in a goroutine of its own with a 10 s deadline
// (so a slow client holds up no other), and a failed one is reported to r
// as a refusal of listener and the connection closed. Accept returns
// *tls.Conn values. Closing the listener closes inner and the connections
// still in their handshake.
func TLSListener(inner net.Listener, cfg *tls.Config, listener string, r *Refusals) net.Listener {
	return newTLSListener(inner, cfg, listener, r, handshakeTimeout)
}

func newTLSListener(inner net.Listener, cfg *tls.Config, listener string, r *Refusals, timeout time.Duration) *tlsListener {
	l := &tlsListener{
		Listener: inner,
		cfg:      cfg,
		name:     listener,
		r:        r,
		timeout:  timeout,
		conns:    make(chan net.Conn),
		quit:     make(chan struct{}),
		done:     make(chan struct{}),
		pending:  map[net.Conn]struct{}{},
	}
	go l.acceptLoop()
	return l
}

type tlsListener struct {
	net.Listener
	cfg     *tls.Config
	name    string
	r       *Refusals
	timeout time.Duration

	conns chan net.Conn
	quit  chan struct{} // closed by Close, or when the accept loop ends
	done  chan struct{} // closed when the accept loop ends; err is then set
	err   error

	quitOnce sync.Once
	mu       sync.Mutex
	pending  map[net.Conn]struct{} // connections in their handshake
	wg       sync.WaitGroup        // their goroutines
}

func (l *tlsListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, l.err
	}
}

// Close closes inner and the connections in their handshake, and waits
// for the accept loop's end.
func (l *tlsListener) Close() error {
	err := l.Listener.Close()
	l.shutdown()
	<-l.done
	return err
}

// shutdown closes quit and the connections in their handshake, once.
func (l *tlsListener) shutdown() {
	l.quitOnce.Do(func() {
		l.mu.Lock()
		close(l.quit)
		for c := range l.pending {
			c.Close()
		}
		l.mu.Unlock()
	})
}

func (l *tlsListener) acceptLoop() {
	defer func() {
		l.shutdown()
		l.wg.Wait()
		close(l.done)
	}()
	var delay time.Duration
	for {
		raw, err := l.Listener.Accept()
		if err != nil {
			// Retry a temporary error (too many open files) as
			// net/http does; anything else ends the listener.
			var te interface{ Temporary() bool }
			if errors.As(err, &te) && te.Temporary() && !errors.Is(err, net.ErrClosed) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(delay):
					continue
				case <-l.quit:
				}
			}
			l.err = err
			return
		}
		delay = 0
		l.mu.Lock()
		select {
		case <-l.quit:
			l.mu.Unlock()
			raw.Close()
			continue
		default:
		}
		l.pending[raw] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.handshake(raw)
	}
}

func (l *tlsListener) handshake(raw net.Conn) {
	defer l.wg.Done()
	c := tls.Server(raw, l.cfg)
	c.SetDeadline(time.Now().Add(l.timeout))
	err := c.Handshake()
	l.mu.Lock()
	delete(l.pending, raw)
	l.mu.Unlock()
	if err != nil {
		select {
		case <-l.quit: // closed under it: no refusal
		default:
			l.r.refused(l.name, raw.RemoteAddr(), err)
		}
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	select {
	case l.conns <- c:
	case <-l.quit:
		c.Close()
	}
}
