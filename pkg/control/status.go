package control

import (
	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
)

// Status is a snapshot of the machine for status RPCs and metrics.
type Status struct {
	Leader bool
	// Workers maps every registered worker to its state: the state of the
	// replica it serves in (placing, loading, warming, ready, draining), or
	// why it serves in none.
	Workers  map[string]string
	Replicas []ReplicaStatus // oldest first
	// PlanError says why the free workers make no replica ("" when they do,
	// or there are none).
	PlanError string
}

// ReplicaStatus is one replica in a Status.
type ReplicaStatus struct {
	Gen            int64
	State          State
	TP, PP, EP     int
	Workers        []string // stage by stage, rank by rank
	Members        []Member
	Blocks         int64
	Table          *expertparallel.Table // expert-parallel replicas: the table in use (not to be modified)
	ExpertsVersion int64
}

// Status reports the machine's state.
func (m *Machine) Status() Status {
	s := Status{Leader: m.leader, Workers: map[string]string{}, PlanError: m.planErr}
	for id := range m.workers {
		switch r := m.owner[id]; {
		case r != nil:
			s.Workers[id] = string(r.state)
		case !m.unlisted[id].IsZero():
			s.Workers[id] = "unregistered: not in etcd's list, waiting for it to register again"
		case m.why[id] != "":
			s.Workers[id] = m.why[id]
		default:
			s.Workers[id] = "idle"
		}
	}
	for _, gen := range sortedKeys(m.replicas) {
		r := m.replicas[gen]
		s.Replicas = append(s.Replicas, ReplicaStatus{Gen: gen, State: r.state, TP: r.tp, PP: r.pp, EP: r.ep, Workers: r.workers(),
			Members: r.members, Blocks: r.blocks, Table: r.table, ExpertsVersion: r.expVersion})
	}
	return s
}
