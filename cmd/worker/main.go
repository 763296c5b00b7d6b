// Command worker serves the internal worker API: it registers in etcd under
// a lease, joins gossip, and loads and runs the model its coordinator
// assigns.
//
//	worker --etcd-endpoints http://127.0.0.1:2379 [--listen 127.0.0.1:0] [--advertise HOST:PORT] [--threads N]
package main

import (
	"os"

	"github.com/qwenfleet/qwenfleet/pkg/server"
)

func main() { os.Exit(server.WorkerMain(os.Args[1:])) }
