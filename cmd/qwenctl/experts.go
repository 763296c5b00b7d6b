package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// runExperts shows how the routed tokens of each expert-parallel replica
// fall on its ranks and, with --rebalance, has the coordinator re-place
// the experts from those counts (vLLM's and DeepSeek's expert-parallel
// load balancer, run on demand).
func runExperts(args []string) error {
	fs := newFlags("experts", "--addr HOST:PORT [--tls-dir DIR] [--api-key KEY | --api-key-file FILE] [--rebalance [--redundant N]] [--json]")
	addr := fs.String("addr", "127.0.0.1:50051", "coordinator address")
	sf := addSecurityFlags(fs)
	rebalance := fs.Bool("rebalance", false, "re-place the experts from the load since the last placement")
	redundant := fs.Int("redundant", -1, "extra expert slots per rank and layer for replicas of hot experts (-1: the coordinator's --redundant-experts)")
	asJSON := fs.Bool("json", false, "print the response as JSON")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this long")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *redundant < -1 {
		return usagef("--redundant: %d < -1", *redundant)
	}
	conn, client, err := dial(*addr, sf)
	if err != nil {
		return err
	}
	defer conn.Close()
	req := &pb.ExpertLoadRequest{Rebalance: *rebalance}
	if *redundant >= 0 {
		n := int32(*redundant)
		req.RedundantExperts = &n
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	resp, err := client.ExpertLoad(ctx, req)
	if err != nil {
		return rpcError(err)
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(resp)
	}
	if len(resp.Replicas) == 0 {
		fmt.Println("no expert-parallel replica is ready")
	}
	for _, r := range resp.Replicas {
		shares := make([]string, len(r.RankTokens))
		for i, v := range r.RankTokens {
			shares[i] = fmt.Sprintf("%.0f", v)
		}
		fmt.Printf("replica %d: ep=%d, experts v%d (%d per rank and layer), %d routed tokens since placed; per rank [%s]; imbalance %.3f (max/mean)\n",
			r.Index, r.Ep, r.ExpertsVersion, r.Slots, r.Tokens, strings.Join(shares, " "), r.Imbalance)
		if *rebalance {
			fmt.Printf("  re-placed: imbalance %.3f on the same load; experts read per worker %v\n", r.ImbalanceAfter, r.Loaded)
		}
	}
	return nil
}
