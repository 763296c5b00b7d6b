package server

import (
	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// assignmentOf reads worker id's assignment of generation gen from a stored
// placement document (pkg/cluster/schema), as the worker API's message.
func assignmentOf(raw []byte, version int64, id string, gen int64) (*workerv1.Assignment, error) {
	p, err := schema.Decode(raw, version)
	if err != nil {
		return nil, err
	}
	a, err := p.Assignment(id, gen)
	if err != nil {
		return nil, err
	}
	return &workerv1.Assignment{Version: a.Generation, Model: a.Model, Quantize: a.Quantize, Compute: a.Compute, Replica: int32(a.Replica),
		Stage: int32(a.Stage), PpSize: int32(a.PPSize), LayersBegin: int32(a.LayersBegin), LayersEnd: int32(a.LayersEnd),
		TpRank: int32(a.TPRank), TpSize: int32(a.TPSize), EpRank: int32(a.EPRank), EpSize: int32(a.EPSize),
		Experts: a.Experts, ExpertsVersion: a.ExpertsVersion, TpPeers: a.Peers, NextStage: a.NextStage, Secret: a.Secret}, nil
}
