package server

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// Message kinds of the Exchange RPC.
const (
	kindAllReduce = 0
	kindHidden    = 1
	kindAllToAll  = 2
)

// mailKey names one message between the workers of a replica.
type mailKey struct {
	version     int64
	step        uint64
	kind, index int32
	from        int32
}

// mailbox holds messages that arrived before (or while) their step waits
// for them. Messages nobody takes (their step failed or was cancelled) are
// swept after staleMail, and every message of another replica generation
// when the worker takes a new assignment.
//
// What one sender (a from rank) may have waiting is bounded (limit, in
// bytes and messages): a message past the bound is refused with
// errMailFull and dropped, and no other sender is held up by it.
type mailbox struct {
	mu    sync.Mutex
	boxes map[mailKey]*letter
	swept time.Time
	limit mailLimit         // per sender; zero fields: defaultMail*
	used  map[int32]mailUse // what each sender has waiting
}

type letter struct {
	ch      chan []byte // buffered, one message
	created time.Time
	full    bool  // a message was put (the channel holds it until taken)
	charged int64 // its bytes, counted in used until taken or dropped (-1: not counted)
}

// mailLimit bounds what one sender may have waiting in a mailbox.
type mailLimit struct {
	bytes   int64
	entries int
}

type mailUse struct {
	bytes   int64
	entries int
}

// errMailFull refuses a message past its sender's bound.
var errMailFull = errors.New("mailbox full")

// Mailbox bounds when nothing sizes them (no assignment or no warm-up
// yet): per sender, a few of the largest messages a worker takes.
const (
	defaultMailEntries = 64
	defaultMailBytes   = 4 * maxPeerMessage
	// maxPeerMessage is the largest message a worker receives (its gRPC
	// receive limit).
	maxPeerMessage = 256 << 20
	// mailSlack is what a sender may have waiting beyond the replica's
	// pipeline depth: an all-reduce's part, the next one's, and room for a
	// step that failed.
	mailSlack = 8
)

// mailLimits are a worker's mailbox bounds for an assignment of ppSize
// stages whose steps carry at most stepTokens tokens of width hidden
// (stepTokens 0: unknown). Every message of a step is at most one row
// (and a header) per token: an all-reduce part, hidden states, an
// all-to-all part. What one sender has waiting is at most one message a
// step in flight (the pipeline's depth: ppSize) plus two of the step it
// runs (it sends all-reduce i+1 only after it has this worker's part i):
// the bound is ppSize+mailSlack messages in bytes, 4× that in entries.
// PeerConfig's MailBytes and MailEntries, when set, replace them.
func mailLimits(ppSize, stepTokens, hidden int, c PeerConfig) mailLimit {
	ppSize = max(ppSize, 1)
	msg := int64(maxPeerMessage)
	if stepTokens > 0 && hidden > 0 {
		msg = min(msg, 4*(int64(stepTokens)*int64(hidden+1)+1))
	}
	l := mailLimit{bytes: int64(ppSize+mailSlack) * msg, entries: 4 * (ppSize + mailSlack)}
	if c.MailBytes > 0 {
		l.bytes = c.MailBytes
	}
	if c.MailEntries > 0 {
		l.entries = c.MailEntries
	}
	return l
}

// setLimit bounds what each sender may have waiting from now on.
func (m *mailbox) setLimit(l mailLimit) {
	m.mu.Lock()
	m.limit = l
	m.mu.Unlock()
}

// drop forgets letter l of key k; m.mu is held.
func (m *mailbox) drop(k mailKey, l *letter) {
	if l.charged >= 0 && l.full {
		u := m.used[k.from]
		u.bytes -= l.charged
		u.entries--
		if u.entries <= 0 {
			delete(m.used, k.from)
		} else {
			m.used[k.from] = u
		}
	}
	l.charged = -1
	if m.boxes[k] == l {
		delete(m.boxes, k)
	}
}

// staleMail is how long an unclaimed message is kept: longer than any step
// waits for it (the coordinator's step timeout is a minute).
const staleMail = 2 * time.Minute

