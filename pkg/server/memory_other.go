//go:build !linux

package server

// machineMemory: only Linux has sysinfo(2), and this build does not ask
// other systems. 0 means unknown: the coordinator then does not let memory
// limit the plan (pkg/control). The worker flag --memory sets it by hand.
func machineMemory() int64 { return 0 }
