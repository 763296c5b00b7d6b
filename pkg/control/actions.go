package control

import (
	"fmt"
	"strings"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
)

// Action is an output of Machine.Step, for the adapter to carry out in
// order. Actions that take time (loads, calls to workers, etcd writes) run
// in the background and report back with the event each names.
type Action interface {
	action()
	String() string
}

// Member is one worker of a replica.
type Member struct {
	Worker Worker
	Stage  int
	Rank   int // in the stage
}

// Connect opens connections to a new replica's workers (closed by Drop).
type Connect struct {
	Gen        int64
	TP, PP, EP int
	Members    []Member // stage by stage, rank by rank
}

// WritePlacement stores Doc in etcd, conditioned on Fence (the leadership's
// election key create revision). Answer: PlacementWritten or
// PlacementWriteFailed with Seq. A later write supersedes an earlier one
// still queued.
type WritePlacement struct {
	Seq   int64
	Fence int64
	Doc   schema.Placement
}

// Load has one worker load its assignment of replica Gen (read from the
// placement). Answer: Loaded or LoadFailed.
type Load struct {
	Gen    int64
	Worker string
}

// Warmup sizes the KV pools of replica Gen's workers (to the smallest of
// them) and runs a step. Answer: WarmedUp or WarmupFailed.
type Warmup struct{ Gen int64 }

// Serve starts replica Gen's engine over Blocks KV blocks, with its steps
// on expert placement ExpertsVersion, and routes requests to it.
type Serve struct {
	Gen            int64
	Blocks         int64
	ExpertsVersion int64
}

// Drop removes replica Gen: its requests move to the other replicas
// (recomputed there), its in-flight loads are cancelled, its connections
// closed.
type Drop struct {
	Gen int64
	Why string
}

// GossipJoin has gossip probe a worker.
type GossipJoin struct {
	Worker string
	Addr   string
}

// CheckHealth asks every worker of replica Gen for its health. Answer:
// HealthChecked.
type CheckHealth struct{ Gen int64 }

// ConfirmWorker asks whether a worker that left etcd's list still answers
// at Addr (a direct health check). Answer: WorkerConfirmed.
type ConfirmWorker struct{ Worker, Addr string }

// StopAdmitting has the router send replica Gen no new request (it keeps
// running those it has). Answer, when it holds none: ReplicaIdle.
type StopAdmitting struct{ Gen int64 }

// Drained says a draining worker serves nothing any more: it may leave.
type Drained struct{ Worker string }

// DrainAnswer answers a DrainRequested with Req: the drain started (Gen is
// the replica that drains, 0 when the worker served in none; Workers are
// its workers), or it was refused (Err; NotFound when no such worker is
// registered).
type DrainAnswer struct {
	Req      int64
	Worker   string
	Timeout  time.Duration // the drain's
	Gen      int64
	Workers  []string
	Err      string
	NotFound bool
}

// GatherExperts reads replica Gen's expert counts. Answer: ExpertCounts.
type GatherExperts struct{ Gen int64 }

// LoadExperts has every worker of replica Gen load expert table Version
// next to the one in use. Answer: ExpertsLoaded.
type LoadExperts struct {
	Gen     int64
	Version int64
	Experts []int32 // expertparallel.Table.Flat
	Slots   int
}

// CancelExperts has every worker of replica Gen forget table Version.
type CancelExperts struct {
	Gen     int64
	Version int64
}

// SwitchExperts has replica Gen's steps after those already sent use
// table Version.
type SwitchExperts struct {
	Gen     int64
	Version int64
}

// ExpertReport answers RebalanceRequested Req.
type ExpertReport struct {
	Req      int64
	Replicas []ExpertReplica
	// Err, when not "", says why the request failed; BadRequest when it was
	// its arguments.
	Err        string
	BadRequest bool
}

// ExpertReplica is one replica's part of an ExpertReport.
type ExpertReplica struct {
	Gen            int64
	EP             int
	Imbalance      float64 // since the placement in use was made
	ImbalanceAfter float64 // of the new placement on the same counts (a rebalance)
	ExpertsVersion int64
	RankTokens     []float64
	Tokens         int64
	Slots          int
	Loaded         []int32 // experts each worker read (a rebalance)
}

// Note is a decision worth a log line.
type Note struct{ Msg string }

