// Command coordinator is the cluster's front door: the public gRPC API,
// continuous batching, KV block tables, sampling. With no flags it starts a
// whole local cluster: a demo model (made once under --data-dir), embedded
// etcd, and one local worker process (this binary re-executed in worker
// mode), serving on 127.0.0.1:50051.
//
//	coordinator [--listen 127.0.0.1:50051] [--model DIR] [--data-dir DIR] [--local-workers N] [--etcd-endpoints URLS]
package main

import (
	"os"

	"github.com/qwenfleet/qwenfleet/pkg/server"
)

func main() {
	if os.Getenv(server.RoleEnv) == "worker" {
		os.Exit(server.WorkerMain(os.Args[1:]))
	}
	os.Exit(server.CoordinatorMain(os.Args[1:]))
}
