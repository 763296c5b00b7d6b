//go:build soak

// TestSoak: a long run (minutes) of random worker faults under a steady
// open-loop load, opt-in with the soak build tag:
//
//	go test -tags soak -run TestSoak -v ./pkg/server/
//	go test -tags soak -run TestSoak -v ./pkg/server/ -soak.duration 90s -soak.report /tmp/soak.json
//
// (the default 3m takes about 4–5 minutes in all, up to about 8 when a wait
// runs to its bound; give a longer -soak.duration a longer -timeout).
//
// The cluster: etcd in the test process and the coordinator (--tp 2 --pp 2,
// no local workers, dense-gqa-f32) on the bridge of a netHosts network, and
// five workers (--threads 1), each in its own network namespace: one
// tp=2 × pp=2 replica of four and a spare. It needs root (netHosts; the
// test skips without it).
//
// Before any fault each of 16 prompts' greedy output (120 tokens,
// ignore_eos) is computed alone. Then requests start at a fixed rate
// (-soak.rate, 4/s), whatever the completions (open loop), each a random
// prompt of the 16, each checked against its baseline: a request is
// completed (all its tokens, finished for length, equal to the baseline),
// failed (an error, a changed token: the report says which, and the faults
// during its life) or lost (neither, 120 s after the last request was sent;
// it is cancelled then). Every chunk's arrival time is recorded.
//
// After 10 s of load, faults one at a time until -soak.duration (3m) has
// passed since the load started, and every kind has occurred: the kind is
// drawn from a shuffled deck of the four (refilled when empty, so each kind
// comes once per four faults), the victim at random among the five workers,
// except that each kind's first fault hits a member of the serving replica
// (so every kind is measured at least once on the replica):
//
//	kill       SIGKILL; the same worker id is started again in the same
//	           namespace 2–4 s later
//	stop       SIGSTOP for 2–6 s, then SIGCONT
//	partition  the worker's host cut off (netHosts.Cut) for 2–6 s, then healed
//	restart    SIGTERM: the worker drains and must exit 0 (checked); then
//	           it is started again
//
// After each fault the test waits until the replica is whole for good
// (one replica of four workers, all ready; when the victim was a member, of
// a newer placement than the one at the fault; and still the same replica
// when all workers are back), and all five workers are back (registered
// with their current pid, neither reported dead nor draining), then 3 s,
// before the next fault. Each wait is bounded (90 s from the fault): past
// it the test ends at once, saying what was missing, with the report so far
// (the requests then running get 30 s to finish).
//
// Measured per fault (and, per kind and overall, their count, median and
// max):
//   - fault → next token, for each stream in flight at the fault instant
//     (sent before it, not ended, not all its tokens received) that was
//     affected: its next token after the fault came more than 250 ms after
//     it (affectedAfter). Streams whose next token came sooner were not held
//     up at once (a spare's fault; a drain, which lets them finish); the
//     steady-state gaps before the first fault (reported) are far below
//     250 ms. A stream whose next token was already on its way and that
//     then waited for the re-formed replica is not counted as affected, so
//     the report also has the stall: the longest token gap of any stream in
//     flight that overlaps fault → whole again;
//   - whole again: fault → the replica whole for good (by kind: over the
//     faults that hit a replica member); first whole, and flaps: whole
//     replicas lost again before that;
//   - collateral: replicas removed, between the fault and the next one,
//     for a reason that names a worker other than the victim (the
//     coordinator log's "replica removed" lines: e.g. gossip reporting a
//     healthy worker dead);
//   - all back: fault → all five workers back;
//   - new ttft: the longest first-token wait of the requests sent between
//     the fault and whole again (what new requests paid: during a drain of
//     the only replica they wait while it is cordoned).
// Also: the longest wait for a token outside every fault's window (fault to
// all back), which no fault in progress explains.
//
// The report goes to t.Logf, and as JSON to the file -soak.report names.
// The test fails if a request failed or was lost, nothing was sent, or a
// fault went wrong (a drained worker that exits non-zero, a worker that
// exits on its own, a wait past its bound).
//
// Other flags: -soak.rate, -soak.seed (the same faults, victims, holds and
// prompts; not the same timing), -soak.logs DIR (every process's full log,
// copied at the end; QWENFLEET_TEST_LOGS=1 prints their tails),
// -soak.log-level, and -soak.gossip-log FILE: a memberlist observer node
// joins the workers' gossip and logs what it sees (suspicions, deaths,
// address conflicts); it is a member too, so it changes what it observes
// a little.

package server_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/memberlist"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

var (
	soakDuration  = flag.Duration("soak.duration", 3*time.Minute, "TestSoak (-tags soak): how long faults are injected under load")
	soakRate      = flag.Float64("soak.rate", 4, "TestSoak: requests started per second (open loop)")
	soakReport    = flag.String("soak.report", "", "TestSoak: write the report as JSON to this file")
	soakSeed      = flag.Uint64("soak.seed", 0, "TestSoak: seed of the random choices (0: from the clock; logged)")
	soakLogs      = flag.String("soak.logs", "", "TestSoak: copy every process's full log into this directory at the end")
	soakGossipLog = flag.String("soak.gossip-log", "", "TestSoak: join the workers' gossip with an observer node that logs what it sees to this file")
	soakLogLevel  = flag.String("soak.log-level", "info", "TestSoak: --log-level of the coordinator and the workers")
)

const (
	soakTokens     = 120                    // tokens per request
	soakPrompts    = 16                     // distinct prompts
	soakWorkers    = 5                      // tp=2 × pp=2, and a spare
	soakWarmup     = 10 * time.Second       // load before the first fault
	soakPause      = 3 * time.Second        // between all back and the next fault
	soakWholeIn    = 90 * time.Second       // bound on whole again, and on all back
	soakLostAfter  = 120 * time.Second      // after the last send: still running is lost
	soakAbortGrace = 30 * time.Second       // the same when the test is aborted
	affectedAfter  = 250 * time.Millisecond // a stream whose next token came later was affected
	soakPollPeriod = 100 * time.Millisecond
)