// slot finds or makes k's letter; m.mu is held.
func (m *mailbox) slot(k mailKey) *letter {
	if m.boxes == nil {
		m.boxes = map[mailKey]*letter{}
	}
	now := time.Now()
	if now.Sub(m.swept) > staleMail/4 {
		m.swept = now
		for k2, l2 := range m.boxes {
			if now.Sub(l2.created) > staleMail {
				m.drop(k2, l2)
			}
		}
	}
	l, ok := m.boxes[k]
	if !ok {
		l = &letter{ch: make(chan []byte, 1), created: now}
		m.boxes[k] = l
	}
	return l
}

// keepOnly drops every message of a generation other than version.
func (m *mailbox) keepOnly(version int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, l := range m.boxes {
		if k.version != version {
			m.drop(k, l)
		}
	}
}

// put leaves a message for the step that takes it. A second message of
// the same key is refused, and so is one past its sender's bound
// (errMailFull): neither waits.
func (m *mailbox) put(k mailKey, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l := m.boxes[k]; l != nil && l.full {
		return fmt.Errorf("message %+v delivered twice", k)
	}
	lim := m.limit
	if lim.bytes <= 0 {
		lim.bytes = defaultMailBytes
	}
	if lim.entries <= 0 {
		lim.entries = defaultMailEntries
	}
	u := m.used[k.from]
	if u.entries+1 > lim.entries || u.bytes+int64(len(data)) > lim.bytes {
		return fmt.Errorf("%w: rank %d has %d messages (%d bytes) waiting here; a %d-byte %s is past the bound of %d messages, %d bytes",
			errMailFull, k.from, u.entries, u.bytes, len(data), kindName(k.kind), lim.entries, lim.bytes)
	}
	l := m.slot(k)
	if m.used == nil {
		m.used = map[int32]mailUse{}
	}
	u.entries++
	u.bytes += int64(len(data))
	m.used[k.from] = u
	l.full, l.charged = true, int64(len(data))
	l.ch <- data // buffered for one; full guards it
	return nil
}

func (m *mailbox) take(ctx context.Context, k mailKey) ([]byte, error) {
	m.mu.Lock()
	l := m.slot(k)
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.drop(k, l)
		m.mu.Unlock()
	}()
	select {
	case d := <-l.ch:
		return d, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for %s %d of step %d from rank %d: %w", kindName(k.kind), k.index, k.step, k.from, ctx.Err())
	}
}

func kindName(k int32) string {
	switch k {
	case kindHidden:
		return "hidden states"
	case kindAllToAll:
		return "all-to-all"
	}
	return "all-reduce"
}

// f32Bytes views x as its bytes (little-endian on every platform Go's
// amd64 and arm64 ports run). The view aliases x.
func f32Bytes(x []float32) []byte {
	if len(x) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x))
}

func decodeF32(b []byte, into []float32) error {
	if len(b) != 4*len(into) {
		return fmt.Errorf("%d bytes for %d values", len(b), len(into))
	}
	copy(f32Bytes(into), b)
	return nil
}

// PeerConfig tunes the connections between the workers of a replica.
type PeerConfig struct {
	// Window is the flow-control window of a peer stream and connection
	// (default 16 MiB): a prefill chunk's hidden states are megabytes, and
	// gRPC's default 64 KiB would stall every such message on window
	// updates. gRPC ignores windows under 64 KiB. A send that outgrows the
	// window waits for the peer to read: that is how a hung peer blocks
	// its senders, and why every send is bounded by its step's deadline.
	Window int32
	// KeepaliveTime is how often a peer connection with nothing to read is
	// pinged, and KeepaliveTimeout how long a ping may go unanswered before
	// the connection is closed (defaults 5 s and 2 s). The worker's server
	// permits pings that often (PeerServerOptions).
	KeepaliveTime, KeepaliveTimeout time.Duration
	// Creds are the transport credentials of the connections to peers
	// (nil: plaintext): with TLS, the worker's certificate
	// (credentials.NewTLS(security.TLS.ClientConfig(""))).
	Creds credentials.TransportCredentials
	// MailBytes and MailEntries bound what one peer may have waiting in
	// this worker's mailbox, in bytes and messages (0: sized from the
	// assignment and the warm-up; see mailLimits). A message past them is
	// refused RESOURCE_EXHAUSTED and dropped.
	MailBytes   int64
	MailEntries int
}

