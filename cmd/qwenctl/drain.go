package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// runDrain takes a worker out of the cluster gracefully, like kubectl
// drain: its replica takes no new request, its running requests finish
// (or, after --timeout, move to other replicas), then the worker leaves
// etcd and exits 0. It waits until the worker is gone unless --no-wait.
func runDrain(args []string) error {
	fs := newFlags("drain", "[--addr HOST:PORT] [--tls-dir DIR] [--api-key KEY | --api-key-file FILE] [--timeout D] [--force] [--no-wait] WORKER_ID")
	addr := fs.String("addr", "127.0.0.1:50051", "coordinator address")
	sf := addSecurityFlags(fs)
	timeout := fs.Duration("timeout", 2*time.Minute, "how long the worker's replica may take to finish its requests before they move to other replicas")
	force := fs.Bool("force", false, "drain the last replica serving requests too (new requests then wait for another replica)")
	noWait := fs.Bool("no-wait", false, "return once the drain has started")
	// Flags may come before or after the worker id.
	if err := fs.Parse(args); err != nil {
		return parse(fs, args)
	}
	var ids []string
	for fs.NArg() > 0 {
		ids = append(ids, fs.Arg(0))
		if err := parse(fs, fs.Args()[1:]); err != nil {
			if _, ok := err.(usageError); !ok || fs.NArg() == 0 {
				return err
			}
			continue
		}
	}
	switch {
	case len(ids) == 0:
		return usagef("no WORKER_ID (qwenctl status lists them)")
	case len(ids) > 1:
		return usagef("one WORKER_ID, got %d: %s", len(ids), strings.Join(ids, " "))
	case *timeout <= 0:
		return usagef("--timeout: must be > 0")
	}
	id := ids[0]
	conn, client, err := dial(*addr, sf)
	if err != nil {
		return err
	}
	defer conn.Close()
	secs := timeout.Seconds()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	resp, err := client.Drain(ctx, &pb.DrainRequest{WorkerId: id, TimeoutSeconds: &secs, Force: *force})
	cancel()
	if err != nil {
		if status.Code(err) == codes.FailedPrecondition && !*force {
			return fmt.Errorf("%v (qwenctl drain --force drains it anyway)", rpcError(err))
		}
		return rpcError(err)
	}
	t0 := time.Now()
	if resp.Replica != "" {
		fmt.Printf("worker %s: replica %s (workers %s) takes no new requests; its running requests finish, or move after %s\n",
			id, resp.Replica, strings.Join(resp.ReplicaWorkers, ","), *timeout)
	} else {
		fmt.Printf("worker %s serves in no replica: it leaves now\n", id)
	}
	if *noWait {
		return nil
	}
	// The worker leaves etcd once its replica is released: wait for that.
	limit := time.Now().Add(*timeout + time.Minute)
	for time.Now().Before(limit) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		info, err := client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		cancel()
		if err == nil {
			found := false
			for _, w := range info.Workers {
				found = found || w.Id == id
			}
			if !found {
				fmt.Printf("worker %s drained and left in %.1fs\n", id, time.Since(t0).Seconds())
				return nil
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("worker %s still registered %s after its drain started (qwenctl status shows its state)", id, time.Since(t0).Round(time.Second))
}