var soakKinds = []string{"kill", "stop", "partition", "restart"}

// soakWorker is worker id w<i>, in host i of the network.
type soakWorker struct {
	id   string
	host int
	p    *proc // the current process
	all  []*proc
}

type soak struct {
	t      *testing.T
	h      *netHosts
	etcd   string
	client pb.GeneratorClient
	rng    *rand.Rand
	ws     []*soakWorker
	load   *soakLoad
	coord  *proc

	mu      sync.Mutex
	stopped map[int]bool // pids SIGSTOPped, not yet continued
	cut     map[int]bool // hosts cut, not yet healed

	faults   []*soakFault
	problems []string
}

// unfault continues every stopped worker and heals every cut link, so that
// the cleanups that stop the processes do not wait on them. A cleanup is
// registered after each worker's start (so it runs before that worker's
// stop); it uses runIP, not Heal, so it cannot fail the test.
func (s *soak) unfault() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for pid := range s.stopped {
		syscall.Kill(pid, syscall.SIGCONT)
		delete(s.stopped, pid)
	}
	for host := range s.cut {
		runIP("link", "set", "dev", s.h.veth[host], "up")
		delete(s.cut, host)
	}
}

func (s *soak) startWorker(w *soakWorker) {
	s.t.Helper()
	w.p = startCmd(s.t, s.h.Command(w.host, binDir+"/worker", "--etcd-endpoints", s.etcd, "--id", w.id,
		"--threads", "1", "--listen", s.h.IP(w.host)+":0", "--log-level", *soakLogLevel))
	w.all = append(w.all, w.p)
	s.t.Cleanup(s.unfault)
}

func (s *soak) worker(id string) *soakWorker {
	for _, w := range s.ws {
		if w.id == id {
			return w
		}
	}
	return nil
}

// info is GetServerInfo, or an error (never fails the test: it is called
// from watchers too).
func (s *soak) info() (*pb.ServerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return s.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
}

// whole says whether info shows one replica of four ready workers (of a
// placement newer than v0 when v0 >= 0), or what is missing.
func soakWhole(info *pb.ServerInfo, v0 int64) error {
	rs := info.GetPlacement().GetReplicas()
	if len(rs) != 1 || len(rs[0].Workers) != 4 {
		return fmt.Errorf("placement v%d: %d replicas %v", info.GetPlacement().GetVersion(), len(rs), soakReplicas(rs))
	}
	if v0 >= 0 && info.Placement.Version <= v0 {
		return fmt.Errorf("placement still v%d (the one at the fault)", v0)
	}
	states := map[string]string{}
	for _, w := range info.Workers {
		states[w.Id] = w.State
	}
	for _, id := range rs[0].Workers {
		if states[id] != "ready" {
			return fmt.Errorf("placement v%d %v: %s is %q", info.Placement.Version, rs[0].Workers, id, states[id])
		}
	}
	return nil
}

func soakReplicas(rs []*pb.Placement_Replica) []string {
	var out []string
	for _, r := range rs {
		out = append(out, strings.Join(r.Workers, ","))
	}
	return out
}

// allBack says whether every worker is registered with its current pid,
// neither reported dead nor draining, and its process still runs.
func (s *soak) allBack(info *pb.ServerInfo) error {
	byID := map[string]*pb.WorkerStatus{}
	for _, w := range info.Workers {
		byID[w.Id] = w
	}
	for _, w := range s.ws {
		select {
		case <-w.p.done:
			return fmt.Errorf("%s's process exited (%v)", w.id, w.p.cmd.ProcessState)
		default:
		}
		st, ok := byID[w.id]
		switch {
		case !ok:
			return fmt.Errorf("%s not registered", w.id)
		case int(st.Pid) != w.p.cmd.Process.Pid:
			return fmt.Errorf("%s registered with pid %d, its process is %d", w.id, st.Pid, w.p.cmd.Process.Pid)
		case strings.Contains(st.State, "dead") || strings.Contains(st.State, "draining"):
			return fmt.Errorf("%s (pid %d, its current process) is %q", w.id, st.Pid, st.State)
		}
	}
	return nil
}

// wholeWatch polls the cluster from a fault on, until stopped: when the
// replica was first whole (soakWhole(info, v0)), when its current whole streak
// began, and how many times a whole replica was lost again (a flap: it was
// removed, or a newer one took its place) before the streak that lasts.
type wholeWatch struct {
	mu      sync.Mutex
	first   time.Time
	since   time.Time // zero: not whole at the last poll
	version int64     // the placement of the streak
	flaps   int
	last    error // what was missing at the last poll
	stop    chan struct{}
}

func (s *soak) watchWhole(v0 int64) *wholeWatch {
	w := &wholeWatch{stop: make(chan struct{})}
	go func() {
		for {
			info, err := s.info()
			if err == nil {
				err = soakWhole(info, v0)
			}
			now := time.Now()
			w.mu.Lock()
			w.last = err
			switch {
			case err == nil && w.since.IsZero():
				w.since, w.version = now, info.Placement.Version
				if w.first.IsZero() {
					w.first = now
				}
			case err == nil && info.Placement.Version != w.version:
				w.since, w.version = now, info.Placement.Version
				w.flaps++
			case err != nil && !w.since.IsZero() && info != nil:
				w.since = time.Time{}
				w.flaps++
			}
			w.mu.Unlock()
			select {
			case <-w.stop:
				return
			case <-time.After(soakPollPeriod):
			}
		}
	}()
	return w
}

// stable is the start of the current whole streak (zero if none) and its
// placement version.
func (w *wholeWatch) stable() (time.Time, int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.since, w.version, w.last
}