// Defaults of PeerConfig.
const (
	defaultPeerWindow    = 16 << 20
	minPeerWindow        = 64 << 10
	peerBuffer           = 256 << 10
	defaultPeerKeepalive = 5 * time.Second
	defaultPeerKATimeout = 2 * time.Second
)

func (c PeerConfig) withDefaults() PeerConfig {
	if c.Window <= 0 {
		c.Window = defaultPeerWindow
	}
	c.Window = max(c.Window, minPeerWindow)
	if c.KeepaliveTime <= 0 {
		c.KeepaliveTime = defaultPeerKeepalive
	}
	if c.KeepaliveTimeout <= 0 {
		c.KeepaliveTimeout = defaultPeerKATimeout
	}
	return c
}

// PeerDialOptions are the dial options for a worker's peers.
func PeerDialOptions(c PeerConfig) []grpc.DialOption {
	c = c.withDefaults()
	creds := c.Creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(creds),
		grpc.WithInitialWindowSize(c.Window), grpc.WithInitialConnWindowSize(c.Window),
		grpc.WithWriteBufferSize(peerBuffer), grpc.WithReadBufferSize(peerBuffer),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: c.KeepaliveTime, Timeout: c.KeepaliveTimeout, PermitWithoutStream: true})}
}

// PeerServerOptions are the matching server options of a worker: the same
// windows, keepalive pings of its own to its clients (peers and the
// coordinator), and an enforcement policy that permits the peers' pings.
func PeerServerOptions(c PeerConfig) []grpc.ServerOption {
	c = c.withDefaults()
	return []grpc.ServerOption{grpc.InitialWindowSize(c.Window), grpc.InitialConnWindowSize(c.Window),
		grpc.WriteBufferSize(peerBuffer), grpc.ReadBufferSize(peerBuffer),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: c.KeepaliveTime, Timeout: c.KeepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: c.KeepaliveTime / 2, PermitWithoutStream: true})}
}

// peers are the workers a sharded worker talks to.
type peers struct {
	rank   int     // in the stage
	tp     []*peer // the stage's ranks; nil at rank
	group  int     // all-reduces sum over ranks [rank-rank%group, +group) (the attention TP group)
	ep     int     // expert-parallel ranks of the stage (0: none)
	next   *peer   // nil on the last stage
	conns  []*grpc.ClientConn
	cancel context.CancelFunc // ends the streams
}

// peer is the one stream of messages to another worker: a message is a
// frame on an open stream, not a call of its own.
type peer struct {
	client workerv1.WorkerClient
	ctx    context.Context // the peers' lifetime (carries the generation's secret)
	turn   chan struct{}   // held by the one sender (a stream's Send is not safe for concurrent use)
	stream workerv1.Worker_ExchangeClient
	end    context.CancelFunc // cancels stream
}

// send puts one message on the stream, opening it when there is none. It
// returns by the time ctx ends, whatever the peer does: waiting for its
// turn, and a Send blocked because the peer stopped reading (its window
// is full), end with ctx; the stream is then cancelled. A stream that
// fails or is cancelled is dropped, and the next send opens another.
func (p *peer) send(ctx context.Context, req *workerv1.ExchangeRequest) error {
	select {
	case p.turn <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting to send: %w", context.Cause(ctx))
	}
	defer func() { <-p.turn }()
	if p.stream == nil {
		sctx, end := context.WithCancel(p.ctx)
		s, err := p.client.Exchange(sctx)
		if err != nil {
			end()
			return err
		}
		p.stream, p.end = s, end
	}
	stop := context.AfterFunc(ctx, p.end)
	err := p.stream.Send(req)
	if err != nil {
		_, cerr := p.stream.CloseAndRecv() // Send reports io.EOF; this, why (bounded by ctx too)
		if cerr != nil {
			err = cerr
		}
	}
	if !stop() { // ctx ended: the stream was cancelled, maybe under the send
		err = fmt.Errorf("sending: %w", context.Cause(ctx))
	}
	if err != nil {
		p.end()
		p.stream, p.end = nil, nil
	}
	return err
}

