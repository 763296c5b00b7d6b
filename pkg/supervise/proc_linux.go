package supervise

import "syscall"

// sysProcAttr has the kernel send the child SIGKILL when its parent dies,
// so a killed coordinator takes its local workers with it.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