// abort ends the test with the report so far: no more requests are sent,
// those running get soakAbortGrace to finish (the others count as lost).
func (s *soak) abort(format string, args ...any) {
	s.t.Helper()
	msg := fmt.Sprintf(format, args...)
	s.problems = append(s.problems, "aborted: "+msg)
	if s.load != nil {
		s.t.Logf("aborting: %s; the running requests get %v to finish", msg, soakAbortGrace)
		s.load.finish(soakAbortGrace)
		s.writeReport()
	}
	s.t.Fatal(msg)
}

// A fault and what it did.
type soakFault struct {
	Index  int    `json:"index"`
	Kind   string `json:"kind"`
	Worker string `json:"worker"`
	Role   string `json:"role"` // "stage S rank R" of the replica, or "spare"
	member bool
	at     time.Time
	AtS    float64   `json:"at_s"`   // since the load started
	HoldS  float64   `json:"hold_s"` // stop, partition: how long; kill: until started again; restart: until it exited
	Note   string    `json:"note,omitempty"`
	wholeT time.Time // the replica whole again, for good (the streak that lasted to all back)
	backT  time.Time
	// From the streams, at the end.
	InFlight     int       `json:"in_flight"`
	Affected     int       `json:"affected"`
	NoNextToken  int       `json:"no_next_token"` // in flight, and no token came after the fault
	NextTokenS   []float64 `json:"next_token_s"`  // affected streams
	NextMedianS  float64   `json:"next_token_median_s"`
	NextMaxS     float64   `json:"next_token_max_s"`
	WholeS       float64   `json:"whole_s"`       // fault → the replica whole for good
	FirstWholeS  float64   `json:"first_whole_s"` // fault → the replica first whole (a flap may follow)
	Flaps        int       `json:"flaps"`         // whole replicas lost again before that
	StallMaxS    float64   `json:"stall_max_s"`   // the longest token gap of a stream in flight, around the fault
	Removals     []string  `json:"removals"`      // "replica removed" lines of the coordinator's log, fault to all back
	Collateral   int       `json:"collateral"`    // of those, removals that name a worker other than the victim
	AllBackS     float64   `json:"all_back_s"`
	NewRequests  int       `json:"new_requests"`          // sent between the fault and whole again
	NewFirstMaxS float64   `json:"new_first_token_max_s"` // their longest wait for a first token
}

func soakRole(info *pb.ServerInfo, id string) (string, bool) {
	for _, r := range info.GetPlacement().GetReplicas() {
		for _, st := range r.Stages {
			for rank, w := range st.Workers {
				if w == id {
					return fmt.Sprintf("stage %d rank %d", st.Index, rank), true
				}
			}
		}
		if slices.Contains(r.Workers, id) {
			return "replica member", true
		}
	}
	return "spare", false
}

// inject makes one fault of kind on a worker (a replica member when
// member), waits until the cluster is whole and all workers are back, and
// records it.
func (s *soak) inject(kind string, memberOnly bool) {
	t := s.t
	t.Helper()
	info, err := s.info()
	if err != nil {
		s.abort("server info before fault %d: %v", len(s.faults)+1, err)
	}
	var pool []string
	for _, w := range s.ws {
		if _, m := soakRole(info, w.id); m || !memberOnly {
			pool = append(pool, w.id)
		}
	}
	if len(pool) == 0 {
		s.abort("no replica member to fault: placement %v", soakReplicas(info.GetPlacement().GetReplicas()))
	}
	w := s.worker(pool[s.rng.IntN(len(pool))])
	f := &soakFault{Index: len(s.faults) + 1, Kind: kind, Worker: w.id}
	f.Role, f.member = soakRole(info, w.id)
	v0 := int64(-1)
	if f.member {
		v0 = info.Placement.Version
	}
	s.faults = append(s.faults, f)
	pid := w.p.cmd.Process.Pid
	hold := time.Duration(2000+s.rng.IntN(4001)) * time.Millisecond
	var ww *wholeWatch
	defer func() {
		if ww != nil {
			close(ww.stop)
		}
	}()

	switch kind {
	case "kill":
		if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil {
			s.abort("kill %s: %v", w.id, err)
		}
		f.at = time.Now()
		f.AtS = s.load.rel(f.at)
		ww = s.watchWhole(v0)
		select {
		case <-w.p.done:
		case <-time.After(10 * time.Second):
			s.abort("%s did not exit 10 s after SIGKILL", w.id)
		}
		time.Sleep(time.Duration(2000+s.rng.IntN(2001)) * time.Millisecond)
		s.startWorker(w)
		f.HoldS = time.Since(f.at).Seconds()
	case "stop":
		s.mu.Lock()
		s.stopped[pid] = true
		s.mu.Unlock()
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			s.abort("stop %s: %v", w.id, err)
		}
		f.at = time.Now()
		f.AtS = s.load.rel(f.at)
		ww = s.watchWhole(v0)
		time.Sleep(hold)
		syscall.Kill(pid, syscall.SIGCONT)
		s.mu.Lock()
		delete(s.stopped, pid)
		s.mu.Unlock()
		f.HoldS = time.Since(f.at).Seconds()
	case "partition":
		s.mu.Lock()
		s.cut[w.host] = true
		s.mu.Unlock()
		s.h.Cut(w.host)
		f.at = time.Now()
		f.AtS = s.load.rel(f.at)
		ww = s.watchWhole(v0)
		time.Sleep(hold)
		s.h.Heal(w.host)
		s.mu.Lock()
		delete(s.cut, w.host)
		s.mu.Unlock()
		f.HoldS = time.Since(f.at).Seconds()
	case "restart":
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			s.abort("SIGTERM %s: %v", w.id, err)
		}
		f.at = time.Now()
		f.AtS = s.load.rel(f.at)
		ww = s.watchWhole(v0)
		select {
		case <-w.p.done:
			f.HoldS = time.Since(f.at).Seconds()
			if code := w.p.cmd.ProcessState.ExitCode(); code != 0 {
				f.Note = fmt.Sprintf("exited %d after SIGTERM, want 0", code)
				s.problems = append(s.problems, fmt.Sprintf("fault %d: %s (%s) %s", f.Index, w.id, f.Role, f.Note))
			}
		case <-time.After(soakWholeIn):
			s.abort("fault %d: %s (%s) did not exit %v after SIGTERM (it should drain and exit 0)", f.Index, w.id, f.Role, soakWholeIn)
		}
		s.startWorker(w)
	default:
		panic(kind)
	}
	// Wait for the replica whole for good (a streak that lasts) and all
	// workers back.
	what := fmt.Sprintf("fault %d (%s of %s, %s)", f.Index, kind, w.id, f.Role)
	var missing error
	for {
		info, err := s.info()
		since, version, last := ww.stable()
		switch {
		case err != nil:
			missing = err
		case since.IsZero():
			missing = fmt.Errorf("replica not whole: %v", last)
		case version != info.Placement.GetVersion():
			missing = fmt.Errorf("placement v%d, whole at v%d", info.Placement.GetVersion(), version)
		default:
			missing = s.allBack(info)
		}
		if missing == nil {
			f.backT = time.Now()
			break
		}
		if time.Since(f.at) > soakWholeIn {
			break
		}
		time.Sleep(soakPollPeriod)
	}
	ww.mu.Lock()
	f.wholeT, f.Flaps = ww.since, ww.flaps
	if !ww.first.IsZero() {
		f.FirstWholeS = ww.first.Sub(f.at).Seconds()
	}
	ww.mu.Unlock()
	if !f.wholeT.IsZero() {
		f.WholeS = f.wholeT.Sub(f.at).Seconds()
	}
	if f.backT.IsZero() {
		f.Note = fmt.Sprintf("not whole with all workers back after %v: %v", soakWholeIn, missing)
		s.abort("%s: the replica whole and all workers back: not after %v: %v", what, soakWholeIn, missing)
	}
	f.AllBackS = f.backT.Sub(f.at).Seconds()
	t.Logf("fault %d at %.1fs: %s of %s (%s, hold %.1fs): whole again after %.2fs (first %.2fs, %d flaps), all back after %.2fs %s",
		f.Index, f.AtS, kind, w.id, f.Role, f.HoldS, f.WholeS, f.FirstWholeS, f.Flaps, f.AllBackS, f.Note)
}