func dialPeers(a *workerv1.Assignment, cfg PeerConfig) (*peers, error) {
	ctx, cancel := context.WithCancel(context.Background())
	if a.Secret != "" { // every stream presents it
		ctx = metadata.AppendToOutgoingContext(ctx, secretMD, a.Secret)
	}
	p := &peers{rank: int(a.TpRank), tp: make([]*peer, len(a.TpPeers)), group: len(a.TpPeers), cancel: cancel}
	if a.EpSize > 1 {
		p.rank, p.group, p.ep = int(a.EpRank), int(max(a.TpSize, 1)), int(a.EpSize)
	}
	dial := func(addr string) (*peer, error) {
		c, err := grpc.NewClient(addr, append(PeerDialOptions(cfg),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20)))...)
		if err != nil {
			return nil, err
		}
		p.conns = append(p.conns, c)
		return &peer{client: workerv1.NewWorkerClient(c), ctx: ctx, turn: make(chan struct{}, 1)}, nil
	}
	var err error
	for r, addr := range a.TpPeers {
		if r != p.rank {
			if p.tp[r], err = dial(addr); err != nil {
				p.close()
				return nil, fmt.Errorf("tp peer %d (%s): %w", r, addr, err)
			}
		}
	}
	if a.NextStage != "" {
		if p.next, err = dial(a.NextStage); err != nil {
			p.close()
			return nil, fmt.Errorf("next stage (%s): %w", a.NextStage, err)
		}
	}
	return p, nil
}

