//go:build !linux

package supervise

import "syscall"

// sysProcAttr: only Linux has Pdeathsig. Elsewhere a child outlives a
// parent that is killed without stopping it; a qwenfleet worker then exits
// when its etcd lease ends or its own context does (see the package doc).
func sysProcAttr() *syscall.SysProcAttr { return nil }