// The load.

type soakChunk struct {
	at time.Time
	n  int // tokens so far
}

const (
	soakPending = iota
	soakCompleted
	soakFailed
	soakLost
)

type soakReq struct {
	index, prompt int
	sent          time.Time
	want          []int32

	mu     sync.Mutex
	ids    []int32
	chunks []soakChunk
	end    time.Time
	state  int
	why    string
}

func (r *soakReq) done(err error, finish string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state != soakPending {
		return
	}
	r.end = time.Now()
	switch {
	case err != nil:
		r.state, r.why = soakFailed, err.Error()
	case finish != "length":
		r.state, r.why = soakFailed, fmt.Sprintf("finished with %q after %d tokens", finish, len(r.ids))
	case !slices.Equal(r.ids, r.want):
		r.state, r.why = soakFailed, "tokens changed: "+soakFirstDiff(r.ids, r.want)
	default:
		r.state = soakCompleted
	}
}

func soakFirstDiff(got, want []int32) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return fmt.Sprintf("token %d is %d, want %d (got %d tokens, want %d)", i, got[i], want[i], len(got), len(want))
		}
	}
	return fmt.Sprintf("got %d tokens, want %d", len(got), len(want))
}

type soakLoad struct {
	client pb.GeneratorClient
	ps     [][]int32
	want   [][]int32
	rate   float64
	rng    *rand.Rand // the sender's own

	ctx    context.Context
	cancel context.CancelFunc
	stop   chan struct{} // closed: send no more
	sender sync.WaitGroup
	wg     sync.WaitGroup
	start  time.Time

	mu   sync.Mutex
	reqs []*soakReq
	once sync.Once
}

func (l *soakLoad) rel(at time.Time) float64 { return at.Sub(l.start).Seconds() }

func (l *soakLoad) run() {
	l.start = time.Now()
	interval := time.Duration(float64(time.Second) / l.rate)
	l.sender.Go(func() {
		next := l.start
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			case <-time.After(time.Until(next)):
			}
			j := l.rng.IntN(len(l.ps))
			r := &soakReq{index: i, prompt: j, want: l.want[j], sent: time.Now()}
			l.mu.Lock()
			l.reqs = append(l.reqs, r)
			l.mu.Unlock()
			l.wg.Go(func() { l.stream(r) })
			next = next.Add(interval)
		}
	})
}

func (l *soakLoad) stream(r *soakReq) {
	stream, err := l.client.Generate(l.ctx, idsReq(l.ps[r.prompt], soakTokens))
	if err != nil {
		r.done(err, "")
		return
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			err = errors.New("stream ended without complete")
		}
		if err != nil {
			r.done(err, "")
			return
		}
		switch x := resp.Response.(type) {
		case *pb.GenerateResponse_Chunk:
			now := time.Now()
			r.mu.Lock()
			r.ids = append(r.ids, x.Chunk.TokenIds...)
			r.chunks = append(r.chunks, soakChunk{now, len(r.ids)})
			r.mu.Unlock()
		case *pb.GenerateResponse_Complete:
			r.done(nil, x.Complete.FinishReason)
			return
		case *pb.GenerateResponse_Error:
			r.done(fmt.Errorf("%s: %s", x.Error.Code, x.Error.Message), "")
			return
		}
	}
}

