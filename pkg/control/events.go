package control

import (
	"fmt"
	"time"
)

// Worker is a registered worker as the control plane sees it.
type Worker struct {
	ID          string
	Addr        string // its gRPC address
	GossipAddr  string // "" when it does not gossip
	Host        string
	Backend     string // "cpu" or "cuda"
	PID         int
	MemoryBytes int64 // 0: unknown (memory does not limit the plan)
	// Registered is when this registration was made: a worker that
	// registers again (its lease was lost, or it was paused) is a new
	// member with a fresh state, as a new process is.
	Registered time.Time
	// Draining is the worker asking to be drained (its state in etcd is
	// "draining": it got a SIGTERM); DrainTimeout is how long its
	// replica's requests may take to finish (0: Config.DrainTimeout).
	Draining     bool
	DrainTimeout time.Duration
}

// sameProcess says whether w and o are the same registration of the same
// process of a worker: a worker that comes back with another pid or
// address, or registers again, is a new one.
func (w Worker) sameProcess(o Worker) bool {
	return w.Addr == o.Addr && w.PID == o.PID && w.Registered.Equal(o.Registered)
}

// Event is an input of Machine.Step.
type Event interface{ event() }

// Workers is the whole set of workers registered in etcd now (what a watch
// of the workers' keys reports). A known worker not listed is not taken
// for gone at once (its lease may have expired in an etcd outage while it
// serves on): the machine asks for it to be checked (ConfirmWorker) and
// waits up to Config.LapseGrace for it to register again.
type Workers struct{ List []Worker }

// WorkerConfirmed answers ConfirmWorker: whether the worker answered a
// direct check. One that does not is gone.
type WorkerConfirmed struct {
	ID    string
	Alive bool
}

// LeadershipRenewed says the term goes on under a new election key: the
// lease expired (etcd was away longer than its TTL) and this coordinator
// won again at once. Fence is the new key's create revision; replicas stay.
type LeadershipRenewed struct{ Fence int64 }

// WorkerUp is one worker registered, or changed (a new process when its pid
// or address changed).
type WorkerUp struct{ Worker Worker }

// WorkerGone is a worker whose etcd key went (its lease expired or it left).
type WorkerGone struct{ ID string }

// GossipSuspect is gossip reporting a worker dead (and the adapter's
// direct check confirming it). Addr is the gossip address the report is
// about: a report about another address than the registered one is about
// an earlier process of the worker, and changes nothing.
type GossipSuspect struct{ ID, Addr string }

// GossipAlive is gossip seeing a worker (again) at Addr.
type GossipAlive struct{ ID, Addr string }

// PlacementWritten says the placement writes up to Seq are stored.
type PlacementWritten struct{ Seq int64 }

// PlacementWriteFailed says the write Seq was not made; Fenced when etcd
// refused it because this coordinator no longer leads.
type PlacementWriteFailed struct {
	Seq    int64
	Fenced bool
	Err    string
}

// Loaded says a worker of replica Gen loaded its slice.
type Loaded struct {
	Gen    int64
	Worker string
}

// LoadFailed says a worker of replica Gen did not load its slice.
type LoadFailed struct {
	Gen    int64
	Worker string
	Err    string
}

// WarmedUp says every worker of replica Gen sized its KV pool to Blocks
// blocks and ran a step.
type WarmedUp struct {
	Gen    int64
	Blocks int64
}

// WarmupFailed says replica Gen did not warm up.
type WarmupFailed struct {
	Gen int64
	Err string
}

// StepFailed says a step of replica Gen failed; Refused when a worker
// refused it (another assignment, or no KV pool: it cannot run steps of
// this replica any more).
type StepFailed struct {
	Gen     int64
	Refused bool
	Err     string
	// Superseded: the refusal says a worker holds a newer assignment.
	// Unconfirmed: etcd has not confirmed this coordinator's lease for
	// longer than its TTL (another coordinator may lead). Both: the
	// workers took another leader's assignment, and this coordinator steps
	// down (a superseded step while the lease is confirmed is a late step
	// of a replica this leader re-formed; other refusals, e.g. a worker
	// restarted with no model, are a worker's failure).
	Superseded, Unconfirmed bool
}

// HealthChecked answers CheckHealth: Unhealthy names the first worker that
// failed its check ("" when all passed).
type HealthChecked struct {
	Gen       int64
	Unhealthy string
}

// LeadershipGained says this coordinator won the election. Fence names the
// term (the election key's create revision) for conditional writes;
// LastGeneration is the highest replica generation in the stored placement.
type LeadershipGained struct {
	Fence          int64
	LastGeneration int64
}

// LeadershipLost says the term ended (session expired, resigned, or
// stopping).
type LeadershipLost struct{}

// DrainRequested asks to take a worker out: its replica takes no new
// requests, and is released when idle or after Timeout (0:
// Config.DrainTimeout). Unless Force, a drain that would leave no replica
// serving is refused. With Req > 0 the machine answers with a DrainAnswer
// of the same Req.
type DrainRequested struct {
	Worker  string
	Timeout time.Duration
	Force   bool
	Req     int64
}

// ReplicaIdle says replica Gen holds no request (running or waiting).
type ReplicaIdle struct{ Gen int64 }

// RebalanceRequested asks for the expert load of every ready
// expert-parallel replica and, with Rebalance, to re-place their experts
// with Redundant extra slots per rank (< 0: Config.RedundantExperts). The
// answer is an ExpertReport action with the same Req (> 0).
type RebalanceRequested struct {
	Req       int64
	Rebalance bool
	Redundant int
}

// ExpertCounts answers GatherExperts: the cumulative routed-token counts
// of replica Gen, [layer][expert].
type ExpertCounts struct {
	Gen    int64
	Counts [][]int64
	Err    string
}

// ExpertsLoaded answers LoadExperts: every worker loaded the table of
// Version (Loaded: experts read, by member), or Err.
type ExpertsLoaded struct {
	Gen     int64
	Version int64
	Loaded  []int32
	Err     string
}

// Tick is time passing (the time is Step's).
type Tick struct{}

func (Workers) event()              {}
func (WorkerUp) event()             {}
func (WorkerGone) event()           {}
func (WorkerConfirmed) event()      {}
func (LeadershipRenewed) event()    {}
func (GossipSuspect) event()        {}
func (GossipAlive) event()          {}
func (PlacementWritten) event()     {}
func (PlacementWriteFailed) event() {}
func (Loaded) event()               {}
func (LoadFailed) event()           {}
func (WarmedUp) event()             {}
func (WarmupFailed) event()         {}
func (StepFailed) event()           {}
func (HealthChecked) event()        {}
func (LeadershipGained) event()     {}
func (LeadershipLost) event()       {}
func (DrainRequested) event()       {}
func (ReplicaIdle) event()          {}
func (RebalanceRequested) event()   {}
func (ExpertCounts) event()         {}
func (ExpertsLoaded) event()        {}
func (Tick) event()                 {}

// Key is a replica's name in logs, the router and status: "g<generation>".
func Key(gen int64) string { return fmt.Sprintf("g%d", gen) }