func (p *peers) close() {
	p.cancel()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// stepLink is a shard.Link over gRPC for one step: an all-reduce sends this
// rank's part to every other rank and adds all parts in rank order, so
// every rank computes the same sum.
type stepLink struct {
	ctx     context.Context
	box     *mailbox
	p       *peers
	version int64
	step    uint64
	n       int32 // all-reduces so far
	// commTime is the time spent in all-reduces and sending hidden states;
	// waitTime the time waiting for the previous stage.
	commTime, waitTime time.Duration
	a                  int32           // all-to-alls so far
	sent               int64           // bytes sent to peers
	m                  *metrics.Worker // nil: not observed
}

// observe adds an operation's time to a total and, with metrics, to h.
func (l *stepLink) observe(total *time.Duration, h func(*metrics.Worker) prometheus.Histogram, t0 time.Time) {
	d := time.Since(t0)
	*total += d
	if l.m != nil {
		h(l.m).Observe(d.Seconds())
	}
}

func (l *stepLink) send(ctx context.Context, to *peer, kind, index int32, data []byte) error {
	atomic.AddInt64(&l.sent, int64(len(data)))
	return to.send(ctx, &workerv1.ExchangeRequest{Version: l.version, StepId: l.step, Kind: kind, Index: index,
		FromRank: int32(l.p.rank), Data: data})
}

func (l *stepLink) AllReduce(x []float32) error {
	defer l.observe(&l.commTime, func(m *metrics.Worker) prometheus.Histogram { return m.AllReduce }, time.Now())
	idx := l.n
	l.n++
	data := f32Bytes(x) // read by the sends, which end before x changes
	// A failed send ends the waits too: a peer that cannot be reached
	// will not send its part either.
	ctx, cancel := context.WithCancelCause(l.ctx)
	defer cancel(nil)
	lo := l.p.rank - l.p.rank%l.p.group
	group := l.p.tp[lo : lo+l.p.group]
	var sends sync.WaitGroup
	for i, c := range group {
		if c != nil {
			sends.Go(func() {
				if err := l.send(ctx, c, kindAllReduce, idx, data); err != nil {
					cancel(fmt.Errorf("sending to rank %d: %w", lo+i, err))
				}
			})
		}
	}
	parts := make([][]byte, len(group))
	var first error
	for i := range group {
		r := lo + i
		if r == l.p.rank {
			continue
		}
		b, err := l.box.take(ctx, mailKey{l.version, l.step, kindAllReduce, idx, int32(r)})
		if err == nil && len(b) != len(data) {
			err = fmt.Errorf("%d bytes for %d values", len(b), len(x))
		}
		if err != nil {
			first = fmt.Errorf("from rank %d: %w", r, err)
			cancel(first) // the sends end too
			break
		}
		parts[i] = b
	}
	sends.Wait()
	if cause := context.Cause(ctx); cause != nil && l.ctx.Err() == nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	if first != nil {
		return first
	}
	// Every rank adds the parts in rank order, from zero: the same bits
	// everywhere.
	for i, own := range x {
		var sum float32
		for j, p := range parts {
			v := own
			if lo+j != l.p.rank {
				v = math.Float32frombits(binary.LittleEndian.Uint32(p[4*i:]))
			}
			sum += v
		}
		x[i] = sum
	}
	return nil
}

// AllToAll sends part j to stage rank j and returns each rank's part for
// this one.
func (l *stepLink) AllToAll(send [][]float32) ([][]float32, error) {
	defer l.observe(&l.commTime, func(m *metrics.Worker) prometheus.Histogram { return m.AllReduce }, time.Now())
	if len(send) != len(l.p.tp) {
		return nil, fmt.Errorf("all-to-all of %d parts among %d ranks", len(send), len(l.p.tp))
	}
	idx := l.a
	l.a++
	ctx, cancel := context.WithCancelCause(l.ctx)
	defer cancel(nil)
	var sends sync.WaitGroup
	for r, c := range l.p.tp {
		if c != nil {
			sends.Go(func() {
				if err := l.send(ctx, c, kindAllToAll, idx, f32Bytes(send[r])); err != nil {
					cancel(fmt.Errorf("sending to rank %d: %w", r, err))
				}
			})
		}
	}
	recv := make([][]float32, len(l.p.tp))
	var first error
	for r := range l.p.tp {
		if r == l.p.rank {
			recv[r] = send[r]
			continue
		}
		b, err := l.box.take(ctx, mailKey{l.version, l.step, kindAllToAll, idx, int32(r)})
		if err == nil {
			recv[r] = make([]float32, len(b)/4)
			err = decodeF32(b, recv[r])
		}
		if err != nil {
			first = fmt.Errorf("from rank %d: %w", r, err)
			cancel(first) // the sends end too
			break
		}
	}
	sends.Wait()
	if cause := context.Cause(ctx); cause != nil && l.ctx.Err() == nil && !errors.Is(cause, context.Canceled) {
		return nil, cause
	}
	if first != nil {
		return nil, first
	}
	return recv, nil
}

// stageLink is the link of an expert-parallel rank: its stage-wide sums
// are expertparallel's combine over the link's all-to-all.
type stageLink struct {
	*stepLink
	st *expertparallel.Stage
}

func (l *stageLink) ReduceStage(x []float32, width int, touched []bool) error {
	return l.st.ReduceStage(x, width, touched)
}

func (l *stepLink) RecvHidden() ([]float32, error) {
	defer l.observe(&l.waitTime, func(m *metrics.Worker) prometheus.Histogram { return m.StageWait }, time.Now())
	b, err := l.box.take(l.ctx, mailKey{l.version, l.step, kindHidden, 0, int32(l.p.rank)})
	if err != nil {
		return nil, err
	}
	h := make([]float32, len(b)/4)
	return h, decodeF32(b, h)
}

func (l *stepLink) SendHidden(h []float32) error {
	defer l.observe(&l.commTime, func(m *metrics.Worker) prometheus.Histogram { return m.StageTransfer }, time.Now())
	return l.send(l.ctx, l.p.next, kindHidden, 0, f32Bytes(h))
}