// finish stops sending, gives the requests still running up to grace,
// marks those still running then lost and cancels them. Once.
func (l *soakLoad) finish(grace time.Duration) {
	l.once.Do(func() {
		close(l.stop)
		l.sender.Wait()
		all := make(chan struct{})
		go func() { l.wg.Wait(); close(all) }()
		select {
		case <-all:
		case <-time.After(grace):
		}
		for _, r := range l.requests() {
			r.mu.Lock()
			if r.state == soakPending {
				r.state, r.end = soakLost, time.Now()
				r.why = fmt.Sprintf("not done %v after the last request was sent (%d tokens so far)", grace, len(r.ids))
			}
			r.mu.Unlock()
		}
		l.cancel()
		select {
		case <-all:
		case <-time.After(10 * time.Second):
		}
	})
}

func (l *soakLoad) requests() []*soakReq {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.reqs)
}

// The report.

type soakFailure struct {
	Request int      `json:"request"`
	Prompt  int      `json:"prompt"`
	SentS   float64  `json:"sent_s"`
	EndS    float64  `json:"end_s"`
	State   string   `json:"state"` // failed or lost
	Why     string   `json:"why"`
	Tokens  int      `json:"tokens"`
	Faults  []string `json:"faults"` // those during its life
}

type soakKind struct {
	Kind        string  `json:"kind"`
	Faults      int     `json:"faults"`
	OnReplica   int     `json:"on_replica"` // of which on a replica member
	InFlight    int     `json:"in_flight"`
	Affected    int     `json:"affected"`
	NoNextToken int     `json:"no_next_token"`
	NextMedianS float64 `json:"next_token_median_s"`
	NextMaxS    float64 `json:"next_token_max_s"`
	WholeMedS   float64 `json:"whole_median_s"` // faults on a replica member
	WholeMaxS   float64 `json:"whole_max_s"`
	BackMedS    float64 `json:"all_back_median_s"`
	BackMaxS    float64 `json:"all_back_max_s"`
	NewFirstMax float64 `json:"new_first_token_max_s"`
	StallMaxS   float64 `json:"stall_max_s"`
	Flaps       int     `json:"flaps"`
	Collateral  int     `json:"collateral"`
}

type soakReportJSON struct {
	Duration     string  `json:"duration"`
	Elapsed      float64 `json:"elapsed_s"`
	RatePerS     float64 `json:"rate_per_s"`
	Tokens       int     `json:"tokens"`
	Prompts      int     `json:"prompts"`
	Seed         uint64  `json:"seed"`
	AffectedMS   int64   `json:"affected_after_ms"`
	Sent         int     `json:"sent"`
	Completed    int     `json:"completed"`
	Failed       int     `json:"failed"`
	Lost         int     `json:"lost"`
	SteadyGapP50 float64 `json:"steady_gap_p50_s"`
	SteadyGapP99 float64 `json:"steady_gap_p99_s"`
	SteadyGapMax float64 `json:"steady_gap_max_s"`
	SteadyTTFT50 float64 `json:"steady_first_token_p50_s"`
	SteadyTTFT99 float64 `json:"steady_first_token_p99_s"`
	// The longest wait for a token outside every fault's window (fault to
	// all back), and when it began: a stall no fault in progress explains.
	QuietMaxGapS   float64       `json:"quiet_max_gap_s"`
	QuietMaxGapAtS float64       `json:"quiet_max_gap_at_s"`
	Kinds          []soakKind    `json:"kinds"` // then "all"
	Faults         []*soakFault  `json:"faults"`
	Failures       []soakFailure `json:"failures"`
	Problems       []string      `json:"problems"`
}

func soakQuantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func soakMax(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return slices.Max(xs)
}

