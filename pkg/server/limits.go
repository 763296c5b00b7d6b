package server

import (
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Defaults of the public server's limits (the coordinator's flags).
const (
	// DefaultMaxConcurrentStreams is how many calls one client connection
	// may have open at once (--max-concurrent-streams).
	DefaultMaxConcurrentStreams = 1024
	// DefaultSendTimeout is how long a response may wait for a client that
	// does not read it (--send-timeout).
	DefaultSendTimeout = 30 * time.Second
	// DefaultMaxQueueWait is how long a request may wait in a replica's
	// queue before its first step (--max-queue-wait).
	DefaultMaxQueueWait = 30 * time.Second
	// MaxInputBytes caps a request's text (or its chat messages' contents
	// together) whatever the context: tokenizing is linear in it, and no
	// served context needs more (131072 tokens of CJK text are about
	// 600 KB).
	MaxInputBytes = 1 << 20
)

// Keepalive policy of the public server. Clients may ping every
// KeepaliveMinTime (our client library pings no more often than every
// 20 s) even with no call open; one that pings more often is sent GOAWAY.
// The server pings a connection idle for KeepaliveTime and closes it when
// the ping is not answered within KeepaliveTimeout, so a dead client's
// calls end (and their requests are aborted) in about 40 s.
const (
	KeepaliveMinTime = 10 * time.Second
	KeepaliveTime    = 30 * time.Second
	KeepaliveTimeout = 10 * time.Second
)

// Limits bound what one client can hold on the public server.
type Limits struct {
	// MaxConcurrentStreams caps the calls open at once on one connection
	// (0: DefaultMaxConcurrentStreams); more wait in the client.
	MaxConcurrentStreams uint32
}

// PublicServerOptions are the grpc.ServerOptions of the coordinator's
// public server: the concurrent-stream cap and the keepalive policy (see
// KeepaliveMinTime).
func PublicServerOptions(l Limits) []grpc.ServerOption {
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	return []grpc.ServerOption{
		grpc.MaxConcurrentStreams(l.MaxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: KeepaliveMinTime, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: KeepaliveTime, Timeout: KeepaliveTimeout}),
	}
}

// errSendTimeout is a boundedSender's error for a Send the client did not
// take in time.
var errSendTimeout = errors.New("the client did not read the response in time")

// boundedSender does the Sends of one stream in its own goroutine so that
// the handler can give up on a client that stops reading: grpc-go has no
// per-Send deadline, and a Send blocks while the client's flow-control
// window is full. After a Send times out the sender is broken (every
// later Send fails at once); the handler then returns, which makes grpc
// cancel the stream and so ends the pending Send and the goroutine. The
// memory held for such a client is one message and the transport's
// flow-control windows. Not safe for concurrent use (as a grpc stream).
type boundedSender[T any] struct {
	send    func(T) error
	timeout time.Duration
	in      chan T
	res     chan error
	timer   *time.Timer // reused by every Send
	broken  bool
}

// newBoundedSender starts the sender's goroutine; Close ends it.
func newBoundedSender[T any](send func(T) error, timeout time.Duration) *boundedSender[T] {
	b := &boundedSender[T]{send: send, timeout: timeout, in: make(chan T), res: make(chan error, 1), timer: time.NewTimer(timeout)}
	b.timer.Stop()
	go func() {
		for m := range b.in {
			b.res <- b.send(m)
		}
	}()
	return b
}

// Send sends m, or returns errSendTimeout when the client has not taken
// it within the timeout.
func (b *boundedSender[T]) Send(m T) error {
	if b.broken {
		return errSendTimeout
	}
	b.in <- m                // the goroutine is idle: the last Send returned
	b.timer.Reset(b.timeout) // no stale tick after Stop (Go 1.23 timers)
	defer b.timer.Stop()
	select {
	case err := <-b.res:
		return err
	case <-b.timer.C:
		b.broken = true
		return errSendTimeout
	}
}

// Close lets the goroutine end (after a pending Send returns).
func (b *boundedSender[T]) Close() { close(b.in) }
