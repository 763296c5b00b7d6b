// Command etcd is the real etcd server (go.etcd.io/etcd/server/v3/etcdmain), built from this
// module so that tests, compose files and images need no etcd download. It takes etcd's own
// flags and environment (ETCD_*), e.g.
//
//	etcd --name e0 --data-dir /var/lib/etcd \
//	  --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://etcd:2379
//
// The coordinator embeds an etcd of its own when it is given no --etcd-endpoints; this binary
// is for clusters that run etcd apart from the coordinators (three members for a cluster that
// survives the loss of one).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
