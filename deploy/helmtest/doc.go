// Package helmtest checks the Helm chart in helm/qwenfleet without a Kubernetes cluster.
// It holds only tests:
//
//   - helm lint --strict and helm template of the chart and of every preset, with the helm
//     scripts/install-helm.sh installs into .bin/helm (installed on first use; the tests
//     skip, saying why, when it cannot be installed);
//   - every rendered manifest decoded strictly into the Kubernetes API types (k8s.io/api),
//     the CRD kinds (ServiceMonitor, cert-manager Certificate) into structs of the fields
//     the chart uses, then explicit assertions: selectors match labels, probes, resources,
//     restricted security contexts, the addresses, gossip port and node name each part is
//     given, the NetworkPolicies' flows evaluated pod to pod (gossip on its one port), the
//     certificate names against the names each part dials;
//   - TestCPUDemoInDocker: the images built (scripts/build-images.sh, every run), the
//     cpu-demo preset rendered with real certificates and run as docker containers (the
//     workloads' commands, environment, volumes and init containers; the Services' DNS
//     names as network aliases, a ClusterIP Service as a proxy to its ready pods; startup,
//     liveness and readiness probes as the kubelet runs them, every pod on one node), a
//     first Generate through the coordinator Service, the addresses the leader and the
//     workers are known by and gossip at, a worker's init containers run again over its
//     volume, then the worker StatefulSet scaled by one under a steady load (qwenctl bench
//     with --api-key-file), with no liveness failure and no gossip trouble in any log.
package helmtest