// analyze fills the faults' stream measurements and builds the report.
func (s *soak) analyze() *soakReportJSON {
	l := s.load
	reqs := l.requests()
	removals := s.removals()
	rep := &soakReportJSON{Duration: soakDuration.String(), Elapsed: l.rel(time.Now()), RatePerS: l.rate, Tokens: soakTokens,
		Prompts: soakPrompts, Seed: *soakSeed, AffectedMS: affectedAfter.Milliseconds(), Sent: len(reqs), Faults: s.faults,
		Problems: s.problems}
	type window struct{ from, to time.Time }
	var windows []window
	for _, f := range s.faults {
		to := f.backT
		if to.IsZero() {
			to = time.Now()
		}
		windows = append(windows, window{f.at, to})
	}
	quiet := func(a, b time.Time) bool {
		for _, w := range windows {
			if a.Before(w.to) && b.After(w.from) {
				return false
			}
		}
		return true
	}
	first := time.Now() // before it: the steady state
	if len(s.faults) > 0 {
		first = s.faults[0].at
	}
	var gaps, ttft []float64
	for _, r := range reqs {
		r.mu.Lock()
		switch r.state {
		case soakCompleted:
			rep.Completed++
			prev := r.sent
			for i, c := range r.chunks {
				switch {
				case c.at.Before(first) && i == 0:
					ttft = append(ttft, c.at.Sub(prev).Seconds())
				case c.at.Before(first):
					gaps = append(gaps, c.at.Sub(prev).Seconds())
				}
				if d := c.at.Sub(prev).Seconds(); d > rep.QuietMaxGapS && quiet(prev, c.at) {
					rep.QuietMaxGapS, rep.QuietMaxGapAtS = d, l.rel(prev)
				}
				prev = c.at
			}
		case soakFailed, soakLost:
			if r.state == soakFailed {
				rep.Failed++
			} else {
				rep.Lost++
			}
			fl := soakFailure{Request: r.index, Prompt: r.prompt, SentS: l.rel(r.sent), EndS: l.rel(r.end),
				State: map[int]string{soakFailed: "failed", soakLost: "lost"}[r.state], Why: r.why, Tokens: len(r.ids)}
			for _, f := range s.faults {
				if f.at.Before(r.end) && (f.backT.IsZero() || f.backT.After(r.sent)) {
					fl.Faults = append(fl.Faults, fmt.Sprintf("%d:%s %s", f.Index, f.Kind, f.Worker))
				}
			}
			rep.Failures = append(rep.Failures, fl)
		}
		r.mu.Unlock()
	}
	rep.SteadyGapP50, rep.SteadyGapP99, rep.SteadyGapMax = soakQuantile(gaps, 0.5), soakQuantile(gaps, 0.99), soakMax(gaps)
	rep.SteadyTTFT50, rep.SteadyTTFT99 = soakQuantile(ttft, 0.5), soakQuantile(ttft, 0.99)

	for fi, f := range s.faults {
		f.InFlight, f.Affected, f.NoNextToken, f.NextTokenS, f.NewRequests, f.NewFirstMaxS, f.StallMaxS = 0, 0, 0, nil, 0, 0, 0
		// Stalls: token gaps that overlap the fault's window (to the
		// replica whole again, or to all back, or to now).
		wend := cmp.Or(f.wholeT, f.backT, time.Now())
		for _, r := range reqs {
			r.mu.Lock()
			if r.sent.Before(f.at) && (r.end.IsZero() || r.end.After(f.at)) {
				before := 0
				var next time.Time
				for _, c := range r.chunks {
					if c.at.After(f.at) {
						next = c.at
						break
					}
					before = c.n
				}
				if before < soakTokens {
					f.InFlight++
					prev := r.sent
					for _, at := range append(soakChunkTimes(r.chunks), cmp.Or(r.end, time.Now())) {
						if at.After(f.at) && prev.Before(wend) {
							f.StallMaxS = max(f.StallMaxS, at.Sub(prev).Seconds())
						}
						prev = at
					}
					switch {
					case next.IsZero():
						f.NoNextToken++
					case next.Sub(f.at) > affectedAfter:
						f.Affected++
						f.NextTokenS = append(f.NextTokenS, next.Sub(f.at).Seconds())
					}
				}
			}
			if !f.wholeT.IsZero() && !r.sent.Before(f.at) && r.sent.Before(f.wholeT) {
				f.NewRequests++
				if len(r.chunks) > 0 {
					f.NewFirstMaxS = max(f.NewFirstMaxS, r.chunks[0].at.Sub(r.sent).Seconds())
				}
			}
			r.mu.Unlock()
		}
		f.NextMedianS, f.NextMaxS = soakQuantile(f.NextTokenS, 0.5), soakMax(f.NextTokenS)
		f.Removals, f.Collateral = nil, 0
		until := time.Now() // removals belong to the last fault before them
		if fi < len(s.faults)-1 {
			until = s.faults[fi+1].at
		}
		for _, rm := range removals {
			if rm.at.Before(f.at) || !rm.at.Before(until) {
				continue
			}
			f.Removals = append(f.Removals, fmt.Sprintf("+%.2fs %s: %s", rm.at.Sub(f.at).Seconds(), rm.replica, rm.why))
			if m := soakWorkerInWhy.FindStringSubmatch(rm.why); m != nil && m[1] != f.Worker {
				f.Collateral++
			}
		}
	}
	for _, kind := range append(slices.Clone(soakKinds), "all") {
		k := soakKind{Kind: kind}
		var next, wholes, backs []float64
		for _, f := range s.faults {
			if kind != "all" && f.Kind != kind || f.wholeT.IsZero() {
				continue
			}
			k.Faults++
			k.InFlight += f.InFlight
			k.Affected += f.Affected
			k.NoNextToken += f.NoNextToken
			next = append(next, f.NextTokenS...)
			if f.member {
				k.OnReplica++
				wholes = append(wholes, f.WholeS)
			}
			if !f.backT.IsZero() {
				backs = append(backs, f.AllBackS)
			}
			k.NewFirstMax = max(k.NewFirstMax, f.NewFirstMaxS)
			k.StallMaxS = max(k.StallMaxS, f.StallMaxS)
			k.Flaps += f.Flaps
			k.Collateral += f.Collateral
		}
		k.NextMedianS, k.NextMaxS = soakQuantile(next, 0.5), soakMax(next)
		k.WholeMedS, k.WholeMaxS = soakQuantile(wholes, 0.5), soakMax(wholes)
		k.BackMedS, k.BackMaxS = soakQuantile(backs, 0.5), soakMax(backs)
		rep.Kinds = append(rep.Kinds, k)
	}
	return rep
}

func soakChunkTimes(cs []soakChunk) []time.Time {
	out := make([]time.Time, len(cs))
	for i, c := range cs {
		out[i] = c.at
	}
	return out
}

type soakRemoval struct {
	at           time.Time
	replica, why string
}

var (
	soakRemovedLine = regexp.MustCompile(`^time=(\S+) .*msg="replica removed" replica=(\S+) why="((?:[^"\\]|\\.)*)"`)
	soakWorkerInWhy = regexp.MustCompile(`\bworker (\S+?):? `)
)

// removals are the coordinator's "replica removed" log lines (text
// format): when, which replica, why. Best effort: a line it cannot read is
// skipped.
func (s *soak) removals() []soakRemoval {
	raw, err := os.ReadFile(s.coord.log.Name())
	if err != nil {
		return nil
	}
	var out []soakRemoval
	for line := range strings.Lines(string(raw)) {
		m := soakRemovedLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		why, err := strconv.Unquote(`"` + m[3] + `"`)
		if err != nil {
			why = m[3]
		}
		out = append(out, soakRemoval{at, m[2], why})
	}
	return out
}