func (Connect) action()        {}
func (WritePlacement) action() {}
func (Load) action()           {}
func (Warmup) action()         {}
func (Serve) action()          {}
func (Drop) action()           {}
func (GossipJoin) action()     {}
func (CheckHealth) action()    {}
func (ConfirmWorker) action()  {}
func (StopAdmitting) action()  {}
func (Drained) action()        {}
func (DrainAnswer) action()    {}
func (GatherExperts) action()  {}
func (LoadExperts) action()    {}
func (CancelExperts) action()  {}
func (SwitchExperts) action()  {}
func (ExpertReport) action()   {}
func (Note) action()           {}

func (a Connect) String() string {
	return fmt.Sprintf("connect %s tp=%d pp=%d ep=%d %s", Key(a.Gen), a.TP, a.PP, a.EP, membersString(a.Members))
}

func membersString(ms []Member) string {
	var b strings.Builder
	for i, m := range ms {
		if i > 0 {
			if m.Stage != ms[i-1].Stage {
				b.WriteString("|")
			} else {
				b.WriteString(",")
			}
		}
		b.WriteString(m.Worker.ID)
	}
	return "[" + b.String() + "]"
}

func (a WritePlacement) String() string {
	var rs []string
	for _, r := range a.Doc.Replicas {
		var st []string
		for _, s := range r.Stages {
			var ws []string
			for _, rk := range s.Ranks {
				ws = append(ws, rk.Worker)
			}
			st = append(st, strings.Join(ws, ","))
		}
		e := ""
		if r.EP > 1 {
			e = fmt.Sprintf(" experts=v%d", r.ExpertsVersion)
		}
		rs = append(rs, fmt.Sprintf("%s[%s]%s", Key(r.Generation), strings.Join(st, "|"), e))
	}
	return fmt.Sprintf("write-placement seq=%d fence=%d last-gen=%d replicas=%s", a.Seq, a.Fence, a.Doc.LastGeneration, strings.Join(rs, " "))
}

func (a Load) String() string          { return fmt.Sprintf("load %s %s", Key(a.Gen), a.Worker) }
func (a Warmup) String() string        { return "warmup " + Key(a.Gen) }
func (a Serve) String() string         { return fmt.Sprintf("serve %s blocks=%d", Key(a.Gen), a.Blocks) }
func (a Drop) String() string          { return fmt.Sprintf("drop %s: %s", Key(a.Gen), a.Why) }
func (a GossipJoin) String() string    { return fmt.Sprintf("gossip-join %s %s", a.Worker, a.Addr) }
func (a CheckHealth) String() string   { return "check-health " + Key(a.Gen) }
func (a StopAdmitting) String() string { return "stop-admitting " + Key(a.Gen) }
func (a ConfirmWorker) String() string { return "confirm-worker " + a.Worker + " at " + a.Addr }
func (a Drained) String() string       { return "drained " + a.Worker }
func (a DrainAnswer) String() string {
	if a.Err != "" {
		return fmt.Sprintf("drain-answer req=%d refused: %s", a.Req, a.Err)
	}
	return fmt.Sprintf("drain-answer req=%d replica=%s workers=%s", a.Req, keyOrNone(a.Gen), strings.Join(a.Workers, ","))
}

func keyOrNone(gen int64) string {
	if gen == 0 {
		return "none"
	}
	return Key(gen)
}
func (a GatherExperts) String() string { return "gather-experts " + Key(a.Gen) }
func (a LoadExperts) String() string {
	return fmt.Sprintf("load-experts %s v=%d slots=%d", Key(a.Gen), a.Version, a.Slots)
}
func (a CancelExperts) String() string {
	return fmt.Sprintf("cancel-experts %s v=%d", Key(a.Gen), a.Version)
}
func (a SwitchExperts) String() string {
	return fmt.Sprintf("switch-experts %s v=%d", Key(a.Gen), a.Version)
}
func (a ExpertReport) String() string {
	if a.Err != "" {
		return fmt.Sprintf("expert-report req=%d error (bad request: %v): %s", a.Req, a.BadRequest, a.Err)
	}
	var rs []string
	for _, r := range a.Replicas {
		s := fmt.Sprintf("%s imbalance=%.3f tokens=%d v=%d slots=%d", Key(r.Gen), r.Imbalance, r.Tokens, r.ExpertsVersion, r.Slots)
		if r.Loaded != nil {
			s += fmt.Sprintf(" after=%.3f loaded=%v", r.ImbalanceAfter, r.Loaded)
		}
		rs = append(rs, s)
	}
	return fmt.Sprintf("expert-report req=%d [%s]", a.Req, strings.Join(rs, "; "))
}
func (a Note) String() string { return "note: " + a.Msg }
