// Package schema is what the cluster keeps in etcd, as plain data: the
// placement document the leading coordinator writes under <prefix>placement
// and every worker reads its assignment from. It imports no etcd (pkg/cluster
// stores the bytes; pkg/control builds the document without any I/O), so
// "placement" means one thing across the coordinator, the workers and the
// store.
//
// A placement lists replicas; a replica is a pipeline of stages; a stage is
// a list of ranks (tensor-parallel, or expert-parallel with attention split
// over groups of TP), each one worker. A replica's Generation names its
// layout: a worker loads "its assignment of generation G", and a step of
// another generation is refused, so a worker never mixes two layouts.
package schema

import (
	"encoding/json"
	"fmt"
)

// Placement is the document under <prefix>placement.
type Placement struct {
	// Version is the etcd key version the document was read at (not
	// stored: filled by the reader).
	Version  int64  `json:"version"`
	Model    string `json:"model"`
	Quantize string `json:"quantize,omitempty"`
	// Compute is the workers' product arithmetic for bf16 weights ("bf16",
	// "f32"; "": each worker's own --compute).
	Compute string `json:"compute,omitempty"`
	// LastGeneration is the highest replica generation any leader has
	// handed out; a new leader starts above it, so a generation is never
	// reused for another layout.
	LastGeneration int64     `json:"last_generation,omitempty"`
	Replicas       []Replica `json:"replicas"`
}

// Replica is one copy of the model.
type Replica struct {
	Index int `json:"index"`
	// Generation identifies this replica's layout: workers take it as their
	// assignment version, and steps of another generation are refused.
	Generation int64 `json:"generation"`
	TP         int   `json:"tp"`
	PP         int   `json:"pp"`
	EP         int   `json:"ep,omitempty"`
	// Experts is the expert placement (expertparallel.Table.Flat) of an
	// expert-parallel replica, ExpertsVersion its version.
	Experts        []int32  `json:"experts,omitempty"`
	ExpertsVersion int64    `json:"experts_version,omitempty"`
	Workers        []string `json:"workers"` // every worker, stage by stage, rank by rank
	LayersBegin    int      `json:"layers_begin"`
	LayersEnd      int      `json:"layers_end"`
	Stages         []Stage  `json:"stages"`
	// Secret is the generation's Exchange secret: a random token (hex)
	// the leader makes for the generation, which its workers present to
	// each other on their Exchange streams. Only readers of the placement
	// know it: it is never logged, nor shown by the public API.
	Secret string `json:"secret,omitempty"`
}

// Stage is a pipeline stage of a replica.
type Stage struct {
	Index       int    `json:"index"`
	LayersBegin int    `json:"layers_begin"`
	LayersEnd   int    `json:"layers_end"`
	Ranks       []Rank `json:"ranks"` // by rank in the stage
}

// Rank is one worker of a stage.
type Rank struct {
	Worker string `json:"worker"`
	Addr   string `json:"addr"`
}

// Assignment is one worker's part of a replica: what it loads and whom it
// talks to.
type Assignment struct {
	Generation  int64
	Model       string
	Quantize    string
	Compute     string
	Replica     int
	Stage       int
	PPSize      int
	LayersBegin int
	LayersEnd   int
	TPRank      int
	TPSize      int
	// EPRank and EPSize are set for an expert-parallel stage (EPSize > 1),
	// with the replica's expert table and its version.
	EPRank, EPSize int
	Experts        []int32
	ExpertsVersion int64
	// Peers are the addresses of the stage's ranks (including this one)
	// when the stage has more than one; NextStage the address of the same
	// rank in the next stage ("" in the last).
	Peers     []string
	NextStage string
	// Secret is the replica's Exchange secret (Replica.Secret).
	Secret string
}

// Decode parses a stored document.
func Decode(raw []byte, version int64) (*Placement, error) {
	var p Placement
	if err := json.Unmarshal(raw, &p); err != nil {
		return nil, fmt.Errorf("placement: %w", err)
	}
	p.Version = version
	return &p, nil
}

// Encode is the stored form of p.
func (p *Placement) Encode() []byte {
	raw, err := json.Marshal(p)
	if err != nil { // plain data: cannot happen
		panic(err)
	}
	return raw
}

// Assignment finds worker id's part in the replica of generation gen.
func (p *Placement) Assignment(id string, gen int64) (*Assignment, error) {
	for _, r := range p.Replicas {
		if r.Generation != gen {
			continue
		}
		for si, st := range r.Stages {
			for ri, rk := range st.Ranks {
				if rk.Worker != id {
					continue
				}
				a := &Assignment{Generation: gen, Model: p.Model, Quantize: p.Quantize, Compute: p.Compute, Replica: r.Index, Stage: si, PPSize: len(r.Stages),
					LayersBegin: st.LayersBegin, LayersEnd: st.LayersEnd, TPRank: ri, TPSize: len(st.Ranks), Secret: r.Secret}
				if r.EP > 1 {
					if r.TP < 1 || r.EP%r.TP != 0 || len(st.Ranks) != r.EP {
						return nil, fmt.Errorf("replica %d: stage %d has %d ranks for ep=%d tp=%d", r.Index, si, len(st.Ranks), r.EP, r.TP)
					}
					a.TPRank, a.TPSize, a.EPRank, a.EPSize = ri%r.TP, r.TP, ri, r.EP
					a.Experts, a.ExpertsVersion = r.Experts, r.ExpertsVersion
				}
				if len(st.Ranks) > 1 {
					for _, x := range st.Ranks {
						a.Peers = append(a.Peers, x.Addr)
					}
				}
				if si+1 < len(r.Stages) {
					next := r.Stages[si+1].Ranks
					if len(next) != len(st.Ranks) {
						return nil, fmt.Errorf("replica %d: stage %d has %d ranks, stage %d has %d", r.Index, si, len(st.Ranks), si+1, len(next))
					}
					a.NextStage = next[ri].Addr
				}
				return a, nil
			}
		}
		return nil, fmt.Errorf("worker %s is not in replica %d (generation %d)", id, r.Index, gen)
	}
	return nil, fmt.Errorf("placement version %d has no replica of generation %d", p.Version, gen)
}
