package server

import "syscall"

// machineMemory is the machine's RAM in bytes (sysinfo(2)), 0 if unknown.
// A CPU worker started without --memory-bytes reports it.
func machineMemory() int64 {
	var si syscall.Sysinfo_t
	if syscall.Sysinfo(&si) != nil {
		return 0
	}
	return int64(si.Totalram) * int64(si.Unit)
}