// writeReport logs the report as tables, and writes it as JSON to
// -soak.report.
func (s *soak) writeReport() *soakReportJSON {
	rep := s.analyze()
	var b strings.Builder
	fmt.Fprintf(&b, "soak: %s of faults (%.0fs in all), %.1f requests/s open loop, %d tokens each from %d prompts, seed %d\n",
		rep.Duration, rep.Elapsed, rep.RatePerS, rep.Tokens, rep.Prompts, rep.Seed)
	fmt.Fprintf(&b, "requests: sent %d, completed %d, failed %d, lost %d\n", rep.Sent, rep.Completed, rep.Failed, rep.Lost)
	fmt.Fprintf(&b, "steady state (before the first fault): inter-token gap p50 %.3fs, p99 %.3fs, max %.3fs; first token p50 %.3fs, p99 %.3fs\n",
		rep.SteadyGapP50, rep.SteadyGapP99, rep.SteadyGapMax, rep.SteadyTTFT50, rep.SteadyTTFT99)
	fmt.Fprintf(&b, "longest wait for a token outside every fault's window (fault to all back): %.3fs, from %.1fs\n", rep.QuietMaxGapS, rep.QuietMaxGapAtS)
	if rep.SteadyGapP99 > affectedAfter.Seconds()/2 {
		fmt.Fprintf(&b, "WARNING: the steady-state p99 gap is more than half the %v that counts a stream as affected: the counts mean little\n", affectedAfter)
	}
	fmt.Fprintf(&b, `
next tok: fault → next token of each affected stream (in flight at the fault, next token more than %v after it)
stall: the longest token gap of a stream in flight, overlapping fault → whole again
whole: fault → one replica of 4 ready workers, for good (by kind: faults on a replica member only); first: when first whole
flaps: whole replicas lost again before that; collateral: replicas removed naming a worker other than the victim (coordinator log)
back: fault → all 5 workers registered again; new ttft: longest first-token wait of requests sent between fault and whole

`, affectedAfter)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "kind\tfaults\ton replica\tin flight\taffected\tno next\tnext tok med\tmax\tstall max\twhole med\tmax\tflaps\tcollateral\tback med\tmax\tnew ttft max\t")
	for _, k := range rep.Kinds {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%.2fs\t%.2fs\t%.2fs\t%.2fs\t%.2fs\t%d\t%d\t%.2fs\t%.2fs\t%.2fs\t\n", k.Kind, k.Faults, k.OnReplica,
			k.InFlight, k.Affected, k.NoNextToken, k.NextMedianS, k.NextMaxS, k.StallMaxS, k.WholeMedS, k.WholeMaxS, k.Flaps, k.Collateral,
			k.BackMedS, k.BackMaxS, k.NewFirstMax)
	}
	tw.Flush()
	b.WriteString("\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "#\tat\tkind\tworker\trole\thold\tin flight\taffected\tnext tok med\tmax\tstall\twhole\tfirst\tflaps\tcollateral\tback\tnew ttft max\t")
	for _, f := range rep.Faults {
		back := "-"
		if f.AllBackS > 0 {
			back = fmt.Sprintf("%.2fs", f.AllBackS)
		}
		fmt.Fprintf(tw, "%d\t%.1fs\t%s\t%s\t%s\t%.1fs\t%d\t%d\t%.2fs\t%.2fs\t%.2fs\t%.2fs\t%.2fs\t%d\t%d\t%s\t%.2fs\t\n", f.Index, f.AtS, f.Kind,
			f.Worker, f.Role, f.HoldS, f.InFlight, f.Affected, f.NextMedianS, f.NextMaxS, f.StallMaxS, f.WholeS, f.FirstWholeS, f.Flaps,
			f.Collateral, back, f.NewFirstMaxS)
	}
	tw.Flush()
	for _, f := range rep.Faults {
		if f.Note != "" {
			fmt.Fprintf(&b, "fault %d (%s of %s): %s\n", f.Index, f.Kind, f.Worker, f.Note)
		}
	}
	for _, f := range rep.Faults {
		if f.Collateral > 0 || f.Flaps > 0 {
			fmt.Fprintf(&b, "fault %d (%s of %s): replicas removed: %s\n", f.Index, f.Kind, f.Worker, strings.Join(f.Removals, "; "))
		}
	}
	for i, fl := range rep.Failures {
		if i == 20 {
			fmt.Fprintf(&b, "... %d more failed or lost\n", len(rep.Failures)-20)
			break
		}
		fmt.Fprintf(&b, "%s: request %d (prompt %d, sent at %.1fs, ended %.1fs, %d tokens; faults %v): %s\n",
			fl.State, fl.Request, fl.Prompt, fl.SentS, fl.EndS, fl.Tokens, fl.Faults, fl.Why)
	}
	for _, p := range rep.Problems {
		fmt.Fprintf(&b, "problem: %s\n", p)
	}
	s.t.Logf("\n%s", b.String())
	if *soakReport != "" {
		raw, err := json.MarshalIndent(rep, "", "  ")
		if err == nil {
			err = os.WriteFile(*soakReport, append(raw, '\n'), 0o644)
		}
		if err != nil {
			s.t.Errorf("writing the report: %v", err)
		}
	}
	return rep
}

func TestSoak(t *testing.T) {
	needE2E(t)
	if *soakRate <= 0 {
		t.Fatalf("-soak.rate %v: want > 0", *soakRate)
	}
	seed := *soakSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
		*soakSeed = seed
	}
	t.Logf("seed %d (-soak.seed to choose the same faults, victims and prompts again)", seed)
	h := newNetHosts(t, soakWorkers)
	s := &soak{t: t, h: h, rng: rand.New(rand.NewPCG(seed, 1)), stopped: map[int]bool{}, cut: map[int]bool{}}
	if *soakLogs != "" {
		t.TempDir() // its removal is registered now: it runs after the copy below
		t.Cleanup(func() { s.copyLogs(*soakLogs) })
	}
	etcdPort, coordPort := freePortOn(t, h.HostIP()), freePortOn(t, h.HostIP())
	addr := fmt.Sprintf("%s:%d", h.HostIP(), coordPort)
	s.etcd = startEtcdOn(t, h.HostIP(), etcdPort)
	s.coord = start(t, "coordinator", "--listen", addr, "--data-dir", t.TempDir(), "--local-workers", "0",
		"--model", refDir("dense-gqa-f32"), "--tp", "2", "--pp", "2", "--etcd-endpoints", s.etcd,
		"--log-level", *soakLogLevel)
	_, s.client = dial(t, addr)
	for i := range soakWorkers {
		w := &soakWorker{id: fmt.Sprintf("w%d", i), host: i}
		s.ws = append(s.ws, w)
		s.startWorker(w)
	}
	waitReady(t, s.client, s.coord, 120*time.Second)
	waitFor(t, soakWholeIn, "a replica of 4 ready workers and all 5 workers registered", func() error {
		info, err := s.info()
		if err != nil {
			return err
		}
		if err := soakWhole(info, -1); err != nil {
			return err
		}
		return s.allBack(info)
	})

	if *soakGossipLog != "" {
		s.observeGossip(*soakGossipLog)
	}
	ps := testPrompts(soakPrompts, 512)
	want := greedyAlone(t, s.client, ps, soakTokens)
	for i, w := range want {
		if len(w) != soakTokens {
			t.Fatalf("prompt %d alone: %d tokens, want %d", i, len(w), soakTokens)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	s.load = &soakLoad{client: s.client, ps: ps, want: want, rate: *soakRate, rng: rand.New(rand.NewPCG(seed, 2)),
		ctx: ctx, cancel: cancel, stop: make(chan struct{})}
	t.Cleanup(func() { s.load.finish(0) }) // on an early end: before the processes stop
	s.load.run()
	t.Logf("load: %.1f requests/s of %d tokens; first fault after %v, faults for %v", *soakRate, soakTokens, soakWarmup, *soakDuration)
	time.Sleep(soakWarmup)

	var deck []string
	seen := map[string]int{}
	for time.Since(s.load.start) < *soakDuration || len(seen) < len(soakKinds) {
		if len(deck) == 0 {
			deck = slices.Clone(soakKinds)
			s.rng.Shuffle(len(deck), func(i, j int) { deck[i], deck[j] = deck[j], deck[i] })
		}
		kind := deck[0]
		deck = deck[1:]
		s.inject(kind, seen[kind] == 0)
		seen[kind]++
		time.Sleep(soakPause)
	}

	t.Logf("faults done at %.1fs: the last requests finish (at most %v)", s.load.rel(time.Now()), soakLostAfter)
	s.load.finish(soakLostAfter)
	// Every worker still runs (none exited on its own).
	for _, w := range s.ws {
		select {
		case <-w.p.done:
			s.problems = append(s.problems, fmt.Sprintf("%s's process exited during the run: %v", w.id, w.p.cmd.ProcessState))
		default:
		}
	}
	rep := s.writeReport()
	if rep.Sent == 0 {
		t.Error("no request was sent")
	}
	if rep.Failed > 0 || rep.Lost > 0 {
		t.Errorf("%d of %d requests failed, %d lost (see the report)", rep.Failed, rep.Sent, rep.Lost)
	}
	for _, p := range rep.Problems {
		t.Error(p)
	}
}

// copyLogs copies every process's log into dir (coordinator.log,
// w<i>-<n>.log for the n-th process of worker i).
func (s *soak) copyLogs(dir string) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.t.Errorf("-soak.logs: %v", err)
		return
	}
	cp := func(p *proc, name string) {
		raw, err := os.ReadFile(p.log.Name())
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, name), raw, 0o644)
		}
		if err != nil {
			s.t.Errorf("-soak.logs: %v", err)
		}
	}
	for _, w := range s.ws {
		for n, p := range w.all {
			cp(p, fmt.Sprintf("%s-%d.log", w.id, n))
		}
	}
	cp(s.coord, "coordinator.log")
}

type soakGossipObserver struct{ l *log.Logger }

func (o soakGossipObserver) NotifyJoin(n *memberlist.Node) {
	o.l.Printf("EVENT join %s %s:%d", n.Name, n.Addr, n.Port)
}
func (o soakGossipObserver) NotifyLeave(n *memberlist.Node) {
	o.l.Printf("EVENT leave/dead %s %s:%d", n.Name, n.Addr, n.Port)
}
func (o soakGossipObserver) NotifyUpdate(n *memberlist.Node) {
	o.l.Printf("EVENT update %s %s:%d", n.Name, n.Addr, n.Port)
}
func (o soakGossipObserver) NotifyConflict(existing, other *memberlist.Node) {
	o.l.Printf("EVENT conflict %s: mine %s:%d, theirs %s:%d", existing.Name, existing.Addr, existing.Port, other.Addr, other.Port)
}

func (s *soak) observeGossip(path string) {
	t := s.t
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	l := log.New(f, "", log.LstdFlags|log.Lmicroseconds)
	mc := memberlist.DefaultLocalConfig()
	mc.ProbeInterval = 200 * time.Millisecond
	mc.ProbeTimeout = 100 * time.Millisecond
	mc.GossipInterval = 50 * time.Millisecond
	mc.SuspicionMult = 2
	mc.PushPullInterval = 5 * time.Second
	mc.Name = "soak-observer"
	mc.BindAddr = s.h.HostIP()
	mc.BindPort = 0
	mc.Logger = l
	o := soakGossipObserver{l}
	mc.Events = o
	mc.Conflict = o
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ml.Shutdown(); f.Close() })
	raw, _ := os.ReadFile(s.ws[0].p.log.Name())
	m := regexp.MustCompile(`gossip=(\S+)`).FindStringSubmatch(string(raw))
	if m == nil {
		t.Fatalf("no gossip address in w0's log: %s", raw)
	}
	if _, err := ml.Join([]string{m[1]}); err != nil {
		t.Fatal(err)
	}
}
